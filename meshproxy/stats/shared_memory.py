"""The stats segment: one shared-memory buffer, a slab per worker plus a retired slab.

Layout of a slab (cells of int64; per-scope layouts come from stats.names):
    [worker scope][tracing scope][listener x L][http x L][cluster x C][endpoint x E]
The segment holds `workers + 1` slabs; the last one, RETIRED, accumulates the counters and
histograms of replaced workers so that totals never go backwards. Capacities are fixed when
the segment is made (pages never touched cost no memory); a config that needs more slots
than there are is refused with a clear error, like any other invalid config.

Slots are assigned by the supervisor, by name; the assignment travels to the workers inside
each snapshot. A name that stays keeps its slot (and its history) across reloads. The slot
of a name that leaves (an endpoint gone from the registry, a cluster removed) is parked
for REUSE_AFTER, long enough for every request still running on an older snapshot to end
and stop writing there, then zeroed in every slab and given to a new name: endpoint churn
from a registry never exhausts the segment, and a reused slot never shows its previous
owner's numbers. (A departed endpoint's requests stay counted in its cluster's own
counters; a departed cluster's stats leave /stats with it, as Envoy's do.) The capacities
are `meshproxy run` flags; a config that needs more slots than are free is refused.
"""

from __future__ import annotations

import mmap
import os
from array import array
from dataclasses import dataclass, field

from meshproxy._core.stats_block import StatsBlock, fold, set_bounds
from meshproxy.stats.names import BUCKETS, Kind, Scope

set_bounds(BUCKETS)


@dataclass(frozen=True)
class Capacity:
    # Generous defaults: the segment is sparse, untouched pages are never allocated.
    listeners: int = 64
    clusters: int = 1024
    endpoints: int = 8192
    mirrors: int = 256  # routes whose mirrored responses are compared (mirror.<route>.*)


ORDER = ((Scope.WORKER, "workers"), (Scope.TRACING, "workers"),
         (Scope.LISTENER, "listeners"), (Scope.HTTP, "listeners"),
         (Scope.CLUSTER, "clusters"), (Scope.ENDPOINT, "endpoints"),
         (Scope.MIRROR, "mirrors"))


class Layout:
    def __init__(self, cap: Capacity) -> None:
        self.cap = cap
        self.base: dict[Scope, int] = {}
        self.count: dict[Scope, int] = {}
        at = 0
        for scope, attr in ORDER:
            n = 1 if attr == "workers" else getattr(cap, attr)
            self.base[scope] = at
            self.count[scope] = n
            at += n * scope.cells
        self.slab_cells = at
        mask = bytearray(at)
        ends = array("q", [-1]) * at
        for scope, _ in ORDER:
            for slot in range(self.count[scope]):
                first = self.first(scope, slot)
                for st in scope.stats:
                    if st.kind is Kind.GAUGE:
                        cell = first + scope.offsets[st.name]
                        mask[cell] = 1
                        if st.ends_as is not None:
                            ends[cell] = first + scope.offsets[st.ends_as]
        self.gauge_mask = bytes(mask)
        # Per cell: the counter a gauge's value is added to when its worker dies (-1: none).
        self.ends_as = ends.tobytes()

    def first(self, scope: Scope, slot: int) -> int:
        return self.base[scope] + slot * scope.cells


# Seconds a departed name's slot waits before it is reused: requests that started on an
# older snapshot may still write there (a long download, a slow upstream) until they end.
REUSE_AFTER = 60.0

KINDS = (("listeners", (Scope.LISTENER, Scope.HTTP)), ("clusters", (Scope.CLUSTER,)),
         ("endpoints", (Scope.ENDPOINT,)), ("mirrors", (Scope.MIRROR,)))


