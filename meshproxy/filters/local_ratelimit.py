"""Local rate limiting (Envoy's local_ratelimit filter): token buckets per route or virtual
host, optionally one per descriptor value, for the whole worker pool.

The buckets are GCRA cells in a shared-memory table (`_core.token_bucket`): every worker
takes from the same buckets with a compare-and-swap, so the configured rate is the pool's,
not each worker's. The supervisor assigns each limiter its table by name (listener,
virtual host, route, table size), so a reload that keeps a limiter keeps its state.

A request over the limit gets 429 with flag RL, Envoy's body `local_rate_limited` and
`x-envoy-ratelimited`; with response_headers on, every response of the limited route says
x-ratelimit-limit ("<max>, <max>;w=<seconds>", draft-ietf-httpapi-ratelimit-headers-03 as
Envoy writes it), x-ratelimit-remaining and x-ratelimit-reset (seconds until the bucket is
full again, or until the next token when refused).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshproxy._core.lb_select import hash_bytes
from meshproxy._core.token_bucket import TokenBuckets, cells_needed

# Where a limiter's table lives: (buffer, offset in int64 cells) for a name and cell count.
Memory = Callable[[str, int], tuple[Any, int]]


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    name: str          # the shared table's name (stable across reloads)
    max_tokens: int
    per_second: float  # tokens_per_fill / fill_interval
    window: float      # fill_interval, seconds (for x-ratelimit-limit)
    key: str           # "", "header", "source_principal", "remote_address"
    header: bytes      # for key == "header"
    nkeys: int
    response_headers: bool

    @property
    def cells(self) -> int:
        return cells_needed(self.nkeys)


def private_memory(name: str, cells: int) -> tuple[Any, int]:
    """A table in this process only (tests, `meshproxy demo`, one worker)."""
    return bytearray(cells * 8), 0


class LocalRateLimiter:
    __slots__ = ("spec", "buckets", "limit_header")

    def __init__(self, spec: RateLimitSpec, memory: Memory) -> None:
        buf, offset = memory(spec.name, spec.cells)
        self.spec = spec
        self.buckets = TokenBuckets(buf, offset, spec.nkeys, spec.max_tokens, spec.per_second)
        window = spec.window
        shown = int(window) if window == int(window) else window
        self.limit_header = (b"x-ratelimit-limit",
                             b"%d, %d;w=%s" % (spec.max_tokens, spec.max_tokens,
                                                str(shown).encode()))

    def key(self, head: Any, peer_ip: bytes, principal: bytes | None) -> int:
        kind = self.spec.key
        if not kind:
            return 0
        if kind == "header":
            value = head.get(self.spec.header) or b""
        elif kind == "remote_address":
            value = peer_ip
        else:
            value = principal or b""
        return hash_bytes(value)

    def take(self, key: int) -> tuple[bool, list[tuple[bytes, bytes]]]:
        """(allowed, response headers to add)."""
        b = self.buckets
        ok = b.take(key)
        if not self.spec.response_headers:
            return ok, []
        return ok, [self.limit_header,
                    (b"x-ratelimit-remaining", b"%d" % b.remaining),
                    (b"x-ratelimit-reset", b"%d" % math.ceil(b.reset))]
