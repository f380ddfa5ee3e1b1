"""Outlier detection against real origins: ejection after consecutive failures, return
after the ejection time, interval rules, max_ejection_percent and panic mode."""

from __future__ import annotations

import json
import time

from tests.helpers import ok_response
from tests.integration.test_retries import fail_503, get, start
from tests.integration.test_supervisor import admin, stat


def reload_with(tmp_path, ports: list[int], od: dict, retry: dict | None = None,
                 panic: float | None = None):
    p = start(tmp_path, ports, retry)
    cfg = json.loads(p.config_path.read_text())
    cfg["clusters"][0]["outlier_detection"] = od
    if panic is not None:
        cfg["clusters"][0]["healthy_panic_threshold"] = panic
    cfg["listeners"][0]["port"] = p.port
    p.config_path.write_text(json.dumps(cfg))
    assert admin(p, "/reload", "POST")[0] == 200
    time.sleep(0.3)
    return p


def test_outlier_detection_ejects_after_5_and_returns(origin_factory, tmp_path) -> None:
    good_a, good_b = (origin_factory(lambda r, s: ok_response(b"ok")) for _ in range(2))
    bad = origin_factory(fail_503)
    p = reload_with(tmp_path, [good_a.port, bad.port, good_b.port],
                     {"consecutive_5xx": 5, "base_ejection_time": "1500ms",
                      "max_ejection_percent": 50},
                     retry={"retry_on": "5xx", "num_retries": 2,
                            "retry_back_off": {"base_interval": "1ms"}})
    statuses = [get(p)[0] for _ in range(40)]
    assert statuses == [200] * 40  # retries hide the failures from clients
    assert len(bad.requests) == 5  # then it was ejected and got nothing more
    assert stat(p, "cluster.web.outlier_detection.ejections_enforced_consecutive_5xx") == 1
    assert stat(p, "cluster.web.outlier_detection.ejections_active") == 1
    clusters = json.loads(admin(p, "/clusters?format=json")[1])["clusters"][0]["endpoints"]
    health = {e["address"].rsplit(":", 1)[1]: e["health"] for e in clusters}
    assert health[str(bad.port)] == "failed_outlier_check"
    assert health[str(good_a.port)] == "healthy"
    time.sleep(1.7)  # the ejection time is over: it is tried again, and ejected again
    statuses = [get(p)[0] for _ in range(40)]
    assert statuses == [200] * 40
    assert len(bad.requests) == 10
    assert stat(p, "cluster.web.outlier_detection.ejections_enforced_total") == 2
    p.stop()


def test_outlier_detection_max_ejection_percent(origin_factory, tmp_path) -> None:
    good = origin_factory(lambda r, s: ok_response(b"ok"))
    bad1, bad2 = origin_factory(fail_503), origin_factory(fail_503)
    p = reload_with(tmp_path, [good.port, bad1.port, bad2.port],
                     {"consecutive_5xx": 2, "base_ejection_time": "30s"})  # default 10%
    for _ in range(30):
        get(p)
    # 10% of 3 endpoints is less than one, but one may always be ejected; not two
    assert stat(p, "cluster.web.outlier_detection.ejections_active") == 1
    assert stat(p, "cluster.web.outlier_detection.ejections_overflow") >= 1
    p.stop()


def test_outlier_detection_panic_uses_all_endpoints(origin_factory, tmp_path) -> None:
    good = origin_factory(lambda r, s: ok_response(b"ok"))
    bad1, bad2 = origin_factory(fail_503), origin_factory(fail_503)
    p = reload_with(tmp_path, [good.port, bad1.port, bad2.port],
                     {"consecutive_5xx": 2, "base_ejection_time": "30s",
                      "max_ejection_percent": 100}, panic=50)
    for _ in range(12):
        get(p)
    assert stat(p, "cluster.web.outlier_detection.ejections_active") == 2
    before = len(bad1.requests) + len(bad2.requests)
    for _ in range(12):
        get(p)
    # one healthy of three is below the 50% panic threshold: all endpoints are used
    assert len(bad1.requests) + len(bad2.requests) > before
    assert stat(p, "cluster.web.lb_healthy_panic") > 0
    p.stop()


def test_outlier_detection_failure_percentage_interval(origin_factory, tmp_path) -> None:
    calls = {"n": 0}

    def flaky(req, s):
        calls["n"] += 1
        return fail_503(req, s) if calls["n"] % 4 else ok_response(b"ok")  # 75% failures

    good = origin_factory(lambda r, s: ok_response(b"ok"))
    bad = origin_factory(flaky)
    p = reload_with(tmp_path, [good.port, bad.port],
                     {"consecutive_5xx": 0, "consecutive_gateway_failure": 0,
                      "interval": "1s", "enforcing_failure_percentage": 100,
                      "failure_percentage_threshold": 60,
                      "failure_percentage_minimum_hosts": 1,
                      "failure_percentage_request_volume": 10,
                      "enforcing_success_rate": 0, "max_ejection_percent": 50,
                      "base_ejection_time": "30s"})
    for _ in range(40):
        get(p)
    time.sleep(2.2)  # an interval boundary passes
    assert stat(p, "cluster.web.outlier_detection.ejections_enforced_failure_percentage") == 1
    before = len(bad.requests)
    assert [get(p)[0] for _ in range(10)] == [200] * 10
    assert len(bad.requests) == before
    p.stop()


def test_outlier_detection_success_rate_interval(origin_factory, tmp_path) -> None:
    calls = {"n": 0}

    def half(req, s):
        calls["n"] += 1
        return fail_503(req, s) if calls["n"] % 2 else ok_response(b"ok")

    goods = [origin_factory(lambda r, s: ok_response(b"ok")) for _ in range(4)]
    bad = origin_factory(half)
    p = reload_with(tmp_path, [g.port for g in goods] + [bad.port],
                     {"consecutive_5xx": 0, "consecutive_gateway_failure": 0,
                      "interval": "1s", "success_rate_minimum_hosts": 5,
                      "success_rate_request_volume": 10, "success_rate_stdev_factor": 1000,
                      "max_ejection_percent": 20, "base_ejection_time": "30s"})
    for _ in range(75):
        get(p)
    time.sleep(2.2)
    # rates 1,1,1,1,0.5: mean 0.9, stdev 0.2, threshold 0.9 - 1.0 x 0.2 = 0.7 > 0.5
    assert stat(p, "cluster.web.outlier_detection.ejections_enforced_success_rate") == 1
    p.stop()
