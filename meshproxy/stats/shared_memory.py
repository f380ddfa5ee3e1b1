"""The stats segment: one shared-memory buffer, a slab per worker plus a retired slab.

Layout of a slab (cells of int64; per-scope layouts come from stats.names):
    [worker scope][tracing scope][listener x L][http x L][cluster x C][endpoint x E]
The segment holds `workers + 1` slabs; the last one, RETIRED, accumulates the counters and
histograms of replaced workers so that totals never go backwards. Capacities are fixed when
the segment is made (pages never touched cost no memory); a config that needs more slots
than there are is refused with a clear error, like any other invalid config.

Slots are assigned by the supervisor, by name, and never reused within a process lifetime:
a cluster added by a reload gets a fresh slot, one removed keeps its slot and its history.
The assignment travels to the workers inside each snapshot.
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


ORDER = ((Scope.WORKER, "workers"), (Scope.TRACING, "workers"),
         (Scope.LISTENER, "listeners"), (Scope.HTTP, "listeners"),
         (Scope.CLUSTER, "clusters"), (Scope.ENDPOINT, "endpoints"))


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


@dataclass
class Slots:
    """name -> slot, per scope kind (LISTENER and HTTP share the listener's slot)."""

    listeners: dict[str, int] = field(default_factory=dict)
    clusters: dict[str, int] = field(default_factory=dict)
    endpoints: dict[str, int] = field(default_factory=dict)  # "cluster/host:port"

    def assign(self, listeners: list[str], clusters: list[str], endpoints: list[str],
               cap: Capacity) -> list[str]:
        """Give new names slots; returns errors when a capacity would be exceeded (nothing
        is assigned then)."""
        errors = []
        for what, table, names, limit in (("listeners", self.listeners, listeners, cap.listeners),
                                          ("clusters", self.clusters, clusters, cap.clusters),
                                          ("endpoints", self.endpoints, endpoints, cap.endpoints)):
            new = [n for n in dict.fromkeys(names) if n not in table]
            if len(table) + len(new) > limit:
                errors.append(f"{what}: the stats segment has room for {limit} {what} "
                              f"over the process lifetime, this config needs "
                              f"{len(table) + len(new)}")
        if errors:
            return errors
        for table, names in ((self.listeners, listeners), (self.clusters, clusters),
                             (self.endpoints, endpoints)):
            for n in names:
                if n not in table:
                    table[n] = len(table)
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

    def retire(self, slab: int) -> None:
        """A worker is gone: keep its counters and histograms, count what it had in
        progress as ended (connections destroyed, requests reset: each gauge's `ends_as`),
        drop its gauges, and leave the slab zeroed for its replacement. Totals balance:
        downstream_cx_total == downstream_cx_destroy + downstream_cx_active."""
        fold(self.buf, self.layout.slab_cells, slab, self.retired, self.layout.gauge_mask,
             self.layout.ends_as)
