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

import datetime
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
from meshproxy.control.ca import ISSUE_NEW, TRUST_BOTH, Authority, CAError, fingerprint, pem
from meshproxy.control.election import Election
from meshproxy.control.messages import (
    Certificate,
    CertificateRefused,
    CertificateRequest,
    config_version,
)
from meshproxy.control.metrics import Metrics
from meshproxy.control.push import EVERYTHING, Hooks, PushServer, Subscription
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
        self.rotation: rot.Rotation | None = None
        self.rotation_holding: list[str] = []  # nodes the leader waits for, last it looked
        # Called when the signing CA changes (the control plane re-issues its own
        # serving certificate from it).
        self.on_signer_change: Any = None
        self._nursery: trio.Nursery | None = None

    # ---------------------------------------------------------------- the view

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ca_metrics()
            res_rev = await self._list_resources()
            reg_rev = await self._list_registry()
            ca_rev = await self._list_rotation()
            nursery.start_soon(self._watch, RESOURCES, res_rev, self._resource_event,
                               self._list_resources)
            nursery.start_soon(self._watch, rot.KEY, ca_rev, self._rotation_event,
                               self._list_rotation)
            if self.authority is not None:
                nursery.start_soon(self._rotate)
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
        a = self.authority
        if (a is not None and sub.claims is not None and sub.identity_root
                and sub.identity_root != a.signer().root_fingerprint and a.phase):
            # A proxy back from away during a rotation: a leaf of the root being left.
            await self.push.renew(a.signer().root_fingerprint, "root rotation", sub)
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
        return self.authority.bundle() if self.authority is not None else b""

    def sign(self, sub: Subscription, req: CertificateRequest
             ) -> Certificate | CertificateRefused:
        """Istio's CSR flow: the identity is the stream's (its join token), never the
        CSR's; a refusal says why and is counted by reason."""
        self.metrics.inc("citadel_server_csr_count")
        if self.authority is None:
            return CertificateRefused(req.id, "this control plane runs no CA")
        claims = sub.claims
        if claims is None:
            self.refused("no_token", f"proxy {sub.hello.node} asked for a certificate on a "
                         "stream without a join token")
            return CertificateRefused(req.id, "no identity without a join token (join on the "
                                      "TLS discovery port with one)")
        try:
            chain = self.authority.sign(req.csr, claims.namespace, claims.service_account,
                                        req.ttl, datetime.datetime.now(datetime.UTC))
        except CAError as exc:
            self.metrics.inc("citadel_server_csr_sign_error_count", reason="csr")
            log.warning("refused the CSR of proxy %s (%s): %s", sub.hello.node,
                        sub.spiffe_id, exc)
            return CertificateRefused(req.id, str(exc))
        self.metrics.inc("citadel_server_success_cert_issuance_count")
        leaf = chain[0]
        log.info("issued %s to proxy %s: serial %x, expires %s", sub.spiffe_id,
                 sub.hello.node, leaf.serial_number, leaf.not_valid_after_utc.isoformat())
        return Certificate(req.id, pem(chain), self.trust_bundle(), sub.spiffe_id)

    def refused(self, reason: str, detail: str) -> None:
        self.metrics.inc("citadel_server_authentication_failure_count", reason=reason)
        log.warning("identity refused (%s): %s", reason, detail)

    # ---------------------------------------------------------------- root rotation

    async def _list_rotation(self) -> int:
        entry = await self.store.get(rot.KEY)
        rev = await self.store.revision()
        self._rotation_event("put" if entry else "delete", rot.KEY,
                             entry.value if entry else None, rev)
        return rev

    def _rotation_event(self, kind: str, key: str, value: bytes | None, rev: int) -> None:
        """Every replica follows the rotation: its bundle, its signer, its proxies."""
        if key != rot.KEY:
            return
        new = msgspec.json.decode(value, type=rot.Rotation) if kind == "put" and value else None
        old_phase = self.rotation.phase if self.rotation else ""
        self.rotation = new
        phase = new.phase if new else ""
        a = self.authority
        if a is None or phase == old_phase:
            return
        signer_before = a.signer().root_fingerprint
        try:
            if new is None:
                a.promote()  # the leader did it already; here it reloads
            else:
                if a.next is None or a.next.root_fingerprint != new.new_root:
                    a.reload()
                a.phase = phase
        except (CAError, OSError) as exc:
            log.error("root rotation: cannot follow phase %r: %s", phase, exc)
            return
        self._ca_metrics()
        log.info("root rotation phase %s (bundle: %s; signing with %s)", phase or "none",
                 ", ".join(fingerprint(r) for r in a.roots()), a.signer().root_fingerprint)
        self.push.notify({EVERYTHING})  # the bundle may have changed: every proxy's push
        if a.signer().root_fingerprint != signer_before and self.on_signer_change:
            self.on_signer_change()
        if phase == ISSUE_NEW:
            self._renew_soon()

    def _renew_soon(self) -> None:
        async def renew() -> None:
            assert self.authority is not None
            asked = await self.push.renew(self.authority.signer().root_fingerprint,
                                          "root rotation")
            self.metrics.inc("meshproxy_ca_renewals_requested", asked)
        if self._nursery is not None:
            self._nursery.start_soon(renew)

    def _ca_metrics(self) -> None:
        a = self.authority
        if a is None:
            return
        self.metrics.set("citadel_server_root_cert_expiry_timestamp",
                         a.signer().root.not_valid_after_utc.timestamp())
        self.metrics.set("meshproxy_ca_rotation_phase", rot.PHASE_NUMBER.get(a.phase, 0))

    async def rotate_root(self) -> dict[str, Any]:
        """Begin a rotation (the operator's `meshctl ca rotate-root`)."""
        a = self.authority
        assert a is not None
        if self.rotation is not None:
            raise ValueError(f"a root rotation is running (phase {self.rotation.phase})")
        nxt = a.prepare_next(datetime.datetime.now(datetime.UTC))
        now = time.time()
        state = rot.Rotation(TRUST_BOTH, a.current.root_fingerprint, nxt.root_fingerprint,
                             now, now)
        value = msgspec.json.encode(state)
        try:
            rev = await self.store.put(rot.KEY, value, expect=0)
        except Conflict:
            raise ValueError("a root rotation is running") from None
        # Followed here at once (the watch brings the same state again, a no-op), so the
        # operator who asked sees the phase in the very next view.
        self._rotation_event("put", rot.KEY, value, rev)
        log.warning("root rotation begun: %s -> %s", state.old_root, state.new_root)
        return msgspec.to_builtins(state)

    async def _rotate(self) -> None:
        """The leader moves a running rotation on when every proxy applied its phase."""
        assert self.authority is not None
        while True:
            await trio.sleep(rot.INTERVAL)
            state = self.rotation
            if state is None or not self.election.leader:
                continue
            bundle = config_version(b"", self.authority.bundle())
            waiting = rot.holding(state.phase, await self.proxy_status(), bundle,
                                  state.new_root)
            self.rotation_holding = waiting
            if waiting:
                continue
            nxt = rot.following(state.phase)
            entry = await self.store.get(rot.KEY)
            if entry is None:
                continue
            if nxt == rot.DONE:
                self.authority.promote()
                await self.store.delete(rot.KEY, expect=entry.revision)
                log.warning("root rotation done: every proxy trusts and presents %s only",
                            state.new_root)
                continue
            new = msgspec.structs.replace(state, phase=nxt, phase_since=time.time())
            try:
                await self.store.put(rot.KEY, msgspec.json.encode(new), expect=entry.revision)
            except Conflict:
                continue
            log.warning("root rotation: every proxy applied %s; phase %s", state.phase, nxt)

    def ca_view(self) -> dict[str, Any]:
        a = self.authority
        assert a is not None

        def cert(c: Any) -> dict[str, Any]:
            return {"fingerprint": fingerprint(c), "subject": c.subject.rfc4514_string(),
                    "not_after": c.not_valid_after_utc.isoformat()}
        view: dict[str, Any] = {
            "trust_domain": a.trust_domain, "leaf_ttl": a.leaf_ttl,
            "signer": cert(a.signer().cert), "signer_root": a.signer().root_fingerprint,
            "roots": [cert(r) for r in a.roots()], "phase": a.phase,
            "plugged_in": not a.created and a.current.cert != a.current.root,
            "rotation": msgspec.to_builtins(self.rotation) if self.rotation else None,
            "holding": self.rotation_holding if self.rotation else [],
            "bundle_pem": a.bundle().decode()}
        return view

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
