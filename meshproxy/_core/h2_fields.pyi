"""Type stubs for meshproxy._core.h2_fields (h2's inbound field checks, compiled)."""

from collections.abc import Iterable
from typing import Any

def normalize_inbound_headers(headers: Iterable[Any], flags: Any) -> list[Any]: ...
def validate_headers(headers: Iterable[Any], flags: Any) -> list[Any]: ...
