"""The HTTP/1.1 data path on real sockets: a real proxy process, a real origin, curl."""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import curl, ok_response, raw_exchange, read_response

CORPUS = Path(__file__).resolve().parent.parent / "corpus"


def origin_saw(body: bytes) -> dict:
    return json.loads(body.split(b"\r\n\r\n", 1)[1] if body.startswith(b"HTTP/") else body)


def test_proxy_basics_get_with_curl(env) -> None:
    o, p = env
    r = curl("-i", f"http://127.0.0.1:{p.port}/hello?x=1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"HTTP/1.1 200 OK\r\n")
    seen = origin_saw(r.stdout.split(b"\r\n\r\n", 1)[1])
    assert seen["method"] == "GET" and seen["target"] == "/hello?x=1"


def test_proxy_basics_forwarding_headers(env) -> None:
    o, p = env
    r = curl(f"http://127.0.0.1:{p.port}/", "-H", "X-Forwarded-For: 10.1.1.1",
             "-H", "X-Forwarded-Proto: https")
    headers = dict((k, v) for k, v in origin_saw(r.stdout)["headers"])
    assert headers["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"  # appended
    assert headers["x-forwarded-proto"] == "http"  # set by the proxy, not trusted
    rid = uuid.UUID(headers["x-request-id"])
    assert rid.version == 4
    r = curl(f"http://127.0.0.1:{p.port}/", "-H", "X-Request-Id: my-id-1")
    headers = dict((k, v) for k, v in origin_saw(r.stdout)["headers"])
    assert headers["x-request-id"] == "my-id-1"  # passed through


def test_proxy_basics_downstream_keep_alive_and_upstream_pooling(env) -> None:
    o, p = env
    before = o.connections
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for i in range(5):
            s.sendall(b"GET /k%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            status, _, body = read_response(s)
            assert status == 200 and json.loads(body)["target"] == f"/k{i}"
    # five requests on one client connection, and all on one upstream connection
    assert len({r.conn_id for r in o.requests}) == 1
    assert o.connections - before <= 1


def test_proxy_basics_pipelined_requests_answered_in_order(env) -> None:
    o, p = env
    data = b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(3))
    data += b"GET /p3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    out = raw_exchange(p.port, data)
    assert out.count(b"HTTP/1.1 200 OK") == 4
    order = [out.index(b'"/p%d"' % i) for i in range(4)]
    assert order == sorted(order)


def test_proxy_basics_connection_close_from_client(env) -> None:
    o, p = env
    out = raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert b"connection: close" in out.lower()  # and the proxy closed: raw_exchange returned


def test_proxy_basics_upstream_connection_close_not_reused(env) -> None:
    o, p = env
    o.handler = lambda req, s: ok_response(b"bye", headers=((b"connection", b"close"),))
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for _ in range(3):
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            status, headers, body = read_response(s)
            assert status == 200 and body == b"bye"
            assert "connection" not in headers  # hop-by-hop, not relayed
    assert len({r.conn_id for r in o.requests}) == 3


def test_proxy_basics_http10_client_gets_no_chunked(env) -> None:
    o, p = env
    o.handler = lambda req, s: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    out = raw_exchange(p.port, b"GET / HTTP/1.0\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"hello world"
    assert b"connection: close" in head.lower()


def test_proxy_basics_http11_client_gets_chunked_from_close_delimited(env) -> None:
    o, p = env

    def close_delimited(req, s):
        s.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        from tests.helpers import Close
        raise Close()

    o.handler = close_delimited
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = read_response(s)
        assert headers.get("transfer-encoding") == "chunked" and body == b"until the end"
        o.handler = lambda req, s: ok_response(b"again")
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # the client connection stayed open
        assert read_response(s)[2] == b"again"


def test_proxy_basics_http10_keep_alive(env) -> None:
    o, p = env
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, _ = read_response(s)
            assert status == 200 and headers["connection"] == "keep-alive"


@pytest.mark.parametrize("status", [204, 304])
def test_proxy_basics_no_body_statuses(env, status: int) -> None:
    o, p = env
    o.handler = lambda req, s: b"HTTP/1.1 %d X\r\nETag: \"a\"\r\n\r\n" % status
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s)[0] == status
        assert read_response(s)[0] == status  # framing intact for the next response


def test_proxy_basics_head_response_has_no_body(env) -> None:
    o, p = env
    o.handler = lambda req, s: b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body = read_response(s, head_only=True)
        assert status == 200 and headers["content-length"] == "1000" and body == b""
        o.handler = lambda req, s: ok_response(b"next")
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s)[2] == b"next"


def test_proxy_basics_hop_by_hop_removed_both_ways(env) -> None:
    o, p = env
    o.handler = lambda req, s: (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Up\r\n"
                                b"X-Up: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\n"
                                b"Upgrade: foo\r\nX-Kept: 1\r\n\r\nok")
    out = raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\n"
                               b"X-Secret: s\r\nKeep-Alive: 300\r\nTE: trailers\r\nTrailer: X\r\n"
                               b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
                               b"X-Normal: n\r\n\r\n", timeout=1)
    names = {k for k, _ in o.requests[-1].headers}
    for hop in (b"connection", b"x-secret", b"keep-alive", b"te", b"trailer",
                b"proxy-connection", b"upgrade"):
        assert hop not in names
    assert b"x-normal" in names
    head = out.split(b"\r\n\r\n")[0].lower()
    for hop in (b"x-up", b"keep-alive", b"proxy-connection", b"upgrade"):
        assert hop + b":" not in head
    assert b"x-kept: 1" in head


def test_proxy_basics_h2c_upgrade_is_not_tunnelled(env) -> None:
    o, p = env
    out = raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                               b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", timeout=1)
    assert out.startswith(b"HTTP/1.1 200")
    names = {k for k, _ in o.requests[-1].headers}
    assert b"upgrade" not in names and b"http2-settings" not in names


def test_proxy_basics_absolute_form_authority_becomes_host(env) -> None:
    o, p = env
    raw_exchange(p.port, b"GET http://Authority.example:81/abs?q=1 HTTP/1.1\r\nHost: other\r\n"
                         b"Connection: close\r\n\r\n")
    req = o.requests[-1]
    assert req.target == b"/abs?q=1" and req.all(b"host") == [b"Authority.example:81"]


REFUSED_REQUESTS = sorted(p for p in CORPUS.glob("*.http")
                          if not p.name.startswith("200_") and "_response_" not in p.name)


@pytest.mark.parametrize("path", REFUSED_REQUESTS, ids=lambda p: p.stem)
def test_proxy_basics_malformed_request_reaches_no_upstream(env, path: Path) -> None:
    o, p = env
    # A previous case may have legitimately forwarded a head (chunked-body cases): let the
    # origin's thread finish counting it before taking the baseline.
    quiet_since, last = time.monotonic(), o.raw_bytes
    while time.monotonic() - quiet_since < 0.3:
        time.sleep(0.05)
        if o.raw_bytes != last:
            quiet_since, last = time.monotonic(), o.raw_bytes
    before, completed = o.raw_bytes, len(o.requests)
    out = raw_exchange(p.port, path.read_bytes(), timeout=2, shutdown=False)
    expected = int(path.stem.split("_", 1)[0])
    # Chunked bodies included: the chunks that arrived with the head are decoded before any
    # upstream I/O (tests/integration/test_smuggling.py covers a bad chunk arriving later).
    assert len(o.requests) == completed
    assert out.startswith(b"HTTP/1.1 %d " % expected), out[:100]
    assert b"connection: close" in out.lower()
    assert o.raw_bytes == before  # not one byte reached the origin
