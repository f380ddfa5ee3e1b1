"""Idle keep-alive connections park on the reactor with no task (downstream.PARK_AFTER;
on the fast path at once, since it needs no task) and come back to a task, or to the fast
path, when the client sends again; timeouts, drains and closes reach them all the same."""

from __future__ import annotations

import socket
import time

from tests.helpers import FAST_PATH, Origin, config, read_response, wait_for
from tests.integration.test_supervisor import admin, start, stat

PARKED = "listener.ingress.downstream_cx_parked"
ACTIVE = "listener.ingress.downstream_cx_active"
REQUEST = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


def _proxy(tmp_path, idle: str = "10s"):
    o = Origin().start()
    p = start(tmp_path, o, 1, cfg=config(o.port, listener={"idle_timeout": idle}))
    return o, p


def _closed_within(s: socket.socket, limit: float) -> float:
    t0 = time.monotonic()
    s.settimeout(limit)
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, TimeoutError):
        pass
    return time.monotonic() - t0


def test_idle_parking_parked_connection_serves_again(tmp_path) -> None:
    o, p = _proxy(tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.sendall(REQUEST)
            assert read_response(s)[0] == 200
            if not FAST_PATH:
                assert stat(p, PARKED) == 0  # busy connections keep their task
            wait_for(lambda: stat(p, PARKED) == 1, 5)
            s.sendall(REQUEST)
            assert read_response(s)[0] == 200
            if not FAST_PATH:
                assert stat(p, PARKED) == 0
            # Parked again; then two pipelined requests in one write wake it, answered in
            # order on the same connection.
            wait_for(lambda: stat(p, PARKED) == 1, 5)
            s.sendall(REQUEST.replace(b"/x", b"/one") + REQUEST.replace(b"/x", b"/two"))
            assert read_response(s)[0] == 200
            assert read_response(s)[0] == 200
            assert [r.target for r in o.requests[-2:]] == [b"/one", b"/two"]
            assert stat(p, ACTIVE) == 1
    finally:
        p.stop()
        o.stop()


def test_idle_parking_idle_timeout_closes_a_parked_connection(tmp_path) -> None:
    o, p = _proxy(tmp_path, "2500ms")
    try:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.sendall(REQUEST)
            assert read_response(s)[0] == 200
            t0 = time.monotonic()
            wait_for(lambda: stat(p, PARKED) == 1, 5)
            _closed_within(s, 6)
            took = time.monotonic() - t0
        assert 2.0 < took < 4.0, took
        wait_for(lambda: stat(p, ACTIVE) == 0, 5)
        assert stat(p, PARKED) == 0
        assert stat(p, "listener.ingress.downstream_cx_destroy") == 1
    finally:
        p.stop()
        o.stop()


def test_idle_parking_client_close_while_parked_is_counted(tmp_path) -> None:
    o, p = _proxy(tmp_path)
    try:
        s = socket.create_connection(("127.0.0.1", p.port))
        s.sendall(REQUEST)
        assert read_response(s)[0] == 200
        wait_for(lambda: stat(p, PARKED) == 1, 5)
        s.close()
        wait_for(lambda: stat(p, ACTIVE) == 0, 5)
        assert stat(p, PARKED) == 0
        # The worker still serves new connections (the wake-up path broke nothing).
        with socket.create_connection(("127.0.0.1", p.port)) as s2:
            s2.sendall(REQUEST)
            assert read_response(s2)[0] == 200
    finally:
        p.stop()
        o.stop()


def test_idle_parking_drain_closes_parked_connections(tmp_path) -> None:
    o, p = _proxy(tmp_path, "60s")
    try:
        with socket.create_connection(("127.0.0.1", p.port)) as s:
            s.sendall(REQUEST)
            assert read_response(s)[0] == 200
            wait_for(lambda: stat(p, PARKED) == 1, 5)
            assert admin(p, "/drain", "POST")[0] == 200
            assert _closed_within(s, 5) < 3.0
        wait_for(lambda: stat(p, ACTIVE) == 0, 5)
    finally:
        p.stop()
        o.stop()
