"""An HTTP/2 origin for the tests, on the h2 library (a thread per connection), whose
behaviour a test can set: what it answers, how many streams it allows, a GOAWAY after
n requests, streams refused, responses streamed within the proxy's windows.

Paths it knows (anything else is the echo):
  /echo...            200, JSON of what arrived: method, path, authority, scheme, headers,
                      body (text), trailers, the connection and stream ids
  /big?n=N            N bytes of b"x", with content-length
  /nolength?n=N       N bytes without content-length
  /trailers           "body" then trailers x-checksum: abc, grpc-status: 0
  /status/NNN         that status, a short body
  /never              "ok" with x-token sent never-indexed (RFC 7541 6.2.3), x-plain not
  /hold               answers only once `release` is set (concurrency tests)
"""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import GoAwayFrame

from tests.helpers import ThreadedServer


@dataclass
class H2Request:
    conn_id: int
    stream_id: int
    headers: dict[str, str]
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    never_indexed: list[str] = field(default_factory=list)  # names sent so (RFC 7541 6.2.3)

    @property
    def path(self) -> str:
        return self.headers.get(":path", "")


@dataclass
class H2Origin(ThreadedServer):
    port: int = 0
    max_concurrent_streams: int = 100
    goaway_after: int = 0      # per connection: GOAWAY (NO_ERROR) once this many requests came
    refuse_first: int = 0      # REFUSED_STREAM the first n streams (over all connections)
    tls: ssl.SSLContext | None = None
    requests: list[H2Request] = field(default_factory=list)
    connections: int = 0
    peak_streams: int = 0      # streams open at once on one connection, at most
    release: threading.Event = field(default_factory=threading.Event)
    alpn: list[str] = field(default_factory=list)  # what each TLS connection negotiated
    socks: list[socket.socket] = field(default_factory=list)
    data_sent: int = 0         # response DATA bytes written, all streams

    def stop(self) -> None:
        self.release.set()
        super().stop()

    def abort_all(self) -> None:
        """Reset every connection (RST), as an origin that crashes."""
        for sock in self.socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                b"\x01\x00\x00\x00\x00\x00\x00\x00")
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accepted(self, sock: socket.socket) -> None:
        self.socks.append(sock)

    def _serve(self, sock: socket.socket, cid: int) -> None:
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)
                self.alpn.append(sock.selected_alpn_protocol() or "")
            _Conn(self, sock, cid).serve()
        except (OSError, ssl.SSLError, ProtocolError):
            pass
        finally:
            sock.close()


