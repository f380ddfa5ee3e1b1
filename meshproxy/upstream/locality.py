"""Priorities and localities (Envoy's priority levels and locality-weighted balancing).

Sans-IO: health fractions in, shares out.

Priority load (Envoy): a priority level's health is its healthy fraction times the
overprovisioning factor (1.4), capped at 100%. Priority 0 takes as much of the traffic as
its health; what it cannot take spills to priority 1 up to that level's health, and so on.
If every level together is below 100%, the loads are scaled up to 100% (Envoy normalizes
them; below the panic threshold the cluster panics instead). So losing one of two
endpoints in priority 0 (health 50% x 1.4 = 70%) sends 30% of the traffic to priority 1.

Locality weights (Envoy's locality_weighted_lb_config): within a priority, a locality is
chosen with probability proportional to weight x min(1, 1.4 x healthy fraction), then an
endpoint within it by the cluster's lb_policy.
"""

from __future__ import annotations

OVERPROVISIONING = 1.4


def health(healthy: int, total: int, factor: float = OVERPROVISIONING) -> float:
    """A level's health in [0, 1]."""
    if total == 0:
        return 0.0
    return min(1.0, factor * healthy / total)


def priority_loads(levels: list[tuple[int, int]], factor: float = OVERPROVISIONING
                   ) -> list[float]:
    """levels: (healthy, total) per priority, 0 first. Returns each level's share of
    the traffic, summing to 1 (all to priority 0 when nothing is healthy anywhere)."""
    hs = [health(h, t, factor) for h, t in levels]
    total = sum(hs)
    if total <= 0:
        return [1.0] + [0.0] * (len(levels) - 1)
    if total < 1.0:
        return [h / total for h in hs]  # normalized, as Envoy does
    loads, left = [], 1.0
    for h in hs:
        take = min(h, left)
        loads.append(take)
        left -= take
    return loads


def locality_weights(groups: list[tuple[int, int, int]], factor: float = OVERPROVISIONING
                     ) -> list[float]:
    """groups: (weight, healthy, total) per locality. Effective weights."""
    return [w * health(h, t, factor) for w, h, t in groups]


def choose(shares: list[float], draw: float) -> int:
    """Index of the share that `draw` in [0, sum) falls in."""
    acc = 0.0
    for i, s in enumerate(shares):
        acc += s
        if draw < acc:
            return i
    for i in range(len(shares) - 1, -1, -1):
        if shares[i] > 0:
            return i
    return 0
