"""A client that sends its request and shuts down its side at once (the FIN in the same
segment, or the same wake-up) is answered and then closed at once, as nginx and HAProxy do:
the proxy must not sit in CLOSE-WAIT until idle_timeout (reactor.py's edge-triggered rule,
tested here on real sockets)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from tests.helpers import Origin, Proxy, config, ok_response

IDLE = 5.0  # the listener's idle_timeout: a connection left in CLOSE-WAIT would last this


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    o = Origin(lambda req, sock: ok_response(b"ok")).start()
    p = Proxy(config(o.port, listener={"idle_timeout": f"{IDLE}s"}),
              tmp_path_factory.mktemp("p"))
    yield o, p
    p.stop()
    o.stop()


def close_wait(port: int) -> int:
    """Sockets of the proxy's listening port in CLOSE-WAIT: the client's FIN received, the
    proxy's side still open."""
    out = subprocess.run(["ss", "-Htan", "state", "close-wait", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len([x for x in out.splitlines() if x.strip()])


def request_then_fin(port: int, data: bytes) -> tuple[bytes, float]:
    """Send data and the FIN in one go, to a proxy already parked waiting for the request
    (so that one edge announces both); return what came back and how long the proxy took
    to close after its first byte."""
    with socket.create_connection(("127.0.0.1", port), timeout=IDLE + 3) as s:
        time.sleep(0.1)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out, first = b"", 0.0
        while True:
            d = s.recv(65536)
            if not d:
                break
            if not out:
                first = time.monotonic()
            out += d
        return out, time.monotonic() - first if first else 0.0


def test_half_close_request_with_fin_is_answered_then_closed(half) -> None:
    _, p = half
    for _ in range(3):
        out, lag = request_then_fin(p.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"ok")
        assert lag < 1.0, lag  # closed at once, not after idle_timeout (5 s)


def test_half_close_many_concurrent_clients_leave_no_close_wait(half) -> None:
    _, p = half
    results: list[tuple[bytes, float]] = []
    lock = threading.Lock()

    def one(data: bytes) -> None:
        r = request_then_fin(p.port, data)
        with lock:
            results.append(r)

    pipelined = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    garbage = b"\x16\x03\x01garbage that is not HTTP\r\n\r\n"
    partial = b"GET /never-finished HTTP/1.1\r\nHost: a\r\n"
    kinds = [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"] * 32 + [pipelined] * 8 + \
        [garbage] * 13 + [partial] * 12
    threads = [threading.Thread(target=one, args=(k,)) for k in kinds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(IDLE + 5)
    assert len(results) == len(kinds)
    assert max(lag for _, lag in results) < 1.5
    assert sum(out.count(b"HTTP/1.1 200") for out, _ in results) == 32 + 2 * 8
    # Nothing of it is left on the proxy's side.
    deadline = time.monotonic() + 1.0
    while close_wait(p.port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert close_wait(p.port) == 0
