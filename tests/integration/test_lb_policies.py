"""Load-balancing policies through a real proxy: consistent hashing keeps a key on one
endpoint, least request and peak EWMA steer away from a slow endpoint."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from tests.helpers import Proxy, ok_response
from tests.integration.test_retries import get


def tagged(tag: str, delay: float = 0.0):
    def handler(req, s):
        if delay:
            time.sleep(delay)
        return ok_response(tag.encode())
    return handler


def proxy(tmp_path, ports: list[int], policy: str, hash_policy: list | None = None) -> Proxy:
    route: dict = {"cluster": "web"}
    if hash_policy is not None:
        route["hash_policy"] = hash_policy
    cfg = {"listeners": [{"name": "ingress", "address": "127.0.0.1", "port": 0,
                          "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                              {"match": {"prefix": "/"}, "route": route}]}]}],
           "clusters": [{"name": "web", "lb_policy": policy,
                         "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports]}]}
    return Proxy(cfg, tmp_path)


@pytest.mark.parametrize("policy, hp, header", [
    ("ring_hash", [{"header": "x-user"}], "x-user: {u}"),
    ("maglev", [{"cookie": "session"}], "Cookie: theme=dark; session={u}"),
])
def test_lb_policies_consistent_hashing_sticks(origin_factory, tmp_path, policy, hp,
                                               header) -> None:
    origins = [origin_factory(tagged(str(i))) for i in range(3)]
    p = proxy(tmp_path, [o.port for o in origins], policy, hp)
    homes: dict[str, set[bytes]] = {}
    for _round in range(3):
        for u in range(30):
            _, body = get(p, headers=(header.format(u=f"user-{u}"),))
            homes.setdefault(f"user-{u}", set()).add(body)
    assert all(len(h) == 1 for h in homes.values())  # every user always on one endpoint
    spread = Counter(next(iter(h)) for h in homes.values())
    assert len(spread) == 3  # and users are spread over all endpoints
    p.stop()


def test_lb_policies_source_ip_hash(origin_factory, tmp_path) -> None:
    origins = [origin_factory(tagged(str(i))) for i in range(3)]
    p = proxy(tmp_path, [o.port for o in origins], "ring_hash", [{"source_ip": True}])
    assert len({get(p)[1] for _ in range(10)}) == 1  # one client address, one endpoint
    p.stop()


@pytest.mark.parametrize("policy", ["least_request", "peak_ewma"])
def test_lb_policies_load_aware_avoid_slow_endpoint(origin_factory, tmp_path,
                                                    policy: str) -> None:
    slow = origin_factory(tagged("slow", delay=0.4))
    fast = [origin_factory(tagged(f"fast{i}")) for i in range(2)]
    p = proxy(tmp_path, [slow.port] + [o.port for o in fast], policy)
    served: list[bytes] = []

    def client() -> None:
        for _ in range(15):
            served.append(get(p)[1])

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    share = Counter(served)[b"slow"] / len(served)
    assert share < 0.25, Counter(served)  # round robin would give it a third
    p.stop()
