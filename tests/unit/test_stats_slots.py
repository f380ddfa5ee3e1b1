"""Stats slots: kept by names that stay, parked for REUSE_AFTER when a name leaves, then
zeroed and reused, so endpoint churn never exhausts a capacity."""

from __future__ import annotations

from meshproxy.stats.names import Scope
from meshproxy.stats.shared_memory import REUSE_AFTER, Capacity, Layout, Segment, Slots

CAP = Capacity(listeners=2, clusters=2, endpoints=3)


def test_slots_keep_names_that_stay_and_reuse_departed_ones_after_the_wait() -> None:
    s = Slots()
    assert s.assign(["l"], ["c"], ["c/a", "c/b", "c/c"], CAP, now=0.0) == []
    first = dict(s.endpoints)
    # a and b leave, d would need a fourth slot: the departed ones are still parked.
    errors = s.assign(["l"], ["c"], ["c/c", "c/d"], CAP, now=1.0)
    assert errors and "endpoints" in errors[0] and "3 in use or released" in errors[0]
    assert s.endpoints == first  # refused: nothing changed
    assert s.assign(["l"], ["c"], ["c/c"], CAP, now=1.0) == []
    assert s.endpoints == {"c/c": first["c/c"]}
    assert s.release(1.0 + REUSE_AFTER - 0.1) == []
    zeroed = s.release(1.0 + REUSE_AFTER)
    assert sorted(slot for _, slot in zeroed) == sorted([first["c/a"], first["c/b"]])
    assert s.assign(["l"], ["c"], ["c/c", "c/d", "c/e"], CAP, now=70.0) == []
    assert s.endpoints["c/c"] == first["c/c"]
    assert {s.endpoints["c/d"], s.endpoints["c/e"]} == {first["c/a"], first["c/b"]}


def test_segment_zero_clears_a_slot_in_every_slab() -> None:
    seg = Segment(Layout(CAP), 3)
    cell = seg.layout.first(Scope.ENDPOINT, 1)
    for slab in range(3):
        seg.block(slab).set(cell, 7)
    other = seg.layout.first(Scope.ENDPOINT, 2)
    seg.block(0).set(other, 5)
    seg.zero(Scope.ENDPOINT, 1)
    assert [seg.block(slab).get(cell) for slab in range(3)] == [0, 0, 0]
    assert seg.block(0).get(other) == 5
