"""Bodies stream both ways with backpressure; 100-continue; 1xx relaying; WebSocket."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time

from tests.helpers import Close, ok_response, raw_exchange, read_response

MIB = 1024 * 1024


def test_proxy_bodies_content_length_post(env) -> None:
    o, p = env
    out = raw_exchange(p.port, b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n"
                               b"Connection: close\r\n\r\nhello world")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["body_len"] == 11
    assert o.requests[-1].body == b"hello world"


def test_proxy_bodies_chunked_request_reframed(env) -> None:
    o, p = env
    out = raw_exchange(p.port, b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                               b"Connection: close\r\n\r\n"
                               b"5\r\nhello\r\n1;ext=x\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    req = o.requests[-1]
    assert req.body == b"hello world"
    assert req.header(b"transfer-encoding") == b"chunked"


def test_proxy_bodies_body_then_pipelined_request(env) -> None:
    o, p = env
    out = raw_exchange(p.port, b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
                               b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200") == 2
    assert [r.target for r in o.requests[-2:]] == [b"/1", b"/2"]


def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_proxy_bodies_8mib_upload_and_download_memory_flat(env, tmp_path) -> None:
    o, p = env
    payload = os.urandom(8 * MIB)
    digest = hashlib.sha256(payload).hexdigest()

    def handler(req, s):
        if req.method == b"POST":
            return ok_response(hashlib.sha256(req.body).hexdigest().encode())
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), 256 * 1024):
            s.sendall(payload[i:i + 256 * 1024])
        return None

    o.handler = handler
    # warm up so that the baseline includes buffers every request uses
    raw_exchange(p.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                         b"Connection: close\r\n\r\nx")
    base = _peak_rss_kib(p.proc.pid)
    f = tmp_path / "up.bin"
    f.write_bytes(payload)
    up = subprocess.run(["curl", "-sS", "--max-time", "60", "-H", "Expect:", "--data-binary",
                         f"@{f}", f"http://127.0.0.1:{p.port}/up"], capture_output=True)
    assert up.stdout.decode() == digest
    down = subprocess.run(["curl", "-sS", "--max-time", "60", "--limit-rate", "20M",
                           f"http://127.0.0.1:{p.port}/down"], capture_output=True)
    assert hashlib.sha256(down.stdout).hexdigest() == digest
    grew = _peak_rss_kib(p.proc.pid) - base
    assert grew < 4 * 1024, f"peak RSS grew by {grew} KiB moving 8 MiB each way"


def test_proxy_bodies_backpressure_slow_reader(env) -> None:
    """A client that does not read stops the proxy from reading the origin: the origin's
    sending stalls well short of the body. How much the kernels buffer on the way depends
    on the host (loopback autotunes a receive buffer up to tcp_rmem's maximum, 32 MiB
    here), so the proof is that the origin is paused, not a fixed byte count."""
    o, p = env
    total = 256 * MIB  # several times what both legs' kernel buffers can hold
    sent = {"n": 0}
    chunk = b"z" * 65536

    def handler(req, s):
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        s.settimeout(3)
        try:
            while sent["n"] < total:
                s.sendall(chunk)
                sent["n"] += len(chunk)
        except OSError:
            pass
        raise Close()

    o.handler = handler
    with socket.create_connection(("127.0.0.1", p.port)) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        time.sleep(1.5)  # without backpressure the whole body is sent in well under this
        first = sent["n"]
        time.sleep(0.7)
        second = sent["n"]
        assert second < total // 2, second
        assert second - first < MIB, (first, second)  # paused, not still draining


def test_proxy_bodies_expect_100_continue_answered_by_proxy(env) -> None:
    o, p = env
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        s.sendall(b"PUT /e HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"data")
        status, _, body = read_response(s)
        assert status == 200 and json.loads(body)["body_len"] == 4
    assert o.requests[-1].header(b"expect") is None


def test_proxy_bodies_expect_100_with_curl(env, tmp_path) -> None:
    o, p = env
    f = tmp_path / "b.bin"
    f.write_bytes(b"q" * 2000)
    r = subprocess.run(["curl", "-sS", "-v", "--max-time", "10", "-H", "Expect: 100-continue",
                        "--data-binary", f"@{f}", f"http://127.0.0.1:{p.port}/e"],
                       capture_output=True)
    assert b"HTTP/1.1 100 Continue" in r.stderr
    assert json.loads(r.stdout)["body_len"] == 2000


def test_proxy_bodies_1xx_relayed_and_not_final(env) -> None:
    o, p = env
    o.handler = lambda req, s: (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                                + ok_response(b"final"))
    out = raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n")
    assert b"HTTP/1.1 200 OK" in out and out.endswith(b"final")
    out = raw_exchange(p.port, b"GET / HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK")  # never a 1xx to an HTTP/1.0 client


def test_proxy_bodies_websocket_tunnel(env) -> None:
    o, p = env

    def ws(req, s):
        assert req.header(b"upgrade") == b"websocket"
        s.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Accept: x\r\n\r\n")
        while True:  # echo bytes, upper-cased, until the client closes
            d = s.recv(65536)
            if not d:
                raise Close()
            s.sendall(d.upper())

    o.handler = ws
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as c:
        c.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += c.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        assert b"upgrade: websocket" in head.lower()
        for msg in (b"\x81\x05hello", b"binary\x00\xff"):
            c.sendall(msg)
            got = b""
            while len(got) < len(msg):
                got += c.recv(4096)
            assert got == msg.upper()


def test_proxy_bodies_concurrent_clients(env) -> None:
    o, p = env
    results: list[int] = []

    def client(i: int) -> None:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            for _ in range(20):
                s.sendall(b"GET /c%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                results.append(read_response(s)[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 320
