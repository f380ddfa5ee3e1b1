"""The compiled fast path (proxy.fast_path) against real origins and clients: what it
serves itself, and each phase at which it hands an exchange to a task, answered exactly as
the task path answers (the suite runs with MESHPROXY_FAST_PATH=off too, where the counts
of the fast path stay zero and every answer is the same)."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from tests.helpers import (
    FAST_PATH,
    Close,
    Origin,
    Proxy,
    config,
    echo_handler,
    make_pki,
    ok_response,
    read_response,
)
from tests.integration.test_supervisor import start, stat

BEGUN = "http.ingress.fast_path.rq_total"
HANDED = "http.ingress.fast_path.handed_off"
DECLINED = "http.ingress.fast_path.declined"


def _get(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n"


def _counts(p: Proxy) -> tuple[int, int, int]:
    return stat(p, BEGUN), stat(p, HANDED), stat(p, DECLINED)


def _expect(p: Proxy, begun: int, handed: int, declined: int) -> None:
    assert _counts(p) == ((begun, handed, declined) if FAST_PATH else (0, 0, 0))


@pytest.fixture
def proxy_for(tmp_path):
    made: list = []

    def make(handler, routes: list | None = None, listener: dict | None = None) -> tuple:
        o = Origin(handler).start()
        p = start(tmp_path, o, 1, cfg=config(o.port, routes=routes, listener=listener))
        made.append((o, p))
        return o, p

    yield make
    for o, p in made:
        p.stop()
        o.stop()


def test_fast_path_serves_keep_alive_exchanges(proxy_for) -> None:
    o, p = proxy_for(echo_handler)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for i in range(20):
            s.sendall(_get(f"/n{i}"))
            status, headers, body = read_response(s)
            assert status == 200
            seen = json.loads(body)
            assert seen["target"] == f"/n{i}"
            assert dict(seen["headers"])["x-forwarded-for"] == "127.0.0.1"
            assert "x-request-id" in dict(seen["headers"])
    # The first request finds no idle upstream connection: a task connects, the fast path
    # serves the other 19 over the pooled one.
    _expect(p, 20, 1, 0)
    assert o.connections == 1
    assert stat(p, "http.ingress.downstream_rq_2xx") == 20
    assert stat(p, "cluster.web.upstream_rq_2xx") == 20


def test_fast_path_pipelined_requests_are_answered_in_order(proxy_for) -> None:
    o, p = proxy_for(echo_handler)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/warm"))
        assert read_response(s)[0] == 200
        s.sendall(_get("/one") + _get("/two") + _get("/three"))
        targets = [json.loads(read_response(s)[2])["target"] for _ in range(3)]
    assert targets == ["/one", "/two", "/three"]
    _expect(p, 4, 1, 0)


def test_fast_path_buffered_body_goes_with_the_head(proxy_for) -> None:
    o, p = proxy_for(echo_handler)
    body = b"x" * 3000
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/warm"))
        assert read_response(s)[0] == 200
        s.sendall(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n" + body
                  + _get("/after"))
        assert json.loads(read_response(s)[2])["body_len"] == 3000
        assert json.loads(read_response(s)[2])["target"] == "/after"
        # A body still on its way is left to a task, which streams it.
        s.sendall(b"POST /q HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n")
        time.sleep(0.2)
        s.sendall(body)
        assert json.loads(read_response(s)[2])["body_len"] == 3000
    assert o.requests[1].body == body and o.requests[3].body == body
    _expect(p, 3, 1, 1)


def test_fast_path_partial_head_is_read_on_by_a_task(proxy_for) -> None:
    o, p = proxy_for(echo_handler)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/warm"))
        assert read_response(s)[0] == 200
        time.sleep(0.1)
        s.sendall(b"GET /split HTTP/1.1\r\nHo")
        time.sleep(0.2)
        s.sendall(b"st: a\r\n\r\n")
        assert json.loads(read_response(s)[2])["target"] == "/split"
        # A malformed head is the task's 400, and no upstream sees it.
        s.sendall(b"GET /bad HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n")
        assert read_response(s)[0] == 400
    assert [r.target for r in o.requests] == [b"/warm", b"/split"]


def test_fast_path_stale_pooled_connection_is_sent_again(proxy_for) -> None:
    def answer_then_close(req, sock):
        sock.sendall(ok_response(b"once"))
        raise Close()  # no Connection: close said: the proxy pools it, the origin is gone

    o, p = proxy_for(answer_then_close)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for _ in range(4):
            s.sendall(_get())
            status, _, body = read_response(s)
            assert (status, body) == (200, b"once")
            time.sleep(0.1)  # the origin's FIN reaches the pooled connection
    # Each request after the first finds the pooled connection closed, before any response
    # byte: it is counted as a retry and sent again on a new connection (by a task).
    assert stat(p, "cluster.web.upstream_rq_retry") == 3
    assert o.connections == 4
    if FAST_PATH:
        assert stat(p, BEGUN) == 4


def test_fast_path_streams_a_response_it_cannot_take_whole(proxy_for) -> None:
    big = b"b" * (3 << 20)
    o, p = proxy_for(lambda req, sock: ok_response(big if req.target == b"/big" else b"s"))
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(_get("/warm"))
        assert read_response(s)[0] == 200
        for _ in range(2):
            s.sendall(_get("/big"))
            status, _, body = read_response(s)
            assert status == 200 and body == big
            s.sendall(_get("/small"))
            assert read_response(s)[2] == b"s"
    assert stat(p, "http.ingress.downstream_rq_2xx") == 5
    if FAST_PATH:
        begun, handed, _ = _counts(p)
        assert begun == 5 and handed >= 3  # the first, and each 3 MiB body


def test_fast_path_relays_a_whole_chunked_response(proxy_for) -> None:
    """A chunked response whose last chunk came with its head is served on the fast path:
    re-encoded as one chunk with its trailers for an HTTP/1.1 client, raw to the close for
    an HTTP/1.0 one; an empty one and a malformed one behave as on the task path."""
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n")
    answers = {b"/c": chunked,
               b"/empty": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
               b"/bad": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nx\r\n"}
    o, p = proxy_for(lambda req, sock: answers.get(req.target) or ok_response(b"w"))
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/warm"))
        assert read_response(s)[0] == 200
        for _ in range(2):
            s.sendall(_get("/c"))
            got = b""
            while not got.endswith(b"0\r\nx-sum: 11\r\n\r\n"):
                data = s.recv(65536)
                assert data, got
                got += data
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
            assert body == b"b\r\nhello world\r\n0\r\nx-sum: 11\r\n\r\n"
        s.sendall(_get("/empty"))
        status, _, body = read_response(s)
        assert (status, body) == (200, b"")
    if FAST_PATH:
        begun, handed, _ = _counts(p)
        assert (begun, handed) == (4, 1), (begun, handed)  # only the first connects in a task
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET /c HTTP/1.0\r\nHost: a\r\n\r\n")
        got = b""
        while data := s.recv(65536):
            got += data
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"\r\n\r\nhello world")
        assert b"transfer-encoding" not in got.lower()
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/bad"))
        got = b""
        try:
            while data := s.recv(65536):
                got += data
        except ConnectionResetError:
            pass
        # The response had begun when its body proved broken: the client connection is
        # cut, never given a truncated body as a whole one (as on the task path).
        assert got == b""
    assert stat(p, "cluster.web.upstream_cx_protocol_error") == 1


def test_fast_path_slow_reader_gets_the_rest_from_a_task(proxy_for) -> None:
    body = b"r" * 60_000
    o, p = proxy_for(lambda req, sock: ok_response(body))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it takes little at once
    s.settimeout(10)
    s.connect(("127.0.0.1", p.port))
    with s:
        s.sendall(_get("/warm"))
        assert read_response(s)[2] == body
        # Pipelined and not read for a while: the first responses fill the socket buffers
        # (the proxy's send buffer grows to 4 MiB, tcp_wmem's maximum), so a later one
        # cannot be sent whole at once.
        s.sendall(_get() * 100)
        time.sleep(0.5)
        for _ in range(100):
            status, _, got = read_response(s)
            assert status == 200 and got == body
    assert stat(p, "http.ingress.downstream_rq_2xx") == 101
    if FAST_PATH:
        # The first, and a response a task finished sending (that task then serves the
        # pipelined requests already read, and the connection parks on the fast path).
        begun, handed, _ = _counts(p)
        assert handed >= 2, (begun, handed)


def test_fast_path_route_timeout_is_504(proxy_for) -> None:
    def slow(req, sock):
        if req.target == b"/slow":
            time.sleep(1.5)
        return ok_response(b"late" if req.target == b"/slow" else b"ok")

    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "web", "timeout": "300ms"}}]
    o, p = proxy_for(slow, routes)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/warm"))
        assert read_response(s)[0] == 200
        s.sendall(_get("/slow"))
        status, headers, body = read_response(s)
        assert status == 504
        assert body == b"upstream request timeout\n"
        assert s.recv(100) == b""  # a timeout ends the connection
    assert stat(p, "cluster.web.upstream_rq_timeout") == 1
    assert stat(p, "cluster.web.upstream_rq_active") == 0
    _expect(p, 2, 2, 0)


def test_fast_path_per_try_timeout_and_retriable_status_are_retried(proxy_for) -> None:
    calls: dict[bytes, int] = {}

    def flaky(req, sock):
        n = calls[req.target] = calls.get(req.target, 0) + 1
        if req.target == b"/hang" and n == 1:
            time.sleep(1.0)
        if req.target == b"/busy" and n == 1:
            return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"
        return ok_response(b"fine")

    retry = {"retry_on": "5xx,reset", "num_retries": 1, "per_try_timeout": "200ms"}
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "web", "retry_policy": retry}}]
    o, p = proxy_for(flaky, routes)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/warm"))
        assert read_response(s)[0] == 200
        for path in ("/hang", "/busy"):
            s.sendall(_get(path))
            status, _, body = read_response(s)
            assert (status, body) == (200, b"fine"), path
    assert stat(p, "cluster.web.upstream_rq_per_try_timeout") == 1
    assert stat(p, "cluster.web.upstream_rq_retry") == 2
    assert stat(p, "cluster.web.upstream_rq_retry_success") == 2
    assert stat(p, "cluster.web.upstream_rq_active") == 0
    _expect(p, 3, 3, 0)


def test_fast_path_interim_response_is_relayed(proxy_for) -> None:
    def hints(req, sock):
        if req.target == b"/hints":
            return (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                    + ok_response(b"done"))
        return ok_response(b"ok")

    o, p = proxy_for(hints)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/warm"))
        assert read_response(s)[0] == 200
        s.sendall(_get("/hints"))
        data = b""
        while not data.endswith(b"done"):
            chunk = s.recv(65536)
            assert chunk
            data += chunk
    assert data.startswith(b"HTTP/1.1 103 ")
    assert b"link: </s.css>; rel=preload" in data.lower()
    assert b"HTTP/1.1 200 " in data
    _expect(p, 2, 2, 0)


def test_fast_path_declines_what_needs_a_task(proxy_for) -> None:
    routes = [{"match": {"prefix": "/direct"},
               "direct_response": {"status": 200, "body": "direct"}},
              {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]
    o, p = proxy_for(echo_handler, routes)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(_get("/direct"))
        assert read_response(s)[2] == b"direct"
        s.sendall(b"GET /upgrade HTTP/1.1\r\nHost: a\r\nx-meshproxy-deadline-ms: 5000\r\n\r\n")
        assert read_response(s)[0] == 200
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET http://a/abs HTTP/1.1\r\nHost: a\r\n\r\n")
        assert json.loads(read_response(s)[2])["target"] == "/abs"
    # Each connection's first request is declined; the task then keeps the connection.
    _expect(p, 0, 0, 2)


def test_fast_path_serves_tls_keep_alive_with_the_compiled_record_layer(tmp_path) -> None:
    d = tmp_path / "pki"
    d.mkdir()
    _, pairs = make_pki(d, [["a.example"]])
    o = Origin(echo_handler).start()
    cfg = config(o.port, listener={"tls": {"certificates": [
        {"certificate_chain": c, "private_key": k} for c, k in pairs]}})
    p = start(tmp_path, o, 1, cfg=cfg)
    try:
        ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="a.example") as s:
            for i in range(30):
                body = b"y" * (i * 700)  # records of every size, bodies up to 20 KB
                s.sendall(b"POST /t%d HTTP/1.1\r\nHost: a.example\r\nContent-Length: %d\r\n\r\n"
                          % (i, len(body)) + body)
                status, _, got = read_response(s)
                seen = json.loads(got)
                assert (status, seen["target"], seen["body_len"]) == (200, f"/t{i}", len(body))
                assert dict(seen["headers"])["x-forwarded-proto"] == "https"
            s.sendall(_get("/big") * 3)  # pipelined, in one TLS record
            assert [json.loads(read_response(s)[2])["target"] for _ in range(3)] == ["/big"] * 3
        # The handshake is stepped from the reactor and the fast path reads every request
        # from the first on, leaving to a task those whose body's last record was still on
        # its way.
        if FAST_PATH:
            begun, handed, declined = _counts(p)
            assert begun + declined == 33 and begun >= 16, (begun, handed, declined)
        assert stat(p, "http.ingress.downstream_rq_2xx") == 33
    finally:
        p.stop()
        o.stop()
