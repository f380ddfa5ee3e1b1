"""One attempt to an HTTP/2 origin (proxy.relay's counterpart for clusters whose protocol
is http2, or downstream with an HTTP/2 client): a stream on the endpoint's multiplexed
connection (upstream.connect.acquire_h2), the request's head as HTTP/2 fields, its body
as DATA within the origin's windows, the response head as the MessageHead every relay
reads (protocol.http2.response_head, through the compiled parser).

The client's request body arrives as it does for an HTTP/1.1 origin (ClientSide's buffer
and reads: Content-Length or chunked, an HTTP/2 client's body without a length framed
chunked by its stream); here it is unframed into DATA, and chunked trailers become the
request's trailing HEADERS (RFC 9113 8.1). A stream the origin did not process (REFUSED_
STREAM, or above a GOAWAY's last stream id) is sent again (MAX_RESENDS) when the request
can be replayed, as on a stale HTTP/1.1 connection: it never ran.
"""

from __future__ import annotations

import trio

from meshproxy._core.http1_conn import relay_informational
from meshproxy._core.http1_parser import ChunkedDecoder, MessageHead, ParseError
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import REFUSED, ProxyError
from meshproxy.protocol.http2 import (
    asks_trailers,
    mark_never_indexed,
    response_head,
    upstream_fields,
)
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import BodyState, Exchange
from meshproxy.proxy.head_rewrite import relayed_trailers
from meshproxy.proxy.origin_body import per_try_timeout, upstream_protocol_error
from meshproxy.proxy.phases import PH_REQ_BODY, PH_UPSTREAM
from meshproxy.transport.sockio import RECV_SIZE, PeerClosed
from meshproxy.upstream.cluster_manager import Cluster
from meshproxy.upstream.conn_pool import Endpoint
from meshproxy.upstream.connect import acquire_h2
from meshproxy.upstream.h2_origin import OriginStream

NO_DEADLINE = float("inf")
# Times a stream the origin did not process is sent again (each time on a connection
# that had not gone away yet): an origin that refuses more is failing, not draining.
MAX_RESENDS = 3


async def attempt_h2(side: ClientSide, head: MessageHead, ex: Exchange, cluster: Cluster,
                     ep: Endpoint, up_head: bytes, state: BodyState, per_try: float,
                     route_timeout: float) -> tuple[MessageHead, bytes, OriginStream]:
    """relay.attempt for an HTTP/2 origin: the final response head and the stream it
    came on (the relays read the body from it)."""
    up = side.ctx.parser.parse_request(up_head)
    assert up is not None  # the proxy's own head, made from a parsed one
    fields = upstream_fields(up, b"https" if cluster.tls_h2 is not None else b"http",
                             asks_trailers(head), side.never_indexed)
    has_body = head.chunked or head.content_length > 0
    first_attempt = not state.started
    resent = 0
    while True:
        origin = await acquire_h2(side.reactor, cluster, ep)
        st = origin.open_stream(fields, not has_body)
        side.upstream = st  # type: ignore[assignment]  # the relays' connection
        ex.upstream_host = ep.label
        try:
            if has_body:
                if first_attempt and not state.done:
                    await _stream_body(side, head, ex, st, state)
                else:
                    await _replay_body(st, state)
            side.phase = PH_UPSTREAM
            if not state.timer_started:
                # As relay.attempt: the route timeout starts once the request is complete.
                state.timer_started = True
                side.deadline = (side.reactor.now + route_timeout if route_timeout
                                 else NO_DEADLINE)
            resp = await _response_head(side, head, st,
                                        side.reactor.now + per_try if per_try else 0.0)
        except ProxyError as err:
            st.close()
            side.upstream = None
            replayable = not has_body or not state.started or (
                state.done and state.replay is not None)
            if err.failure == REFUSED and resent < MAX_RESENDS and replayable:
                resent += 1  # never processed: again, on another connection
                first_attempt = not state.started
                cst = cluster.stats
                if err.stat:
                    cst.block.inc(getattr(cst, err.stat))
                cst.block.inc(cst.upstream_rq_retry)
                continue
            raise
        st.requests += 1
        return resp, b"", st


