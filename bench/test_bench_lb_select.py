"""Cost of one pick per load-balancing policy (10 endpoints), and how evenly the
consistent-hashing policies spread keys (recorded in extra_info: coefficient of variation
of the per-endpoint key counts, 0 being perfectly even)."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from meshproxy._core.lb_select import hash_bytes, make

NAMES = [b"10.0.%d.%d:8080" % (i // 256, i % 256) for i in range(10)]
KEY = hash_bytes(b"user-12345")


@pytest.mark.benchmark(group="lb pick, 10 endpoints")
@pytest.mark.parametrize("policy", ["round_robin", "least_request", "random", "ring_hash",
                                    "maglev", "peak_ewma"])
def test_bench_lb_pick(benchmark, policy: str) -> None:
    lb = make(policy, [1] * 10, NAMES)
    key = KEY if policy in ("ring_hash", "maglev") else 0
    i = benchmark(lb.pick, key, 0)
    assert 0 <= i < 10


@pytest.mark.benchmark(group="lb pick, 10 endpoints")
def test_bench_lb_pick_weighted_round_robin(benchmark) -> None:
    lb = make("round_robin", list(range(1, 11)), NAMES)
    assert 0 <= benchmark(lb.pick, 0, 0) < 10


@pytest.mark.benchmark(group="consistent hash evenness (100k keys, 10 endpoints)")
@pytest.mark.parametrize("policy", ["ring_hash", "maglev"])
def test_bench_lb_evenness(benchmark, policy: str) -> None:
    lb = make(policy, [1] * 10, NAMES)
    keys = [hash_bytes(b"key-%d" % i) for i in range(100_000)]

    def spread() -> float:
        counts = Counter(lb.pick(k, 0) for k in keys)
        return statistics.pstdev(counts.values()) / statistics.fmean(counts.values())

    cv = benchmark.pedantic(spread, rounds=1, iterations=1)
    benchmark.extra_info["coefficient_of_variation"] = round(cv, 4)
    assert cv < (0.15 if policy == "ring_hash" else 0.02)
