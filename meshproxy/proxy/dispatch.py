"""A request's way through the listener: its target, the route, the filters, then the
router or a local answer. One function for every codec: an HTTP/1.1 connection and an
HTTP/2 stream are both a ClientSide, which writes the local reply its own way
(`send_local`) and alone decides what the reply does to its connection.

Order (Envoy's HTTP connection manager, then its router):
 1. the target: origin-form, or absolute-form whose authority replaces Host (RFC 9112
    3.2.2), or `OPTIONS *`; anything else is 400;
 2. the route (the caller's principal is a pseudo-header when a route matches on it); no
    route asks the control plane for the authority when on-demand discovery is on;
 3. the listener's authorization policies for a request no route serves (a denied caller
    learns nothing about which paths exist), else 404 NR;
 4. the route's filters (CORS, authz, rate limits, faults) may answer, or delay; then the
    router forwards, or a direct response / redirect is answered here.
"""

from __future__ import annotations

from typing import Any

import trio

from meshproxy._core.http1_parser import MessageHead
from meshproxy.config.snapshot import PRINCIPAL_HEADER, ClusterAction, ListenerSpec, RouteFilters
from meshproxy.protocol import errors as flags
from meshproxy.protocol.authority import service_authority, split_absolute_form
from meshproxy.proxy.attempt import Resume
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.filter_chain import on_cors, on_fault, on_request_headers
from meshproxy.proxy.local_reply import LocalReply
from meshproxy.proxy.mirror import start_mirrors
from meshproxy.proxy.python_filters import on_request
from meshproxy.proxy.router import answer, forward


async def dispatch(side: ClientSide, head: MessageHead, ex: Exchange) -> bool:
    """Serve one request; whether the side stays open for another (HTTP/1.1)."""
    target = head.target
    host = head.host or b""
    if target[:1] != b"/":
        split = split_absolute_form(target)
        if split is not None:
            # RFC 9112 section 3.2.2: the authority of an absolute-form target replaces
            # the Host header.
            host, target = split
        elif not (target == b"*" and head.method == b"OPTIONS"):
            return await side.send_local(ex, head, 400, b"unsupported request target\n",
                                         flags.DOWNSTREAM_PROTOCOL_ERROR, close=True)
    ex.host = host
    ex.target = target
    spec = side.ctx.spec
    headers = head.headers
    if spec.match_principal and side.identity is not None:
        headers = headers + [(PRINCIPAL_HEADER, side.identity.principal)]
    vh, route = spec.route_table.route(host, head.method, target, headers)
    if vh is None and side.original_dst is not None and spec.destinations is not None:
        # An intercepted request whose Host no virtual host serves (a client that called
        # an address): the service its destination is routes it.
        by = spec.destinations.match(*side.original_dst).host
        if by:
            vh, route = spec.route_table.route(by, head.method, target, headers)
    if route is None and spec.on_demand_timeout and side.ctx.state.demand is not None:
        spec, route = await _on_demand(side, host, head.method, target, headers)
    if route is None:
        if spec.authz is not None:
            refusal = on_request_headers(side, RouteFilters(spec.authz, None), head, ex,
                                         host, target)
            if refusal is not None:
                return await reply(side, ex, head, refusal)
        return await side.send_local(ex, head, 404, b"", flags.NO_ROUTE)
    action = route.action
    filters = action.filters
    if filters is not None:
        refusal = None
        if filters.cors is not None:
            refusal = on_cors(side, filters.cors, head, ex)
        if refusal is None:
            refusal = on_request_headers(side, filters, head, ex, host, target)
        if refusal is None and filters.fault is not None:
            refusal = await on_fault(side, filters.fault, head, ex, action)
        if refusal is None and filters.python:
            refusal = await on_request(side, filters.python, head, ex)
            if refusal is None and ex.python.req.headers.changed:
                # Envoy's clearRouteCache: fields a filter changed may route the request
                # elsewhere (its filters ran already; the new route's action is taken).
                headers = head.headers
                if spec.match_principal and side.identity is not None:
                    headers = headers + [(PRINCIPAL_HEADER, side.identity.principal)]
                again = spec.route_table.route(host, head.method, target, headers)[1]
                if again is not None:
                    action = again.action
        if refusal is not None:
            return await reply(side, ex, head, refusal)
    if type(action) is ClusterAction:
        side.forwarding(head, action)
        py = ex.python
        if py is not None and not py.wants_body and py.capture is None:
            py = None  # nothing of the body phases to run
        if action.mirrors or py is not None:
            tap = start_mirrors(side, head, ex, action) if action.mirrors else None
            # What sees the request body as it goes (BodyState.tap), and what reads the
            # response back as it is written to the client (mirror_diff Captures).
            taps = [t for t in (tap, py) if t is not None]
            captures = [c for c in (tap.capture if tap is not None else None,
                                    py.capture if py is not None else None) if c is not None]
            body_tap = taps[0] if len(taps) == 1 else Taps(taps)
            if captures:
                return await _observed(side, head, ex, action, body_tap, captures, taps)
            return await forward_or_reply(side, head, ex, action, None, body_tap)
        return await forward_or_reply(side, head, ex, action, None)
    return await reply(side, ex, head, answer(action, side.ctx.scheme, host, target))


