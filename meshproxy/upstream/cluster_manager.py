"""Per-worker cluster state: endpoints, their pools, and the load balancer of each cluster.

Built from a Snapshot's ClusterSpecs. Selection is the compiled smooth weighted round robin
of `_core.lb_select`; a cluster with no endpoint answers `pick() -> None` (503 UH).
"""

from __future__ import annotations

import trio

from meshproxy._core.circuit_state import Breaker, RetryBudget
from meshproxy._core.lb_select import SmoothWeightedRoundRobin
from meshproxy.config.compile import BreakerSpec, ClusterSpec
from meshproxy.stats.sink import Sink
from meshproxy.upstream.conn_pool import Endpoint


class Cluster:
    __slots__ = ("spec", "name", "endpoints", "lb", "stats", "breaker", "budget", "_freed")

    def __init__(self, spec: ClusterSpec, sink: Sink,
                 previous: dict[tuple[str, int], Endpoint] | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self.stats = sink.cluster(spec.name)
        # Circuit breakers: this worker's share of the pool-wide thresholds (BreakerSpec).
        b = spec.breakers or BreakerSpec(1024, 1024, 1024, 3, None, 0, 0.0)
        self.breaker = Breaker(b.max_connections, b.max_pending_requests, b.max_requests,
                               b.max_retries)
        self.budget = (RetryBudget(b.budget_percent, b.min_retry_concurrency, b.budget_window)
                       if b.budget_percent is not None else None)
        self._freed: trio.Event | None = None
        self.endpoints = []
        for a, p, w in spec.endpoints:
            old = previous.get((a, p)) if previous else None
            if old is not None and old.idle_timeout == spec.idle_timeout:
                # Same endpoint in the new snapshot: keep its pool of warm connections.
                old.weight = w
                old.max_idle = spec.max_idle_connections
                self.endpoints.append(old)
            else:
                self.endpoints.append(Endpoint(
                    a, p, w, spec.idle_timeout, spec.max_idle_connections,
                    sink.endpoint(spec.name, f"{a}:{p}"), self.stats))
        for ep in self.endpoints:
            ep.notify = self._notify
            ep.changed = self.publish
        self.publish()
        self.lb = (SmoothWeightedRoundRobin([e.weight for e in self.endpoints])
                   if self.endpoints else None)

    # ------------------------------------------------------------ circuit breakers

    def open_connections(self) -> int:
        return sum(ep.open for ep in self.endpoints)

    def publish(self) -> None:
        """Envoy's remaining_* gauges for this worker's share."""
        b, st = self.breaker, self.stats
        blk = st.block
        blk.set(st.remaining_rq, b.max_requests - b.requests)
        blk.set(st.remaining_pending, b.max_pending - b.pending)
        blk.set(st.remaining_retries, b.max_retries - b.retries)
        blk.set(st.remaining_cx, b.max_connections - self.open_connections())

    def _notify(self) -> None:
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    async def freed(self) -> None:
        """Until a connection of this cluster is released or closed."""
        if self._freed is None:
            self._freed = trio.Event()
        await self._freed.wait()

    def pick(self) -> Endpoint | None:
        if self.lb is None:
            return None
        return self.endpoints[self.lb.pick()]

    def pick_avoiding(self, tried: list[Endpoint]) -> Endpoint | None:
        """A pick outside `tried` when the balancer offers one within a few tries (Envoy's
        previous_hosts predicate with host_selection_retry_max_attempts 3); else any."""
        if self.lb is None:
            return None
        ep = self.endpoints[self.lb.pick()]
        for _ in range(3):
            if ep not in tried:
                break
            ep = self.endpoints[self.lb.pick()]
        return ep


class ClusterManager:
    def __init__(self, specs: dict[str, ClusterSpec], sink: Sink,
                 previous: ClusterManager | None = None) -> None:
        self.clusters: dict[str, Cluster] = {}
        kept: set[int] = set()
        for name, spec in specs.items():
            old = previous.clusters.get(name) if previous is not None else None
            prev_eps = {(e.address, e.port): e for e in old.endpoints} if old else None
            cluster = Cluster(spec, sink, prev_eps)
            kept.update(id(e) for e in cluster.endpoints)
            self.clusters[name] = cluster
        if previous is not None:
            # Endpoints no longer in the config: their idle connections go now; busy ones
            # close when their request ends (they are not returned to any pool).
            for cluster in previous.clusters.values():
                for ep in cluster.endpoints:
                    if id(ep) not in kept:
                        ep.close_all()
                        ep.max_idle = 0

    def get(self, name: str) -> Cluster | None:
        return self.clusters.get(name)

    def sweep(self, now: float) -> None:
        """Close idle connections past their idle timeout (the worker calls this every
        second)."""
        for cluster in self.clusters.values():
            for ep in cluster.endpoints:
                if ep.idle:
                    ep.sweep(now)

    def close_all(self) -> None:
        for cluster in self.clusters.values():
            for ep in cluster.endpoints:
                ep.close_all()
