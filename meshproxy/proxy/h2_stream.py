"""One HTTP/2 stream as the layers below the driver see a client: a ClientSide whose reads
are the stream's DATA and whose writes are HEADERS and DATA frames on the connection
(proxy.downstream_h2 drives the connection; this is one request and its response).

The contract with the relay (proxy.client_side) holds as for an HTTP/1.1 connection:
- the request body is read with `recv` (and what arrived with the head is already in
  `buf`). A body with a content-length is its DATA as it came; one without is re-framed
  chunked as it is read (protocol.http2.request_head marked it so), its trailers in the
  last chunk, so the relay forwards both to an HTTP/1.1 origin unchanged.
- flow control is the buffer bound: DATA is acknowledged (WINDOW_UPDATE) only once the
  relay has taken it, so a stream holds at most its window (initial_stream_window_size)
  of a request body however slow the origin (RFC 9113 5.2);
- writes wait for the peer's window (RFC 9113 6.9) and for the connection's writer once
  more than WRITE_HIGH_WATER is queued: a slow reader stops the relay reading the origin.

A stream ends once: its response ended (END_STREAM sent), or it was reset (by the client,
by the proxy when the response broke, or with the connection).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, StreamClosedError
from h2.exceptions import ProtocolError as H2ProtocolError

from meshproxy._core.http1_conn import (
    FRAMING_LENGTH,
    FRAMING_NONE,
    plan_response,
    upstream_reusable,
)
from meshproxy._core.http1_parser import (
    MessageHead,
    encode_chunk,
    encode_last_chunk,
)
from meshproxy.config.snapshot import RESPONSE_SKIP, ClusterAction
from meshproxy.protocol import errors as flags
from meshproxy.protocol.grpc import local_status, status_of, trailers_only
from meshproxy.protocol.http2 import local_fields, response_fields
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.dispatch import forward_or_reply, reply
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.origin_body import open_body
from meshproxy.proxy.phases import PH_REQ_BODY, PH_RESP_BODY, PH_TUNNEL, PH_UPSTREAM
from meshproxy.transport.sockio import RECV_SIZE, PeerClosed
from meshproxy.upstream.conn_pool import UpstreamConn

NO_DEADLINE = float("inf")
_H2_ERRORS = (StreamClosedError, H2ProtocolError, FlowControlError)


class H2Stream(ClientSide):
    protocol = b"HTTP/2"
    multiplexed = True

    __slots__ = ("conn", "sid", "cs", "inbox", "ended", "chunked", "trailers", "gone",
                 "waiter", "window_waiter", "response_done", "ex", "head_bytes",
                 "headers_sent", "expired", "tail_sent", "tunnel", "flight", "requests",
                 "fast_hint", "never_indexed", "capture")

    def __init__(self, conn: Any, sid: int, head_bytes: bytes, ended: bool) -> None:
        """`conn`: the proxy.downstream_h2.H2Driver of the connection (which imports this
        module, so it is not named here)."""
        dc = conn.dc
        # The connection's I/O state, shared; `ch` and `sock` are the connection's, which a
        # stream never reads or closes itself (its reset is a frame).
        self.ctx = dc.ctx
        self.reactor = dc.reactor
        self.ch = dc.ch
        self.sock = dc.sock
        self.peer = dc.peer
        self.peer_ip = dc.peer_ip
        self.identity = dc.identity
        self.original_dst = dc.original_dst
        self._remote = b""
        self.send = _no_bytes
        self.conn = conn
        self.sid = sid
        self.head_bytes = head_bytes
        self.buf = b""
        self.pos = 0
        self.phase = PH_UPSTREAM
        self.upstream: UpstreamConn | None = None
        self.born = self.reactor.now
        # The head is whole: the relay sets the body's and the route's deadlines.
        self.deadline = NO_DEADLINE
        # The task's cancel scope, made when a task serves the stream (or when it is cancelled
        # before one does): a stream the fast path serves never needs one.
        self.cs: trio.CancelScope | None = None
        # Request DATA not yet taken by the relay: (payload, flow-controlled length).
        self.inbox: deque[tuple[bytes, int]] = deque()
        self.ended = ended        # END_STREAM received
        self.chunked = False      # the body is re-framed chunked (no content-length)
        self.tunnel = False       # an extended CONNECT (RFC 8441): DATA is a tunnel's bytes
        self.trailers: list[tuple[bytes, bytes]] = []
        self.tail_sent = False
        self.gone = False         # reset by the client, or the connection is gone
        self.expired = False  # its deadline passed while a task served it
        self.waiter: trio.Event | None = None
        self.window_waiter: trio.Event | None = None
        self.headers_sent = False
        self.response_done = False  # END_STREAM sent (or the stream reset by us)
        self.ex: Exchange | None = None
        # The fast path's exchange while it serves the stream with no task (proxy.fast_path_h2).
        self.flight: Any = None
        self.requests = 0
        self.fast_hint = False
        # The request fields the client sent never-indexed, kept so upstream (RFC 7541 7.1.3).
        self.never_indexed: frozenset[tuple[bytes, bytes]] | None = None
        # A mirrored request's response, captured as it is written (proxy.mirror).
        self.capture: Any = None

    # ------------------------------------------------------------------ from the driver

    def expire(self) -> None:
        """The stream's deadline passed (the reactor's ticker): its task answers by phase,
        or the fast path decides (a retry after the per-try timeout, or the 504)."""
        flight = self.flight
        if flight is not None and flight.waiting:
            flight.expire()
            return
        self.expired = True
        self.cancel_task()

    def feed(self, data: bytes, flow: int) -> None:
        self.inbox.append((data, flow))
        self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def lost(self) -> None:
        """Reset by the client, or the connection ended: the request is abandoned (by its
        task, or here when the fast path had it)."""
        self.gone = True
        flight = self.flight
        if flight is not None:
            self.flight = None
            flight.abandon()  # its callbacks go too: no cycle is left for the collector
            self.conn.end_stream(self)
        else:
            self.cancel_task()

    def cancel_task(self) -> None:
        """Cancel the stream's task (its scope, made now if the task has not begun: it then
        begins cancelled)."""
        self.scope().cancel()

    def scope(self) -> trio.CancelScope:
        """The scope the stream's task runs in."""
        cs = self.cs
        if cs is None:
            cs = self.cs = trio.CancelScope()
        return cs

    def window(self) -> None:
        w = self.window_waiter
        if w is not None:
            self.window_waiter = None
            w.set()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            w.set()

    def take_buffered(self) -> None:
        """What arrived with the head becomes `buf`, as an HTTP/1.1 connection's read
        would have it (a small body then goes upstream in the head's send)."""
        if self.inbox or (self.chunked and self.ended):
            self.buf = self._take(1 << 30)

    # ------------------------------------------------------------------ from the fast path

    def hand_off(self, cont: Callable[[], Awaitable[bool]] | None) -> None:
        """The fast path gives the stream to a task: `cont` first (the exchange it began
        goes on), or, declined before it began one, the request from its head."""
        self._unflight()
        if cont is None:
            self.buf = b""
            self.pos = 0
        self.conn.serve_in_task(self, cont)

    def fast_done(self) -> None:
        """The fast path is through with the stream: it relayed the whole response and
        finished the exchange, or it could not go on (the stream closed under it, or a
        bug). The stream ends, reset unless its response was sent."""
        self._unflight()
        self.conn.end_stream(self)

    close_taskless = fast_done  # Flight's name for its ending without a task

    def _unflight(self) -> None:
        """The fast path is done with the stream. Its flight holds its own callbacks (bound
        methods, a reference cycle): they are dropped, so the flight is freed at once
        rather than left to the cyclic collector, one per stream."""
        flight = self.flight
        if flight is not None:
            self.flight = None
            flight.client_cb = flight.upstream_cb = None

    def too_old(self) -> bool:
        return bool(self.conn.dc.too_old())

    def can_emit(self, n: int) -> bool:
        """Whether a response with n body bytes can be queued at once: within the stream's
        and the connection's windows (RFC 9113 6.9), one DATA frame, and no more than
        WRITE_HIGH_WATER queued for the client."""
        h2 = self.conn.codec.h2
        try:
            window = h2.local_flow_control_window(self.sid)
        except _H2_ERRORS:
            return False
        return (n <= window and n <= h2.max_outbound_frame_size
                and self.conn.room(n))

    def emit(self, resp: MessageHead, framing: int, action: ClusterAction, ex: Exchange,
             data: bytes, trailers: list[tuple[bytes, bytes]] | None) -> None:
        """A whole response from an HTTP/1.1 origin queued on the connection (can_emit said
        it fits), with relay_response's fields: HEADERS, DATA, trailers, END_STREAM on the
        last of them (RFC 9113 8.1)."""
        if self.gone:
            raise PeerClosed("the client reset the stream")
        fields = response_head_fields(resp.status, resp, framing, action, ex, None)
        if trailers:
            grpc_trailers(ex, trailers)
        h2 = self.conn.codec.h2
        sid = self.sid
        frames = 1
        try:
            h2.send_headers(sid, fields, end_stream=not data and not trailers)
            if data:
                h2.send_data(sid, data, end_stream=not trailers)
                frames += 1
            if trailers:
                h2.send_headers(sid, trailers, end_stream=True)
                frames += 1
        except _H2_ERRORS:
            raise PeerClosed("the stream is closed") from None
        self.headers_sent = self.response_done = True
        self.conn.queued_now(len(data), frames)

    async def go_on(self, head: MessageHead, ex: Exchange, action: ClusterAction,
                    resume: Any) -> bool:
        """An exchange the fast path began goes on in the router, from `resume` (the
        stream's task finishes it)."""
        return await forward_or_reply(self, head, ex, action, resume)

    async def answer_with(self, head: MessageHead, ex: Exchange, answer: Any) -> bool:
        """The fast path's request is answered locally (the router's failure reply)."""
        return await reply(self, ex, head, answer)

    async def timed_out(self) -> bool:
        """The route timeout fired while the fast path waited for the upstream."""
        await self.on_timeout()
        return False

    # ------------------------------------------------------------------ reads

    # recv and recv_wait are methods here, not the per-instance callables of ClientSide's
    # slots (which they shadow): a bound method stored on the stream would be a reference
    # cycle, left to the cyclic collector once per stream.
    async def recv(self, size: int = RECV_SIZE, deadline: float = 0.0) -> bytes:
        """Request body bytes (chunk-framed when `chunked`); b"" once it has ended."""
        while not self.inbox:
            if self.ended:
                return self._tail()
            if self.gone:
                raise PeerClosed("the client reset the stream")
            w = self.waiter = trio.Event()
            await w.wait()
        return self._take(size)

    recv_wait = recv

    def _take(self, size: int) -> bytes:
        inbox = self.inbox
        parts = []
        got = flow = 0
        while inbox and got < size:
            data, n = inbox.popleft()
            if got + len(data) > size:
                keep = size - got
                inbox.appendleft((data[keep:], 0))
                data = data[:keep]
            parts.append(data)
            got += len(data)
            flow += n
        if flow:
            self.conn.consumed(self.sid, flow)
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        if self.chunked:
            out = encode_chunk(out) if out else b""
            if self.ended and not inbox:
                out += self._tail()
        return out

    def _tail(self) -> bytes:
        """The end of a chunk-framed body, its trailers in it, said once (b"" after)."""
        if not self.chunked or self.tail_sent:
            return b""
        self.tail_sent = True
        return encode_last_chunk(self.trailers)

    # ------------------------------------------------------------------ writes

    async def send_head(self, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        if self.gone:
            raise PeerClosed("the client reset the stream")
        if self.capture is not None:
            self.capture.h2_fields(fields, end)
        try:
            self.conn.codec.h2.send_headers(self.sid, fields, end_stream=end)
        except _H2_ERRORS:
            raise PeerClosed("the stream is closed") from None
        self.headers_sent = True
        if end:
            self.response_done = True
        await self.conn.queued(0)

    async def send_body(self, data: bytes, end: bool) -> None:
        """DATA within the peer's windows and the frame size; END_STREAM with the last."""
        if self.capture is not None:
            self.capture.h2_data(data, end)
        conn = self.conn
        h2 = conn.codec.h2
        sid = self.sid
        while True:
            if self.gone:
                raise PeerClosed("the client reset the stream")
            n = len(data)
            if n:
                try:
                    window = h2.local_flow_control_window(sid)
                except _H2_ERRORS:
                    raise PeerClosed("the stream is closed") from None
                if window <= 0:
                    w = self.window_waiter = trio.Event()
                    await w.wait()
                    continue
                n = min(n, window, h2.max_outbound_frame_size)
            last = end and n == len(data)
            try:
                h2.send_data(sid, data[:n] if n < len(data) else data, end_stream=last)
            except _H2_ERRORS:
                raise PeerClosed("the stream is closed") from None
            if last:
                self.response_done = True
            await conn.queued(n)
            data = data[n:]
            if not data:
                return

    async def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        await self.send_head(fields, True)

    async def informational(self, status: int, headers: list[tuple[bytes, bytes]],
                            phrase: bytes = b"") -> None:
        """A 1xx as a HEADERS frame without END_STREAM (RFC 9113 8.1); HTTP/2 has no
        reason phrase, and the connection-specific fields go (8.2.2)."""
        fields = [(b":status", b"%d" % status)]
        fields += [f for f in headers if f[0] not in RESPONSE_SKIP]
        await self.send_head(fields, False)

    def reset(self) -> None:
        self.conn.reset(self, ErrorCodes.INTERNAL_ERROR)

    def cancel(self) -> None:
        """A tunnel's other side was reset: RST_STREAM CANCEL (RFC 8441 5, a TCP RST)."""
        self.conn.reset(self, ErrorCodes.CANCEL)

    async def send_local(self, ex: Any, head: MessageHead | None, status: int, body: bytes,
                         flag: str, *, close: bool = False, body_done: bool = False,
                         extra: list[tuple[bytes, bytes]] | None = None,
                         content_type: bytes = b"text/plain", grpc_status: int = -1) -> bool:
        """A local reply on this stream (`close` is the connection's: a stream ends anyway).
        To a gRPC call it is trailers-only, with the gRPC status for it (`grpc_status`, or
        the one Envoy maps from `status`: protocol.grpc)."""
        hdrs = list(extra or ())
        if ex.resp_extra:
            hdrs += ex.resp_extra
        if ex.grpc:
            code = (grpc_status if grpc_status >= 0
                    else local_status(status, flag == flags.UPSTREAM_REQUEST_TIMEOUT))
            ex.status = 200
            ex.grpc_status = code
            ex.flags = flag
            ex.response_started = True
            ex.bytes_out = 0
            await self.send_head(trailers_only(code, body.strip(), hdrs), True)
            return False
        head_only = head is not None and head.method == b"HEAD"
        fields = local_fields(status, len(body), content_type, hdrs)
        ex.status = status
        ex.flags = flag
        ex.response_started = True
        ex.bytes_out = 0 if head_only or not body else len(body)
        if head_only or not body:
            await self.send_head(fields, True)
        else:
            await self.send_head(fields, False)
            await self.send_body(body, True)
        return False

    # ------------------------------------------------------------------ the response

    async def relay_response(self, head: MessageHead, ex: Exchange, action: ClusterAction,
                             conn: UpstreamConn, resp: MessageHead, ubuf: bytes,
                             request_complete: bool) -> bool:
        """An HTTP/1.1 origin's response as HEADERS, DATA and trailers on this stream: the
        origin's framing (http1_conn decides it) ends the stream; chunked trailers become
        a trailing HEADERS frame (RFC 9113 8.1)."""
        status = resp.status
        plan = plan_response(head, resp, request_complete, False)
        framing = plan.framing
        # An HTTP/2 origin's never-indexed fields stay so (`conn` is then its OriginStream).
        fields = response_head_fields(status, resp, framing, action, ex,
                                      getattr(conn, "never_indexed", None))
        ex.status = ex.upstream_status = status
        self.phase = PH_RESP_BODY
        reusable = upstream_reusable(request_complete, resp, framing)
        ex.response_started = True
        body = open_body(conn, resp, ubuf, framing)
        data = body.take()
        # END_STREAM rides on the last frame: the head when there is no body, else the
        # last DATA, or the trailers' HEADERS (RFC 9113 8.1).
        trailers = body.done and bool(body.trailers)
        await self.send_head(fields, body.done and not data and not trailers)
        while True:
            end = body.done and not body.trailers
            if data or (end and not self.response_done):
                ex.bytes_out += len(data)
                await self.send_body(data, end)
            if body.done:
                break
            data = await body.read()
        if body.trailers:
            grpc_trailers(ex, body.trailers)
            await self.send_trailers(body.trailers)
        self.upstream = None
        body.finish(reusable, self.reactor.now)
        return False

    async def on_timeout(self) -> None:
        """The stream's deadline passed: 408 while the body was awaited, 504 UT while the
        origin was, a reset once the response had begun (as an HTTP/1.1 connection)."""
        ex = self.ex
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if ex is None:
            return
        if self.phase == PH_TUNNEL:
            ex.flags = flags.STREAM_IDLE_TIMEOUT  # a tunnel silent for idle_timeout
            self.cancel()
            return
        if ex.response_started:
            ex.flags = flags.UPSTREAM_REQUEST_TIMEOUT
            self.reset()
            return
        if self.phase == PH_REQ_BODY:
            status, flag, body = 408, flags.STREAM_IDLE_TIMEOUT, b"request timeout\n"
        else:
            status, flag, body = 504, flags.UPSTREAM_REQUEST_TIMEOUT, b"upstream request timeout\n"
        with trio.move_on_after(1.0):
            try:
                await self.send_local(ex, ex.head, status, body, flag)
            except PeerClosed:
                pass


def response_head_fields(status: int, resp: MessageHead, framing: int, action: ClusterAction,
                         ex: Exchange, never: frozenset[tuple[bytes, bytes]] | None
                         ) -> list[tuple[bytes, bytes]]:
    """An origin's response head as the stream's HEADERS: content-length restated from the
    framing (none for 204 and 304), the connection-specific fields gone (RFC 9113 8.2.2);
    a gRPC call's status from it (a trailers-only answer's)."""
    length = resp.content_length if framing in (FRAMING_LENGTH, FRAMING_NONE) else -1
    if status in (204, 304):
        length = -1
    if ex.grpc:
        ex.grpc_status = status_of(resp.headers)
    return response_fields(status, resp, action.ops.response_skip, action.ops.response_add,
                           ex.resp_extra, length, never)


def grpc_trailers(ex: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
    """A gRPC call's status from its trailers, when they state one."""
    if ex.grpc:
        code = status_of(trailers)
        if code >= 0:
            ex.grpc_status = code


async def _no_bytes(data: bytes) -> None:
    raise AssertionError("an HTTP/2 stream is written in frames, never raw bytes")