@dataclass
class Slots:
    """name -> slot, per scope kind (LISTENER and HTTP share the listener's slot)."""

    listeners: dict[str, int] = field(default_factory=dict)
    clusters: dict[str, int] = field(default_factory=dict)
    endpoints: dict[str, int] = field(default_factory=dict)  # "cluster/host:port"
    mirrors: dict[str, int] = field(default_factory=dict)  # route names
    # Per kind: slots never used yet start at `fresh`; `free` were used and zeroed;
    # `parked` (departed_at, slot) wait REUSE_AFTER.
    fresh: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("listeners", "clusters", "endpoints", "mirrors"), 0))
    free: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k, _ in KINDS})
    parked: dict[str, list[tuple[float, int]]] = field(
        default_factory=lambda: {k: [] for k, _ in KINDS})

    def release(self, now: float) -> list[tuple[Scope, int]]:
        """Parked slots whose wait is over become free; the (scope, slot) cells the caller
        must zero in every slab before they are assigned again."""
        out = []
        for kind, scopes in KINDS:
            ready = [slot for at, slot in self.parked[kind] if now - at >= REUSE_AFTER]
            if ready:
                self.parked[kind] = [(at, s) for at, s in self.parked[kind]
                                     if now - at < REUSE_AFTER]
                self.free[kind] += ready
                out += [(scope, slot) for slot in ready for scope in scopes]
        return out

    def assign(self, listeners: list[str], clusters: list[str], endpoints: list[str],
               cap: Capacity, now: float = 0.0, mirrors: list[str] | None = None
               ) -> list[str]:
        """Give new names slots and park the slots of names that left; returns errors when
        a capacity would be exceeded (nothing is assigned then)."""
        errors = []
        plans = []
        for kind, names, limit in (("listeners", listeners, cap.listeners),
                                   ("clusters", clusters, cap.clusters),
                                   ("endpoints", endpoints, cap.endpoints),
                                   ("mirrors", mirrors or [], cap.mirrors)):
            table: dict[str, int] = getattr(self, kind)
            wanted = dict.fromkeys(names)
            new = [n for n in wanted if n not in table]
            available = len(self.free[kind]) + limit - self.fresh[kind]
            if len(new) > available:
                held = len(table) + len(self.parked[kind])
                errors.append(f"{kind}: the stats segment has room for {limit} {kind} "
                              f"({held} in use or released less than {REUSE_AFTER:.0f} s "
                              f"ago), this config needs {len(new)} more")
            plans.append((kind, table, wanted, new))
        if errors:
            return errors
        for kind, table, wanted, new in plans:
            for name in [n for n in table if n not in wanted]:
                self.parked[kind].append((now, table.pop(name)))
            for name in new:
                if self.free[kind]:
                    table[name] = self.free[kind].pop()
                else:
                    table[name] = self.fresh[kind]
                    self.fresh[kind] += 1
        return []


class Segment:
    """The shared buffer. Created by the supervisor (memfd); a worker maps the same fd."""

    def __init__(self, layout: Layout, slabs: int, fd: int | None = None) -> None:
        self.layout = layout
        self.slabs = slabs
        self.size = layout.slab_cells * 8 * slabs
        if fd is None:
            fd = os.memfd_create("meshproxy-stats", 0)
            os.ftruncate(fd, self.size)
        self.fd = fd
        self.buf = mmap.mmap(fd, self.size)

    @property
    def retired(self) -> int:
        return self.slabs - 1

    def block(self, slab: int) -> StatsBlock:
        cells = self.layout.slab_cells
        return StatsBlock(self.buf, slab * cells, cells)

    def zero(self, scope: Scope, slot: int) -> None:
        """A slot about to be reused starts from nothing in every slab."""
        first = self.layout.first(scope, slot) * 8
        n = scope.cells * 8
        cells = self.layout.slab_cells * 8
        for slab in range(self.slabs):
            at = slab * cells + first
            self.buf[at:at + n] = bytes(n)

    def retire(self, slab: int) -> None:
        """A worker is gone: keep its counters and histograms, count what it had in
        progress as ended (connections destroyed, requests reset: each gauge's `ends_as`),
        drop its gauges, and leave the slab zeroed for its replacement. Totals balance:
        downstream_cx_total == downstream_cx_destroy + downstream_cx_active."""
        fold(self.buf, self.layout.slab_cells, slab, self.retired, self.layout.gauge_mask,
             self.layout.ends_as)