async def forward_or_reply(side: ClientSide, head: MessageHead, ex: Exchange,
                           action: ClusterAction, resume: Resume | None,
                           tap: Any = None) -> bool:
    """The router forwards; a request it could not (no cluster, no healthy upstream, a
    failure before the response began) is answered with the reply it returns."""
    result = await forward(side, head, ex, action, resume, tap)
    if type(result) is bool:
        return result
    assert isinstance(result, LocalReply)
    return await reply(side, ex, head, result)


class Taps:
    """Several takers of the request body (BodyState.tap): mirrors and Python filters."""

    __slots__ = ("taps",)

    def __init__(self, taps: list[Any]) -> None:
        self.taps = taps

    def feed(self, data: bytes) -> None:
        for t in self.taps:
            t.feed(data)

    def end(self) -> None:
        for t in self.taps:
            t.end()

    def unframed(self) -> None:
        for t in self.taps:
            t.unframed()


async def _observed(side: ClientSide, head: MessageHead, ex: Exchange, action: ClusterAction,
                    tap: Any, captures: list[Any], ended: list[Any]) -> bool:
    """A request whose response is read back as it is written to the client (mirrored
    responses compared, Python filters' response body phase): an HTTP/1.1 connection's
    sends, an HTTP/2 stream's HEADERS and DATA; each of `ended` is told once it is
    written (response_written)."""
    try:
        if side.multiplexed:
            side.capture = captures[0] if len(captures) == 1 else _Fanout(captures)  # type: ignore[attr-defined]
            try:
                return await forward_or_reply(side, head, ex, action, None, tap)
            finally:
                side.capture = None  # type: ignore[attr-defined]
        send = side.send

        async def captured(data: bytes) -> None:
            for c in captures:
                c.wire(data)
            await send(data)

        side.send = captured
        try:
            return await forward_or_reply(side, head, ex, action, None, tap)
        finally:
            side.send = send
    finally:
        for t in ended:
            t.response_written()


class _Fanout:
    """Several Captures of an HTTP/2 stream's response."""

    __slots__ = ("captures",)

    def __init__(self, captures: list[Any]) -> None:
        self.captures = captures

    def h2_fields(self, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        for c in self.captures:
            c.h2_fields(fields, end)

    def h2_data(self, data: bytes, end: bool) -> None:
        for c in self.captures:
            c.h2_data(data, end)


async def reply(side: ClientSide, ex: Exchange, head: MessageHead, r: LocalReply) -> bool:
    return await side.send_local(ex, head, r.status, r.body, r.flag, close=r.close,
                                 body_done=r.body_done, extra=r.extra,
                                 content_type=r.content_type, grpc_status=r.grpc_status)


async def _on_demand(side: ClientSide, host: bytes, method: bytes, target: bytes,
                     headers: list[tuple[bytes, bytes]]) -> tuple[ListenerSpec, Any]:
    """No virtual host serves `host` yet: ask the control plane for it (through the
    supervisor) and hold the request until a snapshot serves it, for at most the
    listener's on_demand_timeout (then the caller answers 404 NR)."""
    state = side.ctx.state
    spec = side.ctx.spec
    authority = service_authority(host)
    if authority is None:
        return spec, None
    if authority not in state.asked:
        state.asked.add(authority)
        state.demand(authority)
    with trio.move_on_after(spec.on_demand_timeout):
        while True:
            await state.changed.wait()
            spec = side.ctx.spec
            _vh, route = spec.route_table.route(host, method, target, headers)
            if route is not None:
                return spec, route
            if authority not in state.asked:  # asked again after that snapshot
                state.asked.add(authority)
                state.demand(authority)
    return side.ctx.spec, None
