"""One request and its response: the per-request state, and its end.

`begin` counts a request in; `finish` is the logging phase (pingora's `logging`): the
listener's stats, the span and the access log line, run exactly once per request however
it ended (answered, refused, timed out, or the client gone), and never again.
"""

from __future__ import annotations

import time
from time import perf_counter
from typing import Any

from meshproxy._core.http1_parser import MessageHead
from meshproxy.protocol import errors as flags
from meshproxy.protocol.grpc import STATUS_COUNT, is_call
from meshproxy.proxy.access_log import text
from meshproxy.proxy.client_side import ClientSide
from meshproxy.tracing.tracer import Active, Tracer


class Exchange:
    """One request and its response, as the access log and the error paths see it."""

    __slots__ = ("head", "method", "target", "host", "start", "wall_start", "status", "flags",
                 "bytes_in", "bytes_out", "upstream_host", "request_id", "response_started",
                 "upstream_status", "trace", "cluster", "details", "resp_extra", "logged",
                 "grpc", "grpc_status", "fault_flag", "fault_delay", "python")

    def __init__(self, head: MessageHead | None, start: float) -> None:
        self.head = head
        self.method = head.method if head is not None else b"-"
        self.target = head.target if head is not None else b"-"
        self.host = b""
        self.start = start
        self.wall_start = 0.0
        self.status = 0
        self.flags = "-"
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_host = "-"
        self.grpc = False  # a gRPC call (protocol.grpc): answered and counted as one
        self.grpc_status = -1  # the status it ended with (-1: none seen)
        self.request_id: bytes | None = None
        self.response_started = False
        self.upstream_status = 0
        self.trace: Active | None = None
        self.cluster = "-"
        self.details = "-"  # why it failed, for the log (Envoy's response code details)
        # Headers every response to this request carries (x-ratelimit-*).
        self.resp_extra: list[tuple[bytes, bytes]] | None = None
        self.logged = False  # finish() has run
        # A fault filter's delay (filters.fault): DI before the flags that followed it, and
        # the seconds it took, which the route's timeout no longer has.
        self.fault_flag = ""
        self.fault_delay = 0.0
        # The request's Python filters (proxy.python_filters.PyExchange), or None.
        self.python: Any = None


class BodyState:
    """How far the request body got, and a copy of what was sent upstream for replay
    while it fits the retry buffer (None once it does not, or when retries are off).
    `tap`: who else gets the body as it passes (proxy.mirror's shadows: `feed(data)` per
    piece, `end()` once it is whole), or None."""

    __slots__ = ("started", "_done", "replay", "size", "limit", "timer_started", "trailers",
                 "tap")

    def __init__(self, limit: int, tap: Any = None) -> None:
        self.started = False
        self._done = False
        self.tap = tap
        self.timer_started = False  # the route timeout runs (once per request)
        self.replay: list[bytes] | None = [] if limit > 0 else None
        self.size = 0
        self.limit = limit
        # An HTTP/2 origin's request trailers, replayed with the body (an HTTP/1.1 one's
        # are part of the chunked bytes kept).
        self.trailers: list[tuple[bytes, bytes]] = []

    @property
    def done(self) -> bool:
        return self._done

    @done.setter
    def done(self, value: bool) -> None:
        if value and not self._done and self.tap is not None:
            self.tap.end()
        self._done = value

    def keep(self, data: bytes) -> None:
        if self.tap is not None and data:
            self.tap.feed(data)
        if self.replay is not None:
            self.size += len(data)
            if self.size > self.limit:
                self.replay = None  # too big to replay: this request will not be retried
            else:
                self.replay.append(data)


def begin(side: ClientSide, head: MessageHead | None) -> Exchange:
    """A new request on `side` (head None: one that broke before its head was whole)."""
    ctx = side.ctx
    ex = Exchange(head, perf_counter())
    if side.multiplexed and head is not None and is_call(head):
        ex.grpc = True
    if ctx.logger is not None:
        ex.wall_start = time.time()
    if ctx.tracer is not None and head is not None:
        ex.trace = ctx.tracer.start(head.get)
    hs, ws = ctx.hstats, ctx.state.stats
    blk = hs.block
    blk.inc(hs.downstream_rq_total)
    blk.add(hs.downstream_rq_active, 1)
    blk.inc(ws.downstream_rq_total)
    return ex


