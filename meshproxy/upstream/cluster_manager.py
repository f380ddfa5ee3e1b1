"""Per-worker cluster state: endpoints, their pools, and the load balancer of each cluster.

Built from a Snapshot's ClusterSpecs. Selection is the compiled smooth weighted round robin
of `_core.lb_select`; a cluster with no endpoint answers `pick() -> None` (503 UH).
"""

from __future__ import annotations

import random
from typing import Any

import trio

from meshproxy._core.circuit_state import Breaker, RetryBudget
from meshproxy._core.lb_select import Balancer, make
from meshproxy.config.compile import ORIGINAL_DST_ENDPOINT
from meshproxy.config.snapshot import BreakerSpec, ClusterSpec
from meshproxy.protocol.http2 import ClientCodec
from meshproxy.stats.sink import Sink
from meshproxy.transport.tls_context import ClientTLS
from meshproxy.upstream.conn_pool import Endpoint, UpstreamConn
from meshproxy.upstream.h2_origin import READY, H2Origin
from meshproxy.upstream.locality import choose, health, locality_weights, priority_loads
from meshproxy.upstream.outlier import OutlierDetector

_random = random.random

# Cluster.admit's answers: what a request needs to do to get a connection to an endpoint.
REUSE = 0           # an idle connection of the endpoint: use it
CONNECT = 1         # below max_connections: open a new one
CLOSE_THEN_CONNECT = 2  # at the limit: close the idle connection returned, then open one
WAIT = 3            # at the limit, nothing idle to give way: wait as a pending request
OVERFLOW = 4        # max_pending_requests reached as well: 503 UO
JOIN = 5            # HTTP/2: a stream on a connection still being made, once it is ready


class _Group:
    """Endpoints of one priority and locality, with their own balancer."""

    __slots__ = ("weight", "endpoints", "lb")

    def __init__(self, weight: int, endpoints: list[Endpoint], cluster: Cluster) -> None:
        self.weight = weight
        self.endpoints = endpoints
        self.lb = cluster._balancer(endpoints)
        for i, ep in enumerate(endpoints):
            ep.index, ep.lb = i, self.lb


