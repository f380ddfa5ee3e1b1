"""Forward one request upstream and relay the response: the router's terminal step.

Order of work for a request (decide, then do I/O):
 1. pick the cluster (weighted draw) and the endpoint (compiled smooth WRR);
 2. build the upstream head in one compiled call: hop-by-hop fields removed (RFC 9110
    section 7.6.1, plus the names Connection lists), Host (or host_rewrite), prefix_rewrite,
    x-forwarded-for appended, x-forwarded-proto set, x-request-id added when absent, route
    header mutations, framing re-stated (chunked in, chunked out);
 3. reuse an idle keep-alive connection or connect (connect_timeout -> 503 UF);
 4. send head (and the body when it is already buffered) in one send, else answer
    `Expect: 100-continue` ourselves (as Envoy does) and stream the body with backpressure;
 5. read the response head: 1xx interim responses are relayed (RFC 9110 section 15.2) and
    never taken for the final one; broken framing is 502 UPE;
 6. relay the response with the framing the client can take: Content-Length as is, chunked
    re-encoded for HTTP/1.1 clients, raw-then-close for HTTP/1.0 clients; HEAD/204/304 carry
    no body;
 7. return the connection to the pool only when the exchange ended cleanly on both sides.

A request that fails on a reused connection before any byte of a response arrived is sent
once more on a new connection when it can be replayed (no body, or a body still buffered):
the origin closed the idle connection as we wrote to it, the request never ran.

Failure after the response head went out cannot be answered any more: the client
connection is reset, so a truncated body is never mistaken for a complete one.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

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
    serialize_head,
)
from meshproxy.config.snapshot import RESPONSE_SKIP, TRAILER_SKIP, ClusterAction
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import ProxyError
from meshproxy.proxy.local_reply import CONTINUE_100, reason
from meshproxy.proxy.phases import PH_REQ_BODY, PH_RESP_BODY, PH_TUNNEL, PH_UPSTREAM
from meshproxy.proxy.request_id import new_request_id
from meshproxy.proxy.retry_policy import (
    CONNECT_FAILURE,
    DEADLINE_HEADER,
    GRPC_TIMEOUT,
    PER_TRY_TIMEOUT,
    RESET,
    format_deadline_ms,
    format_grpc_timeout,
)
from meshproxy.tracing.context import PROPAGATION_HEADERS
from meshproxy.transport.sockio import RECV_SIZE, PeerClosed, connect
from meshproxy.transport.tls_stream import TLSError, TLSStream, session_reused
from meshproxy.upstream.cluster_manager import Cluster
from meshproxy.upstream.conn_pool import Endpoint, UpstreamConn

if TYPE_CHECKING:
    from meshproxy.proxy.downstream import DownstreamConnection, Exchange

TE_CHUNKED = (b"transfer-encoding", b"chunked")
CONN_UPGRADE = (b"connection", b"upgrade")

# Framings (http1_conn decides them): F_CLOSE and FRAMING_TUNNEL are relayed alike, until
# the origin closes.
F_NONE, F_LENGTH, F_CHUNKED = FRAMING_NONE, FRAMING_LENGTH, FRAMING_CHUNKED
ATTEMPT_COUNT = frozenset({b"x-envoy-attempt-count"})
DEADLINE_HEADERS = frozenset({DEADLINE_HEADER, GRPC_TIMEOUT})
NO_DEADLINE = float("inf")


class _StaleConnection(Exception):
    """A reused connection closed before any response byte: the request did not run."""


class _UpstreamGone(Exception):
    """The upstream stopped taking the request body (closed or reset its side)."""


async def _send_up(send: Callable[[bytes], Awaitable[None]], data: bytes) -> None:
    try:
        await send(data)
    except PeerClosed:
        raise _UpstreamGone() from None


def build_upstream_head(dc: DownstreamConnection, head: MessageHead, ex: Exchange,
                        action: ClusterAction, websocket: bool, attempt: int = 0,
                        budget: float | None = None, grpc: bool = False) -> bytes:
    """attempt: x-envoy-attempt-count to send (0: none). budget: seconds left of the
    request's deadline, sent on so that it shrinks hop by hop (None: no deadline)."""
    target = ex.target
    if action.prefix_rewrite is not None and action.prefix is not None:
        target = action.prefix_rewrite + target[len(action.prefix):]
    xff = head.forwarded_for
    extra = [
        (b"host", action.host_rewrite or ex.host),
        (b"x-forwarded-for", xff + b", " + dc.peer_ip if xff else dc.peer_ip),
        (b"x-forwarded-proto", dc.ctx.scheme),
    ]
    if dc.identity is not None:
        # Envoy's SANITIZE_SET: the client's own header is dropped (REQUEST_SKIP), ours set.
        extra.append((b"x-forwarded-client-cert", dc.identity.xfcc))
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
    return _serialize(head.method + b" " + target + b" HTTP/1.1", head, skip,
                      action.ops.request_add, extra)


