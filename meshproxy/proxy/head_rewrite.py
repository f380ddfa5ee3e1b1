"""The head sent upstream, built in one compiled call (`serialize_head`).

Hop-by-hop fields are removed (RFC 9110 section 7.6.1: config.snapshot.REQUEST_SKIP plus
the names the message's Connection field lists); Host (or the route's host_rewrite) and the
prefix_rewrite are applied; x-forwarded-for is appended and x-forwarded-proto set;
x-request-id is added when absent (one id for every attempt); the route's header mutations
are added; and the framing the proxy decided is stated once (a peer's own Content-Length
and Transfer-Encoding lines never go on).
"""

from __future__ import annotations

from meshproxy._core.http1_parser import MessageHead, serialize_head
from meshproxy.config.snapshot import TRAILER_SKIP, ClusterAction
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.request_id import new_request_id
from meshproxy.proxy.retry_policy import (
    DEADLINE_HEADER,
    GRPC_TIMEOUT,
    format_deadline_ms,
    format_grpc_timeout,
)
from meshproxy.tracing.context import PROPAGATION_HEADERS

TE_CHUNKED = (b"transfer-encoding", b"chunked")
CONN_UPGRADE = (b"connection", b"upgrade")
ATTEMPT_COUNT = frozenset({b"x-envoy-attempt-count"})
DEADLINE_HEADERS = frozenset({DEADLINE_HEADER, GRPC_TIMEOUT})


def build_upstream_head(side: ClientSide, head: MessageHead, ex: Exchange,
                        action: ClusterAction, websocket: bool, attempt: int = 0,
                        budget: float | None = None, grpc: bool = False) -> bytes:
    """attempt: x-envoy-attempt-count to send (0: none). budget: seconds left of the
    request's deadline, sent on so that it shrinks hop by hop (None: no deadline)."""
    target = ex.target
    if action.prefix_rewrite is not None and action.prefix is not None:
        target = action.prefix_rewrite + target[len(action.prefix):]
    xff = head.forwarded_for
    peer_ip = side.peer_ip
    extra = [
        (b"host", action.host_rewrite or ex.host),
        (b"x-forwarded-for", xff + b", " + peer_ip if xff else peer_ip),
        (b"x-forwarded-proto", side.ctx.scheme),
    ]
    if side.identity is not None:
        # Envoy's SANITIZE_SET: the client's own header is dropped (REQUEST_SKIP), ours set.
        extra.append((b"x-forwarded-client-cert", side.identity.xfcc))
    if head.request_id is None:
        if ex.request_id is None:  # one id for every attempt of the request
            ex.request_id = new_request_id()
        extra.append((b"x-request-id", ex.request_id))
    # The framing decided by the parser, stated once (the peer's own lines are skipped).
    if head.chunked:
        extra.append(TE_CHUNKED)
    elif head.content_length >= 0:
        extra.append((b"content-length", b"%d" % head.content_length))
    if websocket:
        extra.append(CONN_UPGRADE)
        extra.append((b"upgrade", head.upgrade))
    skip = action.ops.request_skip
    if attempt:
        skip = skip | ATTEMPT_COUNT
        extra.append((b"x-envoy-attempt-count", b"%d" % attempt))
    if budget is not None:
        skip = skip | DEADLINE_HEADERS
        extra.append((DEADLINE_HEADER, format_deadline_ms(budget)))
        if grpc:
            extra.append((GRPC_TIMEOUT, format_grpc_timeout(budget)))
    if ex.trace is not None:
        # The proxy's span becomes the upstream's parent (W3C, and B3 if it came so).
        skip = skip | PROPAGATION_HEADERS
        extra += ex.trace.headers()
    return serialize(head.method + b" " + target + b" HTTP/1.1", head, skip,
                     action.ops.request_add, extra)


def serialize(first_line: bytes, msg: MessageHead, skip: frozenset[bytes],
              add: tuple[tuple[bytes, bytes], ...], extra: list[tuple[bytes, bytes]]) -> bytes:
    """The head to send on: msg's fields minus `skip` and the names its Connection header
    lists (RFC 9110 section 7.6.1), then the proxy's `extra` and the route's `add`."""
    if add:
        extra.extend(add)
    if msg.conn_extra:
        skip = skip | frozenset(msg.conn_extra)
    return serialize_head(first_line, msg.headers, skip, extra)


def relayed_trailers(trailers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The trailer fields that may go on (TRAILER_SKIP); most messages have none."""
    if not trailers:
        return trailers
    return [t for t in trailers if t[0] not in TRAILER_SKIP]
