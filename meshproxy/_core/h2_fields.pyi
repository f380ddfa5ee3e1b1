"""Type stubs for meshproxy._core.h2_fields (h2's inbound field checks, compiled)."""

from collections.abc import Iterable
from typing import Any

from meshproxy._core.http1_parser import MessageHead

def normalize_inbound_headers(headers: Iterable[Any], flags: Any) -> list[Any]: ...
def validate_headers(headers: Iterable[Any], flags: Any) -> list[Any]: ...

BODY_AS_IS: int
BODY_CHUNKED: int
BODY_TUNNEL: int

def request_head(fields: list[tuple[bytes, bytes]], end_stream: bool
                 ) -> tuple[bytes, int, frozenset[tuple[bytes, bytes]] | None]: ...
def response_fields(status: int, resp: MessageHead, base: frozenset[bytes],
                    skip: frozenset[bytes], add: tuple[tuple[bytes, bytes], ...],
                    extra: list[tuple[bytes, bytes]] | None, length: int,
                    never: frozenset[tuple[bytes, bytes]] | None
                    ) -> list[tuple[bytes, bytes]]: ...
