"""One downstream HTTP/2 connection: the frames in, a task per stream, the frames out.

The connection's task (DownstreamConnection.run, once the preface or ALPN said h2) reads
and feeds the codec (protocol.http2); each request opens a stream (proxy.h2_stream) served
by its own task, which goes through the same dispatch, filter chain and router as an
HTTP/1.1 request. Tasks live in one nursery that bounds them: when the connection ends,
every stream still open is abandoned with it (its exchange logged with DC).

Writes: streams queue frames in the codec's buffer and wake one writer task, which sends what
is queued in one write; a stream that has queued more than WRITE_HIGH_WATER waits for it
to be written, so the bytes the proxy holds for a client are bounded by that and the
streams' windows, however slowly the client reads. Control frames the client makes us
queue (PING and SETTINGS acknowledgements) while it reads nothing are counted: past
max_outbound_control_frames (or max_outbound_frames of any kind) the connection is a
flood and is closed.

Ends (Envoy's behaviour): the client closes, or sends GOAWAY and its streams finish; a
protocol error or flood (GOAWAY with the error, then close); idle_timeout with no stream
open (GOAWAY NO_ERROR); max_connection_duration or the worker draining: a graceful
GOAWAY naming the last stream taken, the streams in flight finish, new ones are refused
(REFUSED_STREAM, RFC 9113 8.7: the client may retry them elsewhere), then close.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError as H2ProtocolError
from hyperframe.frame import GoAwayFrame

from meshproxy._core.h2_server import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from meshproxy._core.http1_parser import ParseError
from meshproxy.protocol import errors as flags
from meshproxy.protocol.http2 import (
    BODY_AS_IS,
    BODY_CHUNKED,
    BODY_TUNNEL,
    PREMATURE_RESET_LIFETIME,
    H2Failure,
    ServerCodec,
    never_indexed,
    request_head,
)
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.dispatch import dispatch
from meshproxy.proxy.exchange import begin, finish
from meshproxy.proxy.fast_path_h2 import StreamFlight
from meshproxy.proxy.h2_stream import NO_DEADLINE, H2Stream
from meshproxy.proxy.head_rewrite import relayed_trailers
from meshproxy.transport.sockio import PeerClosed

log = logging.getLogger("meshproxy.downstream")

# Bytes queued for the client beyond which a stream's writes wait for the writer: one
# socket write's worth (a TCP send buffer is of this order), so queuing never runs far
# ahead of what the client takes.
WRITE_HIGH_WATER = 65_536
# Bound on the last write (a GOAWAY) to a client that may not be reading.
FAREWELL_TIMEOUT = 1.0


class H2Driver:
    __slots__ = ("dc", "ctx", "codec", "streams", "nursery", "want_write", "drained",
                 "queued_bytes", "control_queued", "frames_queued", "extra_out",
                 "going_away", "peer_away", "read_scope", "ended", "hs", "headers_by",
                 "fast")

    def __init__(self, dc: ClientSide) -> None:
        """`dc`: the connection (proxy.downstream), as the ClientSide its streams share."""
        self.dc = dc
        ctx = self.ctx = dc.ctx
        self.hs = ctx.hstats
        self.codec = ServerCodec(ctx.spec.http2, ctx.spec.max_header_bytes)
        self.streams: dict[int, H2Stream] = {}
        self.nursery: trio.Nursery | None = None
        self.want_write = trio.Event()
        self.drained = trio.Event()
        self.queued_bytes = 0
        self.control_queued = 0
        self.frames_queued = 0
        self.extra_out = b""   # our own frames after h2's (a graceful GOAWAY)
        self.going_away = False
        self.peer_away = False
        self.read_scope = trio.CancelScope()
        self.ended = False
        # While a header block is in progress: when it must have ended (the listener's
        # request_headers_timeout from its first byte), else NO_DEADLINE.
        self.headers_by = NO_DEADLINE
        # Streams without a body start on the fast path (proxy.fast_path_h2) unless it is
        # off (--no-fast-path) or spans are recorded (a task's work).
        self.fast = ctx.state.fast_path and ctx.tracer is None

    # ------------------------------------------------------------------ the connection

    async def run(self, initial: bytes) -> None:
        """Serve the connection until it ends; `initial`: bytes read before the codec
        was chosen (the preface and what followed it)."""
        dc = self.dc
        blk = self.hs.block
        blk.inc(self.hs.downstream_cx_http2_total)
        blk.add(self.hs.downstream_cx_http2_active, 1)
        self.codec.start()
        self._idle()
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._writer)
                self.kick()
                with self.read_scope:
                    await self._read(initial)
                nursery.cancel_scope.cancel()
        finally:
            self.ended = True
            for st in list(self.streams.values()):
                st.lost()
            blk.add(self.hs.downstream_cx_http2_active, -1)
            data = self.codec.h2.data_to_send() + self.extra_out
            self.extra_out = b""
            if data and dc.sock.fileno() >= 0:
                with trio.move_on_after(FAREWELL_TIMEOUT) as scope:
                    scope.shield = True
                    try:
                        await dc.send(data)
                    except (PeerClosed, OSError):
                        pass

    async def _read(self, data: bytes) -> None:
        dc = self.dc
        codec = self.codec
        while True:
            if data:
                try:
                    events = codec.receive(data)
                except H2Failure as exc:
                    self._failed(exc)
                    return
                try:
                    self._handle(events)
                except H2Failure as exc:
                    self._failed(exc)
                    return
                self.kick()
                if codec.header_block_pending():
                    if self.headers_by == NO_DEADLINE:
                        self.headers_by = (dc.reactor.now
                                           + self.ctx.spec.request_headers_timeout)
                        dc.deadline = min(dc.deadline, self.headers_by)
                elif self.headers_by != NO_DEADLINE:
                    self.headers_by = NO_DEADLINE
                    if self.streams:
                        dc.deadline = self._age_limit()
                    else:
                        self._idle()
            if (self.going_away or self.peer_away) and not self.streams:
                return
            try:
                data = await dc.recv()
            except PeerClosed:
                return
            if not data:
                return

    def _failed(self, exc: H2Failure) -> None:
        """A protocol error or a flood: the GOAWAY h2 queued goes out, then the close."""
        hs = self.hs
        hs.block.inc(getattr(hs, exc.stat))
        hs.block.inc(hs.http2_goaway_sent)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("HTTP/2 connection from %s ends: %s", self.dc.peer, exc.reason)

    def _handle(self, events: list[Any]) -> None:
        streams = self.streams
        hs = self.hs
        ev: Any  # narrowed by `kind`, which mypy does not follow
        for ev in events:
            kind = type(ev)
            if kind is DataReceived:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.feed(ev.data, ev.flow_controlled_length)
                    if ev.stream_ended is not None:
                        st.end()
                elif ev.flow_controlled_length:
                    # A stream already answered: its data is dropped, the window reopened.
                    self.consumed(ev.stream_id, ev.flow_controlled_length)
            elif kind is RequestReceived:
                self._open(ev)
            elif kind is StreamEnded:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.end()
            elif kind is WindowUpdated:
                if ev.stream_id == 0:
                    for st in streams.values():
                        st.window()
                else:
                    st = streams.get(ev.stream_id)
                    if st is not None:
                        st.window()
            elif kind is TrailersReceived:
                hs.block.inc(hs.http2_trailers)
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.trailers = relayed_trailers([(k, v) for k, v in ev.headers])
                    never = never_indexed(ev.headers)
                    if never is not None:  # kept so to an HTTP/2 origin (RFC 7541 7.1.3)
                        st.never_indexed = (never if st.never_indexed is None
                                            else st.never_indexed | never)
                    if ev.stream_ended is not None:
                        st.end()
            elif kind is StreamReset:
                st = streams.get(ev.stream_id)
                if not ev.remote_reset:
                    # A stream error of the codec's (a frame the stream's state forbids,
                    # RFC 9113 5.1): its RST_STREAM is queued, the stream is abandoned.
                    hs.block.inc(hs.http2_tx_reset)
                    hs.block.inc(hs.http2_rx_messaging_error)
                    self._control()
                    if st is not None:
                        st.lost()
                    continue
                hs.block.inc(hs.http2_rx_reset)
                if st is not None:
                    premature = (not st.response_done
                                 and self.dc.reactor.now - st.born < PREMATURE_RESET_LIFETIME)
                    st.lost()
                    if premature and self.codec.premature_reset():
                        self.codec.fail("downstream_rq_too_many_premature_resets",
                                        "too many streams reset as soon as opened")
            elif kind is PingReceived:
                self._control()
            elif kind is RemoteSettingsChanged:
                self._control()
                for st in streams.values():
                    st.window()  # INITIAL_WINDOW_SIZE moves every stream's window
            elif kind is ConnectionTerminated:
                self.peer_away = True

    def _control(self) -> None:
        """A control frame queued in reply (PING or SETTINGS ACK): a client that sends
        them without reading the replies floods (CVE-2019-9512, 9515)."""
        self.control_queued += 1
        if self.control_queued > self.codec.spec.max_outbound_control_frames:
            self.codec.fail("http2_outbound_control_flood",
                            "control frames queued for a client that does not read")

    def _open(self, ev: RequestReceived) -> None:
        sid = ev.stream_id
        ended = ev.stream_ended is not None
        if self.going_away:
            # Past our GOAWAY's last stream: refused, never processed (RFC 9113 8.7).
            self.codec.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        head_bytes, body, never = request_head(ev.headers, ended)
        hs = self.hs
        if body == BODY_TUNNEL and not self.codec.spec.allow_connect:
            # RFC 8441 3: :protocol only to a server that sent ENABLE_CONNECT_PROTOCOL;
            # otherwise the request is malformed, a stream error (RFC 9113 8.1.1).
            hs.block.inc(hs.http2_rx_messaging_error)
            self.codec.h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        st = H2Stream(self, sid, head_bytes, ended)
        st.chunked = body == BODY_CHUNKED
        st.tunnel = body == BODY_TUNNEL
        st.never_indexed = never
        self.codec.opened()
        self.streams[sid] = st
        hs.block.add(hs.http2_streams_active, 1)
        self.dc.deadline = self._age_limit()
        if self.ctx.state.draining:
            self.go_away()
        if ended and self.fast and body == BODY_AS_IS:
            # A request without a body: the fast path's (proxy.fast_path_h2), no task.
            self.dc.reactor.timed.add(st)
            flight = st.flight = StreamFlight(st)
            flight.begin()
        else:
            self.serve_in_task(st, None)

    def serve_in_task(self, st: H2Stream, cont: Callable[[], Awaitable[bool]] | None) -> None:
        """The stream's task: from its head, or from what the fast path began (`cont`)."""
        assert self.nursery is not None
        self.nursery.start_soon(self._serve, st, cont)

    # ------------------------------------------------------------------ streams

    async def _serve(self, st: H2Stream, cont: Callable[[], Awaitable[bool]] | None) -> None:
        """One stream, from its head (or from `cont`) to its end, however it ends."""
        ctx = self.ctx
        self.dc.reactor.timed.add(st)
        cs = st.scope()
        try:
            with cs:
                head = None
                if cont is not None:
                    await cont()
                else:
                    try:
                        head = ctx.parser.parse_request(st.head_bytes)
                    except ParseError as exc:
                        ex = st.ex = begin(st, None)
                        await st.send_local(ex, None, exc.status,
                                            exc.reason.encode() + b"\n",
                                            flags.DOWNSTREAM_PROTOCOL_ERROR)
                if head is not None:
                    ex = st.ex = begin(st, head)
                    st.take_buffered()
                    if st.tunnel and (head.upgrade or b"").lower() != b"websocket":
                        # Only the WebSocket upgrade is relayed (Envoy: 403, upgrade_failed).
                        ex.details = "upgrade_failed"
                        await st.send_local(ex, head, 403, b"upgrade not allowed\n", "-")
                    else:
                        await dispatch(st, head, ex)
            if cs.cancelled_caught and st.expired and not st.gone:
                await st.on_timeout()
        except PeerClosed:
            pass
        except Exception:
            # A bug costs this stream (reset), never the connection's other streams.
            log.exception("internal error on a stream from %s", self.dc.peer)
        finally:
            self.end_stream(st)

    def end_stream(self, st: H2Stream) -> None:
        """A stream's end, whoever served it: its upstream let go, its exchange finished
        (the logging phase), the stream closed."""
        self.dc.reactor.timed.discard(st)
        if st.upstream is not None:
            st.upstream.abort()
            st.upstream = None
        ex = st.ex
        if ex is not None:
            st.ex = None
            if st.gone and not st.response_done and ex.status == 0:
                ex.flags = flags.DOWNSTREAM_CONNECTION_TERMINATION
            finish(st, ex)
        self._closed(st)

    def _closed(self, st: H2Stream) -> None:
        hs = self.hs
        hs.block.add(hs.http2_streams_active, -1)
        self.streams.pop(st.sid, None)
        if self.ended:
            return
        if not st.gone:
            if not st.response_done:
                self.reset(st, ErrorCodes.INTERNAL_ERROR)  # ended without a response
            elif not st.ended:
                # Answered before the request body ended: the client may stop sending it
                # (RFC 9113 8.1, RST_STREAM NO_ERROR).
                self.reset(st, ErrorCodes.NO_ERROR)
        # Whatever the relay left unread is reopened in the connection's window.
        left = sum(n for _d, n in st.inbox)
        if left:
            st.inbox.clear()
            self.consumed(0, left)
        if not self.streams:
            if self.going_away or self.peer_away:
                self.read_scope.cancel()
            elif self.ctx.state.draining or self.dc.too_old():
                self.go_away()
                self.read_scope.cancel()
            else:
                self._idle()

    def reset(self, st: H2Stream, code: int) -> None:
        """RST_STREAM from the proxy (a broken response, a timeout, an early answer)."""
        st.response_done = True
        try:
            self.codec.h2.reset_stream(st.sid, code)
        except H2ProtocolError:
            return  # already closed both ways
        if code != ErrorCodes.NO_ERROR:
            hs = self.hs
            hs.block.inc(hs.http2_tx_reset)
        st.gone = True
        self.kick()

    def consumed(self, sid: int, n: int) -> None:
        """The relay took n flow-controlled bytes of stream `sid` (0: of a stream gone):
        the client's windows reopen (WINDOW_UPDATE once half of one was taken)."""
        self.codec.h2.acknowledge_received_data(n, sid)
        self.kick()

    # ------------------------------------------------------------------ timeouts

    def _idle(self) -> None:
        """No stream open: the connection closes after idle_timeout (and no later than
        max_connection_duration)."""
        spec = self.ctx.spec
        dc = self.dc
        deadline = dc.reactor.now + spec.idle_timeout
        limit = self._age_limit()
        dc.deadline = min(deadline, limit)

    def _age_limit(self) -> float:
        limit = self.ctx.spec.max_connection_duration
        return self.dc.born + limit if limit else NO_DEADLINE

    def expire(self) -> None:
        """The connection's deadline passed (reactor), or the worker drains: idle, it
        closes; with streams open (max_connection_duration), a graceful GOAWAY. A header
        block still unfinished at its deadline closes the connection at once: nothing
        else can pass on it before that block ends (RFC 9113 6.10)."""
        dc = self.dc
        if self.headers_by <= dc.reactor.now:
            hs = self.hs
            hs.block.inc(hs.downstream_rq_timeout)
            self.headers_by = NO_DEADLINE
            dc.deadline = NO_DEADLINE
            self.go_away()
            self.read_scope.cancel()
            return
        dc.deadline = NO_DEADLINE
        if not self.streams:
            if not self.ctx.state.draining and not self.dc.too_old():
                hs = self.hs
                hs.block.inc(hs.http2_keepalive_timeout)
            self.go_away()
            self.read_scope.cancel()
        else:
            self.go_away()

    def go_away(self) -> None:
        """A graceful GOAWAY (NO_ERROR) naming the last stream taken; sent once. Built by
        hand: h2's close_connection would end its state machine, and the streams in
        flight still need their frames."""
        if self.going_away:
            return
        self.going_away = True
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.codec.h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.extra_out += frame.serialize()
        hs = self.hs
        hs.block.inc(hs.http2_goaway_sent)
        self.kick()

    # ------------------------------------------------------------------ writes

    def kick(self) -> None:
        self.want_write.set()

    def room(self, n: int) -> bool:
        """Whether n more bytes stay within WRITE_HIGH_WATER of what is queued."""
        return self.queued_bytes + n <= WRITE_HIGH_WATER

    async def queued(self, n: int) -> None:
        """A stream queued a frame of n payload bytes: wake the writer, and wait for it
        while more than WRITE_HIGH_WATER is queued."""
        self.queued_now(n, 1)
        while self.queued_bytes > WRITE_HIGH_WATER and not self.ended:
            await self.drained.wait()

    def queued_now(self, n: int, frames: int) -> None:
        """A stream queued `frames` frames with n DATA payload bytes among them: the writer
        is woken; a client that reads none of it while streams keep answering floods."""
        self.queued_bytes += n
        self.frames_queued += frames
        self.codec.data_frames_sent += n > 0
        if self.frames_queued > self.codec.spec.max_outbound_frames and not self.ended:
            # The client reads nothing while streams keep answering: the connection ends
            # (GOAWAY, then its streams are abandoned with it).
            try:
                self.codec.fail("http2_outbound_flood",
                                "frames queued for a client that does not read")
            except H2Failure as exc:
                self._failed(exc)
            self.read_scope.cancel()
        self.want_write.set()

    async def _writer(self) -> None:
        """Send what is queued, in one write per wake-up."""
        dc = self.dc
        h2 = self.codec.h2
        while True:
            await self.want_write.wait()
            self.want_write = trio.Event()
            data = h2.data_to_send()
            if self.extra_out:
                data += self.extra_out
                self.extra_out = b""
            if data:
                try:
                    await dc.send(data)
                except PeerClosed:
                    self.read_scope.cancel()
                    return
            self.queued_bytes = 0
            self.frames_queued = 0
            self.control_queued = 0
            drained, self.drained = self.drained, trio.Event()
            drained.set()
