"""The router: the terminal step for a route with a cluster action (Envoy's router filter).

1. pick the cluster (weighted draw) and bound the request by the shorter of the route
   timeout and the client's deadline (`x-meshproxy-deadline-ms`, `grpc-timeout`); a
   deadline already spent is answered 504 without touching an upstream;
2. attempts (proxy.relay.attempt): each connects, sends and reads the response head;
3. between attempts the retry policy decides: the condition must be in `retry_on`,
   `num_retries` not reached, the body replayable (it fitted the retry buffer), the
   cluster's max_retries breaker and retry budget must admit one more retry; then a fully
   jittered exponential back-off, and another endpoint when one exists (previous hosts);
4. the final response is relayed; once its head has gone downstream nothing is retried.

Per attempt: upstream_rq_total, upstream_rq_<class>, upstream_rq_time and the endpoint's
counts; per retry: upstream_rq_retry, and _overflow / _limit_exceeded when one is refused.
"""

from __future__ import annotations

import random
from time import perf_counter
from typing import Any

import trio

from meshproxy._core.http1_parser import MessageHead
from meshproxy._core.lb_select import hash_bytes
from meshproxy.config.snapshot import ClusterAction, DirectAction, RedirectAction
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import ProxyError
from meshproxy.protocol.grpc import status_of
from meshproxy.proxy.attempt import (
    Resume,
    close_attempt,
    failure_reply,
    open_attempt,
    overflow,
)
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import BodyState, Exchange
from meshproxy.proxy.head_rewrite import build_upstream_head
from meshproxy.proxy.local_reply import LocalReply
from meshproxy.proxy.phases import PH_RESP_BODY, PH_UPSTREAM
from meshproxy.proxy.relay import attempt, deliver, resume_response
from meshproxy.proxy.retry_policy import (
    RetrySpec,
    backoff,
    parse_deadline_ms,
    parse_grpc_timeout,
    retriable_failure,
    retriable_status,
)
from meshproxy.upstream.cluster_manager import Cluster
from meshproxy.upstream.conn_pool import Endpoint

_random = random.random


def answer(action: DirectAction | RedirectAction, scheme: bytes, host: bytes,
           target: bytes) -> LocalReply:
    """The reply of a route that answers without an upstream (Envoy's direct_response and
    redirect actions)."""
    if type(action) is DirectAction:
        return LocalReply(action.status, action.body, "-", extra=list(action.ops.response_add),
                          content_type=action.content_type)
    assert type(action) is RedirectAction
    location = redirect_location(action, scheme, host, target)
    return LocalReply(action.status, b"", "-",
                      extra=[(b"location", location), *action.ops.response_add])


def redirect_location(a: RedirectAction, scheme: bytes, host: bytes, target: bytes) -> bytes:
    path, sep, query = target.partition(b"?")
    if a.path is not None:
        new_path = a.path
        if b"?" in new_path:
            new_path, _, query = new_path.partition(b"?")
            sep = b"?"
    elif a.prefix_rewrite is not None and a.prefix is not None:
        new_path = a.prefix_rewrite + path[len(a.prefix):]
    else:
        new_path = path
    new_host = a.host if a.host is not None else host
    if a.port is not None:
        hostname = new_host.rsplit(b":", 1)[0] if not new_host.endswith(b"]") else new_host
        new_host = hostname + b":%d" % a.port
    location = (a.scheme or scheme) + b"://" + new_host + new_path
    if sep and query and not a.strip_query:
        location += b"?" + query
    return location


def choose_cluster(action: ClusterAction) -> str:
    clusters = action.clusters
    if len(clusters) == 1:
        return clusters[0][0]
    draw = _random() * action.total_weight
    for name, cumulative in clusters:
        if draw < cumulative:
            return name
    return clusters[-1][0]


def incoming_deadline(head: MessageHead) -> tuple[float | None, bool]:
    """(seconds the client allows, whether it spoke gRPC's grpc-timeout). The parser noted
    both headers while parsing, so no header is scanned here."""
    value = head.deadline_ms
    mine = parse_deadline_ms(value) if value is not None else None
    value = head.grpc_timeout
    grpc = parse_grpc_timeout(value) if value is not None else None
    if mine is None:
        return grpc, grpc is not None
    if grpc is None:
        return mine, False
    return min(mine, grpc), True


def hash_key(dc: ClientSide, head: MessageHead,
             policy: tuple[tuple[str, bytes], ...]) -> int:
    """The consistent-hashing key: the first hash policy with a value (0: none)."""
    for kind, name in policy:
        if kind == "header":
            value = head.get(name)
        elif kind == "cookie":
            value = _cookie(head.get(b"cookie"), name)
        else:
            value = dc.peer_ip
        if value:
            return hash_bytes(value)
    return 0


