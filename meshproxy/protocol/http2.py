"""HTTP/2 for the proxy's connections, sans-IO: the listener's settings and the defences
HTTP/2 needs around each side's state machine, and the translation between a stream's
fields and the head the rest of the data path reads.

The two sides' state machines:
- client connections (ServerCodec): the compiled server connection
  (meshproxy._core.h2_server, h2's interface; it says what of RFC 9113 sections 3 to 8
  it enforces): framing, stream states, flow-control windows, SETTINGS values,
  pseudo-headers, field names and values (8.2.1: no uppercase, no CR/LF/NUL, no
  surrounding whitespace), connection-specific fields (8.2.2), `te` other than
  "trailers", Host against :authority, content-length against the DATA received (8.1.1).
  A malformed request is a connection error (GOAWAY PROTOCOL_ERROR), which RFC 9113 5.4.1
  allows for any stream error and which Envoy's default does too; a frame a stream's
  state forbids is the stream error 5.1 names (RST_STREAM STREAM_CLOSED);
- origin connections (ClientCodec): the h2 library's H2Connection as the client, with
  the compiled HPACK and field checks installed in it.

What is added here, on the client side:
- the HPACK decoder is bounded by the listener's max_request_headers_kb (the "HPACK
  bomb": a small block that decodes into a huge list, RFC 7541 7.3), and a header block
  by 64 CONTINUATION frames (CVE-2024-27316's unbounded buffering);
- floods, counted here with Envoy's names and limits (CVE-2019-9512 ping, 9515 settings,
  9518 empty frames; Envoy's PRIORITY and WINDOW_UPDATE budgets), and rapid reset
  (CVE-2023-44487) as Envoy counts it: premature resets, a stream the client resets
  within a second of opening it; past 500 streams, a connection whose streams were half
  premature resets is closed.

A request is handed on as HTTP/1.1 head bytes made from its fields and parsed by the
compiled parser (`request_head`): the same MessageHead, limits and derived fields
(content length, request id, deadlines) as a request of an HTTP/1.1 client, and a second
check of every field before it can reach an HTTP/1.1 origin. A body without
content-length is marked chunked there, so the relay frames it for the origin.
"""

from __future__ import annotations

from typing import Any

import h2.stream as _h2_stream
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event
from h2.exceptions import DenialOfServiceError, ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes, Settings
from hpack.struct import NeverIndexedHeaderTuple
from hyperframe.frame import Frame

from meshproxy._core import h2_fields
from meshproxy._core.h2_server import (
    DataReceived,
    H2ServerConnection,
    PriorityUpdated,
    WindowUpdated,
)
from meshproxy._core.hpack import Decoder, Encoder
from meshproxy._core.http1_parser import MessageHead
from meshproxy.config.snapshot import RESPONSE_SKIP, Http2Spec, UpstreamHttp2Spec

# RFC 9113 section 3.4: every HTTP/2 connection opens with this, before any frame.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PREFACE_LEN = len(PREFACE)

# Rapid reset (Envoy's premature_reset_min_stream_lifetime_seconds and
# premature_reset_total_stream_count): a reset this soon after the stream opened is
# premature; the check runs once the connection has opened this many streams (a client
# that cancels a few requests is normal).
PREMATURE_RESET_LIFETIME = 1.0
PREMATURE_RESET_MIN_STREAMS = 500



