"""Unit tests of the compiled smooth weighted round robin."""

from __future__ import annotations

from collections import Counter

import pytest

from meshproxy._core.lb_select import SmoothWeightedRoundRobin


def test_lb_select_weights_exact_over_a_cycle() -> None:
    lb = SmoothWeightedRoundRobin([5, 1, 1])
    picks = [lb.pick() for _ in range(7 * 100)]
    assert Counter(picks) == {0: 500, 1: 100, 2: 100}


def test_lb_select_smooth_not_bunched() -> None:
    lb = SmoothWeightedRoundRobin([5, 1, 1])
    assert [lb.pick() for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


def test_lb_select_uniform_rotates() -> None:
    lb = SmoothWeightedRoundRobin([1, 1, 1])
    assert [lb.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_lb_select_pick_other_avoids_previous() -> None:
    lb = SmoothWeightedRoundRobin([1, 1])
    for _ in range(10):
        assert lb.pick_other(0) == 1
    assert SmoothWeightedRoundRobin([3]).pick_other(0) == 0


@pytest.mark.parametrize("weights", [[], [0], [1, -1]])
def test_lb_select_rejects_bad_weights(weights: list[int]) -> None:
    with pytest.raises(ValueError):
        SmoothWeightedRoundRobin(weights)
