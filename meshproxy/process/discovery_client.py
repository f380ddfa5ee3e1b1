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
  Deregister before the stream closes.
"""

from __future__ import annotations

import logging
import os
import random
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
from meshproxy.config.load import ConfigError, decode
from meshproxy.control.messages import (
    PATH,
    UPGRADE,
    Ack,
    Current,
    Deregister,
    Down,
    FrameReader,
    Heartbeat,
    Hello,
    Nack,
    Push,
    Subscribe,
    config_version,
    encode,
)

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


def load_persisted(path: Path) -> tuple[str, schema.Config] | None:
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
    return p.version, config


def persist(path: Path, version: str, raw: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, msgspec.msgpack.encode(Persisted(version, msgspec.Raw(raw),
                                                      time.time())))
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

    def dump(self) -> dict[str, Any]:
        return {"url": self.url, "replica": self.replica, "connected": self.connected,
                "stale": self.stale,
                "version": self.version, "nonce": self.nonce,
                "last_update": self.last_update or None, "last_error": self.last_error,
                "rejected": self.rejected}


Adopt = Callable[[schema.Config], Awaitable[list[str]]]
Applied = Callable[[], Awaitable[None]]


class DiscoveryClient:
    def __init__(self, url: str, token: str, hello: Hello, persist_path: Path | None,
                 backoff: tuple[float, float] = (BACKOFF_BASE, BACKOFF_CAP)) -> None:
        self.targets: list[tuple[str, int]] = []
        for one in url.split(","):
            u = urlsplit(one.strip())
            if u.scheme != "http" or not u.hostname:
                raise ValueError(f"--control-plane: {one!r} is not http://HOST:PORT")
            self.targets.append((u.hostname, u.port or 15080))
        self._target = 0
        self.token = token
        self.hello = hello
        # The supervisor's, bound when it takes this client (Supervisor.__init__).
        self.adopt: Adopt | None = None
        self.applied: Applied | None = None
        self.persist_path = persist_path
        self.base, self.cap = backoff
        self.state = ClientState(url, version=hello.version)
        self._stream: trio.SocketStream | None = None
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
        self.state.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("control plane %s: %s", self.state.url, self.state.last_error)

    def _lost(self) -> None:
        if self.state.connected:
            log.warning("lost the control plane %s; serving config version %s (stale)",
                        self.state.url, self.state.version or "none")
        self.state.connected = False
        self.state.stale = True
        self._stream = None

    async def _connect(self) -> tuple[trio.SocketStream, bytes]:
        host, port = self.targets[self._target]
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
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
                    conn.receive_data(data)
                    continue
                if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
                    return stream, bytes(conn.trailing_data[0])
                if isinstance(ev, h11.Response):
                    await stream.aclose()
                    raise ValueError(f"the control plane answered {ev.status_code} to the "
                                     f"discovery upgrade")

    async def _session(self) -> None:
        stream, leftover = await self._connect()
        self._stream = stream
        self.state.connects += 1
        hello = msgspec.structs.replace(self.hello, version=self.state.version)
        await stream.send_all(encode(hello))
        if self._wanted:
            await stream.send_all(encode(Subscribe(sorted(self._wanted))))
        self.state.connected = True
        host, port = self.targets[self._target]
        self.state.replica = f"{host}:{port}"
        log.info("connected to the control plane at %s (serving version %s)",
                 self.state.replica, self.state.version or "none")
        reader = FrameReader(Down)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeats, stream)
                pending = reader.feed(leftover)
                while True:
                    for msg in pending:
                        await self._on(stream, msg)
                    data = await stream.receive_some(65536)
                    if not data:
                        raise trio.BrokenResourceError("the control plane closed the stream")
                    pending = reader.feed(data)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _heartbeats(self, stream: trio.SocketStream) -> None:
        while True:
            await trio.sleep(self.hello.lease_ttl / 3)
            await stream.send_all(encode(Heartbeat()))

    async def _on(self, stream: trio.SocketStream, msg: Push | Current) -> None:
        if isinstance(msg, Current):
            if msg.version == self.state.version:
                self.state.stale = False
            return
        errors = await self._apply(msg)
        self.state.nonce = msg.nonce
        if errors:
            self.state.update_rejected += 1
            self.state.rejected = errors
            log.error("rejected config version %s from the control plane, the version in "
                      "service (%s) stays: %s", msg.version, self.state.version or "none",
                      "; ".join(errors))
            await stream.send_all(encode(Nack(msg.nonce, msg.version, errors)))
            return
        self.state.update_success += 1
        self.state.rejected = []
        self.state.version = msg.version
        self.state.stale = False
        self.state.last_update = time.time()
        await stream.send_all(encode(Ack(msg.nonce, msg.version)))

    async def _apply(self, push: Push) -> list[str]:
        raw = bytes(push.config)
        if config_version(raw) != push.version:
            return [f"(push): the config does not hash to its version {push.version}"]
        try:
            config = decode(msgspec.msgpack.decode(raw), "push")
        except ConfigError as exc:
            return exc.errors
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return [f"(push): undecodable config: {exc}"]
        assert self.adopt is not None and self.applied is not None, "not bound"
        errors = await self.adopt(config)
        if errors:
            return errors
        await self.applied()  # every worker serves it: only now is it ACKed
        if self.persist_path is not None:
            try:
                persist(self.persist_path, push.version, raw)
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
                await self._stream.send_all(encode(Subscribe(sorted(new))))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def deregister(self) -> None:
        """Graceful shutdown: the workload drains at once, everywhere."""
        if self._stream is None:
            return
        with trio.move_on_after(1):
            try:
                await self._stream.send_all(encode(Deregister()))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

