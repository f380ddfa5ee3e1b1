"""Passive health checking (Envoy's outlier detection), per worker.

Each worker judges endpoints by the results it sees itself: no coordination between
workers, so the single-writer rule of the stats segment holds. With N workers an endpoint
that always fails is ejected by each worker after `consecutive_5xx` of its own failures,
which with the kernel spreading connections evenly is about N x consecutive_5xx requests
in all (documented in the README). /clusters shows on how many workers it is ejected.

Rules, as Envoy applies them:
- consecutive_5xx: a 5xx or a locally originated failure (connect failure, reset,
  timeout) in a row; consecutive_gateway_failure: 502, 503, 504 or a local failure;
- every `interval`: success rate (hosts with enough requests whose success rate is below
  mean - stdev_factor x stdev) and failure percentage (at or above the threshold);
- an ejection is enforced with probability enforcing_*%, and only while the ejected share
  stays within max_ejection_percent (at least one endpoint may always be ejected);
- it lasts base_ejection_time x times ejected, capped at max_ejection_time.
"""

from __future__ import annotations

import random
import statistics
from typing import Any, Protocol

from meshproxy.config.snapshot import OutlierSpec
from meshproxy.upstream.conn_pool import Endpoint

_random = random.random

RULE_5XX = 1
RULE_GATEWAY = 2
_RULE_STAT = {
    RULE_5XX: "outlier_detection_ejections_enforced_consecutive_5xx",
    RULE_GATEWAY: "outlier_detection_ejections_enforced_consecutive_gateway_failure",
}


class Ejecting(Protocol):
    """What the detector needs of the cluster it watches (the cluster owns the detector,
    so the detector names only this, never the cluster's module)."""

    endpoints: list[Endpoint]
    stats: Any

    def publish_ejections(self) -> None: ...


class OutlierDetector:
    def __init__(self, spec: OutlierSpec, cluster: Ejecting) -> None:
        self.spec = spec
        self.cluster = cluster
        self.next_interval = 0.0

    def tick(self, now: float) -> None:
        """Called by the worker about once a second; runs the interval rules when due."""
        if not self.next_interval:
            self.next_interval = now + self.spec.interval
        elif now >= self.next_interval:
            self.next_interval = now + self.spec.interval
            self.on_interval(now)

    def on_result(self, ep: Endpoint, status: int, local_failure: bool, now: float) -> None:
        """One result from `ep`: a status, or a failure with no response."""
        error = local_failure or status >= 500
        gateway = local_failure or status in (502, 503, 504)
        spec = self.spec
        rule = ep.outlier.record(error, gateway, spec.consecutive_5xx, spec.consecutive_gateway)
        if rule:
            enforcing = spec.enforcing_5xx if rule == RULE_5XX else spec.enforcing_gateway
            self._eject(ep, now, enforcing, _RULE_STAT[rule])

    def _eject(self, ep: Endpoint, now: float, enforcing: float, stat: str) -> None:
        if _random() >= enforcing:
            return
        cluster = self.cluster
        st = cluster.stats
        eps = cluster.endpoints
        ejected = sum(1 for e in eps if e.outlier.ejected)
        if ejected >= 1 and (ejected + 1) * 100 > self.spec.max_ejection_percent * len(eps):
            st.block.inc(st.outlier_detection_ejections_overflow)
            return
        ep.outlier.eject(now, self.spec.base_ejection_time, self.spec.max_ejection_time)
        st.block.inc(st.outlier_detection_ejections_enforced_total)
        st.block.inc(getattr(st, stat))
        ep.stats.block.set(ep.stats.ejected, 1)
        cluster.publish_ejections()

    def on_interval(self, now: float) -> None:
        """Interval rules, then a fresh interval."""
        spec = self.spec
        eps = [e for e in self.cluster.endpoints if not e.outlier.ejected]
        sr = [(e, e.outlier.successes / (e.outlier.successes + e.outlier.failures))
              for e in eps if e.outlier.successes + e.outlier.failures >= spec.sr_request_volume]
        if len(sr) >= spec.sr_minimum_hosts:
            rates = [r for _, r in sr]
            threshold = statistics.fmean(rates) - spec.sr_stdev_factor * statistics.pstdev(rates)
            for e, r in sr:
                if r < threshold:
                    self._eject(e, now, spec.enforcing_success_rate,
                                "outlier_detection_ejections_enforced_success_rate")
        fp = [(e, 100.0 * e.outlier.failures / (e.outlier.successes + e.outlier.failures))
              for e in eps if e.outlier.successes + e.outlier.failures >= spec.fp_request_volume]
        if len(fp) >= spec.fp_minimum_hosts:
            for e, pct in fp:
                if pct >= spec.fp_threshold and not e.outlier.ejected:
                    self._eject(e, now, spec.enforcing_failure_percentage,
                                "outlier_detection_ejections_enforced_failure_percentage")
        for e in self.cluster.endpoints:
            e.outlier.end_interval()
