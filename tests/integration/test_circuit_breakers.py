"""Circuit breakers: max_connections makes requests wait as pending, max_pending_requests
and max_requests refuse at once with 503 UO and x-envoy-overloaded, gauges show what is
left."""

from __future__ import annotations

import json
import socket
import threading
import time

from tests.helpers import ok_response, read_response, wait_for
from tests.integration.test_retries import start
from tests.integration.test_supervisor import admin, stat


def slow(req, s) -> bytes:
    time.sleep(0.5)
    return ok_response(b"slow")


def burst(p, n: int) -> list[tuple[int, dict, float]]:
    out: list[tuple[int, dict, float]] = []
    lock = threading.Lock()

    def one() -> None:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            status, headers, _ = read_response(s)
        with lock:
            out.append((status, headers, time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.02)  # in order: the first ones take the slots
    for t in threads:
        t.join(10)
    return out


def test_circuit_breakers_pending_overflow_is_immediate_503_uo(origin_factory, tmp_path) -> None:
    o = origin_factory(slow)
    p = start(tmp_path, [o.port], None,
              breakers={"max_connections": 1, "max_pending_requests": 1})
    results = burst(p, 5)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) == 2 and len(refused) == 3  # one in flight, one pending, the rest refused
    assert all(h.get("x-envoy-overloaded") == "true" for _, h, _ in refused)
    assert all(took < 0.3 for _, _, took in refused)  # at once, not after waiting
    assert o.connections == 1  # the pending request reused the one connection
    assert stat(p, "cluster.web.upstream_rq_pending_overflow") == 3
    assert stat(p, "cluster.web.upstream_rq_pending_total") == 1
    assert stat(p, "cluster.web.upstream_cx_overflow") >= 4
    p.stop()


def test_circuit_breakers_max_connections_queues_without_loss(origin_factory, tmp_path) -> None:
    o = origin_factory(lambda r, s: (time.sleep(0.1), ok_response(b"x"))[1])
    p = start(tmp_path, [o.port], None,
              breakers={"max_connections": 1, "max_pending_requests": 10})
    results = burst(p, 4)
    assert [r[0] for r in results] == [200] * 4
    assert o.connections == 1
    p.stop()


def test_circuit_breakers_max_requests(origin_factory, tmp_path) -> None:
    o = origin_factory(slow)
    p = start(tmp_path, [o.port], None, breakers={"max_requests": 2})
    results = burst(p, 4)
    assert sorted(r[0] for r in results) == [200, 200, 503, 503]
    assert stat(p, "cluster.web.upstream_rq_pending_overflow") == 2
    p.stop()


def test_circuit_breakers_remaining_gauges(origin_factory, tmp_path) -> None:
    o = origin_factory(slow)
    p = start(tmp_path, [o.port], None,
              breakers={"max_connections": 5, "max_pending_requests": 7, "max_requests": 9,
                        "max_retries": 4})
    assert stat(p, "cluster.web.circuit_breakers.default.remaining_rq") == 9
    assert stat(p, "cluster.web.circuit_breakers.default.remaining_pending") == 7
    assert stat(p, "cluster.web.circuit_breakers.default.remaining_retries") == 4
    assert stat(p, "cluster.web.circuit_breakers.default.remaining_cx") == 5
    t = threading.Thread(target=burst, args=(p, 2))
    t.start()
    time.sleep(0.25)  # both requests in flight, on two connections
    assert stat(p, "cluster.web.circuit_breakers.default.remaining_rq") == 7
    assert stat(p, "cluster.web.circuit_breakers.default.remaining_cx") == 3
    t.join()
    # The client may read its response before the worker has ended the request's
    # bookkeeping (that comes right after the last byte is sent).
    wait_for(lambda: stat(p, "cluster.web.circuit_breakers.default.remaining_rq") == 9)
    text = admin(p, "/stats/prometheus")[1].decode()
    assert 'meshproxy_cluster_circuit_breakers_default_remaining_cx{cluster_name="web"} 3' in text  # pooled, idle
    assert json.loads(admin(p, "/stats?format=json")[1])
    p.stop()
