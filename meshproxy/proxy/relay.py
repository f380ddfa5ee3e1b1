"""The relay: the I/O loops that feed and drain an exchange between the client and an
upstream connection, with backpressure, for one attempt of the router.

Order of work for an attempt (decide, then do I/O):
 1. reuse an idle keep-alive connection or connect (upstream.connect; connect_timeout ->
    503 UF);
 2. send head (and the body when it is already buffered) in one send, else answer
    `Expect: 100-continue` ourselves (as Envoy does) and stream the body with backpressure;
 3. read the response head: 1xx interim responses are relayed (RFC 9110 section 15.2) and
    never taken for the final one; broken framing is 502 UPE;
 4. relay the response with the framing the client can take (the compiled http1_conn
    decides it: Content-Length as is, chunked re-encoded for HTTP/1.1 clients,
    raw-then-close for HTTP/1.0 clients; HEAD/204/304 carry no body);
 5. return the connection to the pool only when the exchange ended cleanly on both sides.

A request that fails on a reused connection before any byte of a response arrived is sent
once more on a new connection when it can be replayed (no body, or a body still buffered):
the origin closed the idle connection as we wrote to it, the request never ran.

Failure after the response head went out cannot be answered any more: the router resets
the client connection, so a truncated body is never mistaken for a complete one.

The relay reads and writes the client's side through proxy.client_side (its read cursor,
phase and deadline) and never writes a local reply: failures are ProxyErrors, which the
router turns into the reply for the driver to write.

Size: past 400 lines because the request-body and response-body loops share the framing,
the backpressure rules and the errors they raise; the fast path reuses its error makers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import trio

from meshproxy._core.http1_conn import (
    FRAMING_CHUNKED,
    FRAMING_LENGTH,
    FRAMING_NONE,
    plan_response,
    relay_informational,
    upstream_reusable,
)
from meshproxy._core.http1_parser import (
    ChunkedDecoder,
    MessageHead,
    ParseError,
    encode_chunk,
    encode_last_chunk,
)
from meshproxy.config.snapshot import ClusterAction
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import RESET, ProxyError
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import BodyState, Exchange
from meshproxy.proxy.head_rewrite import relayed_trailers, serialize
from meshproxy.proxy.local_reply import reason
from meshproxy.proxy.origin_body import open_body, per_try_timeout, upstream_protocol_error
from meshproxy.proxy.phases import PH_REQ_BODY, PH_RESP_BODY, PH_UPSTREAM
from meshproxy.proxy.python_filters import on_response
from meshproxy.proxy.relay_h2 import attempt_h2
from meshproxy.proxy.tunnel import tunnel
from meshproxy.transport.sockio import RECV_SIZE, PeerClosed, send_all
from meshproxy.upstream.cluster_manager import REUSE, Cluster
from meshproxy.upstream.conn_pool import Endpoint, UpstreamConn
from meshproxy.upstream.connect import establish

# Framings (http1_conn decides them): F_CLOSE and FRAMING_TUNNEL are relayed alike, until
# the origin closes.
F_NONE, F_LENGTH, F_CHUNKED = FRAMING_NONE, FRAMING_LENGTH, FRAMING_CHUNKED
NO_DEADLINE = float("inf")


class _Multiplexed(Protocol):
    async def relay_response(self, head: MessageHead, ex: Exchange, action: ClusterAction,
                             conn: UpstreamConn, resp: MessageHead, ubuf: bytes,
                             request_complete: bool) -> bool: ...


class _StaleConnection(Exception):
    """A reused connection closed before any response byte: the request did not run."""


class _UpstreamGone(Exception):
    """The upstream stopped taking the request body (closed or reset its side)."""


async def _send_up(send: Callable[[bytes], Awaitable[None]], data: bytes) -> None:
    try:
        await send(data)
    except PeerClosed:
        raise _UpstreamGone() from None


async def attempt(side: ClientSide, head: MessageHead, ex: Exchange, cluster: Cluster,
                  ep: Endpoint, up_head: bytes, state: BodyState, per_try: float,
                  route_timeout: float, stale_retry: bool = False
                  ) -> tuple[MessageHead, bytes, UpstreamConn]:
    """One attempt: connect (or reuse), send the request, read the final response head.
    The first attempt streams the body from the client; later ones replay the copy.
    `stale_retry`: a reused connection was already found closed (the one resend that
    allows is spent). An HTTP/2 cluster's attempt is proxy.relay_h2's (a WebSocket
    upgrade or CONNECT goes as HTTP/1.1: see the README)."""
    if (cluster.spec.protocol != "http1" and cluster.speaks_h2(side.multiplexed)
            and head.upgrade is None and head.method != b"CONNECT"):
        return await attempt_h2(side, head, ex, cluster, ep, up_head, state,  # type: ignore[return-value]
                                per_try, route_timeout)
    cl = head.content_length
    has_body = head.chunked or cl > 0
    first_attempt = not state.started
    dec: ChunkedDecoder | None = None
    # RFC 9110 10.1.1: answer 100-continue only to a client still waiting to send the body.
    want_continue = first_attempt and head.expect_continue and side.pos >= len(side.buf)
    if first_attempt and head.chunked:
        # The chunks already received are decoded before any upstream I/O: a malformed chunk
        # among them is answered 400 with no upstream touched. (A bad chunk that arrives
        # later can only fail the stream, and the upstream connection is then reset.)
        dec = ChunkedDecoder()
        body0, side.pos = _decode_chunks(dec, side.buf, side.pos, ex)
        state.started = True
        state.keep(body0)
        state.done = dec.done
        first = up_head + body0
        buffered = dec.done
    else:
        buffered = first_attempt and cl > 0 and len(side.buf) - side.pos >= cl
        if buffered:
            first = up_head + side.buf[side.pos:side.pos + cl]
        elif not first_attempt and state.replay:
            first = up_head + b"".join(state.replay)
        else:
            first = up_head
    while True:
        kind, conn = cluster.admit(ep, side.reactor.now)
        reused = kind == REUSE
        if conn is None or not reused:
            conn, reused = await establish(side.reactor, cluster, ep, kind, conn)
        side.upstream = conn
        ex.upstream_host = ep.label
        try:
            try:
                await conn.send(first)
            except PeerClosed:
                raise _StaleConnection() from None
            if dec is not None:
                if not dec.done:
                    await _send_request_body(side, head, ex, conn, state, dec, want_continue)
            elif buffered and not state.done:
                side.pos += cl
                ex.bytes_in = cl
                state.started = True
                state.keep(first[len(up_head):])
                state.done = True  # after keep: a tap (proxy.mirror) gets the body, then its end
            elif first_attempt and has_body and not state.started:
                state.started = True
                await _send_request_body(side, head, ex, conn, state, None, want_continue)
            side.phase = PH_UPSTREAM
            if not state.timer_started:
                # Envoy's route timeout starts once the downstream request is complete and
                # covers every retry and back-off after it: set once per request, never
                # again by a later attempt (a request without a body included).
                state.timer_started = True
                side.deadline = side.reactor.now + route_timeout if route_timeout else NO_DEADLINE
            resp, ubuf = await response_head(
                side, head, conn, side.reactor.now + per_try if per_try else 0.0)
        except _StaleConnection:
            conn.close()
            side.upstream = None
            if reused and not stale_retry and (buffered or not has_body or not first_attempt):
                stale_retry = True  # the origin closed it as we wrote: the request never ran
                cluster.stats.block.inc(cluster.stats.upstream_rq_retry)
                continue
            raise _reset_before_headers() from None
        break
    conn.requests += 1
    return resp, ubuf, conn


async def response_head(side: ClientSide, head: MessageHead, conn: UpstreamConn,
                        deadline: float, initial: bytes = b"") -> tuple[MessageHead, bytes]:
    """The final response head and the bytes read with it, 1xx relayed on the way, within
    the per-try `deadline` (0: none); `initial`: what was already read of it."""
    try:
        return await _read_response_head(side, head, conn, deadline, initial)
    except trio.TooSlowError:
        raise per_try_timeout() from None


async def resume_response(side: ClientSide, head: MessageHead, conn: UpstreamConn,
                          deadline: float, unsent: bytes, initial: bytes
                          ) -> tuple[MessageHead, bytes]:
    """The rest of an attempt the fast path began on `conn`: the `unsent` end of the
    request, then the response head from `initial` on."""
    try:
        if unsent:
            try:
                await send_all(conn.sock, unsent)  # already records on a TLS connection
            except PeerClosed:
                raise _StaleConnection() from None
        return await response_head(side, head, conn, deadline, initial)
    except _StaleConnection:
        raise _reset_before_headers() from None


def _reset_before_headers() -> ProxyError:
    return ProxyError(503, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                      "upstream connect error or disconnect/reset before headers",
                      retriable=True, stat="upstream_cx_destroy_remote_with_active_rq",
                      failure=RESET)


def _decode_chunks(dec: ChunkedDecoder, buf: bytes, pos: int,
                   ex: Exchange) -> tuple[bytes, int]:
    """Re-encode the chunks of buf[pos:] for the upstream (the last chunk and the trailers
    that may go on included once `dec` is done), and the position after what was consumed
    (after the message once done: the rest is the next request). A malformed chunk is the
    client's 400."""
    try:
        parts, pos = dec.feed(buf, pos)
    except ParseError as exc:
        raise ProxyError(exc.status, flags.DOWNSTREAM_PROTOCOL_ERROR, "downstream",
                         exc.reason) from None
    out = b""
    if parts:
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        ex.bytes_in += len(data)
        out = encode_chunk(data)
    if dec.done:
        out += encode_last_chunk(relayed_trailers(dec.trailers))
    return out, pos


