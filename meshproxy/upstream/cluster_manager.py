"""Per-worker cluster state: endpoints, their pools, and the load balancer of each cluster.

Built from a Snapshot's ClusterSpecs. Selection is the compiled smooth weighted round robin
of `_core.lb_select`; a cluster with no endpoint answers `pick() -> None` (503 UH).
"""

from __future__ import annotations

import trio

from meshproxy._core.circuit_state import Breaker, RetryBudget
from meshproxy._core.lb_select import Balancer, make
from meshproxy.config.compile import BreakerSpec, ClusterSpec
from meshproxy.stats.sink import Sink
from meshproxy.upstream.conn_pool import Endpoint
from meshproxy.upstream.outlier import OutlierDetector


class Cluster:
    __slots__ = ("spec", "name", "endpoints", "lb", "stats", "breaker", "budget", "_freed",
                 "outlier")

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
            ep.hc = sink.health_cell(spec.name, ep.label) if spec.health_checked else None
        self.outlier = OutlierDetector(spec.outlier, self) if spec.outlier is not None else None
        self.publish()
        self.publish_ejections()
        for i, ep in enumerate(self.endpoints):
            ep.index = i
            ep.max_duration = spec.max_connection_duration
        self.lb: Balancer | None = (
            make(spec.lb_policy, [e.weight for e in self.endpoints],
                 [e.label.encode() for e in self.endpoints], **dict(spec.lb_options))
            if self.endpoints else None)

    # ------------------------------------------------------------ circuit breakers

    def open_connections(self) -> int:
        return sum(ep.open for ep in self.endpoints)

    def publish(self) -> None:
        """Envoy's circuit_breakers.default.remaining_* gauges, this worker's share."""
        b, st = self.breaker, self.stats
        self.publish_requests()
        self.publish_retries()
        st.block.set(st.circuit_breakers_default_remaining_pending, b.max_pending - b.pending)
        st.block.set(st.circuit_breakers_default_remaining_cx,
                     b.max_connections - self.open_connections())

    def publish_requests(self) -> None:
        b, st = self.breaker, self.stats
        st.block.set(st.circuit_breakers_default_remaining_rq, b.max_requests - b.requests)

    def publish_retries(self) -> None:
        b, st = self.breaker, self.stats
        st.block.set(st.circuit_breakers_default_remaining_retries, b.max_retries - b.retries)

    def _notify(self) -> None:
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    async def freed(self) -> None:
        """Until a connection of this cluster is released or closed."""
        if self._freed is None:
            self._freed = trio.Event()
        await self._freed.wait()

    def publish_ejections(self) -> None:
        st = self.stats
        st.block.set(st.outlier_detection_ejections_active,
                     sum(1 for e in self.endpoints if e.outlier.ejected))

    def _usable(self, ep: Endpoint, now: float) -> bool:
        hc = ep.hc
        if hc is not None and hc[0].get(hc[1]):
            return False  # the supervisor's active health check failed it
        o = ep.outlier
        if not o.ejected:
            return True
        if o.maybe_return(now):  # its ejection time is over
            ep.stats.block.set(ep.stats.ejected, 0)
            self.publish_ejections()
            return True
        return False

    def pick(self, now: float = 0.0, tried: list[Endpoint] | None = None,
             key: int = 0) -> Endpoint | None:
        """The balancer's pick among usable endpoints (not ejected; with `tried`, not
        tried before when another exists: Envoy's previous_hosts predicate with
        host_selection_retry_max_attempts 3). Below healthy_panic_threshold every endpoint
        is usable again (Envoy's panic mode)."""
        lb = self.lb
        if lb is None:
            return None
        eps = self.endpoints
        ep = eps[lb.pick(key, 0)]
        if self._usable(ep, now) and (tried is None or ep not in tried):
            return ep
        healthy = sum(1 for e in eps if self._usable(e, now))
        if healthy * 100 < self.spec.panic_threshold * len(eps):
            st = self.stats
            st.block.inc(st.lb_healthy_panic)
            usable = None
        else:
            usable = True
        for attempt in range(1, max(3, len(eps)) + 1):
            if (usable is None or self._usable(ep, now)) and (tried is None or ep not in tried):
                return ep
            # consistent hashing: the next alternative point for the same key
            ep = eps[lb.pick(key, attempt)]
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

    def outlier_tick(self, now: float) -> None:
        for cluster in self.clusters.values():
            if cluster.outlier is not None:
                cluster.outlier.tick(now)

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