def _serialize(first_line: bytes, msg: MessageHead, skip: frozenset[bytes],
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


class BodyState:
    """How far the request body got, and a copy of what was sent upstream for replay
    while it fits the retry buffer (None once it does not, or when retries are off)."""

    __slots__ = ("started", "done", "replay", "size", "limit", "timer_started")

    def __init__(self, limit: int) -> None:
        self.started = False
        self.done = False
        self.timer_started = False  # the route timeout runs (once per request)
        self.replay: list[bytes] | None = [] if limit > 0 else None
        self.size = 0
        self.limit = limit

    def keep(self, data: bytes) -> None:
        if self.replay is not None:
            self.size += len(data)
            if self.size > self.limit:
                self.replay = None  # too big to replay: this request will not be retried
            else:
                self.replay.append(data)


async def _connect(dc: DownstreamConnection, cluster: Cluster, ep: Endpoint) -> UpstreamConn:
    """A new connection to `ep`; with upstream TLS the handshake (and the check of the
    endpoint's SANs) is part of connecting, bounded by the same connect_timeout."""
    conn = None
    with trio.move_on_after(cluster.spec.connect_timeout):
        try:
            conn = UpstreamConn(await connect(dc.reactor, ep.address, ep.port), ep)
        except OSError as exc:
            raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                             f"upstream connect error: {exc.strerror or exc}",
                             retriable=True, stat="upstream_cx_connect_fail",
                             failure=CONNECT_FAILURE) from None
        conn.born = dc.reactor.now
        if cluster.tls is not None:
            await _handshake(cluster, conn)
        return conn
    if conn is not None:
        conn.abort()  # the TLS handshake did not finish in time
    raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                     "upstream connect error: connect timeout", retriable=True,
                     stat="upstream_cx_connect_timeout", failure=CONNECT_FAILURE)


async def _handshake(cluster: Cluster, conn: UpstreamConn) -> None:
    """Upstream TLS: verify the endpoint (chain to the trust bundle, validity, serverAuth,
    an expected SAN), then route the connection's I/O through the TLS stream. A failure is
    503 UF with the reason, as Envoy's "TLS error" transport failure."""
    tls = cluster.tls
    assert tls is not None
    st = cluster.stats
    ssl = tls.connection()
    ep = conn.endpoint
    if ep.tls_session is not None and ep.tls_session[0] is tls:
        ssl.set_session(ep.tls_session[1])  # resume; a rotated context starts afresh
    stream = TLSStream.over_channel(conn.ch, ssl)
    try:
        await stream.handshake()
    except (TLSError, PeerClosed) as exc:
        conn.abort()
        st.block.inc(st.ssl_connection_error)
        raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                         f"upstream connect error: TLS error: {exc}", retriable=True,
                         stat="upstream_cx_connect_fail", failure=CONNECT_FAILURE) from None
    problem = tls.check_peer(stream.ssl)
    if problem:
        conn.abort()
        st.block.inc(st.ssl_fail_verify_san)
        raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                         f"upstream connect error: TLS error: {problem}", retriable=True,
                         stat="upstream_cx_connect_fail", failure=CONNECT_FAILURE)
    st.block.inc(st.ssl_handshake)
    if session_reused(ssl):
        st.block.inc(st.ssl_session_reused)
    conn.tls = stream
    conn.tls_context = tls
    conn.recv, conn.recv_wait = stream.recv, stream.recv_wait
    conn.send = stream.send_all


