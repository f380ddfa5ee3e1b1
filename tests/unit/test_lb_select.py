"""Unit tests of the compiled smooth weighted round robin."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshproxy._core.lb_select import (
    LeastRequest,
    Maglev,
    PeakEwma,
    Random,
    RingHash,
    SmoothWeightedRoundRobin,
    hash_bytes,
    make,
)


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


@pytest.mark.parametrize("weights", [[], [0], [1, -1]])
def test_lb_select_rejects_bad_weights(weights: list[int]) -> None:
    with pytest.raises(ValueError):
        SmoothWeightedRoundRobin(weights)


NAMES = [b"10.0.0.%d:8080" % i for i in range(5)]
KEYS = [hash_bytes(b"user-%d" % i) for i in range(20000)]


@pytest.mark.parametrize("cls", [RingHash, Maglev])
def test_lb_select_consistent_hash_keeps_a_key_on_one_endpoint(cls) -> None:
    lb = cls([1] * 4, NAMES[:4])
    assert all(lb.pick(k) == lb.pick(k) for k in KEYS[:1000])


@pytest.mark.parametrize("cls, spread", [(RingHash, 0.25), (Maglev, 0.03)])
def test_lb_select_consistent_hash_evenness(cls, spread: float) -> None:
    lb = cls([1] * 4, NAMES[:4])
    counts = Counter(lb.pick(k) for k in KEYS)
    for n in counts.values():  # each endpoint near 1/4 of the keys
        assert abs(n / len(KEYS) - 0.25) < 0.25 * spread, counts


@pytest.mark.parametrize("cls", [RingHash, Maglev])
def test_lb_select_adding_an_endpoint_moves_about_1_over_n(cls) -> None:
    before, after = cls([1] * 4, NAMES[:4]), cls([1] * 5, NAMES)
    moved = sum(before.pick(k) != after.pick(k) for k in KEYS) / len(KEYS)
    assert 0.15 < moved < 0.26, moved  # ideal 1/5
    # The keys that moved went to the new endpoint: all of them on a ring; Maglev's
    # disruption is near-minimal by design (a few keys shift between old endpoints).
    moved_keys = [k for k in KEYS if before.pick(k) != after.pick(k)]
    to_new = sum(after.pick(k) == 4 for k in moved_keys) / len(moved_keys)
    assert to_new == 1.0 if cls is RingHash else to_new > 0.9, to_new


def _owners(lb: RingHash, names: list[bytes]) -> list[bytes]:
    return [names[lb.pick(k)] for k in KEYS]


@pytest.mark.parametrize("weighted", [False, True], ids=["equal", "weighted"])
@pytest.mark.parametrize("n", range(1, 21))
def test_lb_select_ring_hash_moves_only_keys_of_the_changed_endpoint(n: int,
                                                                     weighted: bool) -> None:
    """From n to n+1 endpoints and back (removing one in the middle as well): the keys
    that move are exactly those going to the added endpoint or coming from the removed one,
    about its share of the weight, and no key moves between endpoints present on both
    sides."""
    rng = random.Random(n * 2 + weighted)
    names = [b"10.1.%d.%d:8080" % (i // 250, i % 250) for i in range(n + 1)]
    weights = [rng.randint(1, 5) if weighted else 1 for _ in names]
    small = _owners(RingHash(weights[:n], names[:n]), names)
    big = _owners(RingHash(weights, names), names)
    moved = [i for i in range(len(KEYS)) if small[i] != big[i]]
    assert all(big[i] == names[n] for i in moved)  # adding: every moved key went to it
    share = weights[n] / sum(weights)
    assert abs(len(moved) / len(KEYS) - share) < 0.15 * share + 0.005, (len(moved), share)
    # Removing an endpoint in the middle: only its keys move.
    gone = n // 2
    rest = [x for i, x in enumerate(names) if i != gone]
    rest_w = [x for i, x in enumerate(weights) if i != gone]
    without = _owners(RingHash(rest_w, rest), rest)
    changed = [i for i in range(len(KEYS)) if without[i] != big[i]]
    assert all(big[i] == names[gone] for i in changed)
    assert len(changed) / len(KEYS) == pytest.approx(weights[gone] / sum(weights),
                                                     rel=0.15, abs=0.005)


def test_lb_select_ring_hash_weight_change_moves_only_that_endpoint() -> None:
    names = NAMES[:4]
    before = _owners(RingHash([1, 1, 1, 1], names), names)
    after = _owners(RingHash([1, 3, 1, 1], names), names)
    moved = [i for i in range(len(KEYS)) if before[i] != after[i]]
    assert moved and all(after[i] == names[1] for i in moved)


def test_lb_select_ring_hash_maximum_size_bounds_the_ring() -> None:
    lb = RingHash([1000, 1000], NAMES[:2], 1024, 10000)
    assert lb.ring_size <= 10000
    share = Counter(lb.pick(k) for k in KEYS)[0] / len(KEYS)
    assert 0.45 < share < 0.55


def test_lb_select_ring_hash_minimum_size_and_weights() -> None:
    assert RingHash([1, 1, 1], NAMES[:3]).ring_size >= 1024
    lb = RingHash([3, 1], NAMES[:2])
    share = Counter(lb.pick(k) for k in KEYS)[0] / len(KEYS)
    assert 0.65 < share < 0.85  # weight 3 of 4


def test_lb_select_maglev_table_and_weights() -> None:
    assert Maglev([1, 1], NAMES[:2]).table_size == 65537
    lb = Maglev([3, 1], NAMES[:2])
    share = Counter(lb.pick(k) for k in KEYS)[0] / len(KEYS)
    assert 0.72 < share < 0.78


def test_lb_select_alternative_points_for_a_key() -> None:
    lb = RingHash([1] * 4, NAMES[:4])
    k = KEYS[0]
    assert len({lb.pick(k, a) for a in range(20)}) > 1  # attempts reach other endpoints


def test_lb_select_least_request_prefers_idle() -> None:
    lb = LeastRequest([1, 1, 1])
    for _ in range(5):
        lb.start(0)
    counts = Counter(lb.pick() for _ in range(3000))
    assert counts[0] < 0.15 * 3000  # only chosen when both draws are endpoint 0
    lb.finish(0, 0.001, 0.0)


def test_lb_select_least_request_weighted() -> None:
    lb = LeastRequest([4, 1])
    counts = Counter(lb.pick() for _ in range(5000))
    assert counts[0] > 0.75 * 5000


def test_lb_select_random_weighted() -> None:
    lb = Random([1, 3])
    share = Counter(lb.pick() for _ in range(20000))[1] / 20000
    assert 0.72 < share < 0.78


def test_lb_select_peak_ewma_avoids_slow_endpoint() -> None:
    lb = PeakEwma([1, 1, 1], decay=10.0)
    now = 0.0
    for _ in range(50):
        for i, rtt in ((0, 0.200), (1, 0.002), (2, 0.002)):
            lb.start(i)
            lb.finish(i, rtt, now)
        now += 0.01
    assert lb.estimate(0) > 0.1 and lb.estimate(1) < 0.01
    counts = Counter(lb.pick() for _ in range(3000))
    assert counts[0] < 0.05 * 3000
    # the peak decays: long after, a fast response pulls the estimate back down
    lb.start(0)
    lb.finish(0, 0.002, now + 60.0)
    assert lb.estimate(0) < 0.01


def test_lb_select_make_by_name() -> None:
    for policy in ("round_robin", "least_request", "random", "ring_hash", "maglev",
                   "peak_ewma"):
        assert len(make(policy, [1, 2], NAMES[:2])) == 2
    with pytest.raises(ValueError):
        make("fastest", [1])