async def _stream_body(side: ClientSide, head: MessageHead, ex: Exchange, st: OriginStream,
                       state: BodyState) -> None:
    """The client's body, unframed, as DATA (kept for replay while it fits); 100-continue
    answered first to a client waiting for it (RFC 9110 10.1.1)."""
    idle = side.ctx.spec.idle_timeout
    state.started = True
    if state.tap is not None:
        state.tap.unframed()  # what is kept here is the payload, not HTTP/1.1 chunks
    side.phase = PH_REQ_BODY
    if head.expect_continue and side.pos >= len(side.buf):
        await side.informational(100, [])
    buf, pos = side.buf, side.pos
    if head.chunked:
        dec = ChunkedDecoder()
        while True:
            try:
                parts, pos = dec.feed(buf, pos)
            except ParseError as exc:
                raise ProxyError(exc.status, flags.DOWNSTREAM_PROTOCOL_ERROR, "downstream",
                                 exc.reason) from None
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            if dec.done:
                side.buf, side.pos = buf, pos  # what follows is the next request's
                trailers = relayed_trailers(dec.trailers)
                if trailers and side.never_indexed is not None:
                    trailers = mark_never_indexed(trailers, side.never_indexed)
                state.trailers = trailers
                await _send(st, ex, state, data, not trailers)
                if trailers:
                    st.send_trailers(trailers)
                break
            if data and not await _send(st, ex, state, data, False):
                return  # the origin stopped taking it: its answer is read next
            side.deadline = side.reactor.now + idle
            buf, pos = await side.recv(), 0
            if not buf:
                raise PeerClosed("client closed during the request body")
    else:
        remaining = head.content_length
        take = min(remaining, len(buf) - pos)
        data = buf[pos:pos + take]
        side.pos = pos + take
        remaining -= take
        while True:
            if (data or not remaining) and not await _send(st, ex, state, data,
                                                           not remaining):
                return
            if not remaining:
                break
            side.deadline = side.reactor.now + idle
            data = await side.recv(min(remaining, RECV_SIZE))
            if not data:
                raise PeerClosed("client closed during the request body")
            remaining -= len(data)
    state.done = True


async def _send(st: OriginStream, ex: Exchange, state: BodyState, data: bytes,
                end: bool) -> bool:
    state.keep(data)
    ex.bytes_in += len(data)
    return await st.send_data(data, end)


async def _replay_body(st: OriginStream, state: BodyState) -> None:
    assert state.replay is not None
    trailers = state.trailers
    await st.send_data(b"".join(state.replay), not trailers)
    if trailers:
        st.send_trailers(trailers)


async def _response_head(side: ClientSide, head: MessageHead, st: OriginStream,
                         deadline: float) -> MessageHead:
    """The final response head, 1xx relayed on the way, within the per-try deadline (a
    cancel scope only when there is one: it costs a few microseconds a request, and the
    route timeout is the reactor's coarse timer, not a scope)."""
    if not deadline:
        return await _final_head(side, head, st)
    try:
        with trio.fail_at(deadline):
            return await _final_head(side, head, st)
    except trio.TooSlowError:
        raise per_try_timeout() from None


async def _final_head(side: ClientSide, head: MessageHead, st: OriginStream) -> MessageHead:
    while True:
        while st.info:
            fields = st.info.pop(0)
            status = int(fields[0][1]) if fields and fields[0][0] == b":status" else 0
            if relay_informational(head, status):
                await side.informational(status, [f for f in fields if f[0][:1] != b":"])
        if st.fields is not None:
            raw = response_head(st.fields, st.head_ended, head.method)
            try:
                resp = side.ctx.parser.parse_response(raw)
            except ParseError as exc:
                raise upstream_protocol_error(exc) from None
            assert resp is not None
            return resp
        if st.error is not None:
            raise st.error
        await st.wait()
