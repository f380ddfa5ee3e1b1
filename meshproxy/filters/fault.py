"""Fault injection: Envoy's HTTP fault filter (envoy.filters.http.fault), Istio's
HTTPFaultInjection. Sans-IO: `decide` takes the request's fields and two uniform draws and
returns what to inject; the caller (proxy.fault_delay, proxy.filter_chain) waits and
answers.

Per route (config.schema.Fault):
- `delay`: a fixed delay (`fixed_delay`) for `percentage` of the requests; with
  `header_delay`, a request's own `x-envoy-fault-delay-request` (milliseconds) is its
  delay instead, for `x-envoy-fault-delay-request-percentage` of the requests when sent;
- `abort`: an HTTP status (`http_status`) or a gRPC status (`grpc_status`) for
  `percentage` of the requests; with `header_abort`, `x-envoy-fault-abort-request` (an
  HTTP status) or `x-envoy-fault-abort-grpc-request` (a gRPC status) from the request,
  for `x-envoy-fault-abort-request-percentage` of them when sent;
- a header's percentage is capped by the configured one (Envoy: the configured
  percentage is the most the header can ask for); a header that does not parse, or is out
  of range, injects nothing;
- `max_active_faults`: a request that would be faulted while that many faults are active
  in the whole proxy (every worker: the listener's fault.active_faults gauges summed) is
  served without one, counted as fault.faults_overflow.
Order (Envoy's): the delay, then the abort; a request both delayed and aborted waits, then
gets the abort. Response flags: DI for a delay, FI for an abort. Stats (Envoy's, per
listener): http.<listener>.fault.delays_injected, aborts_injected, active_faults,
faults_overflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DELAY_HEADER = b"x-envoy-fault-delay-request"
DELAY_PERCENTAGE_HEADER = b"x-envoy-fault-delay-request-percentage"
ABORT_HEADER = b"x-envoy-fault-abort-request"
ABORT_GRPC_HEADER = b"x-envoy-fault-abort-grpc-request"
ABORT_PERCENTAGE_HEADER = b"x-envoy-fault-abort-request-percentage"
ABORT_BODY = b"fault filter abort"
# A header's delay is bounded like a configured one (config.schema.FaultDelay): an hour.
MAX_HEADER_DELAY_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """A route's fault configuration, compiled (config.compile): seconds and fractions."""

    delay: float | None            # fixed delay, seconds; None: no fixed delay
    delay_fraction: float          # of the requests, 0..1
    header_delay: bool
    abort_status: int              # HTTP status, 0: none
    abort_grpc: int                # gRPC status, -1: none
    abort_fraction: float
    header_abort: bool
    max_active: int                # -1: no limit


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float       # seconds, 0: none
    status: int        # HTTP status of the abort, 0: none
    grpc_status: int   # gRPC status of the abort, -1: none (an HTTP status, mapped)

    @property
    def aborts(self) -> bool:
        return bool(self.status) or self.grpc_status >= 0


NONE = FaultDecision(0.0, 0, -1)


def _number(value: bytes | None) -> int | None:
    if value is None or not value.isdigit() or len(value) > 9:
        return None
    return int(value)


def _fraction(head: Any, name: bytes, configured: float) -> float:
    """The share a percentage header asks for, capped by the configured one."""
    asked = _number(head.get(name))
    if asked is None:
        return configured
    return min(asked / 100.0, configured)


class FaultPolicy:
    """One route's faults, built once per snapshot (config.compile)."""

    __slots__ = ("spec",)

    def __init__(self, spec: FaultSpec) -> None:
        self.spec = spec

    def decide(self, head: Any, delay_draw: float, abort_draw: float) -> FaultDecision:
        """What to inject into this request; the draws are uniform in [0, 1)."""
        spec = self.spec
        delay = 0.0
        if spec.header_delay and head.get(DELAY_HEADER) is not None:
            ms = _number(head.get(DELAY_HEADER))
            if ms is not None and ms <= MAX_HEADER_DELAY_MS and delay_draw < _fraction(
                    head, DELAY_PERCENTAGE_HEADER, spec.delay_fraction):
                delay = ms / 1000.0
        elif spec.delay is not None and delay_draw < spec.delay_fraction:
            delay = spec.delay
        status, grpc = 0, -1
        if spec.header_abort and (head.get(ABORT_HEADER) is not None
                                  or head.get(ABORT_GRPC_HEADER) is not None):
            if abort_draw < _fraction(head, ABORT_PERCENTAGE_HEADER, spec.abort_fraction):
                asked = _number(head.get(ABORT_HEADER))
                if asked is not None and 200 <= asked <= 599:
                    status = asked
                else:
                    asked = _number(head.get(ABORT_GRPC_HEADER))
                    if asked is not None and asked <= 16:
                        grpc = asked
        elif (spec.abort_status or spec.abort_grpc >= 0) and abort_draw < spec.abort_fraction:
            status, grpc = spec.abort_status, spec.abort_grpc
        if not delay and not status and grpc < 0:
            return NONE
        return FaultDecision(delay, status, grpc)
