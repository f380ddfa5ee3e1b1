"""The proxy's side of the control plane (`meshproxy run --control-plane URL`): one
discovery stream (control/messages.py), pushes applied by every worker before they are
ACKed, NACKs that keep the last good config, and that config persisted so that a proxy
restarted while the control plane is down serves at once (static stability).

Rules:
- the supervisor owns the config; this client only turns a Push into `adopt(config)`
  (checked, compiled, sent to the workers) and `applied(version)` (every worker reports the
  local version in its stats slab), then answers Ack; any error on the way is a Nack with
  the field paths, and nothing the workers serve changes;
- the last good config is written (mode 0600, atomically: a temporary file renamed) after
  every Ack; on start it is served, marked stale, until the control plane confirms or
  replaces it;
- a broken stream is reopened after a jittered exponential back-off (Envoy's: a random
  delay below min(cap, base x 2^attempt), 1 s base and 30 s cap by default), reset once a
  stream is established; while disconnected the config in service stays, marked stale;
- heartbeats go every lease_ttl / 3 (the registry's renewal), a graceful stop sends
  Deregister before the stream closes;
- identity (`https://` control plane, with a join token): the control plane's certificate
  is verified against `--ca-bundle` and the trust bundle it last pushed (so a root
  rotation does not lock the proxy out); a CSR goes as soon as the stream opens, and again
  at each renewal time (process/identity.py) or when asked (Renew); a pushed config that
  needs the identity waits for it (Envoy's listener warming), then is applied and ACKed.

Size: past 400 lines because the stream, the back-off, the heartbeats and the identity
renewal share one connection's state; each is a short loop over it.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import msgspec
import trio

from meshproxy.config import schema
from meshproxy.config.load import ConfigError, decode, tls_files
from meshproxy.control.messages import (
    PATH,
    UPGRADE,
    Ack,
    Certificate,
    CertificateRefused,
    CertificateRequest,
    Current,
    Deregister,
    Down,
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
)
from meshproxy.process import identity as ident

log = logging.getLogger("meshproxy.discovery")

_NETWORK = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError,
            h11.ProtocolError, ValueError, msgspec.DecodeError)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


CONNECT_TIMEOUT = 5.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0


class Persisted(msgspec.Struct, frozen=True):
    version: str
    config: msgspec.Raw  # encode_config bytes
    saved_at: float
    trust_bundle: bytes = b""  # public roots; the identity's key is never persisted


def load_persisted(path: Path) -> tuple[str, schema.Config, bytes] | None:
    """The last good config written by a previous run, or None (absent or unreadable:
    said, then ignored)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the persisted config %s: %s", path, exc.strerror)
        return None
    try:
        p = msgspec.msgpack.decode(data, type=Persisted)
        config = decode(msgspec.msgpack.decode(p.config), str(path))
    except (msgspec.DecodeError, msgspec.ValidationError, ConfigError) as exc:
        log.warning("the persisted config %s is unusable, ignored: %s", path, exc)
        return None
    return p.version, config, p.trust_bundle


def needs_identity(config: schema.Config) -> bool:
    return any(path.startswith("sds:") for _, path in tls_files(config))


def persist(path: Path, version: str, raw: bytes, trust_bundle: bytes = b"") -> None:
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, msgspec.msgpack.encode(Persisted(version, msgspec.Raw(raw),
                                                      time.time(), trust_bundle)))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class ClientState:
    """What /config_dump and the stats say about the control plane."""

    url: str
    replica: str = ""  # HOST:PORT of the replica of the last stream
    connected: bool = False
    stale: bool = True
    version: str = ""  # the control plane's version of the config in service
    nonce: str = ""
    last_update: float = 0.0  # wall clock
    last_error: str = ""
    rejected: list[str] = field(default_factory=list)
    update_success: int = 0
    update_rejected: int = 0
    connects: int = 0
    persisted_from: float = 0.0  # when the persisted config in service was saved
    identity: dict[str, Any] | None = None  # Identity.describe() of the one in service
    identity_error: str = ""
    renewals: int = 0

    def dump(self) -> dict[str, Any]:
        return {"url": self.url, "replica": self.replica, "connected": self.connected,
                "stale": self.stale, "identity": self.identity,
                "identity_error": self.identity_error,
                "version": self.version, "nonce": self.nonce,
                "last_update": self.last_update or None, "last_error": self.last_error,
                "rejected": self.rejected}


