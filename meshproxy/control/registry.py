"""The registry: workloads registered by their sidecars, each held by a lease that its
heartbeats renew (Eureka's leases, Consul's TTL checks). Sans-IO: records in, decisions out;
the control plane does the store I/O (control/replica.py).

A registration lives in the store at `/registry/<namespace>/<service>/<node>` as JSON
(`Registration`). Its sidecar registers it when its discovery stream opens (Hello), renews
it with every Heartbeat (each lease_ttl / 3), and marks it `draining` when it shuts down
gracefully (Deregister): a draining workload leaves every proxy's endpoints at once and its
record is deleted when its stream closes.

Expiry is a singleton task (the replica holding the election lease): a registration whose
last renewal is older than its TTL has lapsed and is evicted, which every subscribed proxy
sees as the endpoint leaving, within the scan interval plus one push of the TTL. The
renewal times are wall-clock seconds written by whichever replica took the heartbeat, so
replicas must share a clock (NTP), as Eureka's and Consul's servers must.

Self-preservation (Eureka's, but visible): lapses one at a time are workloads dying; many
at once are more likely the control plane's own network failing. When more than
`threshold` (15%) of the registrations, and at least two, lapse within one TTL (those
evicted in the last TTL count, as lapsed, in both numbers), eviction stops: the lapsed
leases are held, and the registry says so (log, `meshctl registry list`, the metrics)
until enough of them renew. A lapsed lease is evicted EVICT_AFTER after it lapsed, not at
once, so that leases lapsing together (their heartbeats a fraction of TTL/3 apart) are
seen together, still within the TTL + 1 s an eviction may take to reach the proxies. A
leader that has just been elected waits one TTL before evicting anything, so that a
control plane restarted after an outage lets its sidecars reconnect first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from meshproxy.control.messages import Hello
from meshproxy.control.resources import WorkloadSpec

PREFIX = "/registry/"
STATUS_KEY = "/status/registry"
# Share of registrations lapsed at once beyond which nothing is evicted (Eureka's 85%
# renewal threshold, from the other side).
SELF_PRESERVATION_THRESHOLD = 0.15
# How often the leader looks for lapsed leases: expiry is seen within TTL + this.
SCAN_INTERVAL = 0.2
# How long a lease stays lapsed before it is evicted (see self-preservation above): scan
# interval + this + debounce (0.1 s) + a push stays well under 1 s.
EVICT_AFTER = 0.3


class Registration(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    node: str
    namespace: str
    service: str
    address: str
    port: int
    labels: dict[str, str]
    service_account: str
    lease_ttl: float
    renewed: float  # wall-clock seconds of the last heartbeat
    registered: float
    replica: str  # the replica whose stream carries it
    # starting: its sidecar has no config yet (Hello.ready False); only "up" workloads are
    # anybody's endpoints.
    state: Literal["up", "starting", "draining"] = "up"
    # The SPIFFE ID its sidecar authenticated as (a join token): its callers speak mTLS to
    # it and expect this identity. "": a sidecar without a mesh identity.
    identity: str = ""

    @property
    def key(self) -> str:
        return registration_key(self.namespace, self.service, self.node)

    def workload(self) -> WorkloadSpec:
        return WorkloadSpec(service=self.service, address=self.address, port=self.port,
                            labels=self.labels, service_account=self.service_account,
                            locality=self.labels.get("zone", ""), identity=self.identity)


def registration_key(namespace: str, service: str, node: str) -> str:
    return f"{PREFIX}{namespace}/{service}/{node}"


def from_hello(hello: Hello, now: float, replica: str, identity: str = ""
               ) -> Registration | None:
    if hello.service is None or hello.port is None:
        return None
    # Callers reach a workload with an inbound listener through it; an intercepting
    # sidecar's callers connect to the workload's own port, and the rules take them in.
    port = hello.port if hello.intercept else (hello.inbound_port or hello.port)
    return Registration(node=hello.node, namespace=hello.namespace, service=hello.service,
                        address=hello.address, port=port, labels=dict(hello.labels),
                        service_account=hello.service_account, lease_ttl=hello.lease_ttl,
                        renewed=now, registered=now, replica=replica, identity=identity)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Registration)


def encode(reg: Registration) -> bytes:
    return _encoder.encode(reg)


def decode(value: bytes) -> Registration:
    return _decoder.decode(value)


@dataclass
class Decision:
    evict: list[str] = field(default_factory=list)  # keys to delete now
    lapsed: list[str] = field(default_factory=list)  # every lapsed key, evicted or not
    preserving: bool = False


class Registry:
    """Every replica keeps one, fed by the store's watch; the leader asks it what to
    evict."""

    def __init__(self, threshold: float = SELF_PRESERVATION_THRESHOLD) -> None:
        self.threshold = threshold
        self.records: dict[str, Registration] = {}
        self.revisions: dict[str, int] = {}
        self.preserving = False
        self.preserving_since = 0.0
        # (when, ttl) of registrations deleted while lapsed: evictions, for one TTL.
        self.recent: list[tuple[float, float]] = []

    def put(self, reg: Registration, revision: int) -> Registration | None:
        old = self.records.get(reg.key)
        self.records[reg.key] = reg
        self.revisions[reg.key] = revision
        return old

    def remove(self, key: str, now: float | None = None) -> Registration | None:
        """A deletion seen at `now`: one of a lapsed lease is remembered for one TTL."""
        self.revisions.pop(key, None)
        old = self.records.pop(key, None)
        if old is not None and now is not None and old.state == "up" and self.lapsed(old, now):
            self.recent.append((now, old.lease_ttl))
        return old

    @staticmethod
    def lapsed(reg: Registration, now: float) -> bool:
        return now - reg.renewed > reg.lease_ttl

    def decide(self, now: float, grace_until: float = 0.0) -> Decision:
        """What the leader does at `now`: evict the lapsed registrations, unless too many
        lapsed at once (self-preservation) or the leader is in its first TTL."""
        self.recent = [(at, ttl) for at, ttl in self.recent if now - at <= ttl]
        lapsed = sorted(k for k, r in self.records.items() if self.lapsed(r, now))
        together = len(lapsed) + len(self.recent)
        total = len(self.records) + len(self.recent)
        preserving = together >= 2 and together > self.threshold * total > 0
        if preserving and not self.preserving:
            self.preserving_since = now
        self.preserving = preserving
        if preserving or now < grace_until:
            return Decision([], lapsed, preserving)
        due = [k for k in lapsed
               if now - self.records[k].renewed - self.records[k].lease_ttl >= EVICT_AFTER]
        return Decision(due, lapsed, False)