async def deliver(side: ClientSide, head: MessageHead, ex: Exchange,
                 action: ClusterAction, conn: UpstreamConn, resp: MessageHead, ubuf: bytes,
                 websocket: bool, request_complete: bool) -> bool:
    """Relay the final response (or open the WebSocket tunnel), after the Python filters'
    response headers phase (which may change its fields and status)."""
    if ex.python is not None and resp.status != 101:
        await on_response(side, ex, resp)
    if resp.status == 101:
        if not websocket:
            raise ProxyError(502, flags.UPSTREAM_PROTOCOL_ERROR, "upstream",
                             "upstream switched protocols without being asked")
        await tunnel(side, ex, conn, resp, ubuf)
        return False
    if side.multiplexed:
        # An HTTP/2 stream writes frames (proxy.h2_stream, which imports this module).
        stream = cast(_Multiplexed, side)
        return await stream.relay_response(head, ex, action, conn, resp, ubuf,
                                           request_complete)
    return await _relay_response(side, head, ex, action, conn, resp, ubuf, request_complete)


async def _send_request_body(side: ClientSide, head: MessageHead, ex: Exchange,
                             conn: UpstreamConn, state: BodyState, dec: ChunkedDecoder | None,
                             want_continue: bool) -> None:
    """Stream the rest of the request body client -> upstream; each send waits for the
    upstream to take the bytes before more are read from the client (backpressure). A
    chunked body arrives with its decoder, already fed with what was buffered."""
    send_u = conn.send
    idle = side.ctx.spec.idle_timeout
    side.phase = PH_REQ_BODY
    if want_continue:
        # RFC 9110 section 10.1.1: the client waits for this before sending the body.
        await side.informational(100, [])
    try:
        if dec is not None:
            while not dec.done:
                side.deadline = side.reactor.now + idle
                buf = await side.recv()
                if not buf:
                    raise PeerClosed("client closed during the request body")
                out, pos = _decode_chunks(dec, buf, 0, ex)
                if out:
                    state.keep(out)
                    await _send_up(send_u, out)
            # What followed the last chunk belongs to the next request.
            side.buf, side.pos = buf, pos
        else:
            buf, pos = side.buf, side.pos
            remaining = head.content_length
            take = min(remaining, len(buf) - pos)
            if take:
                state.keep(buf[pos:pos + take])
                await _send_up(send_u, buf[pos:pos + take])
                remaining -= take
                ex.bytes_in += take
            side.buf, side.pos = buf, pos + take
            while remaining:
                side.deadline = side.reactor.now + idle
                # Read no further than the body: what follows belongs to the next request.
                data = await side.recv(min(remaining, RECV_SIZE))
                if not data:
                    raise PeerClosed("client closed during the request body")
                state.keep(data)
                await _send_up(send_u, data)
                remaining -= len(data)
                ex.bytes_in += len(data)
        state.done = True
    except _UpstreamGone:
        # The upstream stopped taking the body; it may have answered early (413, 401...),
        # which is read and relayed next. The connection closes after it: the rest of the
        # request body was never read.
        side.phase = PH_UPSTREAM


