"""A multiplexed HTTP/2 connection to one endpoint, and the streams it carries (the client
side of RFC 9113): a worker's requests to an endpoint share one connection; another one
opens only when the streams in flight reach max_concurrent_streams (ours or the origin's
SETTINGS, the lower).

Life of a connection (one task, `run`, in the worker's nursery, so that it outlives the
request that opened it): connecting (upstream.connect, with TLS and ALPN h2, then the
prefaces), ready (the origin's SETTINGS arrived: its stream limit is known), going away
(a GOAWAY from the origin, max_connection_duration, the endpoint left the config, idle
past the cluster's idle_timeout), closed once no stream is left. A stream slot is
reserved synchronously (Cluster.admit_h2) before any await, so requests that arrive
together fill one connection instead of each opening its own.

The reader task feeds h2 and hands each event to its stream; the writer task sends what
h2 queued in one write per wake-up. A stream's request DATA waits for the origin's
windows and, past WRITE_HIGH_WATER queued, for the writer: what the proxy holds for an
origin is bounded. Responses: the stream and connection windows reopen only as the relay
takes the data, so they bound what a stream and the whole connection buffer whatever the
clients' speed (the connection window is large enough, 16 MiB by default, that many
stalled clients are needed before the others wait for it).

GOAWAY (RFC 9113 6.8): streams above its last_stream_id were never processed and fail
as refused (retriable: Envoy's refused-stream); the others finish (a graceful GOAWAY
keeps h2's machine open for them: protocol.http2.ClientCodec), and the connection takes
no new stream. A GOAWAY with an error fails every stream.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError

from meshproxy._core.http1_conn import FRAMING_NONE
from meshproxy.config.snapshot import TRAILER_SKIP
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import REFUSED, RESET, ProxyError
from meshproxy.protocol.http2 import ClientCodec, never_indexed
from meshproxy.transport.sockio import PeerClosed
from meshproxy.upstream.conn_pool import Endpoint, UpstreamConn

log = logging.getLogger("meshproxy.upstream")

# Request bytes queued for an origin past which a stream waits for the writer (as on the
# downstream side: about one socket write).
WRITE_HIGH_WATER = 65_536
CONNECTING, READY, GOING_AWAY, CLOSED = 0, 1, 2, 3


def refused(detail: str, stat: str = "") -> ProxyError:
    """A stream the origin never processed (REFUSED_STREAM, or above a GOAWAY's last
    stream): safe to send again, anywhere (RFC 9113 8.7)."""
    return ProxyError(503, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                      f"upstream refused the stream: {detail}", retriable=True,
                      stat=stat, failure=REFUSED)


def stream_reset(code: int) -> ProxyError:
    return ProxyError(503, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                      f"upstream reset the stream: {_code_name(code)}", retriable=True,
                      stat="upstream_rq_rx_reset", failure=RESET)


def connection_lost(detail: str) -> ProxyError:
    return ProxyError(503, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                      f"upstream connect error or disconnect/reset before headers: {detail}",
                      retriable=True, stat="upstream_cx_destroy_remote_with_active_rq",
                      failure=RESET)


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


class OriginStream:
    """One request on an H2Origin. The attempt (proxy.relay_h2) writes the request and
    reads the response head here; the response relays read the body through the same
    interface as proxy.origin_body's (take, read, done, trailers, clean, finish), and
    `close`/`abort` end the stream (RST_STREAM CANCEL if it is still open), never the
    connection the other streams share."""

    multiplexed = True

    __slots__ = ("origin", "endpoint", "sid", "requests", "fields", "head_ended", "info",
                 "inbox", "unacked", "trailers", "remote_ended", "local_ended", "error",
                 "event", "done", "clean", "released", "expected", "received",
                 "early_reset", "never_indexed")

    def __init__(self, origin: H2Origin) -> None:
        self.origin = origin
        self.endpoint = origin.endpoint
        self.sid = 0
        self.requests = 0
        self.fields: list[tuple[bytes, bytes]] | None = None  # the final response's
        # Those of them the origin sent never-indexed, kept so (RFC 7541 7.1.3); None: none.
        self.never_indexed: frozenset[tuple[bytes, bytes]] | None = None
        self.head_ended = False
        self.info: list[list[tuple[bytes, bytes]]] = []  # 1xx heads not yet relayed
        self.inbox: list[bytes] = []
        self.unacked = 0  # flow-controlled bytes received and not yet taken
        self.trailers: list[tuple[bytes, bytes]] = []
        self.remote_ended = False
        self.local_ended = False
        self.error: ProxyError | None = None
        self.early_reset = False  # RST_STREAM NO_ERROR after a complete response
        self.event: trio.Event | None = None
        self.done = False  # the response body has ended
        self.clean = True
        self.released = False
        self.expected = -1  # the response's content-length
        self.received = 0

    # ------------------------------------------------------------ from the reader

    def wake(self) -> None:
        ev = self.event
        if ev is not None:
            self.event = None
            ev.set()

    def failed(self, err: ProxyError) -> None:
        if self.error is None and not self.remote_ended:
            self.error = err
        self.wake()

    # ------------------------------------------------------------ the attempt's side

    async def wait(self) -> None:
        """Until the reader hands this stream something (or the window moves)."""
        self.event = trio.Event()
        await self.event.wait()

    async def send_data(self, data: bytes, end: bool) -> bool:
        """Request DATA within the origin's windows and frame size; False once the origin
        stopped taking the request (it reset the stream, or answered and ended it)."""
        origin = self.origin
        h2 = origin.codec.h2
        view = memoryview(data)
        while True:
            if self.error is not None or self.remote_ended or origin.state == CLOSED:
                return False
            if not view:
                if end:
                    h2.end_stream(self.sid)
                    self.local_ended = True
                    origin.kick()
                return True
            try:
                room = min(h2.local_flow_control_window(self.sid), h2.max_outbound_frame_size)
            except H2ProtocolError:
                return False
            if room <= 0:
                await self.wait()
                continue
            piece = bytes(view[:room])
            view = view[room:]
            last = end and not view
            try:
                h2.send_data(self.sid, piece, end_stream=last)
            except H2ProtocolError:
                return False
            if last:
                self.local_ended = True
            await origin.queued(len(piece))
            if last:
                return True

    def send_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        """The request's trailers, which end it (RFC 9113 8.1)."""
        if self.error is not None or self.remote_ended:
            return
        try:
            self.origin.codec.h2.send_headers(self.sid, fields, end_stream=True)
        except H2ProtocolError:
            return
        self.local_ended = True
        self.origin.kick()

    # ------------------------------------------------------------ the response body

    def _taken(self) -> bytes:
        inbox = self.inbox
        if not inbox:
            return b""
        data = inbox[0] if len(inbox) == 1 else b"".join(inbox)
        inbox.clear()
        n, self.unacked = self.unacked, 0
        if n:
            self.origin.consumed(self.sid, n)
        return data

    def begin_body(self, framing: int) -> OriginStream:
        """The relays read the body from here (proxy.origin_body.open_body); a response
        that has none by its framing (HEAD, 204, 304) is done whatever follows."""
        if framing == FRAMING_NONE:
            self.done = True
            self.expected = -1
        return self

    def take(self) -> bytes:
        data = self._taken()
        if self.remote_ended and not self.inbox:
            self._ended()
        return data

    async def read(self) -> bytes:
        """The next piece of the body; ProxyError when the stream breaks before its end."""
        while True:
            if self.inbox:
                data = self._taken()
                if self.remote_ended:
                    self._ended()
                return data
            if self.remote_ended:
                self._ended()
                return b""
            if self.error is not None:
                err = self.error
                raise ProxyError(502, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                                 f"upstream stream broke before the response body was "
                                 f"complete: {err.detail}",
                                 stat="upstream_cx_destroy_remote_with_active_rq")
            await self.wait()

    def _ended(self) -> None:
        if self.expected >= 0 and self.received != self.expected:
            # RFC 9113 8.1.1: content-length must equal the DATA received (h2 checks it
            # as the frames come; this is the end-of-stream half for what was buffered).
            raise ProxyError(502, flags.UPSTREAM_PROTOCOL_ERROR, "upstream",
                             "upstream protocol error: content-length mismatch",
                             stat="upstream_cx_protocol_error")
        self.done = True

    def finish(self, reusable: bool, now: float) -> None:
        """The response was relayed: the stream's slot is free (the connection stays)."""
        self.close()

    def close(self) -> None:
        """End the stream: RST_STREAM CANCEL unless both sides ended it."""
        if self.released:
            return
        self.released = True
        origin = self.origin
        if not (self.remote_ended and self.local_ended) and self.error is None:
            origin.reset(self, ErrorCodes.CANCEL)
        elif self.remote_ended and not self.local_ended and self.error is None:
            origin.reset(self, ErrorCodes.NO_ERROR)
        if self.unacked:
            origin.consumed(self.sid, self.unacked)
        self.unacked = 0
        self.inbox.clear()
        origin.release(self)

    abort = close


