"""Retries, per-try timeouts, retry budgets and deadlines against real misbehaving origins:
endpoints told to answer 503, reset, hang, or that refuse connections."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.helpers import Proxy, Reset, ok_response, raw_exchange, read_response, wait_for
from tests.integration.test_supervisor import _admin_port, stat


def fail_503(req, s) -> bytes:
    return b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"


def reset(req, s) -> bytes:
    raise Reset()


def good(tag: bytes):
    def handler(req, s) -> bytes:
        return ok_response(json.dumps({"tag": tag.decode(), "body": req.body.decode(),
                                       "attempt": (req.header(b"x-envoy-attempt-count")
                                                   or b"").decode()}).encode())
    return handler


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, ports: list[int], retry: dict | None, breakers: dict | None = None,
          timeout: str = "15s") -> Proxy:
    route: dict = {"cluster": "web", "timeout": timeout}
    if retry is not None:
        route["retry_policy"] = retry
    cluster: dict = {"name": "web", "endpoints": [{"address": "127.0.0.1", "port": p}
                                                  for p in ports]}
    if breakers is not None:
        cluster["circuit_breakers"] = breakers
    cfg = {"admin": {"address": "127.0.0.1", "port": 0},
           "listeners": [{"name": "ingress", "address": "127.0.0.1", "port": 0,
                          "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                              {"match": {"prefix": "/"}, "route": route}]}]}],
           "clusters": [cluster]}
    p = Proxy(cfg, tmp_path)
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def get(p: Proxy, path: str = "/", body: bytes | None = None,
        headers: tuple[str, ...] = ()) -> tuple[int, bytes]:
    extra = "".join(f"{h}\r\n" for h in headers)
    if body is None:
        req = f"GET {path} HTTP/1.1\r\nHost: a\r\n{extra}\r\n".encode()
    else:
        req = (f"POST {path} HTTP/1.1\r\nHost: a\r\n{extra}Content-Length: {len(body)}\r\n\r\n"
               .encode() + body)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(req)
        status, _, data = read_response(s)
    return status, data


@pytest.mark.parametrize("bad_kind", ["503", "reset", "refused"])
def test_retries_one_bad_endpoint_of_three_is_invisible(origin_factory, tmp_path,
                                                        bad_kind: str) -> None:
    good_a, good_b = origin_factory(good(b"a")), origin_factory(good(b"b"))
    if bad_kind == "refused":
        bad_port, bad = dead_port(), None
    else:
        bad = origin_factory(fail_503 if bad_kind == "503" else reset)
        bad_port = bad.port
    p = start(tmp_path, [good_a.port, bad_port, good_b.port],
              {"retry_on": "5xx", "num_retries": 2,
               "retry_back_off": {"base_interval": "5ms"}})
    statuses = [get(p, f"/r{i}")[0] for i in range(30)]
    assert statuses == [200] * 30
    retries = stat(p, "cluster.web.upstream_rq_retry")
    assert retries >= 10  # a third of first attempts hit the bad endpoint
    assert stat(p, "cluster.web.upstream_rq_retry_success") == retries
    if bad is not None:
        # previous hosts: a retry never went back to the endpoint that just failed
        assert len(bad.requests) == retries
    assert len(good_a.requests) + len(good_b.requests) == 30
    p.stop()


def test_retries_limit_reached_relays_last_response(origin_factory, tmp_path) -> None:
    a, b = origin_factory(fail_503), origin_factory(fail_503)
    p = start(tmp_path, [a.port, b.port], {"retry_on": "gateway-error", "num_retries": 2,
                                           "retry_back_off": {"base_interval": "1ms"}})
    status, body = get(p)
    assert status == 503 and body == b"busy"  # the origin's own answer, relayed
    assert len(a.requests) + len(b.requests) == 3
    assert stat(p, "cluster.web.upstream_rq_retry_limit_exceeded") == 1
    p.stop()


def test_retries_only_listed_conditions(origin_factory, tmp_path) -> None:
    a = origin_factory(lambda r, s: b"HTTP/1.1 429 Too Many\r\nContent-Length: 0\r\n\r\n")
    p = start(tmp_path, [a.port], {"retry_on": "connect-failure", "num_retries": 3})
    assert get(p)[0] == 429
    assert len(a.requests) == 1  # 429 is not a connect failure
    p.stop()
    q = start(tmp_path, [a.port], {"retry_on": "retriable-status-codes", "num_retries": 2,
                                   "retriable_status_codes": [429],
                                   "retry_back_off": {"base_interval": "1ms"}})
    a.requests.clear()
    assert get(q)[0] == 429
    assert len(a.requests) == 3
    q.stop()


def test_retries_replay_request_body_and_attempt_count(origin_factory, tmp_path) -> None:
    calls = {"n": 0}

    def first_fails(req, s):
        calls["n"] += 1
        if calls["n"] == 1:
            return fail_503(req, s)
        return good(b"x")(req, s)

    a = origin_factory(first_fails)
    p = start(tmp_path, [a.port], {"retry_on": "5xx", "num_retries": 1,
                                   "include_attempt_count": True})
    status, body = get(p, body=b"payload-123")
    assert status == 200
    seen = json.loads(body)
    assert seen["body"] == "payload-123" and seen["attempt"] == "2"
    assert a.requests[0].header(b"x-envoy-attempt-count") == b"1"
    # chunked bodies are replayed too
    calls["n"] = 0
    out = raw_exchange(p.port, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                               b"Connection: close\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200") and b'"body": "abcdefg"' in out
    p.stop()


def test_retries_body_over_buffer_is_not_retried(origin_factory, tmp_path) -> None:
    a = origin_factory(fail_503)
    p = start(tmp_path, [a.port], {"retry_on": "5xx", "num_retries": 3,
                                   "retry_buffer_limit": 1024})
    status, _ = get(p, body=b"z" * 5000)
    assert status == 503
    assert len(a.requests) == 1
    p.stop()


def test_retries_per_try_timeout_moves_on(origin_factory, tmp_path) -> None:
    def hang(req, s):
        time.sleep(3)
        return ok_response(b"late")

    slow, fast = origin_factory(hang), origin_factory(good(b"fast"))
    p = start(tmp_path, [slow.port, fast.port],
              {"retry_on": "reset", "num_retries": 1, "per_try_timeout": "200ms"})
    t0 = time.monotonic()
    results = [get(p) for _ in range(4)]
    assert [s for s, _ in results] == [200] * 4
    assert time.monotonic() - t0 < 2.5
    # Round robin: each request takes two picks (slow, then fast for the retry), so every
    # request starts on the slow endpoint.
    assert stat(p, "cluster.web.upstream_rq_per_try_timeout") == 4
    p.stop()


def test_retries_per_try_timeout_without_retry_is_504(origin_factory, tmp_path) -> None:
    def hang(req, s):
        time.sleep(3)
        return ok_response(b"late")

    slow = origin_factory(hang)
    p = start(tmp_path, [slow.port], {"retry_on": "reset", "num_retries": 0,
                                      "per_try_timeout": "200ms"})
    t0 = time.monotonic()
    assert get(p)[0] == 504
    assert time.monotonic() - t0 < 1.5
    p.stop()


def test_retries_windowed_budget_caps_retries(origin_factory, tmp_path) -> None:
    a = origin_factory(fail_503)
    p = start(tmp_path, [a.port], {"retry_on": "5xx", "num_retries": 1,
                                   "retry_back_off": {"base_interval": "1ms"}},
              breakers={"retry_budget": {"budget_percent": 50, "min_retry_concurrency": 0,
                                         "window": "10s"}})
    for _ in range(20):
        assert get(p)[0] == 503
    retries = stat(p, "cluster.web.upstream_rq_retry")
    overflow = stat(p, "cluster.web.upstream_rq_retry_overflow")
    assert retries + overflow == 20
    assert 8 <= retries <= 10  # at most 50% of the requests in the window
    assert len(a.requests) == 20 + retries
    p.stop()


def test_retries_max_retries_breaker(origin_factory, tmp_path) -> None:
    def slow_fail(req, s):
        time.sleep(0.3)
        return fail_503(req, s)

    a = origin_factory(slow_fail)
    p = start(tmp_path, [a.port], {"retry_on": "5xx", "num_retries": 1,
                                   "retry_back_off": {"base_interval": "1ms"}},
              breakers={"max_retries": 2})
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(get(p)[0])) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [503] * 6
    retries = stat(p, "cluster.web.upstream_rq_retry")
    assert retries >= 2 and stat(p, "cluster.web.upstream_rq_retry_overflow") >= 6 - retries - 1
    assert retries <= 2  # never more retries at once than max_retries (one worker)
    p.stop()


def test_retries_deadline_bounds_and_shrinks(origin_factory, tmp_path) -> None:
    def hang(req, s):
        time.sleep(2)
        return ok_response(b"late")

    seen = origin_factory(good(b"g"))
    p = start(tmp_path, [seen.port], None)
    assert get(p, headers=("x-meshproxy-deadline-ms: 5000", "grpc-timeout: 3S"))[0] == 200
    req = seen.requests[-1]
    assert 2500 < int(req.header(b"x-meshproxy-deadline-ms")) <= 3000  # the shorter, shrunk
    assert req.header(b"grpc-timeout").endswith(b"m")
    assert 2500 < int(req.header(b"grpc-timeout")[:-1]) <= 3000
    assert len(req.all(b"x-meshproxy-deadline-ms")) == 1  # replaced, not appended
    p.stop()
    slow = origin_factory(hang)
    q = start(tmp_path, [slow.port], None)
    t0 = time.monotonic()
    assert get(q, headers=("x-meshproxy-deadline-ms: 300",))[0] == 504
    assert time.monotonic() - t0 < 1.5
    before = len(slow.requests)
    assert get(q, headers=("grpc-timeout: 0m",))[0] == 504  # spent: no upstream touched
    time.sleep(0.2)
    assert len(slow.requests) == before
    q.stop()


def test_retries_route_timeout_covers_every_attempt(origin_factory, tmp_path) -> None:
    """Envoy's route timeout spans all attempts and back-offs: a request without a body
    ends near 1 s, not after num_retries per-try timeouts."""
    def hang(req, s):
        time.sleep(3)
        return ok_response(b"late")

    slow = origin_factory(hang)
    p = start(tmp_path, [slow.port], {"retry_on": "reset", "num_retries": 5,
                                      "per_try_timeout": "400ms"}, timeout="1s")
    t0 = time.monotonic()
    assert get(p)[0] == 504
    took = time.monotonic() - t0
    assert 0.9 < took < 1.5, took
    assert len(slow.requests) <= 3  # attempts at about 0, 0.42 and 0.85 s
    # A client deadline shorter than the route's bounds all attempts the same way.
    before = len(slow.requests)
    t0 = time.monotonic()
    assert get(p, headers=("x-meshproxy-deadline-ms: 700",))[0] == 504
    took = time.monotonic() - t0
    assert 0.6 < took < 1.2, took
    assert len(slow.requests) - before <= 2
    p.stop()


def test_retries_max_retries_counts_only_retries_in_flight(origin_factory, tmp_path) -> None:
    """max_retries 1 with num_retries 3: one request gets all four attempts, since each
    retry has ended before the next is admitted."""
    a = origin_factory(fail_503)
    p = start(tmp_path, [a.port], {"retry_on": "5xx", "num_retries": 3,
                                   "retry_back_off": {"base_interval": "1ms"}},
              breakers={"max_retries": 1})
    assert get(p)[0] == 503
    assert len(a.requests) == 4
    assert stat(p, "cluster.web.upstream_rq_retry") == 3
    assert stat(p, "cluster.web.upstream_rq_retry_overflow") == 0
    assert stat(p, "cluster.web.upstream_rq_retry_limit_exceeded") == 1
    assert stat(p, "cluster.web.circuit_breakers.default.remaining_retries") == 1
    p.stop()
