"""Per-worker cluster state: endpoints, their pools, and the load balancer of each cluster.

Built from a Snapshot's ClusterSpecs. Selection is the compiled smooth weighted round robin
of `_core.lb_select`; a cluster with no endpoint answers `pick() -> None` (503 UH).
"""

from __future__ import annotations

import trio

from meshproxy._core.lb_select import SmoothWeightedRoundRobin
from meshproxy.config.compile import ClusterSpec
from meshproxy.transport.reactor import Reactor
from meshproxy.upstream.conn_pool import Endpoint

# How often idle upstream connections past their idle timeout are closed.
SWEEP_INTERVAL = 1.0


class Cluster:
    __slots__ = ("spec", "name", "endpoints", "lb")

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.endpoints = [Endpoint(a, p, w, spec.idle_timeout, spec.max_idle_connections)
                          for a, p, w in spec.endpoints]
        self.lb = (SmoothWeightedRoundRobin([e.weight for e in self.endpoints])
                   if self.endpoints else None)

    def pick(self) -> Endpoint | None:
        if self.lb is None:
            return None
        return self.endpoints[self.lb.pick()]

    def pick_other(self, avoid: Endpoint) -> Endpoint | None:
        if self.lb is None:
            return None
        return self.endpoints[self.lb.pick_other(self.endpoints.index(avoid))]


class ClusterManager:
    def __init__(self, specs: dict[str, ClusterSpec]) -> None:
        self.clusters = {name: Cluster(spec) for name, spec in specs.items()}

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    async def run_sweeper(self, reactor: Reactor) -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = reactor.now
            for cluster in self.clusters.values():
                for ep in cluster.endpoints:
                    if ep.idle:
                        ep.sweep(now)

    def close_all(self) -> None:
        for cluster in self.clusters.values():
            for ep in cluster.endpoints:
                ep.close_all()