class H2Failure(Exception):
    """The connection must end: a protocol error or a flood. `stat` is the http2.* counter
    to count (the attribute name), `code` the GOAWAY error code already queued."""

    def __init__(self, stat: str, reason: str, code: int = ErrorCodes.PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.stat = stat
        self.reason = reason
        self.code = code


def _config(client: bool) -> H2Configuration:
    """Both sides' h2 configuration. Inbound fields are validated and normalized (cookies
    joined, RFC 9113 8.2.3). Outbound ones are the proxy's own, from a head its parser
    read (names lowercased, values without CR/LF/NUL or surrounding whitespace) less the
    connection-specific fields (RESPONSE_SKIP, UPSTREAM_SKIP), so h2's per-field checks
    and normalization are not run twice; keeping credentials out of the HPACK tables
    (RFC 7541 7.1.3) is the compiled encoder's own rule (meshproxy._core.hpack)."""
    return H2Configuration(client_side=client, header_encoding=None,
                           validate_inbound_headers=True, normalize_inbound_headers=True,
                           validate_outbound_headers=False, normalize_outbound_headers=False)


# h2's inbound field checks and cookie joining, compiled (the same rules, errors and
# order: meshproxy._core.h2_fields), in the module where h2's streams look them up.
_h2_stream.validate_headers = h2_fields.validate_headers  # type: ignore[assignment]
_h2_stream.normalize_inbound_headers = h2_fields.normalize_inbound_headers  # type: ignore[assignment]


def _frame_repr(frame: Frame) -> str:
    return f"{type(frame).__name__}(stream_id={frame.stream_id})"


# h2 4.4 formats every frame it receives for its trace log (`repr(frame)`, evaluated before
# the logger, a no-op DummyLogger here, is called): hyperframe's repr renders the flags and
# a dump of the payload, a few microseconds a frame for nothing. A frame's repr is its type
# and stream instead, which is all a log line of ours would say of it.
Frame.__repr__ = _frame_repr  # type: ignore[method-assign]


class _Connection(H2Connection):
    """h2's connection, with two costs of its own taken out: its HPACK (the pure-Python
    hpack package) is the compiled one (meshproxy._core.hpack: the same interface and
    exceptions), and the frames it queues are joined without re-checking every frame's
    size against max_outbound_frame_size (h2 split them to that size a step before; the
    check was an assert run per frame)."""

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.encoder = Encoder()  # type: ignore[assignment]
        self.decoder = Decoder(self.decoder.max_header_list_size)  # type: ignore[assignment]

    def _prepare_for_sending(self, frames: list[Any]) -> None:
        if frames:
            self._data_to_send += b"".join([f.serialize() for f in frames])


def _start(conn: Any, window: int) -> None:
    """The preface's SETTINGS, then the connection window raised from the protocol's
    65,535 (RFC 9113 6.9.2: only a WINDOW_UPDATE on stream 0 can change it)."""
    conn.initiate_connection()
    if window > 65_535:
        conn.increment_flow_control_window(window - 65_535)


def preface_state(data: bytes) -> int:
    """1: `data` opens with the HTTP/2 preface; 0: it may still (a prefix of it);
    -1: it does not (an HTTP/1.1 request, RFC 9113 3.4)."""
    n = min(len(data), PREFACE_LEN)
    if data[:n] != PREFACE[:n]:
        return -1
    return 1 if n == PREFACE_LEN else 0


class ServerCodec:
    """One client connection's HTTP/2 state: the compiled server connection plus the
    flood accounting."""

    __slots__ = ("h2", "spec", "empty_run", "priority_frames", "window_updates",
                 "streams_opened", "data_frames_sent", "premature_resets")

    def __init__(self, spec: Http2Spec, max_header_bytes: int) -> None:
        self.spec = spec
        # Our SETTINGS, in force from the preface on (as h2 applied them); ENABLE_PUSH 0;
        # ENABLE_CONNECT_PROTOCOL (RFC 8441 3: a WebSocket on a stream) when allowed.
        self.h2 = H2ServerConnection(
            max_concurrent_streams=spec.max_concurrent_streams,
            initial_window=spec.initial_stream_window_size,
            header_table_size=spec.hpack_table_size,
            max_header_list_size=max_header_bytes,
            enable_connect=spec.allow_connect)
        self.empty_run = 0
        self.priority_frames = 0
        self.window_updates = 0
        self.streams_opened = 0
        self.data_frames_sent = 0
        self.premature_resets = 0

    def start(self) -> None:
        """Queue the server's preface: SETTINGS, then the connection window's increase."""
        _start(self.h2, self.spec.initial_connection_window_size)

    def receive(self, data: bytes) -> list[Any]:
        """Feed received bytes; the events they make. Raises H2Failure once the connection
        must end (a GOAWAY is queued then)."""
        try:
            events = self.h2.receive_data(data)
        except TooManyStreamsError as exc:
            raise H2Failure("http2_too_many_streams", str(exc)) from None
        except DenialOfServiceError as exc:
            raise H2Failure("http2_header_overflow", str(exc),
                            ErrorCodes.ENHANCE_YOUR_CALM) from None
        except ProtocolError as exc:
            raise H2Failure("http2_rx_messaging_error", str(exc) or type(exc).__name__,
                            getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR)) from None
        self._count(events)
        return events

    def _count(self, events: list[Any]) -> None:
        spec = self.spec
        ev: Any  # narrowed by `kind`, which mypy does not follow
        for ev in events:
            kind = type(ev)
            if kind is DataReceived:
                if ev.data or ev.stream_ended is not None:
                    self.empty_run = 0
                else:
                    self.empty_run += 1
                    if self.empty_run > spec.max_empty_frames:
                        self.fail("http2_inbound_empty_frames_flood",
                                  "too many frames with an empty payload in a row")
                continue
            self.empty_run = 0
            if kind is PriorityUpdated:
                self.priority_frames += 1
                if self.priority_frames > spec.max_priority_frames_per_stream * (
                        1 + self.streams_opened):
                    self.fail("http2_inbound_priority_frames_flood", "PRIORITY flood")
            elif kind is WindowUpdated:
                self.window_updates += 1
                # Envoy's budget: 5 + 2 * (streams opened + the per-DATA allowance).
                if self.window_updates > 5 + 2 * (
                        self.streams_opened
                        + spec.max_window_updates_per_data_frame * self.data_frames_sent):
                    self.fail("http2_inbound_window_update_frames_flood",
                              "WINDOW_UPDATE flood")

    def fail(self, stat: str, reason: str) -> None:
        """End the connection for a flood: GOAWAY ENHANCE_YOUR_CALM (RFC 9113 7)."""
        self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        raise H2Failure(stat, reason, ErrorCodes.ENHANCE_YOUR_CALM)

    def opened(self) -> None:
        self.streams_opened += 1

    def header_block_pending(self) -> bool:
        """A request's header block has begun and not ended: a HEADERS frame without
        END_HEADERS awaits its CONTINUATION, or a HEADERS or CONTINUATION frame is still
        arriving. Nothing else may come on the connection until it ends (RFC 9113 6.10),
        so a client that stalls here (slowloris in HTTP/2) holds the whole connection:
        request_headers_timeout bounds it."""
        return bool(self.h2.header_block_pending())

    def premature_reset(self) -> bool:
        """A client reset a young stream; True once the connection should close."""
        self.premature_resets += 1
        opened = self.streams_opened
        return opened >= PREMATURE_RESET_MIN_STREAMS and self.premature_resets * 2 >= opened