class H2Origin:
    """One HTTP/2 connection to an endpoint (module docstring)."""

    multiplexed = True

    __slots__ = ("endpoint", "codec", "conn", "streams", "reserved", "state", "ready",
                 "failure", "want_write", "drained", "out", "queued_bytes", "born",
                 "idle_since", "scope", "peer_last_stream", "notify")

    def __init__(self, endpoint: Endpoint, codec: ClientCodec, now: float) -> None:
        self.endpoint = endpoint
        self.codec = codec
        self.conn: UpstreamConn | None = None
        self.streams: dict[int, OriginStream] = {}
        self.reserved = 0  # slots promised to requests that have not opened their stream
        self.state = CONNECTING
        self.ready = trio.Event()
        self.failure: ProxyError | None = None
        self.want_write = trio.Event()
        self.drained = trio.Event()
        self.out = b""  # bytes taken out of h2's buffer, not yet written
        self.queued_bytes = 0
        self.born = now
        self.idle_since = now
        self.scope = trio.CancelScope()
        self.peer_last_stream = -1
        self.notify: Any = None  # wakes requests waiting for a slot (the cluster's)

    def capacity(self) -> int:
        """Streams this connection can still take (0 once it is going away)."""
        if self.state >= GOING_AWAY:
            return 0
        limit = (self.codec.spec.max_concurrent_streams if self.state == CONNECTING
                 else self.codec.max_streams())
        return limit - len(self.streams) - self.reserved

    # ------------------------------------------------------------ streams

    def open_stream(self, fields: list[tuple[bytes, bytes]], end: bool) -> OriginStream:
        """Open the stream a slot was reserved for, its HEADERS queued (synchronous, so
        that stream ids go out in order, RFC 9113 5.1.1)."""
        self.reserved -= 1
        if self.state != READY:
            raise refused("the connection is going away")
        h2 = self.codec.h2
        st = OriginStream(self)
        sid = st.sid = h2.get_next_available_stream_id()
        h2.send_headers(sid, fields, end_stream=end)
        st.local_ended = end
        self.streams[sid] = st
        self.kick()
        return st

    def unreserve(self) -> None:
        """A reserved slot that will not be used (the request failed before its stream)."""
        self.reserved -= 1
        self._maybe_close()

    def release(self, st: OriginStream) -> None:
        if self.streams.pop(st.sid, None) is not None:
            self.idle_since = trio.current_time()
            if self.notify is not None:
                self.notify()
            self._maybe_close()

    def reset(self, st: OriginStream, code: int) -> None:
        if self.state == CLOSED:
            return
        try:
            self.codec.h2.reset_stream(st.sid, code)
        except H2ProtocolError:
            return  # already closed both ways
        self.kick()

    def consumed(self, sid: int, n: int) -> None:
        """The relay took n bytes of a stream: its window and the connection's reopen."""
        if self.state == CLOSED:
            return
        try:
            self.codec.h2.acknowledge_received_data(n, sid)
        except H2ProtocolError:
            return
        self.kick()

    # ------------------------------------------------------------ ending

    def go_away(self) -> None:
        """Take no new stream; close once the streams in flight are done."""
        if self.state == READY:
            self.state = GOING_AWAY
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.state == GOING_AWAY and not self.streams and self.reserved <= 0:
            self.scope.cancel()

    def close(self) -> None:
        """Now, whatever is in flight (the worker stops)."""
        self.state = max(self.state, GOING_AWAY)
        self.scope.cancel()

    def idle_expired(self, now: float, idle_timeout: float, max_duration: float) -> bool:
        """The sweep's question: should this connection go away now?"""
        if self.state != READY:
            return False
        if max_duration and now - self.born >= max_duration:
            return True
        return not self.streams and not self.reserved and now - self.idle_since >= idle_timeout

    # ------------------------------------------------------------ the connection's task

    async def run(self, connect: Any) -> None:
        """Connect (`connect()`: upstream.connect's connect_endpoint for this endpoint),
        serve the streams, and close. A failure to connect is every waiting request's."""
        ep = self.endpoint
        try:
            with self.scope:
                try:
                    conn = self.conn = await connect()
                except ProxyError as exc:
                    self.failure = exc
                    return
                self.codec.start()
                cst = ep.cstats
                cst.block.inc(cst.upstream_cx_http2_total)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, nursery)
                    self.kick()
                    await self._read(conn)
                    nursery.cancel_scope.cancel()
        finally:
            was = self.state
            self.state = CLOSED
            if self.failure is None:
                self.failure = connection_lost("connection closed" if was != CONNECTING
                                               else "connect cancelled")
            self.ready.set()
            if self in ep.h2:
                ep.h2.remove(self)
            for st in list(self.streams.values()):
                st.failed(connection_lost("connection closed"))
            conn = self.conn
            if conn is not None:
                data = self.out + self.codec.h2.data_to_send()
                if data and conn.open and was != CONNECTING:
                    with trio.move_on_after(0.5) as cs:
                        cs.shield = True
                        try:
                            await conn.send(data)
                        except (PeerClosed, OSError):
                            pass
                conn.close()
            if self.notify is not None:
                self.notify()

    async def _read(self, conn: UpstreamConn) -> None:
        h2 = self.codec.h2
        while True:
            try:
                data = await conn.recv()
            except PeerClosed:
                return
            if not data:
                return
            try:
                events = h2.receive_data(data)
            except H2ProtocolError as exc:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("HTTP/2 origin %s: protocol error: %s", self.endpoint.label, exc)
                self._fail_all(ProxyError(
                    502, flags.UPSTREAM_PROTOCOL_ERROR, "upstream",
                    f"upstream protocol error: {exc or type(exc).__name__}",
                    stat="upstream_cx_protocol_error"))
                self.out += h2.data_to_send()  # h2's GOAWAY
                return
            self._handle(events)
            self.kick()
            if self.state == GOING_AWAY and not self.streams and self.reserved <= 0:
                return

    def _fail_all(self, err: ProxyError) -> None:
        for st in list(self.streams.values()):
            st.failed(err)
        self.state = max(self.state, GOING_AWAY)

    def _handle(self, events: list[Any]) -> None:
        streams = self.streams
        ev: Any
        for ev in events:
            kind = type(ev)
            if kind is DataReceived:
                n = ev.flow_controlled_length
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.inbox.append(ev.data)
                    st.received += len(ev.data)
                    st.unacked += n
                    if ev.stream_ended is not None:
                        st.remote_ended = True
                    st.wake()
                elif n:
                    self.consumed(ev.stream_id, n)  # a stream we no longer read
            elif kind is ResponseReceived:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.fields = ev.headers
                    st.never_indexed = never_indexed(ev.headers)
                    st.head_ended = ev.stream_ended is not None
                    for name, value in ev.headers:
                        if name == b"content-length":
                            try:
                                st.expected = int(value)
                            except ValueError:
                                st.expected = -1
                    if st.head_ended:
                        st.remote_ended = True
                    st.wake()
            elif kind is InformationalResponseReceived:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.info.append(ev.headers)
                    st.wake()
            elif kind is TrailersReceived:
                st = streams.get(ev.stream_id)
                if st is not None:
                    # TRAILER_SKIP: the fields never relayed after the content. The
                    # fields themselves go on, never-indexed ones marked so (7.1.3).
                    st.trailers = [f for f in ev.headers if f[0] not in TRAILER_SKIP]
                    st.remote_ended = True
                    st.wake()
            elif kind is StreamEnded:
                st = streams.get(ev.stream_id)
                if st is not None:
                    st.remote_ended = True
                    st.wake()
            elif kind is StreamReset:
                st = streams.get(ev.stream_id)
                if st is not None:
                    code = ev.error_code
                    if code == ErrorCodes.REFUSED_STREAM:
                        st.failed(refused("REFUSED_STREAM", "upstream_rq_rx_reset"))
                    elif code == ErrorCodes.NO_ERROR and st.fields is not None:
                        # RFC 9113 8.1: the origin answered and does not want the rest of
                        # the request; the response stands.
                        st.early_reset = True
                        st.local_ended = True
                        st.wake()
                    else:
                        st.failed(stream_reset(code))
            elif kind is WindowUpdated:
                if ev.stream_id == 0:
                    for st in streams.values():
                        st.wake()
                else:
                    st = streams.get(ev.stream_id)
                    if st is not None:
                        st.wake()
            elif kind is RemoteSettingsChanged:
                if self.state == CONNECTING:
                    # Ready once the origin's SETTINGS say how many streams it takes
                    # (RFC 9113 3.4: its preface is a SETTINGS frame).
                    self.state = READY
                    self.ready.set()
                for st in streams.values():
                    st.wake()  # INITIAL_WINDOW_SIZE moves every stream's window
                if self.notify is not None:
                    self.notify()  # MAX_CONCURRENT_STREAMS may have grown
            elif kind is ConnectionTerminated:
                self._goaway(ev.last_stream_id, ev.error_code)

    def _goaway(self, last: int, code: int) -> None:
        cst = self.endpoint.cstats
        cst.block.inc(cst.upstream_cx_close_notify)
        self.state = max(self.state, GOING_AWAY)
        self.peer_last_stream = last
        for sid, st in list(self.streams.items()):
            if sid > last:
                st.failed(refused("GOAWAY"))
        if code != ErrorCodes.NO_ERROR:
            for st in list(self.streams.values()):
                st.failed(stream_reset(code))

    # ------------------------------------------------------------ writes

    def kick(self) -> None:
        self.want_write.set()

    async def queued(self, n: int) -> None:
        """A stream queued n bytes of DATA: wait for the writer past WRITE_HIGH_WATER."""
        self.queued_bytes += n
        self.want_write.set()
        while self.queued_bytes > WRITE_HIGH_WATER and self.state != CLOSED:
            await self.drained.wait()

    async def _writer(self, nursery: trio.Nursery) -> None:
        h2 = self.codec.h2
        conn = self.conn
        assert conn is not None
        while True:
            await self.want_write.wait()
            self.want_write = trio.Event()
            data = self.out + h2.data_to_send()
            self.out = b""
            if data:
                try:
                    await conn.send(data)
                except (PeerClosed, OSError):
                    nursery.cancel_scope.cancel()
                    return
            self.queued_bytes = 0
            drained, self.drained = self.drained, trio.Event()
            drained.set()
