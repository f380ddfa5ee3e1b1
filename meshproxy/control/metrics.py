"""The control plane's metrics, in Prometheus text on its admin port (/metrics). Names are
istiod's where istiod has one (pilot_xds_pushes, pilot_proxy_convergence_time, ...), ours
(meshproxy_registry_*) where it has none. Declared once here, as the data plane's are in
stats/names.py; one process, so plain numbers, no shared memory.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Seconds, istiod's buckets for push and convergence times.
BUCKETS = (0.01, 0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0)


@dataclass
class Histogram:
    name: str
    help: str
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.gauges: dict[str, float] = {}
        self.help: dict[str, str] = {}
        self.push_time = self._hist("pilot_xds_push_time",
                                    "time from a push's start to its bytes sent (s)")
        self.convergence = self._hist("pilot_proxy_convergence_time",
                                      "time from a change committed to its config applied "
                                      "by every worker of a proxy (s)")
        self.debounce = self._hist("pilot_debounce_time",
                                   "time changes waited in the debounce (s)")
        self.histograms = [self.push_time, self.convergence, self.debounce]
        for name, text in COUNTERS.items():
            self.help[name] = text
        for name, text in GAUGES.items():
            self.help[name] = text
            self.gauges[name] = 0

    def _hist(self, name: str, text: str) -> Histogram:
        self.help[name] = text
        return Histogram(name, text)

    def inc(self, name: str, by: float = 1, **labels: str) -> None:
        assert name in COUNTERS, f"undeclared metric {name}"
        key = (name, tuple(sorted(labels.items())))
        self.counters[key] = self.counters.get(key, 0) + by

    def set(self, name: str, value: float) -> None:
        assert name in GAUGES, f"undeclared metric {name}"
        self.gauges[name] = value

    def value(self, name: str, **labels: str) -> float:
        return self.counters.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        out: list[str] = []
        for name in COUNTERS:
            out += [f"# HELP {name} {self.help[name]}", f"# TYPE {name} counter"]
            rows = [(k[1], v) for k, v in self.counters.items() if k[0] == name]
            for labels, v in sorted(rows) or [((), 0)]:
                out.append(f"{name}{_labels(labels)} {v:g}")
        for name in GAUGES:
            out += [f"# HELP {name} {self.help[name]}", f"# TYPE {name} gauge",
                    f"{name} {self.gauges[name]:g}"]
        for h in self.histograms:
            out += [f"# HELP {h.name} {h.help}", f"# TYPE {h.name} histogram"]
            running = 0
            for bound, count in zip((*BUCKETS, float("inf")), h.counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                out.append(f'{h.name}_bucket{{le="{le}"}} {running}')
            out += [f"{h.name}_sum {h.total:.6f}", f"{h.name}_count {h.n}"]
        return "\n".join(out) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


COUNTERS = {
    "pilot_xds_pushes": "pushes sent, by type (config) ",
    "pilot_xds_push_bytes": "bytes of pushes sent",
    "pilot_total_xds_rejects": "pushes a proxy rejected (NACK)",
    "pilot_xds_expired_nonce": "ACK/NACKs whose nonce was not the latest push's (ignored)",
    "pilot_xds_push_skipped": "pushes not sent because the proxy already had the version",
    "pilot_xds_pushes_failed": "pushes that could not be sent (the stream broke)",
    "meshproxy_registry_registrations": "workloads registered",
    "meshproxy_registry_deregistrations": "workloads deregistered gracefully",
    "meshproxy_registry_evictions": "workloads evicted after their lease lapsed",
    "meshproxy_registry_heartbeats": "heartbeats received",
    "citadel_server_csr_count": "certificate signing requests received",
    "citadel_server_success_cert_issuance_count": "workload certificates issued",
    "citadel_server_csr_sign_error_count": "CSRs refused, by reason (csr, identity)",
    "citadel_server_authentication_failure_count":
        "identity attempts refused for want of a valid join token, by reason",
    "meshproxy_ca_tokens_created": "join tokens made",
    "meshproxy_ca_renewals_requested": "proxies asked to renew now (root rotation)",
}

GAUGES = {
    "pilot_xds": "proxies connected to this replica",
    "meshproxy_registry_size": "registrations in the registry",
    "meshproxy_registry_lapsed": "registrations whose lease has lapsed, evicted or held",
    "meshproxy_registry_self_preservation": "1 while lapsed leases are held, not evicted",
    "meshproxy_control_leader": "1 while this replica runs the singleton tasks",
    "meshproxy_store_revision": "the store revision this replica has seen",
    "citadel_server_root_cert_expiry_timestamp": "when the signing root expires (unix s)",
    "meshproxy_ca_rotation_phase": "root rotation phase: 0 none, 1 trust-both, 2 issue-new, "
                                   "3 drop-old",
}