async def attempt(dc: DownstreamConnection, head: MessageHead, ex: Exchange, cluster: Cluster,
                  ep: Endpoint, up_head: bytes, state: BodyState, per_try: float,
                  route_timeout: float) -> tuple[MessageHead, bytes, UpstreamConn]:
    """One attempt: connect (or reuse), send the request, read the final response head.
    The first attempt streams the body from the client; later ones replay the copy."""
    cl = head.content_length
    has_body = head.chunked or cl > 0
    first_attempt = not state.started
    dec: ChunkedDecoder | None = None
    # RFC 9110 10.1.1: answer 100-continue only to a client still waiting to send the body.
    want_continue = first_attempt and head.expect_continue and dc.pos >= len(dc.buf)
    if first_attempt and head.chunked:
        # The chunks already received are decoded before any upstream I/O: a malformed chunk
        # among them is answered 400 with no upstream touched. (A bad chunk that arrives
        # later can only fail the stream, and the upstream connection is then reset.)
        dec = ChunkedDecoder()
        body0, dc.pos = _decode_chunks(dec, dc.buf, dc.pos, ex)
        state.started = True
        state.keep(body0)
        state.done = dec.done
        first = up_head + body0
        buffered = dec.done
    else:
        buffered = first_attempt and cl > 0 and len(dc.buf) - dc.pos >= cl
        if buffered:
            first = up_head + dc.buf[dc.pos:dc.pos + cl]
        elif not first_attempt and state.replay:
            first = up_head + b"".join(state.replay)
        else:
            first = up_head
    stale_retry = False
    while True:
        conn = ep.acquire(dc.reactor.now)
        if conn is None:
            conn = await _connection_slot(dc, cluster, ep)
        reused = conn is not None
        if conn is None:
            conn = await _connect(dc, cluster, ep)
        dc.upstream = conn
        ex.upstream_host = ep.label
        try:
            try:
                await conn.send(first)
            except PeerClosed:
                raise _StaleConnection() from None
            if dec is not None:
                if not dec.done:
                    await _send_request_body(dc, head, ex, conn, state, dec, want_continue)
            elif buffered and not state.done:
                dc.pos += cl
                ex.bytes_in = cl
                state.started = state.done = True
                state.keep(first[len(up_head):])
            elif first_attempt and has_body and not state.started:
                state.started = True
                await _send_request_body(dc, head, ex, conn, state, None, want_continue)
            dc.phase = PH_UPSTREAM
            if not state.timer_started:
                # Envoy's route timeout starts once the downstream request is complete and
                # covers every retry and back-off after it: set once per request, never
                # again by a later attempt (a request without a body included).
                state.timer_started = True
                dc.deadline = dc.reactor.now + route_timeout if route_timeout else NO_DEADLINE
            try:
                resp, ubuf = await _read_response_head(
                    dc, head, conn, dc.reactor.now + per_try if per_try else 0.0)
            except trio.TooSlowError:
                raise ProxyError(504, flags.UPSTREAM_REQUEST_TIMEOUT, "upstream",
                                 "upstream per-try timeout", retriable=True,
                                 stat="upstream_rq_per_try_timeout",
                                 failure=PER_TRY_TIMEOUT) from None
        except _StaleConnection:
            conn.close()
            dc.upstream = None
            if reused and not stale_retry and (buffered or not has_body or not first_attempt):
                stale_retry = True  # the origin closed it as we wrote: the request never ran
                cluster.stats.block.inc(cluster.stats.upstream_rq_retry)
                continue
            raise ProxyError(503, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                             "upstream connect error or disconnect/reset before headers",
                             retriable=True, stat="upstream_cx_destroy_remote_with_active_rq",
                             failure=RESET) from None
        break
    conn.requests += 1
    return resp, ubuf, conn


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


async def _connection_slot(dc: DownstreamConnection, cluster: Cluster,
                           ep: Endpoint) -> UpstreamConn | None:
    """max_connections: None when a new connection may be opened; an idle connection of
    `ep` when one came free while waiting. At the limit, an idle connection of another
    endpoint is closed to make room; otherwise the request waits as pending (at most
    max_pending_requests of them; beyond that 503 UO)."""
    breaker, cst = cluster.breaker, cluster.stats
    blk = cst.block
    if breaker.connection_room(cluster.open_connections()):
        return None
    blk.inc(cst.upstream_cx_overflow)
    for other in cluster.endpoints:
        if other is not ep and other.idle:
            other.idle.pop(0).close()  # the oldest idle connection elsewhere gives way
            return None
    if not breaker.try_pending():
        blk.inc(cst.upstream_rq_pending_overflow)
        raise ProxyError(503, flags.UPSTREAM_OVERFLOW, "upstream",
                         "upstream overflow: max_pending_requests reached")
    blk.inc(cst.upstream_rq_pending_total)
    blk.add(cst.upstream_rq_pending_active, 1)
    cluster.publish()
    try:
        while True:
            await cluster.freed()
            conn = ep.acquire(dc.reactor.now)
            if conn is not None:
                return conn
            if breaker.connection_room(cluster.open_connections()):
                return None
    finally:
        breaker.end_pending()
        blk.add(cst.upstream_rq_pending_active, -1)
        cluster.publish()