async def _read_response_head(side: ClientSide, head: MessageHead,
                              conn: UpstreamConn, deadline: float = 0.0, initial: bytes = b""
                              ) -> tuple[MessageHead, bytes]:
    """The final response head (1xx relayed on the way) and the bytes read with it;
    trio.TooSlowError past `deadline` (the per-try timeout; 0: none)."""
    parser = side.ctx.parser
    recv_u = conn.recv
    if initial:
        data = initial
    else:
        try:
            data = await conn.recv_wait(deadline=deadline)
        except PeerClosed:
            raise _StaleConnection() from None
        if not data:
            raise _StaleConnection()
    ubuf, upos = data, 0
    while True:
        try:
            resp = parser.parse_response(ubuf, upos)
            while resp is not None and resp.status < 200 and resp.status != 101:
                if relay_informational(head, resp.status):
                    await side.informational(resp.status, resp.headers, resp.reason)
                upos = resp.end
                resp = parser.parse_response(ubuf, upos) if upos < len(ubuf) else None
        except ParseError as exc:
            raise upstream_protocol_error(exc) from None
        if resp is not None:
            return resp, ubuf
        try:
            data = await recv_u(deadline=deadline)
        except PeerClosed:
            data = b""
        if not data:
            raise reset_during_head()
        ubuf = ubuf[upos:] + data if upos < len(ubuf) else data
        upos = 0