def _cookie(header: bytes | None, name: bytes) -> bytes | None:
    if not header:
        return None
    for part in header.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            return v
    return None


def _admit_retry(cluster: Cluster, retry: RetrySpec, n: int, now: float) -> bool:
    """May attempt n+1 start? Called once attempt n has ended (its own retry slot, if it
    was a retry, already released). On yes the breaker reserves the retry's slot at once (so
    failures that arrive together cannot all pass max_retries); the retry's attempt releases
    it when it ends. Counts why not."""
    cst = cluster.stats
    if n > retry.num_retries:
        cst.block.inc(cst.upstream_rq_retry_limit_exceeded)
        return False
    budget, breaker = cluster.budget, cluster.breaker
    if ((budget is not None and not budget.allow(now, breaker.requests, breaker.retries))
            or not breaker.try_retry()):
        cst.block.inc(cst.upstream_rq_retry_overflow)
        return False
    cluster.publish_retries()
    return True


def _end_retry(cluster: Cluster) -> None:
    """A retry's attempt has ended (or will never run): its max_retries slot is free."""
    cluster.breaker.end_retry()
    cluster.publish_retries()
    cst = cluster.stats
    cst.block.add(cst.upstream_rq_retry_active, -1)


async def forward(dc: ClientSide, head: MessageHead, ex: Exchange,
                  action: ClusterAction, resume: Resume | None = None,
                  tap: Any = None) -> bool | LocalReply:
    """Forward the request, retrying as the policy allows. Whether the client connection
    stays open once the response was relayed, or the reply for the driver to write when
    the request failed before its response began. With `resume`, the request goes on
    from where the fast path left it; `tap` gets the body as it goes (proxy.mirror)."""
    if resume is None:
        name = ex.cluster = choose_cluster(action)
        found = dc.ctx.clusters.get(name)
        if found is None:
            return LocalReply(503, b"cluster not found\n", flags.NO_CLUSTER)
        cluster = found
    else:
        cluster = resume.cluster
    cst = cluster.stats
    blk = cst.block
    timeout = action.timeout
    if ex.fault_delay and timeout:
        # A fault filter's delay took part of the route's timeout (proxy.filter_chain
        # capped it below the timeout, so some is left).
        timeout -= ex.fault_delay
    deadline, grpc = incoming_deadline(head)
    if deadline is not None:
        left = deadline - (perf_counter() - ex.start)
        if left <= 0:
            blk.inc(cst.upstream_rq_timeout)
            return LocalReply(504, b"deadline exceeded\n", flags.UPSTREAM_REQUEST_TIMEOUT)
        if not timeout or left < timeout:
            timeout = left
    if resume is None:
        key = hash_key(dc, head, action.hash_policy) if action.hash_policy else 0
        picked = cluster.pick(dc.reactor.now, None, key)
        if picked is None:
            blk.inc(cst.upstream_cx_none_healthy)
            return LocalReply(503, b"no healthy upstream\n", flags.NO_HEALTHY_UPSTREAM)
        ep = picked
    else:
        key, ep = resume.key, resume.ep
    websocket = (head.conn_upgrade and head.upgrade is not None and head.version >= 11
                 and head.upgrade.lower() == b"websocket")
    retry = None if websocket else action.retry
    state = (resume.state if resume is not None and resume.state is not None
             else BodyState(retry.buffer_limit if retry is not None else 0, tap))
    has_body = head.chunked or head.content_length > 0
    if cluster.budget is not None and (resume is None or not resume.opened):
        cluster.budget.record_request(dc.reactor.now)
    tried: list[Endpoint] = []
    n = 0
    try:
        while True:
            n += 1
            budget = None if deadline is None else deadline - (perf_counter() - ex.start)
            up_head = build_upstream_head(
                dc, head, ex, action, websocket,
                n if retry is not None and retry.include_attempt_count else 0, budget, grpc)
            keep = await _one_attempt(dc, head, ex, action, cluster, ep, up_head, state,
                                      retry, timeout, websocket, n, has_body, resume)
            resume = None
            if keep is not None:
                return keep
            assert retry is not None
            tried.append(ep)
            try:
                await trio.sleep(backoff(retry, n, _random()))
            except BaseException:
                cluster.breaker.end_retry()  # the reserved retry will not run
                cluster.publish_retries()
                raise
            ep = cluster.pick(dc.reactor.now, tried, key) or ep
    except ProxyError as err:
        if dc.upstream is not None:
            dc.upstream.abort()
            dc.upstream = None
        if ex.response_started:
            ex.flags = err.flag
            ex.details = err.detail
            dc.reset()  # a broken response must never look complete
            return False
        return failure_reply(ex, err, state.started and not state.done, state.done)
    except trio.Cancelled:
        if dc.phase in (PH_UPSTREAM, PH_RESP_BODY):
            blk.inc(cst.upstream_rq_timeout)  # the route timeout fired (504 UT)
        raise


