"""One control-plane replica: its view of the store (resources and registry, listed then
watched), the push server fed by that view, the registry's singleton expiry task when its
election lease says so, and the status records that `meshctl proxy-status` reads.

Every replica serves proxies alike: a change written through any replica reaches the store,
every replica sees it in its watch and pushes it to its own proxies. What a replica writes:
registrations (for its proxies' Hello, Heartbeat, Deregister), its proxies' status records
(`/status/proxies/<node>`, coalesced, at most every STATUS_FLUSH), and its own liveness key
(`/replicas/<id>`, held by a lease: a status record whose replica key is gone is a proxy
that is DISCONNECTED, however its record reads).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from typing import Any

import msgspec
import trio

from meshproxy.config.load import ConfigError
from meshproxy.control import registry as reg
from meshproxy.control import rotation as rot
from meshproxy.control.ca import Authority
from meshproxy.control.election import Election
from meshproxy.control.issuer import Issuer
from meshproxy.control.messages import (
    Certificate,
    CertificateRefused,
    CertificateRequest,
)
from meshproxy.control.metrics import Metrics
from meshproxy.control.push import Hooks, PushServer, Subscription
from meshproxy.control.resources import Resource, decode
from meshproxy.control.store import Compacted, Conflict, LeaseExpired, Store
from meshproxy.control.translate import MeshIndex

log = logging.getLogger("meshproxy.control.replica")

RESOURCES = "/mesh/v1/"
STATUS_PREFIX = "/status/proxies/"
REPLICAS = "/replicas/"
STATUS_FLUSH = 0.2
REPLICA_TTL = 5.0


def new_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Replica(Hooks):
    def __init__(self, store: Store, metrics: Metrics | None = None,
                 replica_id: str | None = None,
                 threshold: float = reg.SELF_PRESERVATION_THRESHOLD,
                 authority: Authority | None = None) -> None:
        self.store = store
        self.authority = authority
        self.id = replica_id or new_replica_id()
        self.metrics = metrics or Metrics()
        self.index = MeshIndex()
        self.resources: dict[str, Resource] = {}
        self.registry = reg.Registry(threshold)
        self.push = PushServer(self.index, self.metrics, self)
        self.election = Election(store, self.id)
        self._dirty: set[str] = set()
        self._flush = trio.Event()
        self._draining: set[str] = set()  # nodes that deregistered on their stream
        self._leader_since = 0.0  # wall clock
        self.revision = 0
        self.issuer = Issuer(store, authority, self.metrics, self.push, self.election,
                             self.proxy_status)

    # ---------------------------------------------------------------- the view

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self.issuer.nursery = nursery
            res_rev = await self._list_resources()
            reg_rev = await self._list_registry()
            ca_rev = await self.issuer.list_rotation()
            nursery.start_soon(self._watch, RESOURCES, res_rev, self._resource_event,
                               self._list_resources)
            nursery.start_soon(self._watch, rot.KEY, ca_rev, self.issuer.rotation_event,
                               self.issuer.list_rotation)
            if self.authority is not None:
                nursery.start_soon(self.issuer.rotate)
            nursery.start_soon(self._watch, reg.PREFIX, reg_rev, self._registry_event,
                               self._list_registry)
            await nursery.start(self._alive)
            nursery.start_soon(self.election.run)
            nursery.start_soon(self._expiry)
            nursery.start_soon(self._flusher)
            nursery.start_soon(self.push.debounce)
            log.info("replica %s watching the store from revision %d", self.id,
                     max(res_rev, reg_rev))
            task_status.started()

    async def _list_resources(self) -> int:
        entries, rev = await self.store.list(RESOURCES)
        changed: set[str] = set()
        seen = set()
        for e in entries:
            seen.add(e.key)
            changed |= self._put_resource(e.key, e.value)
        for key in [k for k in self.resources if k not in seen]:
            changed |= self.index.remove(self.resources.pop(key))
        self.push.notify(changed)
        self._seen(rev)
        return rev

    async def _list_registry(self) -> int:
        entries, rev = await self.store.list(reg.PREFIX)
        seen = set()
        for e in entries:
            seen.add(e.key)
            self._registry_put(e.key, e.value, e.revision)
        for key in [k for k in self.registry.records if k not in seen]:
            self._registry_delete(key)
        self._seen(rev)
        return rev

    def _seen(self, rev: int) -> None:
        self.revision = max(self.revision, rev)
        self.metrics.set("meshproxy_store_revision", self.revision)

    async def _watch(self, prefix: str, after: int, apply: Any, relist: Any) -> None:
        while True:
            try:
                async for ev in self.store.watch(prefix, after):
                    apply(ev.kind, ev.key, ev.value, ev.revision)
                    after = ev.revision
                    self._seen(after)
            except Compacted:
                log.warning("watch of %s fell behind the store's history; listing again",
                            prefix)
                after = await relist()
            except (OSError, trio.BrokenResourceError) as exc:
                log.warning("watch of %s failed (%s); watching again", prefix, exc)
                await trio.sleep(0.5)

    def _put_resource(self, key: str, value: bytes) -> set[str]:
        try:
            r = decode(json.loads(value), key)
        except (ConfigError, ValueError) as exc:  # written past the API: said, not served
            log.error("store key %s holds an invalid resource, ignored: %s", key, exc)
            return set()
        changed: set[str] = set()
        old = self.resources.get(key)
        if old is not None:
            changed |= self.index.remove(old)
        self.resources[key] = r
        return changed | self.index.put(r)

    def _resource_event(self, kind: str, key: str, value: bytes | None, rev: int) -> None:
        if kind == "put" and value is not None:
            changed = self._put_resource(key, value)
        else:
            old = self.resources.pop(key, None)
            changed = self.index.remove(old) if old is not None else set()
        self.push.notify(changed)

    # ---------------------------------------------------------------- the registry

    def _registry_put(self, key: str, value: bytes, rev: int) -> set[str]:
        try:
            new = reg.decode(value)
        except ValueError as exc:
            log.error("store key %s holds an invalid registration, ignored: %s", key, exc)
            return set()
        old = self.registry.put(new, rev)
        ident = f"Registration/{new.node}"
        if old is not None and old.state == new.state and old.workload() == new.workload():
            return set()  # a renewal: nothing any proxy sees
        if old is not None:
            self.index.remove_workload(ident, old.namespace, old.service)
        if new.state == "up":
            return {self.index.put_workload(ident, new.namespace, new.workload())}
        return {f"{new.namespace}/{new.service}"}

    def _registry_delete(self, key: str) -> set[str]:
        old = self.registry.remove(key, time.time())
        if old is None:
            return set()
        return {self.index.remove_workload(f"Registration/{old.node}", old.namespace,
                                           old.service)}

    def _registry_event(self, kind: str, key: str, value: bytes | None, rev: int) -> None:
        if kind == "put" and value is not None:
            changed = self._registry_put(key, value, rev)
        else:
            changed = self._registry_delete(key)
        self.push.notify(changed)
        self.metrics.set("meshproxy_registry_size", len(self.registry.records))

    async def _expiry(self) -> None:
        """Every replica judges the leases (its gauges and `registry list` say the same
        thing everywhere); only the leader evicts."""
        was_leader = False
        preserving = False
        while True:
            await trio.sleep(reg.SCAN_INTERVAL)
            now = time.time()
            leader = self.election.leader
            if leader and not was_leader:
                self._leader_since = now
            was_leader = leader
            self.metrics.set("meshproxy_control_leader", int(leader))
            longest = max((r.lease_ttl for r in self.registry.records.values()), default=0.0)
            decision = self.registry.decide(now, self._leader_since + longest)
            self.metrics.set("meshproxy_registry_lapsed", len(decision.lapsed))
            self.metrics.set("meshproxy_registry_self_preservation", int(decision.preserving))
            if decision.preserving != preserving and leader:
                if decision.preserving:
                    log.warning("registry self-preservation: %d of %d leases lapsed within "
                                "one TTL; evicting none until they renew", len(decision.lapsed),
                                len(self.registry.records))
                else:
                    log.warning("registry self-preservation ended")
            preserving = decision.preserving
            if not leader:
                continue
            for key in decision.evict:
                rec = self.registry.records.get(key)
                try:
                    await self.store.delete(key, expect=self.registry.revisions.get(key, 0))
                except Conflict:
                    continue  # renewed meanwhile: it lives
                self.metrics.inc("meshproxy_registry_evictions")
                if rec is not None:
                    log.warning("evicted %s/%s %s (%s:%d): no heartbeat for %.1f s",
                                rec.namespace, rec.service, rec.node, rec.address, rec.port,
                                now - rec.renewed)

    async def _register(self, sub: Subscription, state: str = "up") -> None:
        if state == "up" and not sub.ready:
            state = "starting"
        h = sub.hello
        now = time.time()
        key = reg.registration_key(h.namespace, h.service or "", h.node)
        old = self.registry.records.get(key)
        new = reg.from_hello(h, now, self.id, sub.spiffe_id)
        if new is None:
            return
        if old is not None and state == "up":
            new = msgspec.structs.replace(new, registered=old.registered)
        if state != "up":
            new = msgspec.structs.replace(new, state=state)
        await self.store.put(key, reg.encode(new))

    # ---------------------------------------------------------------- hooks

    async def hello(self, sub: Subscription) -> None:
        self._draining.discard(sub.hello.node)
        await self.issuer.hello(sub)
        if sub.hello.service is not None:
            await self._register(sub)
            self.metrics.inc("meshproxy_registry_registrations")
        self.status_changed(sub)

    async def heartbeat(self, sub: Subscription) -> None:
        if sub.hello.node in self._draining:
            return
        await self._register(sub)  # renewed; re-registered if it had been evicted
        self.status_changed(sub)

    async def deregister(self, sub: Subscription) -> None:
        self._draining.add(sub.hello.node)
        if sub.hello.service is not None:
            await self._register(sub, "draining")
            self.metrics.inc("meshproxy_registry_deregistrations")
            log.info("proxy %s deregistered %s/%s: draining", sub.hello.node,
                     sub.hello.namespace, sub.hello.service)

    async def closed(self, sub: Subscription, current: bool) -> None:
        h = sub.hello
        if h.node in self._draining and h.service is not None:
            self._draining.discard(h.node)
            await self.store.delete(reg.registration_key(h.namespace, h.service, h.node))
        if current:
            await self._write_status(sub, connected=False)

    def status_changed(self, sub: Subscription) -> None:
        self._dirty.add(sub.hello.node)
        self._flush.set()

    # ---------------------------------------------------------------- identity

    def trust_bundle(self) -> bytes:
        return self.issuer.trust_bundle()

    def sign(self, sub: Subscription, req: CertificateRequest
             ) -> Certificate | CertificateRefused:
        return self.issuer.sign(sub, req)

    def refused(self, reason: str, detail: str) -> None:
        self.issuer.refused(reason, detail)

    # ---------------------------------------------------------------- status records

    async def _write_status(self, sub: Subscription, connected: bool) -> None:
        value = json.dumps(sub.status(self.id, connected)).encode()
        await self.store.put(f"{STATUS_PREFIX}{sub.hello.node}", value)

    async def _flusher(self) -> None:
        while True:
            await self._flush.wait()
            self._flush = trio.Event()
            dirty, self._dirty = self._dirty, set()
            for node in sorted(dirty):
                sub = self.push.subscriptions.get(node)
                if sub is not None:
                    await self._write_status(sub, connected=True)
            await trio.sleep(STATUS_FLUSH)

    async def _alive(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
        started = False
        while True:
            lease = await self.store.grant(REPLICA_TTL)
            await self.store.put(f"{REPLICAS}{self.id}", b"{}", lease=lease)
            if not started:
                task_status.started()
                started = True
            try:
                while True:
                    await trio.sleep(REPLICA_TTL / 3)
                    await self.store.keep_alive(lease)
            except LeaseExpired:
                log.warning("replica %s lost its liveness lease; taking a new one", self.id)

    # ---------------------------------------------------------------- views

    async def proxy_status(self) -> list[dict[str, Any]]:
        entries, _ = await self.store.list(STATUS_PREFIX)
        alive, _ = await self.store.list(REPLICAS)
        replicas = {e.key[len(REPLICAS):] for e in alive}
        out = []
        for e in entries:
            rec = json.loads(e.value)
            rec["status"] = _state(rec, rec["replica"] in replicas)
            out.append(rec)
        return out

    def registry_view(self) -> dict[str, Any]:
        now = time.time()
        rows = []
        for key in sorted(self.registry.records):
            r = self.registry.records[key]
            lapsed = self.registry.lapsed(r, now)
            rows.append({"namespace": r.namespace, "service": r.service, "node": r.node,
                         "address": r.address, "port": r.port, "labels": r.labels,
                         "state": "LAPSED" if lapsed and r.state == "up" else r.state.upper(),
                         "last_heartbeat": round(now - r.renewed, 3),
                         "lease_ttl": r.lease_ttl, "replica": r.replica})
        return {"self_preservation": self.registry.preserving,
                "self_preservation_since": self.registry.preserving_since or None,
                "threshold": self.registry.threshold, "registrations": rows}


def _state(rec: dict[str, Any], replica_alive: bool) -> str:
    """Istio's proxy-status words, plus DISCONNECTED and NACKED. A connected proxy's record
    is rewritten at every heartbeat: one not seen for a lease TTL is gone, whatever its
    replica (perhaps killed before it could say so) last wrote."""
    silent = time.time() - rec["last_seen"] > max(rec.get("lease_ttl", 10.0), 1.0) + 1.0
    if not rec["connected"] or not replica_alive or silent:
        return "DISCONNECTED"
    if rec["nack_version"] and rec["nack_version"] == rec["sent_version"]:
        return "NACKED"
    if rec["in_flight"]:
        return "STALE"
    if not rec["sent_version"] and not rec["version"]:
        return "NOT SENT"
    return "SYNCED"
