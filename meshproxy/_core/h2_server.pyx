"""The server side of an HTTP/2 connection, compiled and sans-IO: bytes in, events out;
calls in, frames queued. It replaces the h2 library's H2Connection for the proxy's client
connections, where h2's Python state machine, hyperframe's frame objects and the event
plumbing took more than half of a worker's time per stream; it keeps h2's interface (the
method names, arguments and exceptions protocol.http2 and the stream drivers use), so that
those drivers, and the tests that hold the proxy to RFC 9113, are unchanged. The upstream
side (proxy to origin) keeps h2.

What is enforced here (RFC 9113 sections 3 to 8; RFC 7541 through _core.hpack):
- 3.4: the client's preface, then SETTINGS as its first frame;
- 4.1/4.2: frames are read whole, none longer than our SETTINGS_MAX_FRAME_SIZE (16,384,
  the default we do not raise): FRAME_SIZE_ERROR, decided from the 9-byte header before
  the payload is buffered; each type's fixed sizes (6.3 PRIORITY 5, 6.4 RST_STREAM 4, 6.5
  SETTINGS a multiple of 6 and ACK empty, 6.7 PING 8, 6.8 GOAWAY >= 8, 6.9 WINDOW_UPDATE 4);
  padding shorter than the payload (6.1, 6.2); unknown frame types ignored (5.5);
- 4.3: every header block is decoded, even of a stream refused or ignored, so that the
  HPACK state stays that of the peer; a decoding error is COMPRESSION_ERROR; a block
  decoding past max_header_list_size (the "HPACK bomb", RFC 7541 7.3) is
  ENHANCE_YOUR_CALM (h2's DenialOfServiceError);
- 5.1: stream states. A client opens odd streams, each above the last (5.1.1); a frame
  other than HEADERS or PRIORITY on an idle stream is PROTOCOL_ERROR; on a half-closed
  (remote) stream DATA or HEADERS is a stream error STREAM_CLOSED; on a stream closed by
  END_STREAM both ways, a connection error STREAM_CLOSED; on a stream the client reset, a
  stream error STREAM_CLOSED; on a stream we reset, frames are ignored (the client may
  have sent them before it read our RST_STREAM), their bytes given back to the
  connection's window;
- 5.1.2: past SETTINGS_MAX_CONCURRENT_STREAMS, h2's TooManyStreamsError (a connection
  error, which 5.4.1 allows for any stream error);
- 5.3.1: a stream depending on itself is PROTOCOL_ERROR;
- 6.5.2: SETTINGS values (ENABLE_PUSH and ENABLE_CONNECT_PROTOCOL 0 or 1,
  INITIAL_WINDOW_SIZE at most 2^31-1 (FLOW_CONTROL_ERROR), MAX_FRAME_SIZE within
  16,384..2^24-1); 6.9.2: an INITIAL_WINDOW_SIZE change moves every stream's window, and
  one past 2^31-1 is FLOW_CONTROL_ERROR;
- 6.9: both windows, both ways: DATA past the connection's or the stream's window is
  FLOW_CONTROL_ERROR; a WINDOW_UPDATE of 0 is PROTOCOL_ERROR, one that takes a window past
  2^31-1 is FLOW_CONTROL_ERROR (of the stream or the connection); what we send never
  exceeds the peer's windows (send_data raises FlowControlError instead);
- 6.10: a header block is HEADERS then CONTINUATION frames of the same stream and nothing
  in between; at most 64 CONTINUATION frames (h2's bound, CVE-2024-27316's unbounded
  buffering), so a block buffers at most 65 frames;
- 8.1.1: content-length against the DATA received (HEAD: none), trailers only with
  END_STREAM; 8.2 and 8.3 (field names and values, connection-specific fields,
  pseudo-headers, Host against :authority): _core.h2_fields, h2's own rules compiled;
- 8.4: a client cannot push (PUSH_PROMISE is PROTOCOL_ERROR).
A connection error queues GOAWAY with its code and raises h2's exception of that kind (its
error_code set); the connection then takes nothing more. A stream error queues RST_STREAM
and yields StreamReset with remote_reset False, so that the driver abandons the stream and
counts the frame it queued.

Receive windows are given back as h2's WindowManager does: once half the window was
processed (acknowledge_received_data), or 1,024 bytes (a quarter of a smaller window) when
the window is empty.

Size: past 700 lines because it is one state machine, every frame type's rules and every
stream state's, which are read together (a frame's answer depends on the state the others
left); the events take a hundred of them.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from h2.exceptions import (
    DenialOfServiceError,
    FlowControlError,
    FrameTooLargeError,
    NoSuchStreamError,
    ProtocolError,
    StreamClosedError,
    TooManyStreamsError,
)
from h2.utilities import HeaderValidationFlags
from hpack.exceptions import HPACKError, OversizedHeaderListError

from meshproxy._core.h2_fields import normalize_inbound_headers, validate_headers

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEF PREFACE_LEN = 24

# Frame types (RFC 9113 6) and flags.
DEF DATA = 0x0
DEF HEADERS = 0x1
DEF PRIORITY = 0x2
DEF RST_STREAM = 0x3
DEF SETTINGS = 0x4
DEF PUSH_PROMISE = 0x5
DEF PING = 0x6
DEF GOAWAY = 0x7
DEF WINDOW_UPDATE = 0x8
DEF CONTINUATION = 0x9
DEF END_STREAM = 0x1
DEF ACK = 0x1
DEF END_HEADERS = 0x4
DEF PADDED = 0x8
DEF PRIORITY_FLAG = 0x20

# Error codes (RFC 9113 7).
DEF NO_ERROR = 0x0
DEF PROTOCOL_ERROR = 0x1
DEF FLOW_CONTROL_ERROR = 0x3
DEF STREAM_CLOSED = 0x5
DEF FRAME_SIZE_ERROR = 0x6
DEF COMPRESSION_ERROR = 0x9

DEF DEFAULT_TABLE = 4096         # RFC 7541 4.2, SETTINGS_HEADER_TABLE_SIZE's default
DEF MAX_WINDOW = 2147483647       # 2^31-1 (6.9.1)
DEF DEFAULT_WINDOW = 65535        # 6.9.2
DEF DEFAULT_MAX_FRAME = 16384     # 4.2
DEF MAX_FRAME_LIMIT = 16777215    # 2^24-1 (6.5.2)
DEF CONTINUATION_BACKLOG = 64     # h2's bound on a block's CONTINUATION frames
# Closed streams remembered (how they closed decides the answer to a late frame); past
# this, the oldest are forgotten and a late DATA on them is ignored.
DEF CLOSED_REMEMBERED = 4096

# How a stream closed.
DEF BY_US = 1      # we sent RST_STREAM: late frames are ignored (5.1, closed)
DEF BY_PEER = 2    # the client sent RST_STREAM: a late frame is a stream error
DEF BY_END = 3     # END_STREAM both ways: a late frame is a connection error

_REQUEST = HeaderValidationFlags(is_client=False, is_trailer=False,
                                 is_response_header=False, is_push_promise=False)
_TRAILER = HeaderValidationFlags(is_client=False, is_trailer=True,
                                 is_response_header=False, is_push_promise=False)


# ---------------------------------------------------------------- events (h2's names)
# Not tracked by the cyclic collector (no_gc): an event holds bytes, numbers, a list of
# fields and at most a StreamEnded, never itself, and so cannot be part of a cycle; every
# tracked allocation counts toward the collector's next run.

@cython.no_gc
cdef class RequestReceived:
    cdef public object stream_id, headers, stream_ended, priority_updated

    def __repr__(self):
        return f"<RequestReceived stream_id:{self.stream_id}>"


@cython.no_gc
cdef class DataReceived:
    cdef public object stream_id, data, flow_controlled_length, stream_ended

    def __repr__(self):
        return (f"<DataReceived stream_id:{self.stream_id} "
                f"flow_controlled_length:{self.flow_controlled_length}>")


@cython.no_gc
cdef class TrailersReceived:
    cdef public object stream_id, headers, stream_ended, priority_updated


@cython.no_gc
cdef class StreamEnded:
    cdef public object stream_id

    def __repr__(self):
        return f"<StreamEnded stream_id:{self.stream_id}>"


@cython.no_gc
cdef class StreamReset:
    """remote_reset: the client's RST_STREAM (True), or a stream error of ours (False),
    whose RST_STREAM is queued."""
    cdef public object stream_id, error_code, remote_reset

    def __repr__(self):
        return (f"<StreamReset stream_id:{self.stream_id} error_code:{self.error_code} "
                f"remote_reset:{self.remote_reset}>")


@cython.no_gc
cdef class WindowUpdated:
    cdef public object stream_id, delta


@cython.no_gc
cdef class PriorityUpdated:
    cdef public object stream_id, weight, depends_on, exclusive


@cython.no_gc
cdef class PingReceived:
    cdef public object ping_data


@cython.no_gc
cdef class RemoteSettingsChanged:
    cdef public object changed_settings


cdef class SettingsAcknowledged:
    pass


@cython.no_gc
cdef class ConnectionTerminated:
    cdef public object error_code, last_stream_id, additional_data


cdef inline unsigned int _u32(const unsigned char* p) noexcept:
    return (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (
        <unsigned int>p[2] << 8) | p[3]


cdef object _error(type kind, str message, int code):
    exc = kind(message)
    exc.error_code = code
    return exc


cdef long long _content_length(list headers) except -2:
    """8.1.1: the content-length the fields state (-1: none); digits only, and several
    only when they agree (h2's rules)."""
    cdef long long found = -1, value
    for name, v in headers:
        if name == b"content-length":
            if not v.isdigit():
                raise ProtocolError(f"Invalid content-length header: {v!r}")
            if len(v) > 18:  # past any body this proxy would carry, and a C long long
                raise ProtocolError(f"content-length too large: {v!r}")
            value = int(v)
            if found >= 0 and value != found:
                raise ProtocolError(
                    f"Conflicting content-length headers: {found} and {value}")
            found = value
    return found


cdef class _Stream:
    def __cinit__(self, unsigned int sid, long long in_window, long long out_window):
        self.sid = sid
        self.in_window = in_window
        self.out_window = out_window
        self.unacked = 0
        self.expected = -1
        self.received = 0


cdef class H2ServerConnection:
    """One client connection's HTTP/2 state, h2's server interface (the part the proxy
    uses): receive_data, data_to_send, send_headers, send_data, reset_stream,
    acknowledge_received_data, increment_flow_control_window, local_flow_control_window,
    close_connection, initiate_connection, highest_inbound_stream_id,
    max_outbound_frame_size."""

    def __cinit__(self, long max_concurrent_streams=100, long initial_window=65535,
                  long header_table_size=4096, long max_header_list_size=65536,
                  bint enable_connect=False):
        self.highest_inbound_stream_id = 0
        self.max_outbound_frame_size = DEFAULT_MAX_FRAME
        self.decoder = Decoder(max_header_list_size)
        self.decoder.max_allowed_table_size = header_table_size
        self.encoder = Encoder()
        self.streams = {}
        self.closed = {}
        self.forgotten_below = 0
        self.out = []
        self.inparts = []
        self.inlen = 0
        self.need = 0
        self.partial_type = -1
        self.preface_seen = self.settings_seen = self.terminated = False
        self.max_concurrent_streams = max_concurrent_streams
        self.local_initial_window = initial_window
        self.local_max_frame = DEFAULT_MAX_FRAME
        self.header_table_size = header_table_size
        self.max_header_list_size = max_header_list_size
        self.enable_connect = enable_connect
        self.peer_initial_window = DEFAULT_WINDOW
        self.in_window = self.in_target = DEFAULT_WINDOW
        self.unacked = 0
        self.out_window = DEFAULT_WINDOW
        self.hb_sid = 0
        self.hb_parts = None
        self.hb_bytes = 0

    # ------------------------------------------------------------------ output

    cdef void _emit(self, int ftype, int flags, unsigned int sid, const unsigned char* p,
                    Py_ssize_t n):
        """Queue one frame (4.1): 24-bit length, type, flags, stream, payload."""
        cdef bytes frame = PyBytes_FromStringAndSize(NULL, 9 + n)
        cdef unsigned char* f = <unsigned char*>PyBytes_AS_STRING(frame)
        f[0] = (n >> 16) & 0xff
        f[1] = (n >> 8) & 0xff
        f[2] = n & 0xff
        f[3] = ftype
        f[4] = flags
        f[5] = (sid >> 24) & 0x7f
        f[6] = (sid >> 16) & 0xff
        f[7] = (sid >> 8) & 0xff
        f[8] = sid & 0xff
        if n:
            memcpy(f + 9, p, n)
        self.out.append(frame)

    cdef void _emit_u32(self, int ftype, unsigned int sid, unsigned int value):
        cdef unsigned char b[4]
        b[0] = (value >> 24) & 0xff
        b[1] = (value >> 16) & 0xff
        b[2] = (value >> 8) & 0xff
        b[3] = value & 0xff
        self._emit(ftype, 0, sid, b, 4)

    def data_to_send(self) -> bytes:
        """Every frame queued, in order, once."""
        cdef list out = self.out
        if not out:
            return b""
        self.out = []
        if len(out) == 1:
            return out[0]
        return b"".join(out)

    def initiate_connection(self) -> None:
        """The server's preface (3.4): SETTINGS with our values."""
        cdef list values = [(0x1, self.header_table_size), (0x2, 0),
                            (0x3, self.max_concurrent_streams),
                            (0x4, self.local_initial_window),
                            (0x5, self.local_max_frame),
                            (0x6, self.max_header_list_size)]
        if self.enable_connect:
            values.append((0x8, 1))  # RFC 8441 3
        cdef bytearray payload = bytearray()
        for ident, value in values:
            payload += ident.to_bytes(2, "big") + int(value).to_bytes(4, "big")
        cdef bytes p = bytes(payload)
        self._emit(SETTINGS, 0, 0, <const unsigned char*>PyBytes_AS_STRING(p),
                   PyBytes_GET_SIZE(p))

    def increment_flow_control_window(self, long long increment, stream_id=None) -> None:
        """Open the connection's receive window by `increment` at once (6.9)."""
        if increment < 1 or increment > MAX_WINDOW:
            raise ValueError(f"flow control increment must be 1..2^31-1, not {increment}")
        if stream_id:
            raise ValueError("only the connection's window is opened this way here")
        if self.in_window + increment > MAX_WINDOW:
            raise FlowControlError("the window would pass 2^31-1")
        self.in_window += increment
        if self.in_window > self.in_target:
            self.in_target = self.in_window
        self._emit_u32(WINDOW_UPDATE, 0, <unsigned int>increment)

    def close_connection(self, int error_code=0, additional_data=None,
                         last_stream_id=None) -> None:
        """GOAWAY (6.8) naming the last stream taken; the connection takes nothing more."""
        if self.terminated:
            return  # said once
        last = self.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        cdef bytes payload = (int(last).to_bytes(4, "big") + int(error_code).to_bytes(4, "big")
                              + (additional_data or b""))
        self._emit(GOAWAY, 0, 0, <const unsigned char*>PyBytes_AS_STRING(payload),
                   PyBytes_GET_SIZE(payload))
        self.terminated = True

    cdef _Stream _sendable(self, unsigned int sid):
        cdef _Stream st = self.streams.get(sid)
        if st is None or st.local_closed or self.terminated:
            raise StreamClosedError(sid)
        return st

    def local_flow_control_window(self, unsigned int stream_id) -> int:
        """What may be sent on the stream now: the smaller of its window and the
        connection's (6.9.1)."""
        cdef _Stream st = self._sendable(stream_id)
        return min(st.out_window, self.out_window)

    def send_headers(self, unsigned int stream_id, headers, bint end_stream=False) -> None:
        """A header block: HEADERS, then CONTINUATION frames past the peer's frame size."""
        cdef _Stream st = self._sendable(stream_id)
        cdef bytes block = self.encoder.encode(headers)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(block)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(block), size = self.max_outbound_frame_size
        cdef Py_ssize_t pos
        cdef int es = END_STREAM if end_stream else 0
        if n <= size:
            self._emit(HEADERS, END_HEADERS | es, stream_id, p, n)
        else:
            self._emit(HEADERS, es, stream_id, p, size)
            pos = size
            while n - pos > size:
                self._emit(CONTINUATION, 0, stream_id, p + pos, size)
                pos += size
            self._emit(CONTINUATION, END_HEADERS, stream_id, p + pos, n - pos)
        if end_stream:
            st.local_closed = True
            if st.remote_closed:
                self._forget(st, BY_END)

    def send_data(self, unsigned int stream_id, data, bint end_stream=False) -> None:
        """One DATA frame, within both windows and the peer's frame size."""
        cdef _Stream st = self._sendable(stream_id)
        cdef bytes payload = data if type(data) is bytes else bytes(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        if n > st.out_window or n > self.out_window:
            raise FlowControlError(
                f"{n} bytes past the window ({min(st.out_window, self.out_window)})")
        if n > self.max_outbound_frame_size:
            raise FrameTooLargeError(f"{n} bytes past the frame size")
        st.out_window -= n
        self.out_window -= n
        self._emit(DATA, END_STREAM if end_stream else 0, stream_id,
                   <const unsigned char*>PyBytes_AS_STRING(payload), n)
        if end_stream:
            st.local_closed = True
            if st.remote_closed:
                self._forget(st, BY_END)

    def reset_stream(self, unsigned int stream_id, int error_code=0) -> None:
        """RST_STREAM (6.4): the stream closes; what the client still sends on it is
        ignored."""
        cdef _Stream st = self.streams.get(stream_id)
        if st is None:
            if stream_id <= self.highest_inbound_stream_id:
                raise StreamClosedError(stream_id)
            raise NoSuchStreamError(stream_id)
        self._emit_u32(RST_STREAM, stream_id, <unsigned int>error_code)
        self._forget(st, BY_US)

    def acknowledge_received_data(self, long long n, unsigned int stream_id) -> None:
        """The application processed n flow-controlled bytes of the stream (0: of a stream
        no longer known): both windows reopen, by h2's WindowManager rule."""
        cdef _Stream st = self.streams.get(stream_id) if stream_id else None
        self._credit(st, n)

    cdef void _credit(self, _Stream st, long long n):
        cdef long long low
        if n <= 0:
            return
        self.unacked += n
        low = min(1024, self.in_target // 4)
        if self.unacked >= self.in_target // 2 or (self.in_window <= 0
                                                   and self.unacked >= low):
            self.in_window += self.unacked
            self._emit_u32(WINDOW_UPDATE, 0, <unsigned int>self.unacked)
            self.unacked = 0
        if st is None or st.remote_closed or self.terminated:
            return  # no more DATA can come on it: its window no longer matters
        st.unacked += n
        low = min(1024, self.local_initial_window // 4)
        if st.unacked >= self.local_initial_window // 2 or (st.in_window <= 0
                                                            and st.unacked >= low):
            st.in_window += st.unacked
            self._emit_u32(WINDOW_UPDATE, st.sid, <unsigned int>st.unacked)
            st.unacked = 0

    # ------------------------------------------------------------------ input

    def header_block_pending(self) -> bool:
        """A header block has begun and not ended (its HEADERS came, not its last
        CONTINUATION), or a HEADERS or CONTINUATION frame is partly received."""
        return bool(self.hb_sid) or self.partial_type == HEADERS or (
            self.partial_type == CONTINUATION)

    def receive_data(self, data) -> list:
        """Feed bytes read from the client; the events they complete. A connection error
        queues GOAWAY and raises."""
        cdef list events = []
        cdef bytes buf
        cdef const unsigned char* p
        cdef Py_ssize_t n, pos = 0, length = 0
        cdef int ftype, flags
        cdef unsigned int sid
        if self.terminated:
            return events
        if type(data) is not bytes:
            data = bytes(data)
        if self.inlen:
            # A frame partly received: its pieces are kept until it is whole, then joined
            # once (a client that sends a frame a byte at a time costs no more than one
            # that sends it at once).
            if self.inlen >= 9 and self.preface_seen and (
                    self.inlen + PyBytes_GET_SIZE(data) < self.need):
                self.inparts.append(data)
                self.inlen += PyBytes_GET_SIZE(data)
                return events
            self.inparts.append(data)
            buf = b"".join(self.inparts)
            self.inparts = []
            self.inlen = 0
        else:
            buf = data
        p = <const unsigned char*>PyBytes_AS_STRING(buf)
        n = PyBytes_GET_SIZE(buf)
        try:
            if not self.preface_seen:
                if n < PREFACE_LEN:
                    if buf != PREFACE[:n]:
                        raise ProtocolError("invalid connection preface (RFC 9113 3.4)")
                    self._keep(buf, 0, PREFACE_LEN)
                    return events
                if buf[:PREFACE_LEN] != PREFACE:
                    raise ProtocolError("invalid connection preface (RFC 9113 3.4)")
                self.preface_seen = True
                pos = PREFACE_LEN
            while n - pos >= 9:
                length = (<Py_ssize_t>p[pos] << 16) | (<Py_ssize_t>p[pos + 1] << 8) | p[pos + 2]
                ftype = p[pos + 3]
                flags = p[pos + 4]
                sid = _u32(p + pos + 5) & 0x7fffffff  # the reserved bit is ignored (4.1)
                if length > self.local_max_frame:
                    raise _error(FrameTooLargeError,
                                 f"a frame of {length} bytes past SETTINGS_MAX_FRAME_SIZE "
                                 f"{self.local_max_frame} (RFC 9113 4.2)", FRAME_SIZE_ERROR)
                if n - pos - 9 < length:
                    break
                payload = buf[pos + 9:pos + 9 + length] if length else b""
                pos += 9 + length
                self._frame(ftype, flags, sid, payload, events)
                if self.terminated:
                    pos = n
                    break
            self.partial_type = -1
            if pos < n:
                self._keep(buf[pos:], p[pos + 3] if n - pos >= 4 else -1,
                           9 + length if n - pos >= 9 else 9)
        except ProtocolError as exc:
            self.inparts = []
            self.inlen = 0
            if not self.terminated:
                self.close_connection(getattr(exc, "error_code", PROTOCOL_ERROR))
            raise
        return events

    cdef void _keep(self, bytes rest, int ftype, Py_ssize_t need):
        """Keep a partial frame (or preface): its bytes, its type once known, the length
        that completes it."""
        self.inparts = [rest]
        self.inlen = PyBytes_GET_SIZE(rest)
        self.partial_type = ftype
        self.need = need

    cdef int _frame(self, int ftype, int flags, unsigned int sid, bytes payload,
                    list events) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(payload)
        cdef unsigned int dep
        if self.hb_sid and ftype != CONTINUATION:
            raise ProtocolError(f"a frame of type {ftype} inside the header block of stream "
                                f"{self.hb_sid} (RFC 9113 6.10)")
        if not self.settings_seen:
            if ftype != SETTINGS or flags & ACK:
                raise ProtocolError("the client's preface has no SETTINGS (RFC 9113 3.4)")
            self.settings_seen = True
        if ftype == DATA:
            return self._data(flags, sid, payload, events)
        if ftype == HEADERS:
            return self._headers(flags, sid, payload, events)
        if ftype == CONTINUATION:
            return self._continuation(flags, sid, payload, events)
        if ftype == WINDOW_UPDATE:
            return self._window_update(sid, payload, events)
        if ftype == SETTINGS:
            return self._settings(flags, sid, payload, events)
        if ftype == RST_STREAM:
            return self._rst_stream(sid, payload, events)
        if ftype == PING:
            if sid:
                raise ProtocolError("PING on a stream (RFC 9113 6.7)")
            if n != 8:
                raise _error(ProtocolError, "PING of other than 8 bytes (RFC 9113 6.7)",
                             FRAME_SIZE_ERROR)
            if not flags & ACK:
                self._emit(PING, ACK, 0, p, 8)
                ev = PingReceived()
                ev.ping_data = payload
                events.append(ev)
            return 0
        if ftype == PRIORITY:
            if not sid:
                raise ProtocolError("PRIORITY on stream 0 (RFC 9113 6.3)")
            if n != 5:
                raise _error(ProtocolError, "PRIORITY of other than 5 bytes (RFC 9113 6.3)",
                             FRAME_SIZE_ERROR)
            dep = _u32(p) & 0x7fffffff
            if dep == sid:
                raise ProtocolError(f"stream {sid} depends on itself (RFC 9113 5.3.1)")
            ev = PriorityUpdated()
            ev.stream_id = sid
            ev.depends_on = dep
            ev.weight = p[4] + 1
            ev.exclusive = bool(p[0] & 0x80)
            events.append(ev)
            return 0
        if ftype == GOAWAY:
            if sid:
                raise ProtocolError("GOAWAY on a stream (RFC 9113 6.8)")
            if n < 8:
                raise _error(ProtocolError, "GOAWAY shorter than 8 bytes (RFC 9113 6.8)",
                             FRAME_SIZE_ERROR)
            ev = ConnectionTerminated()
            ev.last_stream_id = _u32(p) & 0x7fffffff
            ev.error_code = _u32(p + 4)
            ev.additional_data = payload[8:] or None
            events.append(ev)
            return 0
        if ftype == PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE from a client (RFC 9113 8.4)")
        return 0  # an unknown type is ignored (RFC 9113 5.5)

    cdef int _data(self, int flags, unsigned int sid, bytes payload, list events) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload), pad
        cdef _Stream st
        cdef bytes data = payload
        if not sid:
            raise ProtocolError("DATA on stream 0 (RFC 9113 6.1)")
        if flags & PADDED:
            pad = (<const unsigned char*>PyBytes_AS_STRING(payload))[0] if n else n
            if pad >= n:
                raise ProtocolError("padding as long as the frame (RFC 9113 6.1)")
            data = payload[1:n - pad]
        # Every DATA counts against the connection's window, on any stream (6.9).
        if n > self.in_window:
            raise FlowControlError(
                f"{n} bytes of DATA past the connection's window {self.in_window} "
                "(RFC 9113 6.9.1)")
        self.in_window -= n
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            self._credit(None, n)  # never delivered: given back at once
            if st is not None:
                return self._stream_error(sid, STREAM_CLOSED, events)  # half-closed (remote)
            return self._closed_frame(sid, False, events)
        if n > st.in_window:
            raise FlowControlError(
                f"{n} bytes of DATA past stream {sid}'s window {st.in_window} "
                "(RFC 9113 6.9.1)")
        st.in_window -= n
        st.received += PyBytes_GET_SIZE(data)
        if st.expected >= 0 and (st.received > st.expected
                                 or (flags & END_STREAM and st.received != st.expected)):
            raise ProtocolError(f"stream {sid}: {st.received} bytes of DATA against a "
                                f"content-length of {st.expected} (RFC 9113 8.1.1)")
        ev = DataReceived()
        ev.stream_id = sid
        ev.data = data
        ev.flow_controlled_length = n
        events.append(ev)
        if flags & END_STREAM:
            se = StreamEnded()
            se.stream_id = sid
            ev.stream_ended = se
            events.append(se)
            st.remote_closed = True
            if st.local_closed:
                self._forget(st, BY_END)
        return 0

    cdef int _closed_frame(self, unsigned int sid, bint is_headers, list events) except -1:
        """DATA or a header block on a stream not open (its block already decoded)."""
        if sid & 1 == 0 or sid > self.highest_inbound_stream_id:
            raise ProtocolError(f"a frame on idle stream {sid} (RFC 9113 5.1)")
        how = self.closed.get(sid)
        if how == BY_US:
            return 0
        if how == BY_PEER:
            return self._stream_error(sid, STREAM_CLOSED, events)
        if how == BY_END:
            raise StreamClosedError(sid)
        if sid > self.forgotten_below or is_headers:
            raise ProtocolError(f"stream {sid} was closed before it opened (RFC 9113 5.1.1)")
        return 0  # a stream long closed and forgotten: a late frame, ignored

    cdef int _headers(self, int flags, unsigned int sid, bytes payload,
                      list events) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload), pos = 0, pad = 0
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(payload)
        if not sid:
            raise ProtocolError("HEADERS on stream 0 (RFC 9113 6.2)")
        if flags & PADDED:
            if n < 1:
                raise _error(ProtocolError, "a padded HEADERS without its pad length",
                             FRAME_SIZE_ERROR)
            pad = p[0]
            pos = 1
        if flags & PRIORITY_FLAG:
            if n - pos < 5:
                raise _error(ProtocolError, "HEADERS too short for its priority",
                             FRAME_SIZE_ERROR)
            if _u32(p + pos) & 0x7fffffff == sid:
                raise ProtocolError(f"stream {sid} depends on itself (RFC 9113 5.3.1)")
            pos += 5
        if pad > n - pos:
            raise ProtocolError("padding as long as the frame (RFC 9113 6.2)")
        fragment = payload[pos:n - pad] if pos or pad else payload
        if flags & END_HEADERS:
            return self._block(sid, flags & END_STREAM, fragment, events)
        self.hb_sid = sid
        self.hb_end_stream = flags & END_STREAM
        self.hb_parts = [fragment]
        return 0

    cdef int _continuation(self, int flags, unsigned int sid, bytes payload,
                           list events) except -1:
        if not self.hb_sid or sid != self.hb_sid:
            raise ProtocolError(f"CONTINUATION on stream {sid} outside a header block "
                                "(RFC 9113 6.10)")
        self.hb_parts.append(payload)
        if not flags & END_HEADERS:
            if len(self.hb_parts) > CONTINUATION_BACKLOG:
                raise ProtocolError("Too many continuation frames received.")
            return 0
        block = b"".join(self.hb_parts)
        self.hb_sid = 0
        self.hb_parts = None
        return self._block(sid, self.hb_end_stream, block, events)

    cdef list _decode(self, bytes block):
        try:
            return self.decoder.decode(block)
        except OversizedHeaderListError as exc:
            raise DenialOfServiceError(f"Oversized header block: {exc}") from None
        except HPACKError as exc:
            raise _error(ProtocolError, f"Error decoding header block: {exc}",
                         COMPRESSION_ERROR) from None

    cdef int _block(self, unsigned int sid, bint end_stream, bytes block,
                    list events) except -1:
        cdef _Stream st = self.streams.get(sid)
        cdef list headers
        cdef object ev, se
        if sid & 1 == 0:
            raise ProtocolError(f"stream {sid}: a client's streams are odd (RFC 9113 5.1.1)")
        if st is None and sid > self.highest_inbound_stream_id:
            # A new stream (5.1: idle -> open, or half-closed (remote) with END_STREAM).
            if len(self.streams) >= self.max_concurrent_streams:
                raise TooManyStreamsError(
                    f"Max outbound streams is {self.max_concurrent_streams}, "
                    f"{len(self.streams)} open")
            headers = self._decode(block)
            self.highest_inbound_stream_id = sid
            headers = normalize_inbound_headers(validate_headers(headers, _REQUEST), _REQUEST)
            st = _Stream(sid, self.local_initial_window, self.peer_initial_window)
            st.expected = _content_length(headers)
            for name, value in headers:
                if name == b":method":
                    if value == b"HEAD":
                        st.expected = 0
                    break
            if end_stream and st.expected > 0:
                raise ProtocolError(f"stream {sid}: no DATA against a content-length of "
                                    f"{st.expected} (RFC 9113 8.1.1)")
            self.streams[sid] = st
            ev = RequestReceived()
            ev.stream_id = sid
            ev.headers = headers
            events.append(ev)
            if end_stream:
                st.remote_closed = True
                se = StreamEnded()
                se.stream_id = sid
                ev.stream_ended = se
                events.append(se)
            return 0
        headers = self._decode(block)  # decoded whatever follows: HPACK's state (4.3)
        if st is None:
            return self._closed_frame(sid, True, events)
        if st.remote_closed:
            return self._stream_error(sid, STREAM_CLOSED, events)  # half-closed (remote)
        # Trailers (8.1): the last of the request, with END_STREAM.
        if not end_stream:
            raise ProtocolError("Trailers must have END_STREAM set")
        headers = normalize_inbound_headers(validate_headers(headers, _TRAILER), _TRAILER)
        if st.expected >= 0 and st.received != st.expected:
            raise ProtocolError(f"stream {sid}: {st.received} bytes of DATA against a "
                                f"content-length of {st.expected} (RFC 9113 8.1.1)")
        ev = TrailersReceived()
        ev.stream_id = sid
        ev.headers = headers
        se = StreamEnded()
        se.stream_id = sid
        ev.stream_ended = se
        events.append(ev)
        events.append(se)
        st.remote_closed = True
        if st.local_closed:
            self._forget(st, BY_END)
        return 0

    cdef int _settings(self, int flags, unsigned int sid, bytes payload,
                       list events) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload), i
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(payload)
        cdef unsigned int ident, value
        cdef long long delta
        cdef _Stream st
        cdef dict changed = {}
        if sid:
            raise ProtocolError("SETTINGS on a stream (RFC 9113 6.5)")
        if flags & ACK:
            if n:
                raise _error(ProtocolError, "a SETTINGS ACK with a payload (RFC 9113 6.5)",
                             FRAME_SIZE_ERROR)
            events.append(SettingsAcknowledged())
            return 0
        if n % 6:
            raise _error(ProtocolError, "SETTINGS not a multiple of 6 bytes (RFC 9113 6.5)",
                         FRAME_SIZE_ERROR)
        for i in range(0, n, 6):
            ident = (<unsigned int>p[i] << 8) | p[i + 1]
            value = _u32(p + i + 2)
            if ident == 0x1:
                # The size our encoder may use (said in its next block, RFC 7541 4.2), at
                # most 4,096: a client's larger table would only make us keep more of what
                # we sent it (an encoder may always use less than allowed, RFC 7541 4.2).
                self.encoder.header_table_size = min(value, DEFAULT_TABLE)
            elif ident == 0x2 or ident == 0x8:
                if value > 1:
                    raise ProtocolError(f"setting {ident} of {value}, not 0 or 1 "
                                        "(RFC 9113 6.5.2, RFC 8441 3)")
            elif ident == 0x4:
                if value > MAX_WINDOW:
                    raise _error(ProtocolError, f"SETTINGS_INITIAL_WINDOW_SIZE {value} "
                                 "past 2^31-1 (RFC 9113 6.5.2)", FLOW_CONTROL_ERROR)
                delta = <long long>value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():
                    st.out_window += delta
                    if st.out_window > MAX_WINDOW:
                        raise _error(ProtocolError, f"stream {st.sid}'s window past 2^31-1 "
                                     "(RFC 9113 6.9.2)", FLOW_CONTROL_ERROR)
            elif ident == 0x5:
                if value < DEFAULT_MAX_FRAME or value > MAX_FRAME_LIMIT:
                    raise ProtocolError(f"SETTINGS_MAX_FRAME_SIZE {value} out of range "
                                        "(RFC 9113 6.5.2)")
                self.max_outbound_frame_size = value
            changed[ident] = value
        self._emit(SETTINGS, ACK, 0, NULL, 0)
        ev = RemoteSettingsChanged()
        ev.changed_settings = changed
        events.append(ev)
        return 0

    cdef int _window_update(self, unsigned int sid, bytes payload, list events) except -1:
        cdef unsigned int inc
        cdef _Stream st
        if PyBytes_GET_SIZE(payload) != 4:
            raise _error(ProtocolError, "WINDOW_UPDATE of other than 4 bytes (RFC 9113 6.9)",
                         FRAME_SIZE_ERROR)
        inc = _u32(<const unsigned char*>PyBytes_AS_STRING(payload)) & 0x7fffffff
        if not sid:
            if not inc:
                raise ProtocolError("a WINDOW_UPDATE of 0 (RFC 9113 6.9)")
            if self.out_window + inc > MAX_WINDOW:
                raise FlowControlError("the connection's window past 2^31-1 (RFC 9113 6.9.1)")
            self.out_window += inc
        else:
            st = self.streams.get(sid)
            if st is None:
                if sid & 1 == 0 or sid > self.highest_inbound_stream_id:
                    raise ProtocolError(f"WINDOW_UPDATE on idle stream {sid} (RFC 9113 5.1)")
                return 0  # closed: may still come (5.1), ignored
            if not inc:
                raise ProtocolError(f"a WINDOW_UPDATE of 0 on stream {sid} (RFC 9113 6.9)")
            if st.out_window + inc > MAX_WINDOW:
                return self._stream_error(sid, FLOW_CONTROL_ERROR, events)
            st.out_window += inc
        ev = WindowUpdated()
        ev.stream_id = sid
        ev.delta = inc
        events.append(ev)
        return 0

    cdef int _rst_stream(self, unsigned int sid, bytes payload, list events) except -1:
        cdef _Stream st
        if not sid:
            raise ProtocolError("RST_STREAM on stream 0 (RFC 9113 6.4)")
        if PyBytes_GET_SIZE(payload) != 4:
            raise _error(ProtocolError, "RST_STREAM of other than 4 bytes (RFC 9113 6.4)",
                         FRAME_SIZE_ERROR)
        st = self.streams.get(sid)
        if st is None:
            if sid & 1 == 0 or sid > self.highest_inbound_stream_id:
                raise ProtocolError(f"RST_STREAM on idle stream {sid} (RFC 9113 6.4)")
            return 0  # already closed
        self._forget(st, BY_PEER)
        ev = StreamReset()
        ev.stream_id = sid
        ev.error_code = _u32(<const unsigned char*>PyBytes_AS_STRING(payload))
        ev.remote_reset = True
        events.append(ev)
        return 0

    cdef int _stream_error(self, unsigned int sid, int code, list events) except -1:
        """RST_STREAM with `code` (5.4.2); the stream closes as one we reset."""
        cdef _Stream st = self.streams.get(sid)
        self._emit_u32(RST_STREAM, sid, <unsigned int>code)
        if st is not None:
            self._forget(st, BY_US)
        else:
            self.closed[sid] = BY_US
        ev = StreamReset()
        ev.stream_id = sid
        ev.error_code = code
        ev.remote_reset = False
        events.append(ev)
        return 0

    cdef void _forget(self, _Stream st, int how):
        cdef dict closed = self.closed
        cdef unsigned int oldest
        del self.streams[st.sid]
        closed[st.sid] = how
        if len(closed) > CLOSED_REMEMBERED:
            oldest = next(iter(closed))
            del closed[oldest]
            if oldest > self.forgotten_below:
                self.forgotten_below = oldest
