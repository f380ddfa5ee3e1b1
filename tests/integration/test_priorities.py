"""Priority failover and locality weights through a real proxy, with health checks."""

from __future__ import annotations

import time
from collections import Counter

from tests.helpers import Proxy, wait_for
from tests.integration.test_health_check import Switch
from tests.integration.test_retries import get
from tests.integration.test_supervisor import _admin_port


class Tagged(Switch):
    def __init__(self, tag: bytes) -> None:
        super().__init__()
        self.tag = tag

    def __call__(self, req, s) -> bytes:
        out = super().__call__(req, s)
        return out if req.target == b"/healthz" else (
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(self.tag), self.tag))


def proxy(tmp_path, endpoints: list[dict], **cluster) -> Proxy:
    cfg = {"admin": {"address": "127.0.0.1", "port": 0},
           "listeners": [{"name": "ingress", "address": "127.0.0.1", "port": 0,
                          "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                              {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]}]}],
           "clusters": [{"name": "web", "endpoints": endpoints,
                         "health_check": {"interval": "100ms", "unhealthy_threshold": 1,
                                          "healthy_threshold": 1},
                         **cluster}]}
    p = Proxy(cfg, tmp_path)
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def shares(p: Proxy, n: int = 400) -> Counter:
    return Counter(get(p, "/x")[1] for _ in range(n))


def test_priorities_fail_over_in_proportion(origin_factory, tmp_path) -> None:
    a, b, backup = Tagged(b"a"), Tagged(b"b"), Tagged(b"backup")
    oa, ob, oc = origin_factory(a), origin_factory(b), origin_factory(backup)
    p = proxy(tmp_path, [{"address": "127.0.0.1", "port": oa.port, "priority": 0},
                         {"address": "127.0.0.1", "port": ob.port, "priority": 0},
                         {"address": "127.0.0.1", "port": oc.port, "priority": 1}])
    time.sleep(0.3)
    assert shares(p, 60) == Counter({b"a": 30, b"b": 30})  # the backup level gets nothing
    a.status = 503  # one of two in priority 0 fails its health check
    time.sleep(0.5)
    got = shares(p)
    assert got[b"a"] == 0
    assert 0.2 < got[b"backup"] / 400 < 0.4, got  # about 30% spills over (1.4 x 50% = 70%)
    b.status = 503  # all of priority 0 down: everything to priority 1
    time.sleep(0.5)
    assert shares(p, 40) == Counter({b"backup": 40})
    p.stop()


def test_priorities_locality_weights(origin_factory, tmp_path) -> None:
    z1, z2, z3 = Tagged(b"east"), Tagged(b"east"), Tagged(b"west")
    o1, o2, o3 = origin_factory(z1), origin_factory(z2), origin_factory(z3)
    p = proxy(tmp_path, [{"address": "127.0.0.1", "port": o1.port, "locality": "east"},
                         {"address": "127.0.0.1", "port": o2.port, "locality": "east"},
                         {"address": "127.0.0.1", "port": o3.port, "locality": "west"}],
              locality_weights={"east": 1, "west": 3})
    time.sleep(0.3)
    got = shares(p)
    # by locality weight, not by endpoint count: west has one endpoint but 3/4 of traffic
    assert 0.67 < got[b"west"] / 400 < 0.83, got
    p.stop()
