"""Aggregate the stats segment and render it: Envoy-style text, JSON, Prometheus text.

Totals are the sum of every slab (live workers plus the retired slab); gauges only ever
have values in live slabs. Histograms keep Envoy's bucket bounds (ms); Prometheus output
gives cumulative `_bucket{le=...}`, `_sum` (ms) and `_count`, and text output estimates
quantiles from the buckets by linear interpolation, as Envoy's admin does.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshproxy._core.stats_block import sum_cells
from meshproxy.stats.names import BUCKETS, Kind, Scope
from meshproxy.stats.shared_memory import Segment, Slots

PROM_PREFIX = "meshproxy_"


@dataclass
class Sample:
    name: str            # Envoy-style dotted name
    kind: Kind
    prom: str            # Prometheus metric name
    labels: dict[str, str]
    value: int = 0
    buckets: list[int] | None = None  # per bucket (not cumulative), last = above all bounds
    sum_us: int = 0
    count: int = 0


def _scope_samples(seg: Segment, scope: Scope, slot: int, slabs: list[int], dotted: str,
                   labels: dict[str, str]) -> list[Sample]:
    first = seg.layout.first(scope, slot)
    cells = sum_cells(seg.buf, seg.layout.slab_cells, slabs, first, scope.cells)
    out = []
    nb = len(BUCKETS) + 1
    for st in scope.stats:
        at = scope.offsets[st.name]
        s = Sample(f"{dotted}.{st.name}", st.kind,
                   f"{PROM_PREFIX}{scope.prefix}_{st.name.replace('.', '_')}", labels)
        if st.kind is Kind.HISTOGRAM:
            s.buckets = cells[at:at + nb]
            s.sum_us = cells[at + nb]
            s.count = cells[at + nb + 1]
        else:
            s.value = cells[at]
        out.append(s)
    return out


def collect(seg: Segment, slots: Slots, live: dict[int, int], server: dict[str, int]
            ) -> list[Sample]:
    """live: worker index -> slab. server: extra `server.*` gauges from the supervisor."""
    every = [*sorted(live.values()), seg.retired]
    out: list[Sample] = []
    for name, value in sorted(server.items()):
        out.append(Sample(f"server.{name}", Kind.GAUGE, f"{PROM_PREFIX}server_{name}", {},
                          value))
    for index, slab in sorted(live.items()):
        out += _scope_samples(seg, Scope.WORKER, 0, [slab], f"server.worker_{index}",
                              {"worker_id": str(index)})
        for s in out[-len(Scope.WORKER.stats):]:
            s.prom = f"{PROM_PREFIX}server_worker_{s.name.rsplit('.', 1)[1]}"
    out += _scope_samples(seg, Scope.TRACING, 0, every, "tracing", {})
    for name, slot in sorted(slots.listeners.items()):
        out += _scope_samples(seg, Scope.LISTENER, slot, every, f"listener.{name}",
                              {"listener_name": name})
        out += _scope_samples(seg, Scope.HTTP, slot, every, f"http.{name}",
                              {"listener_name": name})
    for name, slot in sorted(slots.clusters.items()):
        out += _scope_samples(seg, Scope.CLUSTER, slot, every, f"cluster.{name}",
                              {"cluster_name": name})
    for name, slot in sorted(slots.mirrors.items()):
        out += _scope_samples(seg, Scope.MIRROR, slot, every, f"mirror.{name}",
                              {"route_name": name})
    return out


def endpoint_stats(seg: Segment, slots: Slots, live: dict[int, int], key: str
                   ) -> dict[str, int]:
    slot = slots.endpoints.get(key)
    if slot is None:
        return {}
    samples = _scope_samples(seg, Scope.ENDPOINT, slot, [*live.values(), seg.retired],
                             key, {})
    return {s.name.rsplit(".", 1)[1]: s.value for s in samples}


def quantile(s: Sample, q: float) -> float | None:
    """Estimate of the q-quantile (ms) from the buckets, interpolating inside a bucket."""
    if not s.count or s.buckets is None:
        return None
    rank = q * s.count
    seen = 0
    lower = 0.0
    for k, n in enumerate(s.buckets):
        upper = BUCKETS[k] if k < len(BUCKETS) else BUCKETS[-1]
        if n and seen + n >= rank:
            return lower + (upper - lower) * ((rank - seen) / n)
        seen += n
        lower = upper
    return BUCKETS[-1]


def _fmt(v: float | None) -> str:
    return "nan" if v is None else f"{v:g}"


def render_text(samples: list[Sample]) -> str:
    lines = []
    for s in sorted(samples, key=lambda x: x.name):
        if s.kind is Kind.HISTOGRAM:
            qs = " ".join(f"P{q * 100:g}({_fmt(quantile(s, q))})"
                          for q in (0.5, 0.9, 0.99, 0.999))
            lines.append(f"{s.name}: {qs} count={s.count} sum={s.sum_us / 1000:g}")
        else:
            lines.append(f"{s.name}: {s.value}")
    return "\n".join(lines) + "\n"


def render_json(samples: list[Sample]) -> dict:
    stats: list[dict] = []
    histograms: list[dict] = []
    for s in sorted(samples, key=lambda x: x.name):
        if s.kind is Kind.HISTOGRAM:
            assert s.buckets is not None
            cumulative, acc = [], 0
            for k, n in enumerate(s.buckets[:-1]):
                acc += n
                cumulative.append({"le": BUCKETS[k], "count": acc})
            histograms.append({"name": s.name, "count": s.count, "sum": s.sum_us / 1000,
                               "buckets": cumulative})
        else:
            stats.append({"name": s.name, "value": s.value, "type": s.kind.value})
    return {"stats": stats, "histograms": histograms}


def _labels(labels: dict[str, str], extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels.items()]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(samples: list[Sample]) -> str:
    """Prometheus text exposition format 0.0.4: one HELP/TYPE block per metric family."""
    families: dict[str, list[Sample]] = {}
    for s in samples:
        families.setdefault(s.prom, []).append(s)
    helps = {f"{PROM_PREFIX}{scope.prefix}_{st.name.replace('.', '_')}": st.help
             for scope in Scope for st in scope.stats}
    for scope_stat in Scope.WORKER.stats:
        helps[f"{PROM_PREFIX}server_worker_{scope_stat.name}"] = scope_stat.help
    out = []
    for prom in sorted(families):
        group = families[prom]
        kind = group[0].kind
        out.append(f"# HELP {prom} {helps.get(prom, prom)}")
        out.append(f"# TYPE {prom} {kind.value}")
        for s in group:
            if kind is Kind.HISTOGRAM:
                assert s.buckets is not None
                acc = 0
                for k, n in enumerate(s.buckets[:-1]):
                    acc += n
                    bound = BUCKETS[k]
                    le = f'le="{bound:g}"'
                    out.append(f"{prom}_bucket{_labels(s.labels, le)} {acc}")
                inf = 'le="+Inf"'
                out.append(f"{prom}_bucket{_labels(s.labels, inf)} {s.count}")
                out.append(f"{prom}_sum{_labels(s.labels)} {s.sum_us / 1000:g}")
                out.append(f"{prom}_count{_labels(s.labels)} {s.count}")
            else:
                out.append(f"{prom}{_labels(s.labels)} {s.value}")
    return "\n".join(out) + "\n"
