"""Request smuggling, tried on real sockets: what the origin received is read byte for byte.

For every case the origin must have received nothing, or exactly one well-framed request
whose framing is the one the proxy decided (one `content-length` or one
`transfer-encoding: chunked` line, written by the proxy). The bytes of the origin's side are
taken apart with h11 as an independent oracle.
"""

from __future__ import annotations

import socket
import time

import h11
import pytest

from tests.helpers import Origin, Proxy, config, ok_response, raw_exchange, read_response


@pytest.fixture(scope="module")
def smug(tmp_path_factory):
    o = Origin().start()
    p = Proxy(config(o.port), tmp_path_factory.mktemp("p"))
    yield o, p
    p.stop()
    o.stop()


@pytest.fixture
def env(smug):
    o, p = smug
    o.handler = lambda req, sock: ok_response(b"ok")
    o.requests.clear()
    o.raw.clear()
    return o, p


def origin_messages(raw: bytes) -> tuple[list[tuple[h11.Request, bytes]], bytes]:
    """(complete requests with their bodies, bytes left that form no complete request)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    out: list[tuple[h11.Request, bytes]] = []
    req, body = None, b""
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            break
        if isinstance(ev, h11.Request):
            req, body = ev, b""
        elif isinstance(ev, h11.Data):
            body += bytes(ev.data)
        elif isinstance(ev, h11.EndOfMessage):
            assert req is not None
            out.append((req, body))
            req = None
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            conn.start_next_cycle()
    return out, bytes(conn.trailing_data[0])


def settle(o: Origin) -> bytes:
    """All the origin received once the proxy has stopped sending."""
    time.sleep(0.3)
    return b"".join(bytes(v) for v in o.raw.values())


def framing_lines(req: h11.Request) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in req.headers if k in (b"content-length", b"transfer-encoding")]


def test_smuggling_content_length_wrap_is_refused_and_reaches_no_origin(env) -> None:
    o, p = env
    # 2**64 + 5: before the fix this wrapped to 5, and the GET after "hello" reached the
    # origin as a request of its own.
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551621\r\n\r\n"
            b"helloGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    out = raw_exchange(p.port, data, timeout=2)
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert out.count(b"HTTP/1.1") == 1  # one answer, and the connection closed
    assert settle(o) == b""
    assert o.requests == []


@pytest.mark.parametrize("value", [b"9223372036854775808", b"4611686018427387905",
                                   b"5, 18446744073709551621", b"99999999999999999999999"])
def test_smuggling_content_length_past_the_bound_is_refused(env, value: bytes) -> None:
    o, p = env
    out = raw_exchange(p.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + value +
                       b"\r\n\r\nhello", timeout=2)
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert settle(o) == b""


@pytest.mark.parametrize("lines", [
    [b"Content-Length: 5", b"Content-Length: 5"],
    [b"Content-Length: 5, 5"],
    [b"Content-Length: 5,5", b"content-length: 5"],
    [b"Content-Length: 0005"],
])
def test_smuggling_identical_content_lengths_forwarded_as_one_line(env, lines) -> None:
    o, p = env
    head = b"POST /dup HTTP/1.1\r\nHost: a\r\n" + b"".join(x + b"\r\n" for x in lines) + b"\r\n"
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(head + b"hello")
        status, _, body = read_response(s)
    assert status == 200 and body == b"ok"
    msgs, rest = origin_messages(settle(o))
    assert len(msgs) == 1 and rest == b""
    req, got = msgs[0]
    assert got == b"hello"
    assert framing_lines(req) == [(b"content-length", b"5")]
    raw = settle(o)
    assert raw.lower().count(b"content-length") == 1


@pytest.mark.parametrize("target", [b"/a#b", b"/a#/../admin", b"http://a/x#frag"])
def test_smuggling_fragment_in_target_is_refused(env, target: bytes) -> None:
    o, p = env
    out = raw_exchange(p.port, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", timeout=2)
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert b"fragment" in out
    assert settle(o) == b""


def test_smuggling_chunk_size_wrap_in_first_bytes_reaches_no_origin(env) -> None:
    o, p = env
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10000000000000005\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    out = raw_exchange(p.port, data, timeout=2)
    assert out.startswith(b"HTTP/1.1 400 "), out
    assert settle(o) == b""


def test_smuggling_chunk_error_mid_stream_never_completes_a_request(env) -> None:
    """A bad chunk after the head went upstream: the upstream connection is reset, so the
    origin holds an unfinished request and nothing after it."""
    o, p = env
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n")
        deadline = time.monotonic() + 3
        while not o.raw and time.monotonic() < deadline:
            time.sleep(0.02)
        s.sendall(b"10000000000000005\r\nworld\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
                  b"Host: a\r\n\r\n")
        s.settimeout(3)
        out = b""
        while True:
            try:
                d = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not d:
                break
            out += d
    assert out.startswith(b"HTTP/1.1 400 "), out
    raw = settle(o)
    msgs, _ = origin_messages(raw)
    assert msgs == []  # the request was never completed at the origin
    assert b"hello" in raw and b"world" not in raw and b"smuggled" not in raw
    assert raw.count(b"transfer-encoding: chunked") == 1


def test_smuggling_chunked_request_forwarded_with_one_framing_line(env) -> None:
    o, p = env
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"003;ext=1\r\nhel\r\n2\r\nlo\r\n0\r\nX-Trailer: t\r\n"
                  b"Content-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, _, _ = read_response(s)
    assert status == 200
    msgs, rest = origin_messages(settle(o))
    assert len(msgs) == 1 and rest == b""
    req, body = msgs[0]
    assert body == b"hello"
    assert framing_lines(req) == [(b"transfer-encoding", b"chunked")]
    raw = settle(o)
    # Trailers go on, but never framing fields (RFC 9110 6.5.1).
    assert b"x-trailer: t" in raw.lower() and b"content-length" not in raw.lower()
    assert raw.lower().count(b"transfer-encoding") == 1


@pytest.mark.parametrize("origin_head, status", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551621\r\n\r\nhello", 502),
    (b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n", 502),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 502),
])
def test_smuggling_broken_response_framing_is_502(env, origin_head: bytes, status: int) -> None:
    o, p = env
    o.handler = lambda req, sock: origin_head
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        got, _, body = read_response(s)
    assert got == status
    assert b"hello" not in body


def test_smuggling_response_duplicate_lengths_restated_once(env) -> None:
    o, p = env
    o.handler = lambda req, sock: (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                   b"Content-Length: 5, 5\r\n\r\nhello")
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        s.settimeout(3)
        out = b""
        while out.count(b"hello") < 2:
            d = s.recv(65536)
            if not d:
                break
            out += d
    first = out.split(b"\r\n\r\n", 1)[0].lower()
    assert first.count(b"content-length") == 1 and b"content-length: 5" in first
    assert out.count(b"HTTP/1.1 200") == 2


def test_smuggling_head_response_keeps_its_length(env) -> None:
    o, p = env
    o.handler = lambda req, sock: b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = read_response(s, head_only=True)
    assert status == 200 and headers["content-length"] == "42" and body == b""
