"""The registry's decisions (sans-IO): lapsed leases are evicted EVICT_AFTER after they
lapse; many lapsing within one TTL (evictions of that TTL included) are held instead
(self-preservation); a new leader waits one TTL."""

from __future__ import annotations

from meshproxy.control.registry import EVICT_AFTER, Registration, Registry


def _reg(node: str, renewed: float, ttl: float = 10.0) -> Registration:
    return Registration(node=node, namespace="default", service="web", address="127.0.0.1",
                        port=8000, labels={}, service_account="default", lease_ttl=ttl,
                        renewed=renewed, registered=0.0, replica="r1")


def _registry(n: int, renewed: float = 100.0) -> Registry:
    r = Registry(0.15)
    for i in range(n):
        r.put(_reg(f"n{i}", renewed), i + 1)
    return r


def test_registry_evicts_one_lapse_after_evict_after() -> None:
    r = _registry(10)
    r.put(_reg("n0", 90.0), 20)  # renewed 10 s earlier than the others
    assert r.decide(100.0 + 0.01).evict == []  # lapsed 0.01 s ago: not yet
    d = r.decide(100.0 + EVICT_AFTER + 0.01)
    assert d.evict == [r.records["/registry/default/web/n0"].key] and not d.preserving


def test_registry_holds_leases_that_lapse_within_one_ttl() -> None:
    r = _registry(10)
    r.put(_reg("n0", 90.0), 20)
    first = r.decide(100.0 + EVICT_AFTER + 0.01)
    assert len(first.evict) == 1
    r.remove(first.evict[0], 100.0 + EVICT_AFTER + 0.02)  # the leader deleted it
    r.put(_reg("n1", 91.0), 21)  # the next one lapses a second later: a burst
    d = r.decide(101.0 + EVICT_AFTER + 0.01)
    assert d.preserving and d.evict == [] and len(d.lapsed) == 1
    # Renewed again: one lapse (the eviction) within the TTL is no burst.
    r.put(_reg("n1", 108.0), 22)
    assert not r.decide(109.0).preserving


def test_registry_needs_two_lapses_and_a_share_above_the_threshold() -> None:
    r = _registry(20)
    for i in range(3):  # 3 of 20 = 15%: not more than 15%
        r.put(_reg(f"n{i}", 80.0), 30 + i)
    d = r.decide(100.0)
    assert not d.preserving and len(d.evict) == 3
    r = _registry(2)
    r.put(_reg("n0", 80.0), 5)  # one of two: 50%, but a single lapse
    assert r.decide(100.0).evict and not r.decide(100.0).preserving
    r = Registry(0.0)  # 0 disables it
    for i in range(4):
        r.put(_reg(f"n{i}", 80.0), i + 1)
    assert len(r.decide(100.0).evict) == 4


def test_registry_new_leader_waits_one_ttl() -> None:
    r = _registry(5, renewed=50.0)  # everything lapsed while the control plane was down
    d = r.decide(100.0, grace_until=110.0)
    assert d.evict == [] and d.preserving  # held: 5 of 5 lapsed