# A request's fields as the HTTP/1.1 head the compiled parser reads, and how its DATA is
# read (BODY_AS_IS, BODY_CHUNKED, BODY_TUNNEL): compiled, _core.h2_fields.request_head says
# how (:authority as Host, extended CONNECT as an upgrade, never-indexed fields kept).
request_head = h2_fields.request_head
BODY_AS_IS = h2_fields.BODY_AS_IS
BODY_CHUNKED = h2_fields.BODY_CHUNKED
BODY_TUNNEL = h2_fields.BODY_TUNNEL


def mark_never_indexed(fields: list[tuple[bytes, bytes]],
                       never: frozenset[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`fields` with those in `never` as NeverIndexedHeaderTuple, which the encoder sends
    never-indexed: what a peer sent so is re-encoded so (RFC 7541 7.1.3, an intermediary's
    MUST)."""
    return [NeverIndexedHeaderTuple(*f) if f in never else f for f in fields]


def tunnel_fields(resp: MessageHead) -> list[tuple[bytes, bytes]]:
    """An origin's 101 to a translated extended CONNECT as the HTTP/2 answer: 200, less
    the connection-specific fields and Sec-WebSocket-Accept (RFC 8441 5: the handshake's
    key and accept are HTTP/1.1's alone)."""
    out = [(b":status", b"200")]
    for field in resp.headers:
        if field[0] not in RESPONSE_SKIP and field[0] != b"sec-websocket-accept":
            out.append(field)
    return out


def response_fields(status: int, resp: MessageHead, skip: frozenset[bytes],
                    add: tuple[tuple[bytes, bytes], ...],
                    extra: list[tuple[bytes, bytes]] | None,
                    length: int, never: frozenset[tuple[bytes, bytes]] | None = None
                    ) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 response head as HTTP/2 fields: connection-specific fields and those the
    Connection header names dropped (RFC 9113 8.2.2), the route's removals and additions
    applied, and content-length stated when the length is known (`length` >= 0); the
    fields an HTTP/2 origin sent never-indexed (`never`) stay so (RFC 7541 7.1.3).
    Compiled (_core.h2_fields); RESPONSE_SKIP: the fields HTTP/2 forbids and
    content-length, which is restated from the framing."""
    return h2_fields.response_fields(status, resp, RESPONSE_SKIP, skip, add, extra, length,
                                     never)


def local_fields(status: int, length: int, content_type: bytes,
                 extra: list[tuple[bytes, bytes]] | None) -> list[tuple[bytes, bytes]]:
    """A local reply's fields (the HTTP/1.1 reply's, less the connection's own)."""
    out = [(b":status", b"%d" % status)]
    if length:
        out.append((b"content-type", content_type))
    out.append((b"content-length", b"%d" % length))
    if extra:
        out += extra
    return out


# ---------------------------------------------------------------- the upstream side

# Request fields that do not go to an HTTP/2 origin (RFC 9113 8.2.2: connection-specific;
# Host becomes :authority, 8.3.1). `te` goes on only as "trailers", below.
UPSTREAM_SKIP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
    b"host", b"te",
})
TE_TRAILERS = (b"te", b"trailers")


class _GracefulClient(_Connection):
    """h2 as the client, except that a graceful GOAWAY (NO_ERROR) does not end the
    connection's state machine: RFC 9113 6.8 lets the streams up to its last_stream_id
    finish, and h2 would refuse their frames (its GOAWAY handling closes everything,
    even frames that arrive in the same read). The event is the same ConnectionTerminated;
    the connection takes no new stream (upstream.h2_origin)."""

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Event]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class ClientCodec:
    """One connection to an HTTP/2 origin: h2's machine as the client, with the
    cluster's settings (a malformed response is the origin's protocol error)."""

    __slots__ = ("h2", "spec")

    def __init__(self, spec: UpstreamHttp2Spec) -> None:
        self.spec = spec
        conn = self.h2 = _GracefulClient(_config(True))
        conn.local_settings = Settings(
            client=True, initial_values={
                SettingCodes.INITIAL_WINDOW_SIZE: spec.initial_stream_window_size,
                SettingCodes.HEADER_TABLE_SIZE: spec.hpack_table_size,
                SettingCodes.ENABLE_PUSH: 0,
            })
        conn.decoder.max_allowed_table_size = spec.hpack_table_size

    def start(self) -> None:
        """Queue the client's preface (RFC 9113 3.4), SETTINGS, the connection window."""
        _start(self.h2, self.spec.initial_connection_window_size)

    def max_streams(self) -> int:
        """Streams this connection may carry at once: ours and the origin's limit."""
        return min(self.spec.max_concurrent_streams,
                   self.h2.remote_settings.max_concurrent_streams)