class Cluster:
    __slots__ = ("spec", "name", "endpoints", "lb", "stats", "breaker", "budget", "_freed",
                 "outlier", "levels", "tls", "tls_h2", "spawn", "_sink", "_original_dst")

    def __init__(self, spec: ClusterSpec, sink: Sink,
                 previous: dict[tuple[str, int], Endpoint] | None = None,
                 spawn: Any = None) -> None:
        self.spec = spec
        # Starts a task in the worker's nursery: an HTTP/2 connection's (upstream.h2_origin)
        # outlives the request that opened it.
        self.spawn = spawn
        self._sink = sink
        self._original_dst: Endpoint | None = None
        self.name = spec.name
        self.stats = sink.cluster(spec.name)
        # Circuit breakers: this worker's share of the pool-wide thresholds (BreakerSpec).
        b = spec.breakers or BreakerSpec(1024, 1024, 1024, 3, None, 0, 0.0)
        self.breaker = Breaker(b.max_connections, b.max_pending_requests, b.max_requests,
                               b.max_retries)
        self.budget = (RetryBudget(b.budget_percent, b.min_retry_concurrency, b.budget_window)
                       if b.budget_percent is not None else None)
        self._freed: trio.Event | None = None
        # Upstream TLS: new connections use this context (rebuilt when the material
        # rotates); pooled connections keep the session they were made with.
        self.tls = ClientTLS.from_spec(spec.tls) if spec.tls is not None else None
        # HTTP/2 over TLS is offered by ALPN h2 (RFC 9113 3.2), on a context of its own.
        self.tls_h2 = (ClientTLS.from_spec(spec.tls, (b"h2",))
                       if spec.tls is not None and spec.protocol != "http1" else None)
        self.endpoints = []
        for a, p, w in spec.endpoints:
            old = previous.get((a, p)) if previous else None
            if (old is not None and old.idle_timeout == spec.idle_timeout
                    and old.secure == (self.tls is not None)):
                # Same endpoint in the new snapshot: keep its pool of warm connections.
                old.weight = w
                old.max_idle = spec.max_idle_connections
                self.endpoints.append(old)
            else:
                self.endpoints.append(Endpoint(
                    a, p, w, spec.idle_timeout, spec.max_idle_connections,
                    sink.endpoint(spec.name, f"{a}:{p}"), self.stats))
                self.endpoints[-1].secure = self.tls is not None
        for ep in self.endpoints:
            ep.notify = self._notify
            ep.changed = self.publish
            ep.hc = sink.health_cell(spec.name, ep.label) if spec.health_checked else None
        self.outlier = OutlierDetector(spec.outlier, self) if spec.outlier is not None else None
        self.publish()
        self.publish_ejections()
        for ep in self.endpoints:
            ep.max_duration = spec.max_connection_duration
        self.lb: Balancer | None = self._balancer(self.endpoints) if self.endpoints else None
        # Priorities and localities: levels[priority] = [groups], each group with its own
        # balancer; None when every endpoint is in one group (the common, fast case).
        self.levels: list[list[_Group]] | None = None
        placement = spec.placement or tuple((0, "") for _ in spec.endpoints)
        if self.endpoints and (len({p for p, _ in placement}) > 1
                               or spec.locality_weights is not None):
            lw = dict(spec.locality_weights or ())
            self.levels = []
            for prio in sorted({p for p, _ in placement}):
                members = [(ep, loc) for ep, (p, loc) in zip(self.endpoints, placement,
                                                              strict=True) if p == prio]
                if spec.locality_weights is None:
                    self.levels.append([_Group(1, [ep for ep, _ in members], self)])
                else:
                    self.levels.append([
                        _Group(lw.get(name, 1), [ep for ep, loc in members if loc == name], self)
                        for name in sorted({loc for _, loc in members})])
        else:
            for i, ep in enumerate(self.endpoints):
                ep.index, ep.lb = i, self.lb

    def original_dst(self) -> Endpoint:
        """The one endpoint a cluster without endpoints of its own (PassthroughCluster,
        proxy.tcp_proxy) counts its connections on, each of which goes where its client
        was going; made on first use, labelled `original_dst` in /clusters."""
        ep = self._original_dst
        if ep is None:
            spec = self.spec
            ep = self._original_dst = Endpoint(
                "0.0.0.0", 0, 1, spec.idle_timeout, 0,
                self._sink.endpoint(spec.name, ORIGINAL_DST_ENDPOINT), self.stats)
        return ep

    def _balancer(self, eps: list[Endpoint]) -> Balancer:
        spec = self.spec
        return make(spec.lb_policy, [e.weight for e in eps], [e.label.encode() for e in eps],
                    **dict(spec.lb_options))

    # ------------------------------------------------------------ circuit breakers

    def admit(self, ep: Endpoint, now: float) -> tuple[int, UpstreamConn | None]:
        """The connection decision for one request to `ep`, synchronous bookkeeping only
        (httpcore's `_assign_requests_to_connections`): REUSE with the idle connection;
        CONNECT; CLOSE_THEN_CONNECT with the oldest idle connection of another endpoint,
        which gives way (the caller closes it); WAIT, the pending slot taken (the caller
        waits on `freed()` and gives it back with `end_pending`); or OVERFLOW. The counts
        (upstream_cx_overflow, upstream_rq_pending_*) are kept here."""
        conn = ep.acquire(now)
        if conn is not None:
            return REUSE, conn
        breaker, cst = self.breaker, self.stats
        blk = cst.block
        if breaker.connection_room(self.open_connections()):
            return CONNECT, None
        blk.inc(cst.upstream_cx_overflow)
        for other in self.endpoints:
            if other is not ep and other.idle:
                return CLOSE_THEN_CONNECT, other.idle.pop(0)
        return self._pend(), None

    def _pend(self) -> int:
        """At max_connections: WAIT with a pending slot taken, or OVERFLOW."""
        cst = self.stats
        blk = cst.block
        if not self.breaker.try_pending():
            blk.inc(cst.upstream_rq_pending_overflow)
            return OVERFLOW
        blk.inc(cst.upstream_rq_pending_total)
        blk.add(cst.upstream_rq_pending_active, 1)
        self.publish()
        return WAIT

    def speaks_h2(self, client_multiplexed: bool) -> bool:
        """Whether a request goes to the endpoints as HTTP/2 (Envoy's
        use_downstream_protocol: as the client spoke)."""
        proto = self.spec.protocol
        return proto == "http2" or (proto == "downstream" and client_multiplexed)

    def admit_h2(self, ep: Endpoint, now: float) -> tuple[int, H2Origin | None]:
        """admit's HTTP/2 counterpart: a stream slot reserved on the first connection of
        `ep` with room (REUSE when it is ready, JOIN while it connects); else a new
        connection, its first slot reserved, for the caller to start (CONNECT); else, at
        max_connections, WAIT or OVERFLOW as for HTTP/1.1. Requests are bounded by
        max_requests (open_attempt), so connections stay few."""
        for origin in ep.h2:
            if origin.capacity() > 0:
                origin.reserved += 1
                return (REUSE if origin.state == READY else JOIN), origin
        breaker, cst = self.breaker, self.stats
        blk = cst.block
        if breaker.connection_room(self.open_connections()):
            origin = H2Origin(ep, ClientCodec(self.spec.http2), now)
            origin.notify = self._notify
            origin.reserved = 1
            ep.h2.append(origin)
            return CONNECT, origin
        blk.inc(cst.upstream_cx_overflow)
        return self._pend(), None

    def end_pending(self) -> None:
        """A request that waited (WAIT) has its connection, or gave up."""
        self.breaker.end_pending()
        cst = self.stats
        cst.block.add(cst.upstream_rq_pending_active, -1)
        self.publish()

    def open_connections(self) -> int:
        # HTTP/2 connections being made count too: requests meanwhile join them.
        return sum(ep.open + sum(1 for o in ep.h2 if o.conn is None) for ep in self.endpoints)

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
        """The balancer's pick among usable endpoints (not ejected, not failed by the
        health check; with `tried`, not tried before when another exists: Envoy's
        previous_hosts predicate with host_selection_retry_max_attempts 3). Below
        healthy_panic_threshold every endpoint is usable again (Envoy's panic mode).
        With priorities or locality weights a group is chosen first (upstream.locality)."""
        if self.lb is None:
            return None
        if self.levels is None:
            return self._pick_in(self.endpoints, self.lb, now, tried, key, None)
        usable = [[sum(1 for e in g.endpoints if self._usable(e, now)) for g in level]
                  for level in self.levels]
        factor = self.spec.overprovisioning
        counts_per_level = [(sum(u), sum(len(g.endpoints) for g in level))
                            for u, level in zip(usable, self.levels, strict=True)]
        # Envoy's panic rule with priorities: the normalized total health (the levels'
        # overprovisioned health summed, capped at 100%) below the threshold.
        total_health = min(1.0, sum(health(h, t, factor) for h, t in counts_per_level))
        if total_health * 100 < self.spec.panic_threshold:
            return self._pick_in(self.endpoints, self.lb, now, tried, key, False)
        loads = priority_loads(counts_per_level, factor)
        li = choose(loads, _random() * sum(loads))
        level, counts = self.levels[li], usable[li]
        group = level[0]
        if len(level) > 1:
            weights = locality_weights([(g.weight, n, len(g.endpoints))
                                        for g, n in zip(level, counts, strict=True)], factor)
            total = sum(weights)
            if total > 0:
                group = level[choose(weights, _random() * total)]
        return self._pick_in(group.endpoints, group.lb, now, tried, key, True)

    def _pick_in(self, eps: list[Endpoint], lb: Balancer, now: float,
                 tried: list[Endpoint] | None, key: int, healthy_enough: bool | None
                 ) -> Endpoint | None:
        """healthy_enough: True when the caller ruled out panic mode, False when it
        declared it, None when it is decided here, for `eps`."""
        ep = eps[lb.pick(key, 0)]
        if self._usable(ep, now) and (tried is None or ep not in tried):
            return ep
        if healthy_enough is None:
            healthy = sum(1 for e in eps if self._usable(e, now))
            healthy_enough = healthy * 100 >= self.spec.panic_threshold * len(eps)
        if not healthy_enough:
            st = self.stats
            st.block.inc(st.lb_healthy_panic)
        for attempt in range(1, max(3, len(eps)) + 1):
            if ((not healthy_enough or self._usable(ep, now))
                    and (tried is None or ep not in tried)):
                return ep
            # consistent hashing: the next alternative point for the same key
            ep = eps[lb.pick(key, attempt)]
        if not healthy_enough:
            return ep
        # The balancer's alternatives were all unusable: any usable endpoint (one not
        # tried first); none at all with panic mode off (threshold 0) is 503 UH, as Envoy.
        usable = [e for e in eps if self._usable(e, now)]
        for e in usable:
            if tried is None or e not in tried:
                return e
        return usable[0] if usable else None


class ClusterManager:
    def __init__(self, specs: dict[str, ClusterSpec], sink: Sink,
                 previous: ClusterManager | None = None, spawn: Any = None) -> None:
        self.clusters: dict[str, Cluster] = {}
        kept: set[int] = set()
        for name, spec in specs.items():
            old = previous.clusters.get(name) if previous is not None else None
            prev_eps = {(e.address, e.port): e for e in old.endpoints} if old else None
            cluster = Cluster(spec, sink, prev_eps, spawn)
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
                for ep in cluster.endpoints:
                    if id(ep) in kept and cluster.spec.protocol != getattr(
                            specs.get(cluster.name), "protocol", None):
                        for origin in ep.h2:  # the protocol changed: new connections
                            origin.go_away()
                        for conn in ep.idle:
                            conn.close()
                        ep.idle.clear()

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
                if ep.idle or ep.h2:
                    ep.sweep(now)

    def close_all(self) -> None:
        for cluster in self.clusters.values():
            for ep in cluster.endpoints:
                ep.close_all()
