"""One attempt's bookkeeping, shared by the router and the fast path (proxy.fast_path):
counting an attempt in and out (Envoy's upstream_rq_* and the breaker's max_requests), the
reply to a request that failed before its response began, and `Resume`, where the fast
path hands a request it began to the router.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

from meshproxy._core.http1_parser import MessageHead
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import ProxyError
from meshproxy.proxy.exchange import BodyState, Exchange
from meshproxy.proxy.local_reply import LocalReply
from meshproxy.upstream.cluster_manager import Cluster
from meshproxy.upstream.conn_pool import Endpoint, UpstreamConn

OVERLOADED = (b"x-envoy-overloaded", b"true")


class Resume:
    """Where the fast path (proxy.fast_path) hands a request to a task, and how far it got:
    it chose `cluster` and picked `ep`; with `opened`, its first attempt is counted in
    (open_attempt: `lb`, `lb_index`, `started`) and `state` says what of the body went
    upstream, and then exactly one of: `stale` (the reused connection was found closed
    before any response byte: the attempt goes on on another one), `resp` (the final
    response head, read from `conn` with `ubuf`), `ubuf` alone (the start of a response
    from `conn`, an interim 1xx first: the head is read on, within the per-try
    `deadline`, after the `unsent` end of the request: bytes for the wire, ciphertext
    on a TLS connection), or `error` (the attempt failed)."""

    __slots__ = ("cluster", "ep", "key", "opened", "lb", "lb_index", "started", "state",
                 "stale", "resp", "ubuf", "conn", "error", "deadline", "unsent")

    def __init__(self, cluster: Cluster, ep: Endpoint, key: int) -> None:
        self.cluster = cluster
        self.ep = ep
        self.key = key
        self.opened = False
        self.lb: Any = None
        self.lb_index = 0
        self.started = 0.0
        self.state: BodyState | None = None
        self.stale = False
        self.resp: MessageHead | None = None
        self.ubuf = b""
        self.conn: UpstreamConn | None = None
        self.error: ProxyError | None = None
        self.deadline = 0.0
        self.unsent = b""


def overflow() -> ProxyError:
    return ProxyError(503, flags.UPSTREAM_OVERFLOW, "upstream",
                      "upstream overflow: max_requests reached")


def failure_reply(ex: Exchange, err: ProxyError, close: bool, body_done: bool) -> LocalReply:
    """The reply to a request that failed before its response began (Envoy adds
    x-envoy-overloaded to an overflow's 503)."""
    ex.flags = err.flag
    ex.details = err.detail
    extra = [OVERLOADED] if err.flag == flags.UPSTREAM_OVERFLOW else None
    return LocalReply(err.status, err.detail.encode() + b"\n", err.flag, close=close,
                      body_done=body_done, extra=extra)


def open_attempt(cluster: Cluster, ep: Endpoint, n: int, now: float) -> bool:
    """Count attempt n in once the breaker's max_requests admits it (upstream_rq_total and
    _active, the endpoint's, the balancer's outstanding request); False, counted as
    upstream_rq_pending_overflow, when it does not. A retry's max_retries slot was
    reserved by _admit_retry; refused here, it is given back."""
    cst, est = cluster.stats, ep.stats
    blk = cst.block
    breaker = cluster.breaker
    if not breaker.try_request():
        if n > 1:
            breaker.end_retry()  # the reserved retry will not run
            cluster.publish_retries()
        blk.inc(cst.upstream_rq_pending_overflow)
        return False
    cluster.publish_requests()
    blk.inc(cst.upstream_rq_total)
    blk.add(cst.upstream_rq_active, 1)
    blk.inc(est.rq_total)
    blk.add(est.rq_active, 1)
    ep.lb.start(ep.index)
    if n > 1:
        blk.inc(cst.upstream_rq_retry)
        blk.add(cst.upstream_rq_retry_active, 1)
        if cluster.budget is not None:
            cluster.budget.record_retry(now)
    return True


def close_attempt(cluster: Cluster, est: Any, lb: Any, lb_index: int, started: float,
                  status: int, now: float) -> None:
    """An attempt opened by open_attempt has ended; `status` 0 when it got no response.
    `lb` and `lb_index` are the ones it started with (a reload may replace both)."""
    elapsed = perf_counter() - started
    # Latency-aware balancers learn from responses only; a failure reports no time.
    lb.finish(lb_index, elapsed if status else -1.0, now)
    cst = cluster.stats
    blk = cst.block
    blk.add(cst.upstream_rq_active, -1)
    blk.add(est.rq_active, -1)
    cluster.breaker.end_request()
    cluster.publish_requests()
    if status:
        blk.inc(cst.upstream_rq_1xx + status // 100 - 1)
        blk.observe(cst.upstream_rq_time, elapsed * 1000.0)
