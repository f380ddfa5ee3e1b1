"""HTTP/2 clients for the tests, written on the h2 library (a real HTTP/2 implementation,
not the proxy's code): a well-behaved one that runs requests on one connection, and the
raw-frame tools the conformance and hostile-client tests use (hyperframe frames, HPACK
blocks written by hand, so that a test can send what h2 itself would refuse to)."""

from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
from hpack import Encoder
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, SettingsFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset
    ended: bool = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Client:
    """One HTTP/2 connection (h2c prior knowledge, or TLS with ALPN h2)."""

    def __init__(self, port: int, *, tls_ca: str | None = None, server_name: str = "localhost",
                 window: int | None = None, timeout: float = 10.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if tls_ca is not None:
            ctx = ssl.create_default_context(cafile=tls_ca)
            ctx.set_alpn_protocols(["h2"])
            self.sock: socket.socket = ctx.wrap_socket(raw, server_hostname=server_name)
            assert self.sock.selected_alpn_protocol() == "h2"
        else:
            self.sock = raw
        self.timeout = timeout
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(cfg)
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=True, initial_values={
                    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self.conn.initiate_connection()
        self.flush()
        self.responses: dict[int, Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.auto_ack = True  # reopen our windows as data is read

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str = "/", method: str = "GET", authority: str = "example.com",
                headers: list[tuple[bytes, bytes]] | None = None, body: bytes | None = None,
                end: bool = True, trailers: list[tuple[bytes, bytes]] | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":path", path.encode()),
                  (b":scheme", b"http"), (b":authority", authority.encode()),
                  *(headers or [])]
        no_body = body is None and trailers is None
        self.conn.send_headers(sid, fields, end_stream=no_body and end)
        self.responses[sid] = Response()
        if body is not None:
            self.send_body(sid, body, end=end and trailers is None)
        if trailers is not None:
            self.conn.send_headers(sid, trailers, end_stream=True)
        self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool) -> None:
        """Send within the windows, reading (window updates) when they are shut."""
        if not body and end:
            self.conn.end_stream(sid)
        while body:
            window = self.conn.local_flow_control_window(sid)
            if window <= 0:
                self.flush()
                self.pump(0.5)
                continue
            n = min(window, len(body), self.conn.max_outbound_frame_size)
            self.conn.send_data(sid, body[:n], end_stream=end and n == len(body))
            body = body[n:]
            self.flush()
        self.flush()

    def pump(self, wait: float) -> bool:
        """Read what arrives within `wait` seconds; False once the server closed."""
        r, _, _ = select.select([self.sock], [], [], wait)
        if not r:
            return not self.closed
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        for ev in self.conn.receive_data(data):
            self._event(ev)
        self.flush()
        return True

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            r = self.responses[ev.stream_id]
            r.headers = list(ev.headers)
            r.status = int(dict(r.headers)[b":status"])
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            self.responses[ev.stream_id].informational.append(list(ev.headers))
        elif isinstance(ev, h2.events.DataReceived):
            r = self.responses[ev.stream_id]
            r.body += ev.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.responses[ev.stream_id].trailers = list(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.responses[ev.stream_id].ended = True
        elif isinstance(ev, h2.events.StreamReset):
            if ev.stream_id in self.responses:
                self.responses[ev.stream_id].reset = int(ev.error_code)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev

    def wait(self, *sids: int, timeout: float | None = None) -> list[Response]:
        """Until every stream ended or was reset (or the connection closed)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            rs = [self.responses[s] for s in sids]
            if all(r.ended or r.reset is not None for r in rs) or self.closed:
                return rs
            self.pump(0.2)
        raise AssertionError(f"streams {sids} did not end in time")

    def get(self, path: str = "/", **kw) -> Response:
        return self.wait(self.request(path, **kw))[0]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------- raw frames

def request_block(path: bytes = b"/", method: bytes = b"GET", authority: bytes = b"a",
                  extra: list[tuple[bytes, bytes]] | None = None,
                  pseudo: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """An HPACK block of a request, fields exactly as given (no validation)."""
    fields = pseudo if pseudo is not None else [
        (b":method", method), (b":path", path), (b":scheme", b"http"),
        (b":authority", authority)]
    return Encoder().encode(fields + (extra or []))


def headers_frame(sid: int, block: bytes, end_stream: bool = True,
                  end_headers: bool = True) -> bytes:
    f = HeadersFrame(sid)
    f.data = block
    if end_stream:
        f.flags.add("END_STREAM")
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


class RawConnection:
    """A socket that speaks frames: sends bytes, reads frames until the server closes."""

    def __init__(self, port: int, settings: bool = True, timeout: float = 5.0,
                 rcvbuf: int = 0) -> None:
        """`rcvbuf`: a small receive buffer, for a client that reads nothing (set before
        connecting, so the window it advertises is small from the start)."""
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout
        self.buf = b""
        if settings:
            self.sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def frames(self, until_close: bool = True, wait: float | None = None) -> list[Frame]:
        """Every frame received until the server closes (or `wait` of silence)."""
        out = []
        deadline = time.monotonic() + (wait or self.timeout)
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.sock], [], [], 0.2)
            if not r:
                if not until_close:
                    break
                continue
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                break
            self.buf += data
            while len(self.buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
                if len(self.buf) < 9 + length:
                    break
                f.parse_body(memoryview(self.buf[9:9 + length]))
                self.buf = self.buf[9 + length:]
                out.append(f)
        return out

    def goaway(self) -> GoAwayFrame | None:
        for f in self.frames():
            if isinstance(f, GoAwayFrame):
                return f
        return None

    def close(self) -> None:
        self.sock.close()
