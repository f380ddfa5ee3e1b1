"""A worker's view of its slab: scope objects whose attributes are absolute cell indices.

    st = sink.cluster("web")
    st.block.inc(st.upstream_rq_total)

Each scope kind gets a class with one slot per declared stat (stats.names), so a typo is an
AttributeError at bind time, not a silent new stat. A worker without a shared segment (the
demo, a test running `serve` in-process) gets a private anonymous one: the data path never
checks whether stats are on.
"""

from __future__ import annotations

from typing import Any

from meshproxy._core.stats_block import NullStatsBlock, StatsBlock
from meshproxy.stats.names import Scope
from meshproxy.stats.shared_memory import Capacity, Layout, Segment, Slots


class ScopeStats:
    __slots__ = ("block",)


def attr(name: str) -> str:
    """The attribute of a stat: Envoy's dotted names (outlier_detection.ejections_active)
    become outlier_detection_ejections_active."""
    return name.replace(".", "_")


_CLASSES: dict[Scope, type] = {
    scope: type(f"{scope.name.title()}Stats", (ScopeStats,),
                {"__slots__": tuple(attr(st.name) for st in scope.stats)})
    for scope in Scope
}


class Sink:
    def __init__(self, segment: Segment, slab: int, slots: Slots, enabled: bool = True) -> None:
        self.segment = segment
        self.layout = segment.layout
        self.block: StatsBlock = segment.block(slab)
        if not enabled:
            cells = self.layout.slab_cells
            self.block = NullStatsBlock(segment.buf, slab * cells, cells)
        self.slots = slots

    @classmethod
    def private(cls) -> Sink:
        """A sink over an anonymous segment, for a worker that nobody supervises."""
        seg = Segment(Layout(Capacity(listeners=64, clusters=256, endpoints=1024)), 2)
        return cls(seg, 0, Slots())

    def worker_blocks(self) -> list[StatsBlock]:
        """Every worker's slab, read-only (the last slab is the retired workers' fold):
        a gauge summed over them is the whole proxy's, as the supervisor sums it. A worker
        writes only its own (`block`)."""
        seg = self.segment
        return [seg.block(slab) for slab in range(seg.retired)]

    def _bind(self, scope: Scope, slot: int) -> Any:
        obj = _CLASSES[scope]()
        obj.block = self.block
        first = self.layout.first(scope, slot)
        for st in scope.stats:
            setattr(obj, attr(st.name), first + scope.offsets[st.name])
        return obj

    def _slot(self, table: dict[str, int], name: str, limit: int) -> int:
        slot = table.get(name)
        if slot is None:
            # Unsupervised worker: assign locally (a supervised one always gets its slots
            # in the snapshot).
            if len(table) >= limit:
                raise RuntimeError(f"stats capacity exceeded for {name!r}")
            slot = table[name] = len(table)
        return slot

    def worker(self) -> Any:
        return self._bind(Scope.WORKER, 0)

    def tracing(self) -> Any:
        return self._bind(Scope.TRACING, 0)

    def listener(self, name: str) -> Any:
        return self._bind(Scope.LISTENER, self._slot(self.slots.listeners, name,
                                                     self.layout.cap.listeners))

    def http(self, name: str) -> Any:
        return self._bind(Scope.HTTP, self._slot(self.slots.listeners, name,
                                                 self.layout.cap.listeners))

    def cluster(self, name: str) -> Any:
        return self._bind(Scope.CLUSTER, self._slot(self.slots.clusters, name,
                                                    self.layout.cap.clusters))

    def health_cell(self, cluster: str, label: str) -> tuple[StatsBlock, int]:
        """(block, cell) of an endpoint's hc_failed, in the supervisor's slab."""
        slot = self._slot(self.slots.endpoints, endpoint_key(cluster, label),
                          self.layout.cap.endpoints)
        seg = self.segment
        return (seg.block(seg.retired),
                self.layout.first(Scope.ENDPOINT, slot) + Scope.ENDPOINT.offsets["hc_failed"])

    def mirror(self, route: str) -> Any:
        """A mirrored route's response diff counters (mirror.<route>.*)."""
        return self._bind(Scope.MIRROR, self._slot(self.slots.mirrors, route,
                                                   self.layout.cap.mirrors))

    def endpoint(self, cluster: str, label: str) -> Any:
        return self._bind(Scope.ENDPOINT, self._slot(self.slots.endpoints,
                                                     endpoint_key(cluster, label),
                                                     self.layout.cap.endpoints))


def endpoint_key(cluster: str, label: str) -> str:
    return f"{cluster}/{label}"
