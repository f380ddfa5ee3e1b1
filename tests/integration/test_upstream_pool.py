"""The per-worker upstream pool: idle timeout, idle bound, connect timeout."""

from __future__ import annotations

import socket
import threading
import time

from tests.helpers import config, ok_response, raw_exchange, read_response, wait_for


def test_upstream_pool_idle_connections_expire(origin, proxy_factory) -> None:
    cfg = config(origin.port)
    cfg["clusters"][0]["idle_timeout"] = "300ms"
    p = proxy_factory(cfg)
    raw_exchange(p.port, b"GET /1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    raw_exchange(p.port, b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert origin.requests[0].conn_id == origin.requests[1].conn_id  # reused while fresh
    time.sleep(1.6)  # idle_timeout plus the sweeper's 1 s period
    raw_exchange(p.port, b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert origin.requests[2].conn_id != origin.requests[0].conn_id


def test_upstream_pool_idle_bound(origin_factory, proxy_factory) -> None:
    gate = threading.Event()

    def slow(req, s):
        gate.wait(5)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    o = origin_factory(slow)
    cfg = config(o.port)
    cfg["clusters"][0]["max_idle_connections"] = 1
    p = proxy_factory(cfg)
    clients = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(3)]
    for c in clients:
        c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    wait_for(lambda: len(o.requests) == 3)
    gate.set()
    for c in clients:
        assert read_response(c)[0] == 200
    # three upstream connections were open at once; only one may stay idle in the pool
    o.handler = lambda req, s: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for c in clients:
        c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(c)[0] == 200
    later = {r.conn_id for r in o.requests[3:]}
    assert len(later) == 1 and o.connections == 3
    for c in clients:
        c.close()


def test_upstream_pool_connect_timeout_503_uf(proxy_factory) -> None:
    # A listener whose accept queue is full drops SYNs: connect() hangs, as to a dead host.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    time.sleep(0.1)
    cfg = config(port)
    cfg["clusters"][0]["connect_timeout"] = "300ms"
    p = proxy_factory(cfg)
    t0 = time.monotonic()
    out = raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    took = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 503 ") and b"connect timeout" in out, out
    assert 0.25 < took < 2.0
    for f in fillers:
        f.close()
    blackhole.close()


def test_upstream_pool_max_connection_duration(origin, proxy_factory) -> None:
    cfg = config(origin.port)
    cfg["clusters"][0]["max_connection_duration"] = "300ms"
    p = proxy_factory(cfg)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for _ in range(3):
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(s)[0] == 200
        time.sleep(0.5)
        for _ in range(2):
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert read_response(s)[0] == 200
    ids = [r.conn_id for r in origin.requests]
    assert ids[0] == ids[1] == ids[2]  # reused while young
    assert ids[4] != ids[0]  # too old to reuse after 300 ms: a new connection


def test_downstream_max_connection_duration(origin, proxy_factory) -> None:
    cfg = config(origin.port, listener={"max_connection_duration": "400ms"})
    p = proxy_factory(cfg)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = read_response(s)
        assert status == 200 and "connection" not in headers
        time.sleep(0.25)
        # in flight when the connection reaches its age: answered, then closed
        origin.handler = lambda req, sock: (time.sleep(0.3), ok_response(b"late"))[1]
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _ = read_response(s)
        assert status == 200 and headers.get("connection") == "close"
        s.settimeout(2)
        assert s.recv(10) == b""
    origin.handler = lambda req, sock: ok_response(b"ok")
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s)[0] == 200
        t0 = time.monotonic()
        s.settimeout(3)
        assert s.recv(10) == b""  # an idle connection past its age is closed
        assert time.monotonic() - t0 < 1.0
