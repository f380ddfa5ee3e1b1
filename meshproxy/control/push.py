"""Push: one subscription per connected proxy, debounced changes, nonces, ACK/NACK, and what
`meshctl proxy-status` shows (DESIGN.md section 7; the messages are control/messages.py).

Rules:
- changes are debounced per service: a service's changes go out after DEBOUNCE_AFTER of
  quiet on it or DEBOUNCE_MAX after its first (istiod's PILOT_DEBOUNCE_AFTER 100 ms and
  PILOT_DEBOUNCE_MAX 10 s); then every subscription whose config depends on it is marked
  dirty;
- a subscription has at most one push in flight; a dirty one is translated again when its
  answer arrives, so changes coalesce per proxy and the latest wins; translations and sends
  run at most MAX_CONCURRENT_PUSHES at a time (istiod's PILOT_PUSH_THROTTLE is 100);
- a push whose version (content hash) the proxy already serves is not sent: on reconnect a
  proxy says its version in Hello, so a replica it moves to resends nothing unchanged;
- an answer carrying a nonce other than the latest push's is stale: counted, ignored;
- a NACKed version is not sent again: the proxy keeps its last good config, the status says
  NACKED with the errors, and the next change that yields another version is pushed.

Size: just past 400 lines: the debounce, the per-subscription state and the stream loop
share the subscription's fields and its lock.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from meshproxy.control.messages import (
    Ack,
    Certificate,
    CertificateRefused,
    CertificateRequest,
    Current,
    Deregister,
    FrameReader,
    Heartbeat,
    Hello,
    IdentityStatus,
    Nack,
    Push,
    Renew,
    Subscribe,
    Up,
    config_version,
    encode,
    encode_config,
)
from meshproxy.control.metrics import Metrics
from meshproxy.control.resources import WorkloadSpec
from meshproxy.control.tokens import Claims
from meshproxy.control.translate import MeshIndex, ProxyNode, service_key, translate

log = logging.getLogger("meshproxy.control.push")

DEBOUNCE_AFTER = 0.1
DEBOUNCE_MAX = 10.0
MAX_CONCURRENT_PUSHES = 100
# A proxy has this long after connecting to say Hello.
HELLO_TIMEOUT = 10.0
# A stream silent for three missed heartbeats of the longest TTL is dead.
READ_TIMEOUT_TTLS = 1.5
# Any change at all: every subscription depends on it (inbound policies, for now).
EVERYTHING = "*"
# How long an on-demand request waits for the config that serves it (Envoy's on-demand
# default is 5 s too), and how many services one proxy may ask for: a client sending made-up
# Host headers cannot make its proxy's config (and its pushes) grow without bound.
ON_DEMAND_TIMEOUT = 5.0
MAX_SCOPE = 1024


@dataclass(eq=False)
class Subscription:
    hello: Hello
    node: ProxyNode
    stream: trio.abc.Stream
    connected_at: float  # wall clock
    proxy_version: str  # what the proxy serves: its Hello's, then each one it ACKs
    sent_version: str = ""
    sent_nonce: str = ""
    sent_at: float = 0.0  # wall clock
    in_flight: bool = False
    acked_at: float = 0.0
    nack_version: str = ""
    nack_errors: list[str] = field(default_factory=list)
    dirty: bool = True
    changed_since: float | None = None  # trio time of the oldest change not yet pushed
    pushed_change: float | None = None  # the same, for the push in flight
    convergence: float | None = None  # seconds, of the last change it applied
    deps: set[str] = field(default_factory=set)
    wake: trio.Event = field(default_factory=trio.Event)
    last_seen: float = 0.0  # wall clock
    # Who the proxy proved to be (its join token on the TLS port); None: no identity.
    claims: Claims | None = None
    spiffe_id: str = ""
    identity: IdentityStatus | None = None  # the certificate every worker serves
    identity_root: str = ""  # the root of that certificate (Hello's, then each status)
    sent_bundle: str = ""  # hash of the trust bundle of the push in flight
    bundle: str = ""  # ... of the last push the proxy ACKed (root rotation waits on it)
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    # The proxy serves a config (Hello's `ready`, else its first ACK): until then its
    # workload is registered "starting", and callers are not sent to it.
    ready: bool = True

    def poke(self) -> None:
        self.wake.set()

    async def send(self, frame: bytes) -> None:
        """One whole frame: the pusher, the answers and the renewals share the stream."""
        async with self.send_lock:
            await self.stream.send_all(frame)

    def status(self, replica: str, connected: bool) -> dict[str, Any]:
        return {"node": self.hello.node, "namespace": self.hello.namespace,
                "service": self.hello.service, "replica": replica, "connected": connected,
                "version": self.proxy_version, "sent_version": self.sent_version,
                "sent_nonce": self.sent_nonce, "sent_at": self.sent_at,
                "in_flight": self.in_flight, "acked_at": self.acked_at,
                "nack_version": self.nack_version, "nack_errors": self.nack_errors,
                "connected_at": self.connected_at, "last_seen": self.last_seen,
                "convergence": self.convergence, "workers": self.hello.workers,
                "lease_ttl": self.hello.lease_ttl, "spiffe_id": self.spiffe_id,
                "identity": msgspec.to_builtins(self.identity) if self.identity else None,
                "identity_root": self.identity_root, "bundle": self.bundle}


class Hooks:
    """What the replica does when a proxy speaks (registry I/O, status records)."""

    async def hello(self, sub: Subscription) -> None: ...

    async def heartbeat(self, sub: Subscription) -> None: ...

    async def deregister(self, sub: Subscription) -> None: ...

    async def closed(self, sub: Subscription, current: bool) -> None: ...

    def status_changed(self, sub: Subscription) -> None: ...

    def trust_bundle(self) -> bytes:
        """The PEM roots pushed to proxies with an identity."""
        return b""

    def sign(self, sub: Subscription, req: CertificateRequest
             ) -> Certificate | CertificateRefused:
        return CertificateRefused(req.id, "this control plane has no CA")

    def refused(self, reason: str, detail: str) -> None:
        """An identity attempt without a valid token: logged and counted by the replica."""


def scope_of(hello: Hello) -> frozenset[str] | None:
    if hello.prefetch is None:
        return None
    return frozenset(service_key(s, hello.namespace) for s in hello.prefetch)


class PushServer:
    def __init__(self, index: MeshIndex, metrics: Metrics, hooks: Hooks,
                 max_concurrent: int = MAX_CONCURRENT_PUSHES) -> None:
        self.index = index
        self.metrics = metrics
        self.hooks = hooks
        self.subscriptions: dict[str, Subscription] = {}
        self._limiter = trio.CapacityLimiter(max_concurrent)
        self._pending: dict[str, tuple[float, float]] = {}  # svc -> (first, last) change
        self._changed = trio.Event()

    # ---------------------------------------------------------------- changes

    def notify(self, services: set[str]) -> None:
        """Services ("ns/name", or EVERYTHING) changed in the store just now."""
        if not services:
            return
        now = trio.current_time()
        for svc in services:
            first, _ = self._pending.get(svc, (now, now))
            self._pending[svc] = (first, now)
        self._changed.set()

    async def debounce(self) -> None:
        """Per service: its changes wait for DEBOUNCE_AFTER of quiet (of that service) or
        DEBOUNCE_MAX after its first, then go to the subscriptions that depend on it. Per
        service rather than for the whole replica (istiod's): a steady stream of changes
        elsewhere in the mesh (10 a second is no quiet at all) never holds a proxy's push
        up to the cap. A new change never makes the earliest due time earlier (its own is
        DEBOUNCE_AFTER away, every other's at most that), so one sleep suffices."""
        while True:
            if not self._pending:
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            due = min(min(last + DEBOUNCE_AFTER, first + DEBOUNCE_MAX)
                      for first, last in self._pending.values())
            await trio.sleep_until(due)
            now = trio.current_time()
            ready = {svc: first for svc, (first, last) in self._pending.items()
                     if now >= min(last + DEBOUNCE_AFTER, first + DEBOUNCE_MAX)}
            for svc in ready:
                del self._pending[svc]
            for first in ready.values():
                self.metrics.debounce.observe(now - first)
            if ready:
                self._flush(ready)

    def _flush(self, ready: dict[str, float]) -> None:
        everything = EVERYTHING in ready
        changed = set(ready)
        since = min(ready.values())
        for sub in self.subscriptions.values():
            if everything or sub.node.scope is None or sub.deps & changed:
                sub.dirty = True
                if sub.changed_since is None:
                    sub.changed_since = since
                sub.poke()

    # ---------------------------------------------------------------- one proxy

    async def serve(self, stream: trio.abc.Stream, leftover: bytes, replica: str,
                    claims: Claims | None = None, spiffe_id: str = "") -> None:
        """A discovery stream after its upgrade: Hello, then pushes and answers until it
        closes. `claims`: the join token it was opened with (checked by the API)."""
        reader = FrameReader(Up)
        pending: list[Any] = reader.feed(leftover) if leftover else []
        with trio.move_on_after(HELLO_TIMEOUT):
            while not pending:
                data = await stream.receive_some(65536)
                if not data:
                    return
                pending = reader.feed(data)
        if not pending or not isinstance(pending[0], Hello):
            log.warning("a discovery stream did not open with Hello; closed")
            return
        hello: Hello = pending.pop(0)
        if claims is not None and (hello.namespace, hello.service_account) != (
                claims.namespace, claims.service_account):
            # A token is one service account's: it cannot register, or be issued, another.
            self.hooks.refused("identity", f"proxy {hello.node} holds a token for "
                               f"{claims.namespace}/{claims.service_account} and said it is "
                               f"{hello.namespace}/{hello.service_account}")
            return
        now = time.time()
        workload = None
        if hello.service is not None and hello.port is not None:
            workload = WorkloadSpec(service=hello.service, address=hello.address,
                                    port=hello.port, labels=dict(hello.labels),
                                    service_account=hello.service_account, identity=spiffe_id)
        node = ProxyNode(hello.node, hello.namespace, hello.outbound_address,
                         hello.outbound_port, scope_of(hello),
                         ON_DEMAND_TIMEOUT if hello.on_demand and hello.prefetch is not None
                         else 0.0, workload, hello.address, hello.inbound_port or 0,
                         mtls=claims is not None, intercept=hello.intercept,
                         outbound_traffic_policy=hello.outbound_traffic_policy)
        sub = Subscription(hello, node, stream, now, hello.version, last_seen=now,
                           claims=claims, spiffe_id=spiffe_id,
                           identity_root=hello.identity_root, ready=hello.ready)
        old = self.subscriptions.get(hello.node)
        if old is not None:  # the proxy reconnected here before the old stream broke
            await old.stream.aclose()
        self.subscriptions[hello.node] = sub
        self.metrics.set("pilot_xds", len(self.subscriptions))
        log.info("proxy %s connected (service %s, serving version %s)", hello.node,
                 hello.service, hello.version or "none")
        await self.hooks.hello(sub)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pusher, sub)
                for msg in pending:
                    await self._answer(sub, msg)
                await self._read(sub, reader, nursery)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
                 ValueError, msgspec.DecodeError, OSError) as group:
            log.info("proxy %s stream ended: %r", hello.node, group.exceptions[0])
        except* Exception as group:  # a defect: one proxy's stream, not the control plane
            log.exception("proxy %s stream failed", hello.node, exc_info=group)
        finally:
            current = self.subscriptions.get(hello.node) is sub
            if current:
                del self.subscriptions[hello.node]
            self.metrics.set("pilot_xds", len(self.subscriptions))
            with trio.CancelScope(shield=True):
                await self.hooks.closed(sub, current)

    async def _read(self, sub: Subscription, reader: FrameReader,
                    nursery: trio.Nursery) -> None:
        timeout = max(5.0, sub.hello.lease_ttl * READ_TIMEOUT_TTLS)
        while True:
            with trio.fail_after(timeout):
                data = await sub.stream.receive_some(65536)
            if not data:
                log.info("proxy %s closed its stream", sub.hello.node)
                nursery.cancel_scope.cancel()
                return
            sub.last_seen = time.time()
            for msg in reader.feed(data):
                await self._answer(sub, msg)

    async def _answer(self, sub: Subscription, msg: Any) -> None:
        if isinstance(msg, (Ack, Nack)):
            if msg.nonce != sub.sent_nonce or not sub.in_flight:
                self.metrics.inc("pilot_xds_expired_nonce")
                log.debug("proxy %s: stale nonce %s ignored", sub.hello.node, msg.nonce)
                return
            sub.in_flight = False
            if isinstance(msg, Ack):
                sub.proxy_version = msg.version
                sub.bundle = sub.sent_bundle
                sub.acked_at = time.time()
                sub.nack_version, sub.nack_errors = "", []
                if not sub.ready:
                    sub.ready = True
                    await self.hooks.heartbeat(sub)  # registered "up" now
                if sub.pushed_change is not None:
                    sub.convergence = trio.current_time() - sub.pushed_change
                    self.metrics.convergence.observe(sub.convergence)
            else:
                sub.nack_version, sub.nack_errors = msg.version, list(msg.errors)
                self.metrics.inc("pilot_total_xds_rejects")
                log.warning("proxy %s rejected version %s: %s", sub.hello.node, msg.version,
                            "; ".join(msg.errors))
            sub.pushed_change = None
            self.hooks.status_changed(sub)
            sub.poke()
        elif isinstance(msg, Heartbeat):
            self.metrics.inc("meshproxy_registry_heartbeats")
            await self.hooks.heartbeat(sub)
        elif isinstance(msg, Subscribe):
            wanted = frozenset(service_key(s, sub.hello.namespace) for s in msg.services)
            scope = sub.node.scope
            if sub.node.on_demand_timeout and scope is not None and not wanted <= scope:
                room = max(0, MAX_SCOPE - len(scope))
                added = sorted(wanted - scope)[:room]
                if not added:
                    log.warning("proxy %s asked for more than %d services; refused",
                                sub.hello.node, MAX_SCOPE)
                    return
                sub.node = dataclasses.replace(sub.node, scope=scope | frozenset(added))
                sub.dirty = True
                if sub.changed_since is None:
                    sub.changed_since = trio.current_time()
                sub.poke()
        elif isinstance(msg, Deregister):
            await self.hooks.deregister(sub)
        elif isinstance(msg, CertificateRequest):
            await sub.send(encode(self.hooks.sign(sub, msg)))
        elif isinstance(msg, IdentityStatus):
            sub.identity, sub.identity_root = msg, msg.root
            self.hooks.status_changed(sub)
        elif isinstance(msg, Hello):
            log.warning("proxy %s sent Hello twice; ignored", sub.hello.node)

    async def _pusher(self, sub: Subscription) -> None:
        while True:
            if sub.dirty and not sub.in_flight:
                sub.dirty = False
                async with self._limiter:
                    await self._push(sub)
            await sub.wake.wait()
            sub.wake = trio.Event()

    async def _push(self, sub: Subscription) -> None:
        started = trio.current_time()
        tr = translate(self.index, sub.node)
        sub.deps = tr.deps
        raw = encode_config(tr.config)
        bundle = self.hooks.trust_bundle() if sub.claims is not None else b""
        version = config_version(raw, bundle)
        bundle_hash = config_version(b"", bundle) if bundle else ""
        if version == sub.proxy_version or version == sub.nack_version:
            # It already serves it (or refused exactly this): nothing to send.
            if version == sub.proxy_version:
                sub.changed_since = None
                if sub.bundle != bundle_hash:  # a reconnect: its Hello said this version
                    sub.bundle = bundle_hash
                    self.hooks.status_changed(sub)
                await sub.send(encode(Current(version)))
            self.metrics.inc("pilot_xds_push_skipped")
            if not sub.sent_version:
                sub.sent_version = version
                self.hooks.status_changed(sub)
            return
        nonce = secrets.token_hex(8)
        frame = encode(Push(nonce, version, msgspec.Raw(raw), tr.warnings, bundle))
        sub.sent_version, sub.sent_nonce, sub.sent_at = version, nonce, time.time()
        sub.sent_bundle = bundle_hash
        sub.in_flight = True
        sub.pushed_change, sub.changed_since = sub.changed_since, None
        try:
            await sub.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.metrics.inc("pilot_xds_pushes_failed")
            raise
        self.metrics.inc("pilot_xds_pushes", type="config")
        self.metrics.inc("pilot_xds_push_bytes", len(frame))
        self.metrics.push_time.observe(trio.current_time() - started)
        self.hooks.status_changed(sub)
        log.debug("pushed version %s (%d bytes, nonce %s) to %s", version, len(frame), nonce,
                  sub.hello.node)


    async def renew(self, root: str, reason: str, only: Subscription | None = None) -> int:
        """Ask every proxy (or `only` one) with an identity whose certificate is not from
        `root` for a new one now (a root rotation's second phase); how many were asked."""
        asked = 0
        for sub in [only] if only is not None else list(self.subscriptions.values()):
            if sub.claims is not None and sub.identity_root != root:
                try:
                    await sub.send(encode(Renew(reason)))
                    asked += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        return asked
