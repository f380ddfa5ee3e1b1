"""Type stubs for meshproxy._core.hpack (RFC 7541 header compression, compiled)."""

from collections.abc import Iterable

class Decoder:
    max_header_list_size: int
    max_allowed_table_size: int
    header_table_size: int
    def __init__(self, max_header_list_size: int = 65536) -> None: ...
    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]: ...

class Encoder:
    header_table_size: int
    def __init__(self) -> None: ...
    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes: ...