def upstream_fields(up: MessageHead, scheme: bytes, te_trailers: bool,
                    never: frozenset[tuple[bytes, bytes]] | None = None
                    ) -> list[tuple[bytes, bytes]]:
    """The head built for the origin (proxy.head_rewrite, as HTTP/1.1 and parsed again)
    as HTTP/2 fields: Host as :authority (RFC 9113 8.3.1), the connection-specific
    fields dropped (8.2.2), `te: trailers` kept when the client asked for trailers
    (gRPC needs it, 8.2.2 allows no other value), the fields an HTTP/2 client sent
    never-indexed (`never`) kept so (RFC 7541 7.1.3)."""
    path = up.target
    out = [(b":method", up.method), (b":scheme", scheme),
           (b":authority", up.host or b""), (b":path", path)]
    skip = UPSTREAM_SKIP
    if up.conn_extra:
        skip = skip | frozenset(up.conn_extra)
    for field in up.headers:
        if field[0] not in skip:
            out.append(field)
    if never is not None:
        out = mark_never_indexed(out, never)
    if te_trailers:
        out.append(TE_TRAILERS)
    return out


def never_indexed(fields: list[tuple[bytes, bytes]]) -> frozenset[tuple[bytes, bytes]] | None:
    """The fields a peer sent never-indexed (_core.hpack's decoder gives them as hpack's
    NeverIndexedHeaderTuple), or None."""
    never = [(f[0], f[1]) for f in fields if type(f) is NeverIndexedHeaderTuple]
    return frozenset(never) if never else None


def asks_trailers(head: MessageHead) -> bool:
    """The client's TE field lists "trailers" (RFC 9110 10.1.4)."""
    te = head.get(b"te")
    return te is not None and b"trailers" in te.lower()


def response_head(fields: list[tuple[bytes, bytes]], end_stream: bool,
                  method: bytes) -> bytes:
    """An HTTP/2 origin's response fields as the HTTP/1.1 head the compiled parser reads,
    so that its response goes through the same checks and relays as an HTTP/1.1 origin's.
    Without content-length the body ends with the stream: the head states no framing
    (close-delimited, which the relays re-frame for the client), or a zero length when
    the HEADERS ended the stream on a response that has a body."""
    status = b"502"
    lines = []
    has_length = False
    for name, value in fields:
        if name[:1] == b":":
            if name == b":status":
                status = value
            continue
        if name == b"content-length":
            has_length = True
        lines.append(name + b": " + value)
    if (end_stream and not has_length and method != b"HEAD" and status[:1] != b"1"
            and status not in (b"204", b"304")):
        lines.append(b"content-length: 0")
    lines.append(b"\r\n")
    return b"HTTP/1.1 " + status + b" \r\n" + b"\r\n".join(lines)
