"""WebSocket over HTTP/2 (RFC 8441): an h2-library client opens the WebSocket with an
extended CONNECT on a stream; the proxy translates it to the HTTP/1.1 upgrade of RFC 6455
for an HTTP/1.1 WebSocket origin, answers the origin's 101 with 200, and relays the frames
as DATA both ways (END_STREAM for a FIN, RST_STREAM CANCEL for a reset)."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
import time

from tests.h2client import Client
from tests.helpers import Close, Reset, wait_for
from tests.integration.test_http2_downstream import h2_proxy, log_lines
from tests.integration.test_supervisor import stat

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 1.3


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (RFC 6455 5.2, 5.3), payloads under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """A client frame as the origin reads it: (opcode, unmasked payload)."""
    def exact(n: int) -> bytes:
        out = b""
        while len(out) < n:
            d = sock.recv(n - len(out))
            if not d:
                raise Close()
            out += d
        return out
    b0, b1 = exact(2)
    assert b1 & 0x80, "a client frame is masked (RFC 6455 5.3)"
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", exact(2))[0]
    mask = exact(4)
    payload = exact(n)
    return b0 & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_origin(seen: list):
    """An HTTP/1.1 WebSocket origin: checks the handshake (RFC 6455 4.2.1), answers 101
    with the Sec-WebSocket-Accept for the key, echoes text frames upper-cased and answers
    a close frame with one, then closes."""
    def handler(req, sock):
        seen.append(req)
        key = req.header(b"sec-websocket-key")
        if (req.method != b"GET" or (req.header(b"upgrade") or b"").lower() != b"websocket"
                or b"upgrade" not in (req.header(b"connection") or b"").lower()
                or key is None or len(base64.b64decode(key)) != 16
                or req.header(b"sec-websocket-version") != b"13"):
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            return None
        if req.target == b"/reset":
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n"
                         b"connection: upgrade\r\nsec-websocket-accept: x\r\n\r\n")
            read_frame(sock)
            raise Reset()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
                     b"Sec-WebSocket-Protocol: chat\r\n\r\n")
        while True:
            op, payload = read_frame(sock)
            if op == 8:  # close: answer it, then close the TCP connection (RFC 6455 5.5.1)
                sock.sendall(bytes([0x88, len(payload)]) + payload)
                raise Close()
            out = payload.upper()
            sock.sendall(bytes([0x81, len(out)]) + out)
    return handler


def ws_setup(tmp_path, origin_factory, listener: dict | None = None):
    """A WebSocket origin behind a proxy and an HTTP/2 client of it: (requests the origin
    saw, proxy, client)."""
    seen: list = []
    o = origin_factory(ws_origin(seen))
    p = h2_proxy(tmp_path, o, listener=listener)
    return seen, p, Client(p.port)


def open_ws(c: Client, path: str = "/chat", protocol: bytes = b"websocket") -> int:
    return c.request(path, method="CONNECT", end=False, headers=[
        (b":protocol", protocol), (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"chat")])


def pump_until(c: Client, cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        c.pump(0.1)


def test_http2_websocket_extended_connect_to_an_http1_origin(tmp_path, origin_factory) -> None:
    """RFC 8441: the server allows extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL,
    section 3); the stream's CONNECT with :protocol websocket reaches the origin as the
    RFC 6455 upgrade, with a Sec-WebSocket-Key HTTP/2 does without; 200 answers the 101
    (section 5) without the HTTP/1.1 handshake's fields; frames go both ways as DATA;
    the origin's close ends the stream (END_STREAM)."""
    seen, p, c = ws_setup(tmp_path, origin_factory)
    pump_until(c, lambda: c.conn.remote_settings.enable_connect_protocol == 1)
    sid = open_ws(c)
    pump_until(c, lambda: c.responses[sid].status)
    r = c.responses[sid]
    assert r.status == 200 and not r.ended
    names = {k for k, _v in r.headers}
    assert not names & {b"sec-websocket-accept", b"upgrade", b"connection"}
    assert r.header(b"sec-websocket-protocol") == b"chat"
    req = seen[-1]
    assert req.target == b"/chat" and req.header(b"host") == b"example.com"
    for i, msg in enumerate((b"hello", b"over http/2")):
        before = len(r.body)
        c.send_body(sid, client_frame(msg), end=False)
        want = bytes([0x81, len(msg)]) + msg.upper()
        size = before + len(want)
        pump_until(c, lambda size=size: len(r.body) >= size)
        assert r.body[before:] == want, i
    c.send_body(sid, client_frame(b"\x03\xe8", opcode=8), end=False)
    pump_until(c, lambda: r.ended)
    assert r.body.endswith(b"\x88\x02\x03\xe8") and r.reset is None
    c.send_body(sid, b"", end=True)
    wait_for(lambda: len(log_lines(p)) >= 1)
    line = log_lines(p)[-1]
    assert (line["protocol"], line["response_code"]) == ("HTTP/2", 200)
    assert line["bytes_received"] > 0 and line["bytes_sent"] > 0
    assert c.get("/after").status == 400  # the connection serves on: a plain GET (origin 400)
    c.close()


def test_http2_websocket_origin_refusal_is_relayed(tmp_path, origin_factory) -> None:
    """An origin that does not switch protocols answers the stream as a response does."""
    seen, p, c = ws_setup(tmp_path, origin_factory)
    sid = c.request("/chat", method="CONNECT", end=False,
                    headers=[(b":protocol", b"websocket")])  # no Sec-WebSocket-Version
    r = c.wait(sid)[0]
    assert r.status == 400 and r.ended
    c.close()


def test_http2_websocket_origin_reset_is_rst_stream_cancel(tmp_path, origin_factory) -> None:
    """RFC 8441 5: a TCP reset on the origin's side is RST_STREAM CANCEL on the stream."""
    seen, p, c = ws_setup(tmp_path, origin_factory)
    sid = open_ws(c, "/reset")
    pump_until(c, lambda: c.responses[sid].status)
    c.send_body(sid, client_frame(b"x"), end=False)
    r = c.wait(sid)[0]
    assert r.reset == 8  # CANCEL
    c.close()


def test_http2_websocket_other_protocols_get_403(tmp_path, origin_factory) -> None:
    """Only the WebSocket upgrade is relayed: another :protocol is refused (Envoy: 403,
    upgrade_failed) and no origin sees it."""
    seen, p, c = ws_setup(tmp_path, origin_factory)
    r = c.wait(open_ws(c, protocol=b"webtransport"))[0]
    assert r.status == 403 and not seen
    wait_for(lambda: len(log_lines(p)) >= 1)
    assert log_lines(p)[-1]["response_code_details"] == "upgrade_failed"
    c.close()


def test_http2_websocket_refused_when_not_allowed(tmp_path, origin_factory) -> None:
    """allow_connect: false: no ENABLE_CONNECT_PROTOCOL, and a :protocol request is
    malformed (RFC 8441 3, RFC 9113 8.1.1): RST_STREAM PROTOCOL_ERROR, counted."""
    seen, p, c = ws_setup(tmp_path, origin_factory, {"http2": {"allow_connect": False}})
    pump_until(c, lambda: c.conn.remote_settings.max_concurrent_streams == 100)
    assert c.conn.remote_settings.enable_connect_protocol == 0
    r = c.wait(open_ws(c))[0]
    assert r.reset == 1 and not seen  # PROTOCOL_ERROR
    assert stat(p, "http.ingress.http2.rx_messaging_error") == 1
    assert c.get("/x").status == 400  # the connection lives on
    c.close()