class _Conn:
    def __init__(self, origin: H2Origin, sock: socket.socket, cid: int) -> None:
        self.o = origin
        self.sock = sock
        self.cid = cid
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.h2.local_settings = Settings(client=False, initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: origin.max_concurrent_streams})
        self.reqs: dict[int, H2Request] = {}
        self.outbox: dict[int, list] = {}  # stream -> [data left, trailers, end sent?]
        self.held: list[int] = []
        self.count = 0
        self.last_stream = 2 ** 31 - 1
        self.extra = b""

    def serve(self) -> None:
        h2 = self.h2
        h2.initiate_connection()
        self.flush()
        while True:
            r, _, _ = select.select([self.sock], [], [], 0.05)
            if r:
                data = self.sock.recv(65536)
                if not data:
                    return
                try:
                    events = h2.receive_data(data)
                except ProtocolError:
                    self.flush()
                    return
                for ev in events:
                    if not self.handle(ev):
                        self.flush()
                        return
            if self.held and self.o.release.is_set():
                for sid in self.held:
                    if sid in self.reqs:
                        self.respond(sid, self.reqs[sid])
                self.held.clear()
            self.push()
            self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send() + self.extra
        self.extra = b""
        if data:
            self.sock.sendall(data)

    def handle(self, ev) -> bool:
        o = self.o
        if isinstance(ev, RequestReceived):
            if ev.stream_id > self.last_stream:
                return True  # after our GOAWAY: never processed
            with o._lock:
                refuse = o.refuse_first > 0
                if refuse:
                    o.refuse_first -= 1
            if refuse:
                self.h2.reset_stream(ev.stream_id, ErrorCodes.REFUSED_STREAM)
                return True
            self.reqs[ev.stream_id] = H2Request(
                self.cid, ev.stream_id, dict(ev.headers),
                never_indexed=[h[0] for h in ev.headers if not h.indexable])
            open_now = sum(1 for s in self.reqs if s not in self.outbox) + len(self.outbox)
            o.peak_streams = max(o.peak_streams, open_now)
            if ev.stream_ended is not None:
                self.complete(ev.stream_id)
        elif isinstance(ev, DataReceived):
            req = self.reqs.get(ev.stream_id)
            if req is not None:
                req.body += ev.data
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            if ev.stream_ended is not None:
                self.complete(ev.stream_id)
        elif isinstance(ev, TrailersReceived):
            req = self.reqs.get(ev.stream_id)
            if req is not None:
                req.trailers = dict(ev.headers)
                req.never_indexed += [h[0] for h in ev.headers if not h.indexable]
            if ev.stream_ended is not None:
                self.complete(ev.stream_id)
        elif isinstance(ev, StreamEnded):
            self.complete(ev.stream_id)
        elif isinstance(ev, StreamReset):
            self.reqs.pop(ev.stream_id, None)
            self.outbox.pop(ev.stream_id, None)
        elif isinstance(ev, WindowUpdated):
            pass
        elif isinstance(ev, ConnectionTerminated):
            return False
        return True

    def complete(self, sid: int) -> None:
        req = self.reqs.get(sid)
        if req is None or sid > self.last_stream:
            return
        self.o.requests.append(req)
        self.count += 1
        if self.o.goaway_after and self.count == self.o.goaway_after:
            frame = GoAwayFrame(0)
            frame.last_stream_id = sid
            frame.error_code = 0
            self.last_stream = sid
            self.flush()
            self.extra += frame.serialize()
        if req.path.startswith("/hold") and not self.o.release.is_set():
            self.held.append(sid)
            return
        self.respond(sid, req)

    def respond(self, sid: int, req: H2Request) -> None:
        url = urlsplit(req.path)
        q = parse_qs(url.query)
        n = int(q.get("n", ["0"])[0])
        trailers = None
        if url.path == "/big":
            headers = [(":status", "200"), ("content-length", str(n))]
            body = memoryview(b"x" * n)  # sliced without copies
        elif url.path == "/nolength":
            headers = [(":status", "200")]
            body = b"y" * n
        elif url.path == "/trailers":
            headers = [(":status", "200"), ("content-type", "application/grpc")]
            body = b"body"
            trailers = [("x-checksum", "abc"), ("grpc-status", "0")]
        elif url.path == "/never":
            headers = [(":status", "200"), NeverIndexedHeaderTuple("x-token", "t0k3n"),
                       ("x-plain", "p"), ("content-length", "2")]
            body = b"ok"
        elif url.path.startswith("/status/"):
            status = url.path.rsplit("/", 1)[1]
            headers = [(":status", status)]
            body = b"" if status in ("204", "304") else b"status body"
        else:
            doc = {"method": req.headers.get(":method"), "path": req.path,
                   "authority": req.headers.get(":authority"),
                   "scheme": req.headers.get(":scheme"),
                   "headers": {k: v for k, v in req.headers.items() if k[:1] != ":"},
                   "body": req.body.decode("latin-1"), "trailers": req.trailers,
                   "conn": self.cid, "stream": sid}
            body = json.dumps(doc).encode()
            headers = [(":status", "200"), ("content-type", "application/json"),
                       ("content-length", str(len(body)))]
        if req.headers.get(":method") == "HEAD":
            body, trailers = b"", None
        end = not body and trailers is None
        self.h2.send_headers(sid, headers, end_stream=end)
        if not end:
            self.outbox[sid] = [body, trailers]
        self.reqs.pop(sid, None)

    def push(self) -> None:
        """Send what the windows allow of every response in progress."""
        h2 = self.h2
        for sid in list(self.outbox):
            body, trailers = self.outbox[sid]
            try:
                while body:
                    room = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                    if room <= 0:
                        break
                    piece, body = bytes(body[:room]), body[room:]
                    h2.send_data(sid, piece, end_stream=not body and trailers is None)
                    self.flush()
                    self.o.data_sent += len(piece)
                self.outbox[sid][0] = body
                if not body:
                    if trailers is not None:
                        h2.send_headers(sid, trailers, end_stream=True)
                    del self.outbox[sid]
            except (StreamClosedError, ProtocolError):
                self.outbox.pop(sid, None)