def reset_during_head() -> ProxyError:
    return ProxyError(503, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                      "upstream disconnect/reset before the response was complete",
                      stat="upstream_cx_destroy_remote_with_active_rq")


async def _relay_response(side: ClientSide, head: MessageHead, ex: Exchange,
                          action: ClusterAction, conn: UpstreamConn, resp: MessageHead,
                          ubuf: bytes, request_complete: bool) -> bool:
    """The origin's response to an HTTP/1.1 client, re-framed as plan_response decided
    (chunked re-encoded for an HTTP/1.1 client, raw for an HTTP/1.0 one); the head goes
    in one send with what was read of the body, the last chunk with the end."""
    send_d = side.send
    status = resp.status
    plan = plan_response(head, resp, request_complete,
                         not side.ctx.state.draining and not side.too_old())
    framing, keep, down_chunked, extra = plan.framing, plan.keep, plan.down_chunked, plan.extra
    if ex.resp_extra:
        extra += ex.resp_extra
    pending = serialize(b"HTTP/1.1 %d %s" % (status, resp.reason or reason(status)), resp,
                        action.ops.response_skip, action.ops.response_add, extra)
    ex.status = ex.upstream_status = status
    side.phase = PH_RESP_BODY
    reusable = upstream_reusable(request_complete, resp, framing)
    ex.response_started = True
    body = open_body(conn, resp, ubuf, framing)
    data = body.take()
    while True:
        if data:
            ex.bytes_out += len(data)
            pending += encode_chunk(data) if down_chunked else data
        if body.done:
            break
        if pending:
            await send_d(pending)
            pending = b""
        data = await body.read()
    if down_chunked:
        pending += encode_last_chunk(body.trailers)
    if pending:
        await send_d(pending)
    side.upstream = None
    body.finish(reusable, side.reactor.now)
    return keep