async def finish(dc: DownstreamConnection, head: MessageHead, ex: Exchange,
                 action: ClusterAction, conn: UpstreamConn, resp: MessageHead, ubuf: bytes,
                 websocket: bool, request_complete: bool) -> bool:
    """Relay the final response (or open the WebSocket tunnel)."""
    if resp.status == 101:
        if not websocket:
            raise ProxyError(502, flags.UPSTREAM_PROTOCOL_ERROR, "upstream",
                             "upstream switched protocols without being asked")
        await _tunnel(dc, ex, conn, resp, ubuf)
        return False
    return await _relay_response(dc, head, ex, action, conn, resp, ubuf, request_complete)


async def _send_request_body(dc: DownstreamConnection, head: MessageHead, ex: Exchange,
                             conn: UpstreamConn, state: BodyState, dec: ChunkedDecoder | None,
                             want_continue: bool) -> None:
    """Stream the rest of the request body client -> upstream; each send waits for the
    upstream to take the bytes before more are read from the client (backpressure). A
    chunked body arrives with its decoder, already fed with what was buffered."""
    send_u = conn.send
    idle = dc.ctx.spec.idle_timeout
    dc.phase = PH_REQ_BODY
    if want_continue:
        # RFC 9110 section 10.1.1: the client waits for this before sending the body.
        await dc.send(CONTINUE_100)
    try:
        if dec is not None:
            while not dec.done:
                dc.deadline = dc.reactor.now + idle
                buf = await dc.recv()
                if not buf:
                    raise PeerClosed("client closed during the request body")
                out, pos = _decode_chunks(dec, buf, 0, ex)
                if out:
                    state.keep(out)
                    await _send_up(send_u, out)
            # What followed the last chunk belongs to the next request.
            dc.buf, dc.pos = buf, pos
        else:
            buf, pos = dc.buf, dc.pos
            remaining = head.content_length
            take = min(remaining, len(buf) - pos)
            if take:
                state.keep(buf[pos:pos + take])
                await _send_up(send_u, buf[pos:pos + take])
                remaining -= take
                ex.bytes_in += take
            dc.buf, dc.pos = buf, pos + take
            while remaining:
                dc.deadline = dc.reactor.now + idle
                # Read no further than the body: what follows belongs to the next request.
                data = await dc.recv(min(remaining, RECV_SIZE))
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
        dc.phase = PH_UPSTREAM


async def _read_response_head(dc: DownstreamConnection, head: MessageHead,
                              conn: UpstreamConn, deadline: float = 0.0
                              ) -> tuple[MessageHead, bytes]:
    """The final response head (1xx relayed on the way) and the bytes read with it;
    trio.TooSlowError past `deadline` (the per-try timeout; 0: none)."""
    parser = dc.ctx.parser
    recv_u = conn.recv
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
                    await dc.send(serialize_head(
                        b"HTTP/1.1 %d %s" % (resp.status, resp.reason or reason(resp.status)),
                        resp.headers, RESPONSE_SKIP, []))
                upos = resp.end
                resp = parser.parse_response(ubuf, upos) if upos < len(ubuf) else None
        except ParseError as exc:
            raise ProxyError(502, flags.UPSTREAM_PROTOCOL_ERROR, "upstream",
                             f"upstream protocol error: {exc.reason}",
                             stat="upstream_cx_protocol_error") from None
        if resp is not None:
            return resp, ubuf
        try:
            data = await recv_u(deadline=deadline)
        except PeerClosed:
            data = b""
        if not data:
            raise ProxyError(503, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                             "upstream disconnect/reset before the response was complete",
                             stat="upstream_cx_destroy_remote_with_active_rq")
        ubuf = ubuf[upos:] + data if upos < len(ubuf) else data
        upos = 0


def _truncated() -> ProxyError:
    return ProxyError(502, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                      "upstream closed before the response body was complete",
                      stat="upstream_cx_destroy_remote_with_active_rq")