async def _one_attempt(dc: ClientSide, head: MessageHead, ex: Exchange,
                       action: ClusterAction, cluster: Cluster, ep: Endpoint, up_head: bytes,
                       state: BodyState, retry: RetrySpec | None, timeout: float,
                       websocket: bool, n: int, has_body: bool,
                       resume: Resume | None = None) -> bool | None:
    """Whether the client connection stays open once this attempt answered it; None when
    another attempt should follow. Raises ProxyError when the request fails."""
    cst, est = cluster.stats, ep.stats
    blk = cst.block
    if resume is not None and resume.opened:
        lb, lb_index, started = resume.lb, resume.lb_index, resume.started
    else:
        lb, lb_index = ep.lb, ep.index  # kept: a reload may replace both meanwhile
        if not open_attempt(cluster, ep, n, dc.reactor.now):
            raise overflow()
        started = perf_counter()
        resume = None
    status = 0
    # This attempt's max_retries slot (a retry's), held until the attempt's outcome is
    # known, and released before the next retry is decided: a finished retry never counts
    # against the next one.
    retry_held = n > 1
    try:
        try:
            if resume is None or resume.stale:
                resp, ubuf, conn = await attempt(
                    dc, head, ex, cluster, ep, up_head, state,
                    retry.per_try_timeout if retry else 0.0, timeout,
                    stale_retry=resume is not None)
            elif resume.error is not None:
                raise resume.error
            else:
                assert resume.conn is not None
                conn = resume.conn
                if resume.resp is not None:
                    resp, ubuf = resume.resp, resume.ubuf
                else:
                    resp, ubuf = await resume_response(dc, head, conn, resume.deadline,
                                                       resume.unsent, resume.ubuf)
                    conn.requests += 1
        except ProxyError as err:
            blk.inc(est.rq_error)
            if err.stat:
                blk.inc(getattr(cst, err.stat))
            if cluster.outlier is not None and err.failure:
                cluster.outlier.on_result(ep, 0, True, dc.reactor.now)
            if retry_held:
                retry_held = False
                _end_retry(cluster)
            if (retry is not None and err.failure and retriable_failure(retry, err.failure)
                    and (not has_body or (state.done and state.replay is not None))
                    and _admit_retry(cluster, retry, n, dc.reactor.now)):
                if dc.upstream is not None:
                    dc.upstream.abort()
                    dc.upstream = None
                return None
            raise
        status = resp.status
        if cluster.outlier is not None:
            cluster.outlier.on_result(ep, status, False, dc.reactor.now)
        # Known only now: whether the body fitted the retry buffer while it was sent.
        replayable = not has_body or (state.done and state.replay is not None)
        if retry_held:
            retry_held = False
            _end_retry(cluster)
        grpc_code = status_of(resp.headers) if ex.grpc else -1
        if (retry is not None and replayable
                and ((status >= 400 and retriable_status(retry, status))
                     or (grpc_code > 0 and grpc_code in retry.grpc_codes))
                and _admit_retry(cluster, retry, n, dc.reactor.now)):
            blk.inc(est.rq_error)
            conn.close()  # the response is not relayed: its body is dropped with the connection
            dc.upstream = None
            return None
        ex.upstream_status = status
        if ex.grpc and status != 200 and grpc_code < 0:
            # An origin's non-gRPC answer to a call (a proxy's or a server's HTTP error):
            # the client gets the gRPC status for it (protocol.grpc), never an HTML page.
            conn.close()
            dc.upstream = None
            raise ProxyError(status, "-", "upstream",
                             f"upstream answered HTTP {status} to a gRPC call")
        try:
            keep = await deliver(dc, head, ex, action, conn, resp, ubuf, websocket,
                                state.done or not has_body)
        except ProxyError as err:
            # A body that breaks once the response has begun (the driver resets the
            # client): counted as the same failure before the head would be.
            if err.stat:
                blk.inc(getattr(cst, err.stat))
            raise
        if n > 1 and status < 500:
            blk.inc(cst.upstream_rq_retry_success)
        return keep
    finally:
        if retry_held:  # ended some other way (cancelled by the route timeout, a bug)
            _end_retry(cluster)
        close_attempt(cluster, est, lb, lb_index, started, status, dc.reactor.now)
