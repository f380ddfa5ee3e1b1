"""Priority loads and locality weights (Envoy's overprovisioning arithmetic)."""

from __future__ import annotations

import pytest

from meshproxy.upstream.locality import choose, health, locality_weights, priority_loads


def test_locality_health_overprovisioned() -> None:
    assert health(10, 10) == 1.0
    assert health(8, 10) == 1.0  # 80% x 1.4 >= 100%: nothing moves yet
    assert health(5, 10) == pytest.approx(0.7)
    assert health(0, 10) == 0.0 and health(0, 0) == 0.0


def test_locality_priority_spill_over() -> None:
    assert priority_loads([(2, 2), (1, 1)]) == [1.0, 0.0]
    loads = priority_loads([(1, 2), (1, 1)])  # one of two in P0 lost: 70% / 30%
    assert loads == pytest.approx([0.7, 0.3])
    assert priority_loads([(0, 2), (1, 1)]) == pytest.approx([0.0, 1.0])


def test_locality_priority_normalized_when_all_degraded() -> None:
    loads = priority_loads([(1, 4), (1, 4)])  # 35% + 35%: scaled to 50/50
    assert loads == pytest.approx([0.5, 0.5])
    assert priority_loads([(0, 1), (0, 1)]) == [1.0, 0.0]


def test_locality_weights_scale_with_health() -> None:
    assert locality_weights([(3, 4, 4), (1, 4, 4)]) == [3.0, 1.0]
    w = locality_weights([(3, 1, 4), (1, 4, 4)])  # zone a lost 3 of 4: 3 x 0.35
    assert w == pytest.approx([1.05, 1.0])


def test_locality_choose() -> None:
    assert choose([0.7, 0.3], 0.1) == 0 and choose([0.7, 0.3], 0.8) == 1
    assert choose([0.0, 1.0], 0.0) == 1
    assert choose([1.0, 0.0], 1.0) == 0  # a draw at the very end stays in range