def finish(side: ClientSide, ex: Exchange) -> None:
    """Count and log a request once, whichever way it ended."""
    if ex.logged:
        return
    ex.logged = True
    ctx = side.ctx
    hs = ctx.hstats
    blk = hs.block
    blk.add(hs.downstream_rq_active, -1)
    if ex.fault_flag:
        ex.flags = ex.fault_flag if ex.flags == "-" else ex.fault_flag + "," + ex.flags
    status = ex.status
    if 100 <= status < 600:
        blk.inc(hs.downstream_rq_1xx + status // 100 - 1)
    flag = ex.flags
    if flag == flags.NO_ROUTE:
        blk.inc(hs.no_route)
    elif flag == flags.STREAM_IDLE_TIMEOUT:
        blk.inc(hs.downstream_rq_timeout)
    elif flag == flags.DOWNSTREAM_CONNECTION_TERMINATION:
        blk.inc(hs.downstream_rq_rx_reset)
    if ex.grpc:
        _count_call(ctx, ex)
    elapsed_ms = (perf_counter() - ex.start) * 1000.0
    blk.observe(hs.downstream_rq_time, elapsed_ms)
    if ex.trace is not None and ex.trace.sampled and ctx.tracer is not None:
        _span(side, ctx.tracer, ex)
    if ctx.logger is not None:
        _log(side, ex, int(elapsed_ms))
    if ex.python is not None:
        ex.python.log()  # the Python filters' log phase (proxy.python_filters)


def _count_call(ctx: Any, ex: Exchange) -> None:
    """Per-call stats by gRPC status (Envoy's grpc_stats names, without the per-method
    part): the listener's, and the cluster's when the call was routed to one. A call that
    ended without a status (reset, or an answer that never said) counts as none."""
    code = ex.grpc_status
    scopes = [ctx.hstats]
    cluster = ctx.clusters.get(ex.cluster) if ex.cluster else None
    if cluster is not None:
        scopes.append(cluster.stats)
    for st in scopes:
        blk = st.block
        blk.inc(st.grpc_total)
        if code == 0:
            blk.inc(st.grpc_success)
        else:
            blk.inc(st.grpc_failure)
        if 0 <= code < STATUS_COUNT:
            blk.inc(st.grpc_0 + code)


def protocol(side: ClientSide, head: MessageHead | None) -> bytes:
    """The request's protocol as the access log and spans name it."""
    if side.protocol is not None:
        return side.protocol
    return b"HTTP/1.0" if head is not None and head.version == 10 else b"HTTP/1.1"


def _span(side: ClientSide, tracer: Tracer, ex: Exchange) -> None:
    """Envoy's span tags for this request."""
    head = ex.head
    host = text(ex.host or (head.host if head is not None else None))
    peer = side.peer
    tags = {
        "component": "proxy",
        "http.method": text(ex.method),
        "http.url": f"{side.ctx.scheme.decode()}://{host}{text(ex.target)}",
        "http.protocol": protocol(side, head).decode(),
        "http.status_code": str(ex.status),
        "response_flags": ex.flags,
        "upstream_cluster": ex.cluster,
        "upstream_address": ex.upstream_host,
        "request_size": str(ex.bytes_in),
        "response_size": str(ex.bytes_out),
        "downstream_address": peer[0] if peer else "-",
        "guid:x-request-id": text(ex.request_id
                                  or (head.request_id if head is not None else None)),
        "user_agent": text(head.get(b"user-agent") if head is not None else None),
    }
    error = ex.status >= 500 or ex.status == 0 or ex.flags != "-"
    assert ex.trace is not None
    tracer.finish(ex.trace, text(ex.method), tags, error)


def _log(side: ClientSide, ex: Exchange, duration_ms: int) -> None:
    logger = side.ctx.logger
    assert logger is not None
    head = ex.head
    identity = side.identity
    if head is None:
        logger.log_request(
            ex.wall_start or time.time(), ex.method, ex.target, protocol(side, None), ex.status,
            ex.flags, ex.bytes_in, ex.bytes_out, duration_ms, ex.upstream_host,
            ex.request_id, side.remote(), ex.host or None, None, None,
            identity.spiffe_id or "-" if identity else "-", ex.details)
        return
    logger.log_request(
        ex.wall_start or time.time(), ex.method, ex.target, protocol(side, head),
        ex.status, ex.flags,
        ex.bytes_in, ex.bytes_out, duration_ms, ex.upstream_host,
        ex.request_id or head.request_id, side.remote(), ex.host or head.host,
        head.get(b"user-agent"), head.forwarded_for,
        identity.spiffe_id or "-" if identity else "-", ex.details, ex.grpc_status)
