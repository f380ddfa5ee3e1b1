"""The filter chain: what runs on a request between routing and forwarding.

A filter is configured once per route (config.snapshot.RouteFilters) and consulted per
request at a named phase; it returns CONTINUE, or a LocalReply that ends the request (the
downstream driver writes it: a filter never writes). Envoy's Continue / local reply,
pingora's `request_filter`.

Phases and order (Envoy's HTTP filter order for these filters):
  request headers: authorization (RBAC), then the local rate limit (a request refused by
  policy does not take a token).
"""

from __future__ import annotations

from meshproxy._core.http1_parser import MessageHead
from meshproxy.config.snapshot import RouteFilters
from meshproxy.filters.authz import Request as AuthzRequest
from meshproxy.protocol import errors as flags
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.local_reply import LocalReply

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
        if headers:
            ex.resp_extra = headers
        if not ok:
            blk.inc(hs.http_local_rate_limit_rate_limited)
            ex.resp_extra = [*headers, RATE_LIMITED]
            return LocalReply(429, b"local_rate_limited", flags.RATE_LIMITED)
        blk.inc(hs.http_local_rate_limit_ok)
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
        hostname.decode("latin-1"), side.ctx.spec.port, side.peer[0] if side.peer else "",
        ident.principal.decode() if ident is not None else "",
        ident.namespace if ident is not None else "", header)
