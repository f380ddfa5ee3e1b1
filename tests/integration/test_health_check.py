"""Active health checks: run by the supervisor once per proxy, shared with every worker."""

from __future__ import annotations

import json
import time

from tests.helpers import Proxy, config, ok_response, wait_for
from tests.integration.test_retries import dead_port, get, start
from tests.integration.test_supervisor import admin, stat


class Switch:
    """An origin whose /healthz answer the test flips."""

    def __init__(self) -> None:
        self.status = 200
        self.immediate = False
        self.checks = 0

    def __call__(self, req, s) -> bytes:
        if req.target == b"/healthz":
            self.checks += 1
            extra = b"x-envoy-immediate-health-check-fail: true\r\n" if self.immediate else b""
            return (b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n" % self.status) + extra + b"\r\n"
        return ok_response(b"served")


def with_hc(tmp_path, ports: list[int], hc: dict, *args: str):
    p = start(tmp_path, ports, None)
    cfg = json.loads(p.config_path.read_text())
    cfg["clusters"][0]["health_check"] = hc
    cfg["listeners"][0]["port"] = p.port
    p.config_path.write_text(json.dumps(cfg))
    assert admin(p, "/reload", "POST")[0] == 200
    return p


def health(p, port: int) -> str:
    eps = json.loads(admin(p, "/clusters?format=json")[1])["clusters"][0]["endpoints"]
    return next(e["health"] for e in eps if e["address"].endswith(f":{port}"))


def test_health_check_http_takes_endpoint_out_and_back(origin_factory, tmp_path) -> None:
    sw = Switch()
    flaky, steady = origin_factory(sw), origin_factory(lambda r, s: ok_response(b"served"))
    p = with_hc(tmp_path, [flaky.port, steady.port],
                {"interval": "100ms", "timeout": "500ms", "unhealthy_threshold": 2,
                 "healthy_threshold": 2})
    sw.status = 503
    wait_for(lambda: health(p, flaky.port) == "failed_active_hc", timeout=5)
    before = len([r for r in flaky.requests if r.target != b"/healthz"])
    assert [get(p, "/x")[0] for _ in range(10)] == [200] * 10
    assert len([r for r in flaky.requests if r.target != b"/healthz"]) == before
    assert stat(p, "cluster.web.health_check.healthy") == 1
    assert stat(p, "cluster.web.health_check.failure") >= 2
    sw.status = 200
    wait_for(lambda: health(p, flaky.port) == "healthy", timeout=5)
    for _ in range(10):
        get(p, "/x")
    assert len([r for r in flaky.requests if r.target != b"/healthz"]) > before
    p.stop()


def test_health_check_immediate_fail_header(origin_factory, tmp_path) -> None:
    sw = Switch()
    o = origin_factory(sw)
    p = with_hc(tmp_path, [o.port], {"interval": "100ms", "unhealthy_threshold": 50})
    wait_for(lambda: sw.checks >= 2)
    sw.immediate = True
    checks = sw.checks
    wait_for(lambda: health(p, o.port) == "failed_active_hc", timeout=5)
    assert sw.checks - checks <= 3  # at once, not after 50 failures
    p.stop()


def test_health_check_tcp_dead_endpoint_avoided(origin_factory, tmp_path) -> None:
    alive = origin_factory(lambda r, s: ok_response(b"served"))
    dead = dead_port()
    p = with_hc(tmp_path, [alive.port, dead],
                {"type": "tcp", "interval": "100ms", "unhealthy_threshold": 1})
    wait_for(lambda: health(p, dead) == "failed_active_hc", timeout=5)
    assert [get(p, "/x")[0] for _ in range(10)] == [200] * 10  # no UF: it is skipped
    p.stop()


def test_health_check_runs_once_per_proxy_not_per_worker(origin_factory, tmp_path) -> None:
    sw = Switch()
    o = origin_factory(sw)
    cfg = config(o.port)
    cfg["clusters"][0]["health_check"] = {"interval": "100ms"}
    p = Proxy(cfg, tmp_path, ("--workers", "2"))
    time.sleep(0.5)
    start_checks = sw.checks
    time.sleep(1.0)
    rate = sw.checks - start_checks
    assert 6 <= rate <= 12, rate  # about 10 a second: one checker, not one per worker
    p.stop()