async def _relay_response(dc: DownstreamConnection, head: MessageHead, ex: Exchange,
                          action: ClusterAction, conn: UpstreamConn, resp: MessageHead,
                          ubuf: bytes, request_complete: bool) -> bool:
    send_d, recv_u = dc.send, conn.recv
    status = resp.status
    plan = plan_response(head, resp, request_complete,
                         not dc.ctx.state.draining and not dc.too_old())
    framing, keep, down_chunked, extra = plan.framing, plan.keep, plan.down_chunked, plan.extra
    if ex.resp_extra:
        extra += ex.resp_extra
    out = _serialize(b"HTTP/1.1 %d %s" % (status, resp.reason or reason(status)), resp,
                     action.ops.response_skip, action.ops.response_add, extra)
    ex.status = ex.upstream_status = status
    dc.phase = PH_RESP_BODY
    upos = resp.end
    reusable = upstream_reusable(request_complete, resp, framing)
    ex.response_started = True
    if framing == F_NONE:
        await send_d(out)
    elif framing == F_LENGTH:
        remaining = resp.content_length
        take = min(len(ubuf) - upos, remaining)
        await send_d(out + ubuf[upos:upos + take] if take else out)
        remaining -= take
        upos += take
        ex.bytes_out = take
        while remaining:
            try:
                data = await recv_u(min(remaining, RECV_SIZE))
            except PeerClosed:
                data = b""
            if not data:
                raise _truncated()
            await send_d(data)
            remaining -= len(data)
            ex.bytes_out += len(data)
    elif framing == F_CHUNKED:
        dec = ChunkedDecoder(error_status=502)
        pending = out
        while True:
            try:
                parts, upos = dec.feed(ubuf, upos)
            except ParseError as exc:
                raise ProxyError(502, flags.UPSTREAM_PROTOCOL_ERROR, "upstream",
                                 f"upstream protocol error: {exc.reason}",
                                 stat="upstream_cx_protocol_error") from None
            if parts:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                ex.bytes_out += len(data)
                pending += encode_chunk(data) if down_chunked else data
            if dec.done:
                if down_chunked:
                    pending += encode_last_chunk(relayed_trailers(dec.trailers))
                await send_d(pending)
                break
            if pending:
                await send_d(pending)
                pending = b""
            try:
                ubuf, upos = await recv_u(), 0
            except PeerClosed:
                ubuf = b""
            if not ubuf:
                raise _truncated()
    else:
        pending, data = out, ubuf[upos:]
        while True:
            if data:
                ex.bytes_out += len(data)
                pending += encode_chunk(data) if down_chunked else data
            if pending:
                await send_d(pending)
                pending = b""
            try:
                data = await recv_u()
            except PeerClosed:
                raise _truncated() from None  # a reset is not an end of body
            if not data:
                break
        if down_chunked:
            await send_d(encode_last_chunk())
        upos = len(ubuf)
    dc.upstream = None
    if reusable and upos >= len(ubuf):
        conn.endpoint.release(conn, dc.reactor.now)
    else:
        conn.close()
    return keep


async def _tunnel(dc: DownstreamConnection, ex: Exchange, conn: UpstreamConn,
                  resp: MessageHead, ubuf: bytes) -> None:
    """After a 101 to a WebSocket upgrade, relay bytes both ways until both sides are done.
    The listener's idle_timeout, renewed by traffic either way, bounds a silent tunnel."""
    extra = [CONN_UPGRADE, (b"upgrade", resp.upgrade or b"websocket")]
    out = serialize_head(b"HTTP/1.1 101 %s" % (resp.reason or b"Switching Protocols"),
                         resp.headers, RESPONSE_SKIP, extra)
    ex.status = ex.upstream_status = 101
    ex.response_started = True
    dc.phase = PH_TUNNEL
    idle = dc.ctx.spec.idle_timeout
    dc.deadline = dc.reactor.now + idle
    await dc.send(out + ubuf[resp.end:])
    if dc.pos < len(dc.buf):
        await conn.send(dc.buf[dc.pos:])
        dc.pos = len(dc.buf)

    async def pump(recv: Callable[[], Awaitable[bytes]],
                   send: Callable[[bytes], Awaitable[None]], dst: socket.socket,
                   upstream_bound: bool, nursery: trio.Nursery) -> None:
        try:
            while True:
                data = await recv()
                if not data:
                    break
                dc.deadline = dc.reactor.now + idle
                await send(data)
                if upstream_bound:
                    ex.bytes_in += len(data)
                else:
                    ex.bytes_out += len(data)
        except PeerClosed:
            nursery.cancel_scope.cancel()  # a reset on one side ends the tunnel
            return
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on (RFC 9293 FIN)
        except OSError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, dc.recv, conn.send, conn.sock, True, nursery)
        nursery.start_soon(pump, conn.recv, dc.send, dc.sock, False, nursery)
    dc.upstream = None
    conn.close()