Adopt = Callable[[schema.Config, bytes], Awaitable[list[str]]]
Applied = Callable[[], Awaitable[None]]
Install = Callable[[ident.Identity], Awaitable[list[str]]]


class DiscoveryClient:
    def __init__(self, url: str, token: str, hello: Hello, persist_path: Path | None,
                 backoff: tuple[float, float] = (BACKOFF_BASE, BACKOFF_CAP),
                 ca_bundle: bytes | None = None, trust_bundle: bytes = b"",
                 renew_jitter: float = ident.RENEW_JITTER) -> None:
        self.targets: list[tuple[str, int]] = []
        schemes = set()
        for one in url.split(","):
            u = urlsplit(one.strip())
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"--control-plane: {one!r} is not http(s)://HOST:PORT")
            schemes.add(u.scheme)
            self.targets.append((u.hostname, u.port or (15012 if u.scheme == "https"
                                                        else 15080)))
        if len(schemes) > 1:
            raise ValueError("--control-plane: every URL http:// or every one https://")
        # https: the control plane's certificate is verified, and the proxy gets its
        # mesh identity over the stream.
        self.secure = schemes == {"https"}
        if self.secure and not ca_bundle:
            raise ValueError("an https:// control plane needs --ca-bundle (the roots its "
                             "certificate is verified against)")
        self.ca_bundle = ca_bundle or b""
        self.trust_bundle = trust_bundle  # the last pushed, also trusted for the above
        self.renew_jitter = renew_jitter
        self.install: Install | None = None
        self.identity: ident.Identity | None = None
        self._csr: tuple[str, bytes] | None = None  # (id, key PEM) of the request out
        self._answered = trio.Event()
        self._renew_now = trio.Event()
        self._parked: Push | None = None  # a push waiting for the identity
        self._send_lock = trio.Lock()
        self._target = 0
        self.token = token
        self.hello = hello
        # The supervisor's, bound when it takes this client (Supervisor.__init__).
        self.adopt: Adopt | None = None
        self.applied: Applied | None = None
        self.persist_path = persist_path
        self.base, self.cap = backoff
        self.state = ClientState(url, version=hello.version)
        self._stream: trio.abc.Stream | None = None
        self._wanted: set[str] = set()

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
            except* _NETWORK as group:
                self._failed(group)
            except* Exception as group:  # a defect: said, and the proxy keeps serving
                log.exception("discovery client failed", exc_info=group)
                self._failed(group)
            if self.state.connected:
                attempt = 0  # it was established: start the back-off again
            self._lost()
            # Replicas serve alike: the next attempt goes to the next one.
            self._target = (self._target + 1) % len(self.targets)
            delay = random.uniform(0, min(self.cap, self.base * 2 ** attempt))
            attempt += 1
            log.info("reconnecting to the control plane in %.2f s", delay)
            await trio.sleep(delay)

    def _failed(self, group: BaseExceptionGroup) -> None:
        exc = _leaf(group)
        # trio's TLS and stream errors carry the reason as their cause (the certificate
        # that failed verification, the reset): say it.
        while not str(exc) and exc.__cause__ is not None:
            exc = exc.__cause__
        self.state.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("control plane %s: %s", self.state.url, self.state.last_error)

    def _lost(self) -> None:
        if self.state.connected:
            log.warning("lost the control plane %s; serving config version %s (stale)",
                        self.state.url, self.state.version or "none")
        self.state.connected = False
        self.state.stale = True
        self._stream = None

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=(self.ca_bundle + b"\n" + self.trust_bundle)
                                         .decode("ascii", "replace"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def _connect(self) -> tuple[trio.abc.Stream, bytes]:
        host, port = self.targets[self._target]
        with trio.fail_after(CONNECT_TIMEOUT):
            stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            if self.secure:
                tls = trio.SSLStream(stream, self._tls_context(), server_hostname=host)
                try:
                    await tls.do_handshake()
                except BaseException:
                    await stream.aclose()
                    raise
                stream = tls
            conn = h11.Connection(h11.CLIENT)
            await stream.send_all(conn.send(h11.Request(
                method="GET", target=PATH,
                headers=[("host", f"{host}:{port}"),
                         ("authorization", f"Bearer {self.token}"),
                         ("connection", "upgrade"), ("upgrade", UPGRADE)])))
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise trio.BrokenResourceError("closed before answering")
                    conn.receive_data(bytes(data))
                    continue
                if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
                    return stream, bytes(conn.trailing_data[0])
                if isinstance(ev, h11.Response):
                    await stream.aclose()
                    raise ValueError(f"the control plane answered {ev.status_code} to the "
                                     f"discovery upgrade")

    async def _send(self, stream: trio.abc.Stream, msg: Up) -> None:
        async with self._send_lock:  # heartbeats, answers and CSRs share the stream
            await stream.send_all(encode(msg))

    async def _session(self) -> None:
        stream, leftover = await self._connect()
        self._stream = stream
        self.state.connects += 1
        hello = msgspec.structs.replace(
            self.hello, version=self.state.version,
            identity_root=self.identity.root if self.identity else "")
        await self._send(stream, hello)
        if self._wanted:
            await self._send(stream, Subscribe(sorted(self._wanted)))
        self.state.connected = True
        host, port = self.targets[self._target]
        self.state.replica = f"{host}:{port}"
        log.info("connected to the control plane at %s (serving version %s)",
                 self.state.replica, self.state.version or "none")
        reader = FrameReader(Down)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, stream)
                if self.secure:
                    nursery.start_soon(self._renewals, stream)
                pending = reader.feed(leftover)
                while True:
                    for msg in pending:
                        await self._on(stream, msg)
                    data = await stream.receive_some(65536)
                    if not data:
                        raise trio.BrokenResourceError("the control plane closed the stream")
                    pending = reader.feed(data)
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    await stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _heartbeats(self, stream: trio.abc.Stream) -> None:
        while True:
            await trio.sleep(self.hello.lease_ttl / 3)
            await self._send(stream, Heartbeat())

    # ---------------------------------------------------------------- identity

    async def _renewals(self, stream: trio.abc.Stream) -> None:
        """A certificate at once when there is none, then at each renewal time or when
        asked; a failure is retried after a back-off, well before expiry."""
        attempt = 0
        while True:
            now = time.time()
            have = self.identity
            if have is not None and now < have.renew_at and not self._renew_now.is_set():
                with trio.move_on_after(have.renew_at - now):
                    await self._renew_now.wait()
                continue
            self._renew_now = trio.Event()
            key_pem, csr_pem = ident.new_request()
            req_id = secrets.token_hex(6)
            self._csr = (req_id, key_pem)
            self._answered = trio.Event()
            await self._send(stream, CertificateRequest(req_id, csr_pem))
            with trio.move_on_after(ident.ANSWER_TIMEOUT):
                await self._answered.wait()
            if self.identity is not None and self.identity is not have:
                attempt = 0
                continue
            self._csr = None
            delay = ident.retry_delay(attempt, time.time(),
                                      have.not_after if have else None)
            attempt += 1
            log.warning("no certificate from the control plane (%s); asking again in %.1f s",
                        self.state.identity_error or "no answer", delay)
            await trio.sleep(delay)

    async def _certificate(self, stream: trio.abc.Stream,
                           msg: Certificate | CertificateRefused) -> None:
        if self._csr is None or msg.id != self._csr[0]:
            return  # the answer to a request given up on
        key_pem = self._csr[1]
        self._csr = None
        try:
            if isinstance(msg, CertificateRefused):
                self.state.identity_error = f"refused: {msg.reason}"
                log.error("the control plane refused this proxy's CSR: %s", msg.reason)
                return
            try:
                new = ident.accept(msg.chain, key_pem, msg.trust_bundle, self.renew_jitter)
            except ident.IdentityError as exc:
                self.state.identity_error = str(exc)
                log.error("unusable certificate from the control plane: %s", exc)
                return
            assert self.install is not None and self.applied is not None, "not bound"
            errors = await self.install(new)
            if errors:
                self.state.identity_error = "; ".join(errors)
                return
            await self.applied()
            first = self.identity is None
            self.identity = new
            self.trust_bundle = msg.trust_bundle
            self.state.identity = new.describe()
            self.state.identity_error = ""
            self.state.renewals += 0 if first else 1
            await self._send(stream, IdentityStatus(new.spiffe_id, new.serial, new.not_after,
                                                    new.renew_at, new.root))
            if self._parked is not None:
                parked, self._parked = self._parked, None
                await self._on(stream, parked)
        finally:
            self._answered.set()

    # ---------------------------------------------------------------- pushes

    async def _on(self, stream: trio.abc.Stream, msg: Any) -> None:
        if isinstance(msg, (Certificate, CertificateRefused)):
            await self._certificate(stream, msg)
            return
        if isinstance(msg, Renew):
            log.info("the control plane asks for a new certificate now (%s)", msg.reason)
            self._renew_now.set()
            return
        if isinstance(msg, Current):
            if msg.version == self.state.version:
                self.state.stale = False
            return
        errors = await self._apply(msg)
        if errors is None:
            return  # parked until the identity is in service
        self.state.nonce = msg.nonce
        if errors:
            self.state.update_rejected += 1
            self.state.rejected = errors
            log.error("rejected config version %s from the control plane, the version in "
                      "service (%s) stays: %s", msg.version, self.state.version or "none",
                      "; ".join(errors))
            await self._send(stream, Nack(msg.nonce, msg.version, errors))
            return
        self.state.update_success += 1
        self.state.rejected = []
        self.state.version = msg.version
        self.state.stale = False
        self.state.last_update = time.time()
        await self._send(stream, Ack(msg.nonce, msg.version))

    async def _apply(self, push: Push) -> list[str] | None:
        """Errors, [] when applied, None when parked (it needs the identity)."""
        raw = bytes(push.config)
        if config_version(raw, push.trust_bundle) != push.version:
            return [f"(push): the config does not hash to its version {push.version}"]
        try:
            config = decode(msgspec.msgpack.decode(raw), "push")
        except ConfigError as exc:
            return exc.errors
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return [f"(push): undecodable config: {exc}"]
        if self.identity is None and needs_identity(config):
            log.info("config version %s waits for this proxy's certificate", push.version)
            self._parked = push
            return None
        assert self.adopt is not None and self.applied is not None, "not bound"
        errors = await self.adopt(config, push.trust_bundle)
        if errors:
            return errors
        await self.applied()  # every worker serves it: only now is it ACKed
        if push.trust_bundle:
            self.trust_bundle = push.trust_bundle
        if self.persist_path is not None:
            try:
                persist(self.persist_path, push.version, raw, push.trust_bundle)
            except OSError as exc:
                log.warning("cannot persist the config to %s: %s", self.persist_path,
                            exc.strerror)
        return []

    async def subscribe(self, services: set[str]) -> None:
        """On demand: ask for services this proxy was asked for and does not have."""
        new = services - self._wanted
        if not new:
            return
        self._wanted |= new
        if self._stream is not None:
            try:
                await self._send(self._stream, Subscribe(sorted(new)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def deregister(self) -> None:
        """Graceful shutdown: the workload drains at once, everywhere."""
        if self._stream is None:
            return
        with trio.move_on_after(1):
            try:
                await self._send(self._stream, Deregister())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

