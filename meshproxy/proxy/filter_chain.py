"""The filter chain: what runs on a request between routing and forwarding.

A filter is configured once per route (config.snapshot.RouteFilters) and consulted per
request at a named phase; it returns CONTINUE, or a LocalReply that ends the request (the
downstream driver writes it: a filter never writes). Envoy's Continue / local reply,
pingora's `request_filter`.

Phases and order (Envoy's HTTP filter order for these filters):
  request headers: CORS (`on_cors`: a preflight is answered before authorization, since a
  browser sends it without credentials), authorization (RBAC), then the local rate limit
  (a request refused by policy does not take a token), then fault injection (`on_fault`,
  which may wait: a denied or limited request is answered at once, never delayed first;
  Istio's order, whose RBAC runs before the fault filter).
"""

from __future__ import annotations

import random
from typing import Any

import trio

from meshproxy._core.http1_parser import MessageHead
from meshproxy.config.snapshot import ClusterAction, RouteFilters
from meshproxy.filters.authz import Request as AuthzRequest
from meshproxy.filters.cors import ORIGIN, CorsPolicy
from meshproxy.filters.fault import ABORT_BODY, NONE, FaultDecision, FaultPolicy
from meshproxy.protocol import errors as flags
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.local_reply import LocalReply
from meshproxy.transport.sockio import PeerClosed

CONTINUE = None
# Envoy marks its local rate limit replies so that other Envoys do not retry them.
RATE_LIMITED = (b"x-envoy-ratelimited", b"true")


def on_request_headers(side: ClientSide, filters: RouteFilters, head: MessageHead,
                       ex: Exchange, host: bytes, target: bytes) -> LocalReply | None:
    """Authorization, then the rate limit: CONTINUE, or the local reply."""
    hs = side.ctx.hstats
    blk = hs.block
    if filters.authz is not None:
        decision = filters.authz.check(_authz_request(side, head, host, target))
        if decision.audited:
            blk.inc(hs.rbac_logged)
            ex.details = f"rbac_audit_matched_policy[{decision.audited}]"
        if not decision.allowed:
            blk.inc(hs.rbac_denied)
            ex.details = f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]"
            return LocalReply(403, b"RBAC: access denied", "-")
        blk.inc(hs.rbac_allowed)
    limiter = filters.rate_limit
    if limiter is not None:
        blk.inc(hs.http_local_rate_limit_enabled)
        ident = side.identity
        ok, headers = limiter.take(limiter.key(
            head, side.peer_ip, ident.principal if ident is not None else None))
        if not ok:
            headers = [*headers, RATE_LIMITED]
        if headers:
            ex.resp_extra = headers if ex.resp_extra is None else ex.resp_extra + headers
        if not ok:
            blk.inc(hs.http_local_rate_limit_rate_limited)
            return LocalReply(429, b"local_rate_limited", flags.RATE_LIMITED)
        blk.inc(hs.http_local_rate_limit_ok)
    return CONTINUE


def on_cors(side: ClientSide, policy: CorsPolicy, head: MessageHead,
            ex: Exchange) -> LocalReply | None:
    """CORS (filters.cors): an allowed origin's preflight answered here; an allowed
    origin's other requests get their response fields (ex.resp_extra, which every reply
    to the request carries); CONTINUE otherwise."""
    origin = head.get(ORIGIN)
    if origin is None:
        return CONTINUE
    hs = side.ctx.hstats
    allowed = policy.allowed(origin)
    hs.block.inc(hs.cors_origin_valid if allowed else hs.cors_origin_invalid)
    if policy.is_preflight(head):
        if allowed:
            return LocalReply(200, b"", "-", extra=policy.preflight_answer(origin))
        if not policy.forward:
            return LocalReply(200, b"", "-")
        return CONTINUE
    if allowed:
        extra = policy.response_extra(origin)
        ex.resp_extra = extra if ex.resp_extra is None else ex.resp_extra + extra
    return CONTINUE


