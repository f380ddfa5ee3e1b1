"""Retry decisions and deadlines, sans-IO: facts and `now` in, decisions out.

Conditions (Envoy's retry_on):
  5xx              any 5xx response, or no response at all (connect failure, reset,
                   per-try timeout)
  gateway-error    502, 503 or 504 responses, or no response at all
  reset            no response at all: the connection closed or reset, or the per-try
                   timeout fired (Envoy counts the latter as a reset)
  connect-failure  the connection could not be made (refused, connect timeout)
  retriable-4xx    409
  refused-stream   an HTTP/2 REFUSED_STREAM (HTTP/1.1 upstreams never send one)
  retriable-status-codes  a status listed in retriable_status_codes
Only the retry policy decides; errors only say what happened (protocol.errors).

Deadlines: `grpc-timeout` (gRPC over HTTP/2 spec: 1-8 digits and a unit H M S m u n) and
`x-meshproxy-deadline-ms` (a whole number of milliseconds) bound a request when shorter
than the route timeout. The upstream request carries what is left of the budget, so it
shrinks hop by hop.
"""

from __future__ import annotations

import re

from meshproxy.config.snapshot import (
    RETRY_4XX,
    RETRY_5XX,
    RETRY_CONNECT,
    RETRY_GATEWAY,
    RETRY_REFUSED,
    RETRY_RESET,
    RETRY_STATUS,
    RetrySpec,
)
from meshproxy.protocol.errors import CONNECT_FAILURE, REFUSED

DEADLINE_HEADER = b"x-meshproxy-deadline-ms"
GRPC_TIMEOUT = b"grpc-timeout"


def retriable_status(spec: RetrySpec, status: int) -> bool:
    c = spec.conditions
    if status >= 500 and c & RETRY_5XX:
        return True
    if status in (502, 503, 504) and c & RETRY_GATEWAY:
        return True
    if status == 409 and c & RETRY_4XX:
        return True
    return bool(c & RETRY_STATUS) and status in spec.statuses


def retriable_failure(spec: RetrySpec, failure: str) -> bool:
    """An attempt that got no response (connect failure, reset, per-try timeout)."""
    c = spec.conditions
    if c & (RETRY_5XX | RETRY_GATEWAY):
        return True
    if failure == CONNECT_FAILURE:
        return bool(c & (RETRY_CONNECT | RETRY_RESET))
    if failure == REFUSED:
        return bool(c & (RETRY_REFUSED | RETRY_RESET))
    return bool(c & RETRY_RESET)


def backoff(spec: RetrySpec, retry: int, draw: float) -> float:
    """Seconds to wait before retry number `retry` (1-based): full jitter over an
    exponentially growing interval, capped at max_interval."""
    ceiling = min(spec.max_interval, spec.base_interval * (2 ** (retry - 1)))
    return draw * ceiling


_GRPC = re.compile(rb"^(\d{1,8})([HMSmun])$")
_GRPC_UNIT = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_grpc_timeout(value: bytes) -> float | None:
    m = _GRPC.match(value.strip())
    if m is None:
        return None
    return int(m.group(1)) * _GRPC_UNIT[m.group(2)]


def parse_deadline_ms(value: bytes) -> float | None:
    v = value.strip()
    if not v.isdigit() or len(v) > 10:
        return None
    return int(v) / 1000.0


def format_grpc_timeout(seconds: float) -> bytes:
    """The remaining budget in the finest unit that keeps it within the 8 digits the gRPC
    spec allows (TimeoutValue = 1*8DIGIT); a client's 99999999H stays 99999999H."""
    ms = max(0, int(seconds * 1000))
    if ms < 100_000_000:
        return b"%dm" % ms
    for unit, size in ((b"S", 1), (b"M", 60), (b"H", 3600)):
        n = int(seconds // size)
        if n < 100_000_000:
            return b"%d%s" % (n, unit)
    return b"99999999H"


def format_deadline_ms(seconds: float) -> bytes:
    return b"%d" % max(0, int(seconds * 1000))
