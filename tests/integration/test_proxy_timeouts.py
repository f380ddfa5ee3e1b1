"""Downstream timeouts: request_headers_timeout (silent clients, slowloris) and idle."""

from __future__ import annotations

import socket
import time

import pytest

from tests.helpers import Origin, Proxy, config, read_response


@pytest.fixture(scope="module")
def tenv(tmp_path_factory):
    o = Origin().start()
    p = Proxy(config(o.port, listener={"request_headers_timeout": "400ms",
                                       "idle_timeout": "700ms"}),
              tmp_path_factory.mktemp("p"))
    yield o, p
    p.stop()
    o.stop()


def read_until_closed(s: socket.socket, limit: float = 5) -> tuple[bytes, float]:
    t0 = time.monotonic()
    s.settimeout(limit)
    out = b""
    while True:
        try:
            d = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not d:
            break
        out += d
    return out, time.monotonic() - t0


def test_proxy_timeouts_silent_client_cut_off(tenv) -> None:
    o, p = tenv
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        out, took = read_until_closed(s)
    assert out == b"" and 0.3 < took < 2.0


def test_proxy_timeouts_slowloris_gets_408(tenv) -> None:
    o, p = tenv
    before = len(o.requests)
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\n")
        try:
            for piece in (b"Host: a\r\n", b"X-1: 1\r\n", b"X-2: 2\r\n", b"X-3: 3\r\n"):
                time.sleep(0.15)  # each piece resets nothing: the deadline is for the head
                s.sendall(piece)
        except OSError:
            pass
        out, _ = read_until_closed(s)
        took = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408 ")
    assert took < 2.0
    assert len(o.requests) == before


def test_proxy_timeouts_keep_alive_idle_closed(tenv) -> None:
    o, p = tenv
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s)[0] == 200
        time.sleep(0.2)  # longer than nothing, shorter than idle_timeout: still open
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert read_response(s)[0] == 200
        out, took = read_until_closed(s)
    assert out == b"" and 0.5 < took < 2.5