def _authz_request(side: ClientSide, head: MessageHead, host: bytes,
                   target: bytes) -> AuthzRequest:
    ident = side.identity
    hostname = host.lower()
    if not hostname.endswith(b"]"):
        hostname = hostname.rpartition(b":")[0] or hostname  # the port is not the host

    def header(name: str) -> str | None:
        value = head.get(name.encode("latin-1"))
        return value.decode("latin-1") if value is not None else None

    return AuthzRequest(
        head.method.decode("latin-1"), target.partition(b"?")[0].decode("latin-1"),
        # Istio's destination port: where the client was going, for an intercepted one.
        hostname.decode("latin-1"),
        side.original_dst[1] if side.original_dst is not None else side.ctx.spec.port,
        side.peer[0] if side.peer else "",
        ident.principal.decode() if ident is not None else "",
        ident.namespace if ident is not None else "", header)


# While a request waits out its delay, an HTTP/1.1 client's socket is watched for its close
# (so that a client gone during the delay costs nothing upstream); what it sends meanwhile
# (its body, a pipelined request) is kept, up to this much, then no longer read until the
# delay ends (the socket's buffers hold the rest, as for any client that sends ahead).
DELAY_READ_LIMIT = 65_536


async def on_fault(side: ClientSide, policy: FaultPolicy, head: MessageHead, ex: Exchange,
                   action: Any) -> LocalReply | None:
    """Fault injection (filters.fault): the delay, then the abort. CONTINUE, the abort's
    reply, or 504 UT when the delay reaches the route's timeout (the timeout bounds what a
    caller waits, delay included). Raises PeerClosed when the client went away during the
    delay (nothing goes upstream)."""
    decision = policy.decide(head, random.random(), random.random())
    if decision is NONE:
        return CONTINUE
    hs = side.ctx.hstats
    blk = hs.block
    limit = policy.spec.max_active
    if limit >= 0 and sum(b.get(hs.fault_active_faults) for b in side.ctx.slabs) >= limit:
        blk.inc(hs.fault_faults_overflow)
        return CONTINUE
    blk.add(hs.fault_active_faults, 1)
    try:
        if decision.delay:
            blk.inc(hs.fault_delays_injected)
            ex.fault_flag = flags.DELAY_INJECTED
            timeout = action.timeout if type(action) is ClusterAction else 0.0
            capped = bool(timeout) and decision.delay >= timeout
            wait = timeout if capped else decision.delay
            await _wait_watching(side, wait)
            ex.fault_delay = wait
            if capped:
                return LocalReply(504, b"upstream request timeout\n",
                                  flags.UPSTREAM_REQUEST_TIMEOUT)
        if decision.aborts:
            blk.inc(hs.fault_aborts_injected)
            return _abort(ex, decision)
        return CONTINUE
    finally:
        blk.add(hs.fault_active_faults, -1)


def _abort(ex: Exchange, d: FaultDecision) -> LocalReply:
    """Envoy's abort: the HTTP status with "fault filter abort", or for a gRPC status 200
    with grpc-status (a gRPC call: trailers-only, written by the stream)."""
    if d.grpc_status < 0:
        return LocalReply(d.status, ABORT_BODY, flags.FAULT_INJECTED)
    if ex.grpc:
        return LocalReply(200, ABORT_BODY, flags.FAULT_INJECTED, grpc_status=d.grpc_status)
    return LocalReply(200, b"", flags.FAULT_INJECTED, content_type=b"application/grpc",
                      extra=[(b"grpc-status", b"%d" % d.grpc_status),
                             (b"grpc-message", ABORT_BODY.replace(b" ", b"%20"))])


async def _wait_watching(side: ClientSide, seconds: float) -> None:
    """Sleep `seconds` on trio's timers (no worker is held); an HTTP/1.1 client's close
    ends it with PeerClosed. (An HTTP/2 stream's reset cancels its task instead.)"""
    if side.multiplexed:
        await trio.sleep(seconds)
        return
    with trio.move_on_after(seconds):
        while len(side.buf) - side.pos < DELAY_READ_LIMIT:
            data = await side.recv_wait()
            if not data:
                raise PeerClosed("the client closed during a fault delay")
            side.buf += data
        await trio.sleep_forever()  # the rest of the delay, without reading
