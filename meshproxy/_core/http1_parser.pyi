"""Type stubs for meshproxy._core.http1_parser (see the .pyx for the theory)."""

from collections.abc import Container

class ParseError(Exception):
    status: int
    reason: str
    def __init__(self, status: int, reason: str) -> None: ...

class MessageHead:
    method: bytes
    target: bytes
    status: int
    reason: bytes
    version: int
    headers: list[tuple[bytes, bytes]]
    end: int
    content_length: int
    chunked: bool
    te_count: int
    te_invalid: bool
    te_ends_chunked: bool
    conn_close: bool
    conn_keep_alive: bool
    conn_upgrade: bool
    conn_extra: list[bytes] | None
    host: bytes | None
    host_count: int
    expect_continue: bool
    upgrade: bytes | None
    request_id: bytes | None
    forwarded_for: bytes | None
    grpc_timeout: bytes | None
    deadline_ms: bytes | None
    @property
    def keep_alive(self) -> bool: ...
    def get(self, name: bytes, default: bytes | None = None) -> bytes | None: ...
    def get_all(self, name: bytes) -> list[bytes]: ...

class HeadParser:
    max_request_line: int
    max_header_bytes: int
    max_headers: int
    def __init__(
        self, max_request_line: int = 8192, max_header_bytes: int = 61440, max_headers: int = 100
    ) -> None: ...
    def parse_request(self, data: bytes, start: int = 0) -> MessageHead | None: ...
    def parse_response(self, data: bytes, start: int = 0) -> MessageHead | None: ...

class ChunkedDecoder:
    trailers: list[tuple[bytes, bytes]]
    def __init__(self, max_trailer_bytes: int = 61440, error_status: int = 400) -> None: ...
    @property
    def done(self) -> bool: ...
    def feed(self, data: bytes, start: int = 0) -> tuple[list[bytes], int]: ...

def encode_chunk(data: bytes) -> bytes: ...
def encode_last_chunk(trailers: list[tuple[bytes, bytes]] | None = None) -> bytes: ...
def serialize_head(
    first_line: bytes,
    headers: list[tuple[bytes, bytes]],
    skip: Container[bytes],
    extra: list[tuple[bytes, bytes]],
) -> bytes: ...
