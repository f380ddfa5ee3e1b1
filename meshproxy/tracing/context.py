"""Trace context propagation, sans-IO: W3C Trace Context and B3 (single and multi header).

Incoming precedence: `traceparent` (W3C), then `b3` (single header), then `x-b3-*`.
A malformed header is ignored (the request starts a new trace), never an error: tracing
must not break traffic.

The proxy's span is a child of the incoming context (same trace id, parent = the incoming
span id) or the root of a new trace. Upstream gets the proxy's span as parent, in W3C form
always and, when the request came with B3, in the same B3 form too, so that B3-only
services keep their traces. `tracestate` passes through unchanged (W3C section 3.3).

Sampling is decided at the head: an incoming sampled flag wins (W3C flags bit 0; B3
`1`/`0`/`d`, where `d` is debug and means sampled); otherwise a draw against the configured
rate. An unsampled request is still propagated, with the flag off, and records nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

_HEX32 = re.compile(rb"^[0-9a-f]{32}$")
_HEX16 = re.compile(rb"^[0-9a-f]{16}$")
_ZERO32 = b"0" * 32
_ZERO16 = b"0" * 16

W3C, B3_SINGLE, B3_MULTI, NONE = "w3c", "b3", "b3multi", "none"

# Header names the proxy rewrites when tracing is on (tracestate passes through).
PROPAGATION_HEADERS = frozenset({b"traceparent", b"b3", b"x-b3-traceid", b"x-b3-spanid",
                                 b"x-b3-parentspanid", b"x-b3-sampled", b"x-b3-flags"})

_BLOCK = 4096
_pool = b""
_pos = _BLOCK


def random_hex(nbytes: int) -> bytes:
    """Random ids from the OS, drawn in blocks (no syscall per id); never all zeros, which
    W3C and B3 reserve as invalid."""
    global _pool, _pos
    while True:
        if _pos + nbytes > _BLOCK:
            _pool, _pos = os.urandom(_BLOCK), 0
        raw = _pool[_pos:_pos + nbytes]
        _pos += nbytes
        if any(raw):
            return raw.hex().encode("ascii")


def _reset_after_fork() -> None:
    global _pos
    _pos = _BLOCK


os.register_at_fork(after_in_child=_reset_after_fork)


class Incoming:
    """What the request carried: trace and parent ids (or None), the sampled flag (True,
    False or None for 'not decided'), and which format it came in."""

    __slots__ = ("trace_id", "parent_id", "sampled", "fmt")

    def __init__(self, trace_id: bytes | None = None, parent_id: bytes | None = None,
                 sampled: bool | None = None, fmt: str = NONE) -> None:
        self.trace_id = trace_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.fmt = fmt


def parse_traceparent(value: bytes) -> Incoming | None:
    """version-traceid-parentid-flags (W3C Trace Context section 3.2)."""
    parts = value.strip().lower().split(b"-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == b"ff":
        return None
    version, trace_id, parent_id, flags = parts[:4]
    if version == b"00" and len(parts) != 4:
        return None
    if not (_HEX32.match(trace_id) and _HEX16.match(parent_id)) or len(flags) != 2:
        return None
    if trace_id == _ZERO32 or parent_id == _ZERO16:
        return None
    try:
        sampled = bool(int(flags, 16) & 1)
    except ValueError:
        return None
    return Incoming(trace_id, parent_id, sampled, W3C)


def _b3_sampled(v: bytes) -> bool | None:
    if v in (b"1", b"d", b"true"):
        return True
    if v in (b"0", b"false"):
        return False
    return None


def parse_b3_single(value: bytes) -> Incoming | None:
    """b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]], or just the sampling
    state (`0`, `1`, `d`)."""
    parts = value.strip().lower().split(b"-")
    if len(parts) == 1:
        sampled = _b3_sampled(parts[0])
        return Incoming(None, None, sampled, B3_SINGLE) if sampled is not None else None
    trace_id, span_id = parts[0], parts[1]
    if len(trace_id) == 16:
        trace_id = b"0" * 16 + trace_id  # 64-bit B3 trace ids are left-padded
    if not (_HEX32.match(trace_id) and _HEX16.match(span_id)):
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    return Incoming(trace_id, span_id, sampled, B3_SINGLE)


def parse_b3_multi(trace_id: bytes | None, span_id: bytes | None, sampled: bytes | None,
                   flags: bytes | None) -> Incoming | None:
    decided = True if flags == b"1" else (_b3_sampled(sampled.lower()) if sampled else None)
    if trace_id is None or span_id is None:
        return Incoming(None, None, decided, B3_MULTI) if decided is not None else None
    trace_id, span_id = trace_id.lower(), span_id.lower()
    if len(trace_id) == 16:
        trace_id = b"0" * 16 + trace_id
    if not (_HEX32.match(trace_id) and _HEX16.match(span_id)):
        return None
    return Incoming(trace_id, span_id, decided, B3_MULTI)


def extract(get: Callable[[bytes], bytes | None]) -> Incoming:
    """The incoming context from a header getter (name -> first value or None)."""
    value = get(b"traceparent")
    if value is not None:
        got = parse_traceparent(value)
        if got is not None:
            return got
    value = get(b"b3")
    if value is not None:
        got = parse_b3_single(value)
        if got is not None:
            return got
    tid, sampled, flags = get(b"x-b3-traceid"), get(b"x-b3-sampled"), get(b"x-b3-flags")
    if tid is not None or sampled is not None or flags is not None:
        got = parse_b3_multi(tid, get(b"x-b3-spanid"), sampled, flags)
        if got is not None:
            return got
    return Incoming()


def decide(incoming: Incoming, rate: float, draw: float) -> bool:
    """Head sampling: the incoming decision if there is one, else draw < rate (0..1)."""
    if incoming.sampled is not None:
        return incoming.sampled
    return draw < rate


def outgoing(trace_id: bytes, span_id: bytes, parent_id: bytes | None, sampled: bool,
             fmt: str) -> list[tuple[bytes, bytes]]:
    """Headers that make the proxy's span the parent of the upstream's."""
    flag = b"01" if sampled else b"00"
    out = [(b"traceparent", b"00-" + trace_id + b"-" + span_id + b"-" + flag)]
    s = b"1" if sampled else b"0"
    if fmt == B3_SINGLE:
        out.append((b"b3", trace_id + b"-" + span_id + b"-" + s
                    + (b"-" + parent_id if parent_id else b"")))
    elif fmt == B3_MULTI:
        out += [(b"x-b3-traceid", trace_id), (b"x-b3-spanid", span_id), (b"x-b3-sampled", s)]
        if parent_id:
            out.append((b"x-b3-parentspanid", parent_id))
    return out
