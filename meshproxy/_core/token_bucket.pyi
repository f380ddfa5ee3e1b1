"""Type stubs for meshproxy._core.token_bucket (GCRA token buckets in shared memory)."""

from typing import Any

def now_ns() -> int: ...
def cells_needed(nkeys: int) -> int: ...

class TokenBuckets:
    max_tokens: int
    remaining: int
    reset: float
    def __init__(
        self, buf: Any, offset_cells: int, nkeys: int, max_tokens: int, tokens_per_second: float
    ) -> None: ...
    def take(self, key: int = 0, now: int = -1) -> bool: ...
