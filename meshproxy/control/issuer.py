"""The control plane's identity duties for one replica: signing its proxies' CSRs with the
CA (control/ca.py) for the identity their stream authenticated, counting what it refuses,
and root rotation (control/rotation.py): every replica follows the rotation's state in the
store (its bundle, its signer, renewals for its own proxies); the one holding the
election lease moves it on."""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

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
from meshproxy.control.push import EVERYTHING, PushServer, Subscription
from meshproxy.control.store import Conflict, Store

log = logging.getLogger("meshproxy.control.issuer")


class Issuer:
    def __init__(self, store: Store, authority: Authority | None, metrics: Metrics,
                 push: PushServer, election: Election,
                 proxy_status: Callable[[], Awaitable[list[dict[str, Any]]]]) -> None:
        self.store = store
        self.authority = authority
        self.metrics = metrics
        self.push = push
        self.election = election
        self.proxy_status = proxy_status
        self.rotation: rot.Rotation | None = None
        self.rotation_holding: list[str] = []  # nodes the leader waits for, last it looked
        # Called when the signing CA changes (the control plane re-issues its own
        # serving certificate from it).
        self.on_signer_change: Any = None
        self.nursery: trio.Nursery | None = None
        self._ca_metrics()

    async def hello(self, sub: Subscription) -> None:
        a = self.authority
        if (a is not None and sub.claims is not None and sub.identity_root
                and sub.identity_root != a.signer().root_fingerprint and a.phase):
            # A proxy back from away during a rotation: a leaf of the root being left.
            await self.push.renew(a.signer().root_fingerprint, "root rotation", sub)

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

    async def list_rotation(self) -> int:
        entry = await self.store.get(rot.KEY)
        rev = await self.store.revision()
        self.rotation_event("put" if entry else "delete", rot.KEY,
                             entry.value if entry else None, rev)
        return rev

    def rotation_event(self, kind: str, key: str, value: bytes | None, rev: int) -> None:
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
        if self.nursery is not None:
            self.nursery.start_soon(renew)

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
        self.rotation_event("put", rot.KEY, value, rev)
        log.warning("root rotation begun: %s -> %s", state.old_root, state.new_root)
        return msgspec.to_builtins(state)

    async def rotate(self) -> None:
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

