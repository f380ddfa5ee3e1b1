"""The supervisor: one process owning the config, the stats segment, the admin server and
the worker pool (DESIGN.md section 1).

Workers are separate Python processes (`meshproxy.process.worker_process`), each with its
own trio loop and its own SO_REUSEPORT socket on every listener. The supervisor:
- reserves every listener's port first (a bound, non-listening SO_REUSEPORT socket), so a
  config asking for port 0 gets one real port shared by all workers, and a port that is
  taken is reported before any worker starts;
- sends each worker, one way over a pipe, the config and the stats slots it must use;
- replaces a worker that exits unexpectedly at once; one that keeps dying within
  CRASH_WINDOW of its start is restarted after a doubling back-off (up to MAX_BACKOFF) and
  reported in the log and on /workers; the counters of a dead worker are folded into the
  retired slab, so totals never go backwards;
- on SIGHUP or POST /reload, reads the config again: an invalid one is refused, its errors
  logged, and the running config stays; a valid one goes to every worker, which swaps it
  in without closing a connection;
- on SIGTERM, SIGINT or POST /quitquitquit, tells every worker to drain and exits 0 when
  they are done (or after the drain timeout);
- with a control plane (process/discovery_client.py) instead of a config file, takes each
  pushed config through the same checks (`adopt`), and says when every worker serves it
  (`applied`); on shutdown it deregisters its workload first, so that callers stop sending
  before the listeners close.

Size: past 400 lines because the worker pool, reloads and the drain all act on the same
worker table and snapshot version under one lock; the admin server, the stats and the
discovery client are their own modules.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import trio

from meshproxy.config import schema
from meshproxy.config.compile import (
    ORIGINAL_DST_ENDPOINT,
    compared_routes,
    compile_config,
    own_clusters,
    rate_limit_tables,
)
from meshproxy.config.load import BLACKHOLE_CLUSTER, ConfigError, load_file
from meshproxy.control.messages import ROOT_CA
from meshproxy.process import cert_watch
from meshproxy.process.bucket_memory import BucketMemory
from meshproxy.process.demand_memory import POLL as POLL_DEMANDS
from meshproxy.process.demand_memory import DemandMemory
from meshproxy.process.discovery_client import DiscoveryClient
from meshproxy.process.identity import Identity
from meshproxy.process.messages import DrainMsg, SnapshotMsg, encode
from meshproxy.stats.diff_samples import DiffSamples
from meshproxy.stats.names import Scope, offset
from meshproxy.stats.shared_memory import Capacity, Layout, Segment, Slots
from meshproxy.stats.sink import endpoint_key
from meshproxy.upstream.health_check import HealthChecker

log = logging.getLogger("meshproxy.supervisor")

# A worker that dies sooner than this after starting is crash-looping.
CRASH_WINDOW = 5.0
MAX_BACKOFF = 30.0
_LIVE = offset(Scope.WORKER, "live")
_CONFIG_VERSION = offset(Scope.WORKER, "config_version")
# How often worker processes are checked; a dead one is replaced within this (plus its
# start-up time, about 0.3 s).
POLL_INTERVAL = 0.1


@dataclass
class Options:
    workers: int
    cpu_affinity: bool = False
    max_connections: int = 0
    fast_path: bool = True
    drain_timeout: float = 30.0
    admin_address: str | None = None  # "host:port", "off", or None for the config's
    log_level: str = "info"
    access_log: str | None = None
    stats: bool = True
    capacity: Capacity = field(default_factory=Capacity)
    # Sidecar mode without a persisted config: no worker starts (no listener accepts, so an
    # intercepted app's connections are refused, never let around the mesh) until the
    # first config from the control plane is adopted.
    hold_until_config: bool = False


class WorkerHandle:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.control: trio.lowlevel.FdStream | None = None
        self.started_at = 0.0
        self.restarts = 0
        self.quick_crashes = 0
        self.next_start = 0.0
        self.state = "starting"
        self.last_exit: int | None = None


class Supervisor:
    def __init__(self, config_path: str | Path | None, config: schema.Config, opts: Options,
                 discovery: DiscoveryClient | None = None) -> None:
        self.config_path = Path(config_path) if config_path is not None else None
        self.discovery = discovery
        if discovery is not None:  # its pushes go through the same checks as a reload
            discovery.adopt, discovery.applied = self.adopt, self.applied
            discovery.install = self.install_identity
        self.opts = opts
        self._adopted = trio.Event()  # a config came from the control plane
        self._workers_started = False
        self._serving = trio.Event()  # the workers serve (run())
        self.cap = opts.capacity
        self.segment = Segment(Layout(self.cap), opts.workers + 1)
        self.slots = Slots()
        self.buckets = BucketMemory()
        self.demand = DemandMemory(opts.workers) if discovery is not None else None
        self.samples = DiffSamples(opts.workers)  # mirrored routes' differing pairs
        self.workers = [WorkerHandle(i) for i in range(opts.workers)]
        self.reserved: dict[tuple[str, str, int], socket.socket] = {}
        self.version = 0
        self.config = config
        self.message: SnapshotMsg | None = None
        self.started = time.monotonic()
        self.draining = False
        self.stopping = False
        self.admin_bound: tuple[str, int] | None = None
        self._stop = trio.Event()
        self.health = HealthChecker(self.segment, self.slots)
        self._nursery: trio.Nursery | None = None
        self.material = cert_watch.Material()
        # The mesh identity's secrets (process/identity.py), in memory only.
        self.secrets: dict[str, bytes] = {}
        self.identity: Identity | None = None
        errors = self._prepare(config)
        if errors:
            raise ConfigError(errors, str(config_path or "persisted config"))

    # ---------------------------------------------------------------- config

    def _reserve(self, lst: schema.Listener) -> socket.socket:
        key = (lst.name, lst.address, lst.port)
        sock = self.reserved.get(key)
        if sock is None:
            family = socket.AF_INET6 if ":" in lst.address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                sock.bind((lst.address, lst.port))
            except OSError:
                sock.close()
                raise
            self.reserved[key] = sock
        return sock

    def _prepare(self, config: schema.Config) -> list[str]:
        """Reserve ports and stats slots for `config`; on success it becomes the message
        the workers get. Returns errors (and changes nothing) when it cannot be served."""
        listeners = []
        keep: set[tuple[str, str, int]] = set()
        # What every worker will load, read and checked here: refused here if it cannot be.
        material, errors = cert_watch.load(config, self.secrets)
        for i, lst in enumerate(config.listeners):
            try:
                sock = self._reserve(lst)
            except OSError as exc:
                errors.append(f"listeners[{i}].port: cannot bind {lst.address}:{lst.port}: "
                              f"{exc.strerror}")
                continue
            keep.add((lst.name, lst.address, lst.port))
            listeners.append(msgspec.structs.replace(lst, port=sock.getsockname()[1]))
        endpoints = [endpoint_key(c.name, f"{e.address}:{e.port}")
                     for c in config.clusters for e in c.endpoints]
        own = own_clusters(config)  # the intercepting listeners' passthrough and blackhole
        endpoints += [endpoint_key(n, ORIGINAL_DST_ENDPOINT) for n in own
                      if n != BLACKHOLE_CLUSTER]
        if not errors:
            # Compiled here first, exactly as every worker will compile it: a snapshot that
            # does not compile is refused here, never sent (it would crash-loop every worker).
            errors = self._compiles(msgspec.structs.replace(config, listeners=listeners),
                                    material.files)
        if not errors:
            for scope, slot in self.slots.release(time.monotonic()):
                self.segment.zero(scope, slot)
            # Kept to be put back if the buckets refuse the config: the config in service
            # still writes the slots this assignment would park.
            before = copy.deepcopy(self.slots.__dict__)
            errors = self.slots.assign([lst.name for lst in config.listeners],
                                       [c.name for c in config.clusters] + own, endpoints,
                                       self.cap,
                                       time.monotonic(), compared_routes(config))
            if not errors:
                errors = self.buckets.assign(rate_limit_tables(config), time.monotonic())
                if errors:
                    self.slots.__dict__.update(before)
        if errors:
            for key in list(self.reserved):
                if key not in keep and key not in self._in_use():
                    self.reserved.pop(key).close()
            return errors
        for key in [k for k in self.reserved if k not in keep]:
            self.reserved.pop(key).close()
        self.version += 1
        self.config = msgspec.structs.replace(config, listeners=listeners)
        self.material = material
        self.message = SnapshotMsg(self.version, self.config, self.opts.access_log,
                                   dict(self.slots.listeners), dict(self.slots.clusters),
                                   dict(self.slots.endpoints), len(self.workers),
                                   material.files, dict(self.buckets.slots),
                                   dict(self.slots.mirrors))
        return []

    def _compiles(self, config: schema.Config, files: dict[str, bytes]) -> list[str]:
        try:
            compile_config(config, self.version + 1, self.opts.access_log, len(self.workers),
                           files)
        except ConfigError as exc:
            return exc.errors
        except Exception as exc:  # a defect of the checks: refused, and said what it was
            log.exception("config version %d does not compile", self.version + 1)
            return [f"(config): does not compile: {type(exc).__name__}: {exc}"]
        return []

    def _in_use(self) -> set[tuple[str, str, int]]:
        if self.message is None:
            return set()
        return {(lst.name, lst.address, lst.port) for lst in self.message.config.listeners}

    async def reload(self) -> tuple[int, list[str]]:
        """Read the config file again; (version, []) when adopted, (version, errors) not."""
        if self.config_path is None:
            errors = ["no config file to reload: the control plane pushes this proxy's config"]
            self._log_refused(errors)
            return self.version, errors
        try:
            config = load_file(self.config_path)
        except ConfigError as exc:
            self._log_refused(exc.errors)
            return self.version, exc.errors
        # Port-0 listeners keep the port they were given.
        fixed = []
        for lst in config.listeners:
            if lst.port == 0:
                for (name, addr, _), sock in self.reserved.items():
                    if name == lst.name and addr == lst.address:
                        lst = msgspec.structs.replace(lst, port=sock.getsockname()[1])
            fixed.append(lst)
        errors = self._prepare(msgspec.structs.replace(config, listeners=fixed))
        if errors:
            self._log_refused(errors)
            return self.version, errors
        log.info("adopted config version %d from %s", self.version, self.config_path)
        await self._publish()
        return self.version, []

    async def adopt(self, config: schema.Config, trust_bundle: bytes = b"") -> list[str]:
        """A config from the control plane (with the mesh's trust bundle): checked and
        compiled here, then sent to every worker; its errors (nothing changes) otherwise."""
        before = dict(self.secrets)
        if trust_bundle:
            self.secrets[ROOT_CA] = trust_bundle
        errors = self._prepare(config)
        if errors:
            self.secrets = before
            return errors
        log.info("adopted config version %d from the control plane", self.version)
        await self._publish()
        self._adopted.set()
        return []

    async def install_identity(self, identity: Identity) -> list[str]:
        """A new mesh identity (issued or renewed): every worker gets it in a snapshot of
        the same config, new handshakes use it, connections keep theirs (the rotation path
        of certificate files). Errors: nothing changed."""
        before = dict(self.secrets)
        self.secrets.update(identity.secrets())
        errors = self._prepare(self.config)
        if errors:
            self.secrets = before
            log.error("the issued identity %s cannot be used: %s", identity.spiffe_id,
                      "; ".join(errors))
            return errors
        self.identity = identity
        log.info("identity %s (serial %s, expires %s) in config version %d",
                 identity.spiffe_id, identity.serial, identity.describe()["expiration_time"],
                 self.version)
        await self._publish()
        return []

    async def applied(self) -> None:
        """Until every running worker serves the latest version (each writes the version it
        swapped in to its stats slab); a worker in crash back-off is not waited for, its
        replacement starts with the latest snapshot."""
        want = self.version
        cell = self.segment.layout.first(Scope.WORKER, 0) + _CONFIG_VERSION
        if not self._workers_started:
            if not self._adopted.is_set():
                return  # an identity before any config: no worker runs yet
            await self._serving.wait()  # held workers start with this config (run())
        while not all(w.proc is None or self.segment.block(w.index).get(cell) >= want
                      for w in self.workers):
            await trio.sleep(0.005)

    async def _demands(self) -> None:
        """On-demand discovery: authorities workers found no route for are subscribed."""
        assert self.demand is not None and self.discovery is not None
        while True:
            await trio.sleep(POLL_DEMANDS)
            wanted = self.demand.read_new()
            if wanted:
                log.info("subscribing on demand to %s", ", ".join(sorted(wanted)))
                await self.discovery.subscribe(wanted)

    async def _publish(self) -> None:
        """The snapshot `_prepare` adopted goes to every worker, and the health checker
        probes with its clusters and TLS material."""
        for w in self.workers:
            await self._send(w)
        if self._nursery is not None:
            self.health.apply(self.config, self._nursery, self.material.files)

    async def _watch_certificates(self) -> None:
        """Rotation: a changed TLS file is read, checked and sent to the workers as a new
        snapshot of the same config; a broken one is refused and the old material stays."""
        refused: dict[str, cert_watch.Stamp | None] | None = None
        while True:
            await trio.sleep(cert_watch.POLL_INTERVAL)
            if self.draining or not cert_watch.changed(self.material):
                continue
            seen = cert_watch.current_stamps(self.material)
            if seen == refused:
                continue  # the same broken files: said once already
            errors = self._prepare(self.config)
            if errors:
                refused = seen
                log.error("certificate rotation refused, the material in service stays "
                          "(config version %d): %s", self.version, "; ".join(errors))
                continue
            refused = None
            log.info("certificate rotation: new TLS material in config version %d",
                     self.version)
            await self._publish()

    def _log_refused(self, errors: list[str]) -> None:
        log.error("reload refused, config version %d stays: %s", self.version,
                  "; ".join(errors))

    # ---------------------------------------------------------------- workers

    def _spawn(self, w: WorkerHandle) -> None:
        r, wfd = os.pipe()
        ncpu = os.cpu_count() or 1
        cmd = [sys.executable, "-m", "meshproxy.process.worker_process",
               "--index", str(w.index), "--control-fd", str(r),
               "--stats-fd", str(self.segment.fd), "--slabs", str(self.segment.slabs),
               "--buckets-fd", str(self.buckets.fd),
               "--capacity", str(self.cap.listeners), str(self.cap.clusters),
               str(self.cap.endpoints),
               "--max-connections", str(self.opts.max_connections),
               "--drain-timeout", str(self.opts.drain_timeout),
               "--log-level", self.opts.log_level]
        if self.opts.cpu_affinity:
            cmd += ["--cpu", str(w.index % ncpu)]
        if not self.opts.stats:
            cmd.append("--no-stats")
        if not self.opts.fast_path:
            cmd.append("--no-fast-path")
        cmd += ["--samples-fd", str(self.samples.fd)]
        fds = [r, self.segment.fd, self.buckets.fd, self.samples.fd]
        if self.demand is not None:
            self.demand.reset(w.index)
            cmd += ["--demand-fd", str(self.demand.fd)]
            fds.append(self.demand.fd)
        w.proc = subprocess.Popen(cmd, pass_fds=fds)
        os.close(r)
        w.control = trio.lowlevel.FdStream(wfd)
        w.started_at = time.monotonic()
        w.state = "starting"
        log.debug("worker %d started, pid %d", w.index, w.proc.pid)

    async def _send(self, w: WorkerHandle, msg: SnapshotMsg | DrainMsg | None = None) -> None:
        if w.control is None:
            return
        try:
            await w.control.send_all(encode(msg or self.message))  # type: ignore[arg-type]
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the worker is gone; the monitor replaces it and sends the snapshot

    async def _start(self, w: WorkerHandle) -> None:
        self._spawn(w)
        await self._send(w)

    def _live(self, w: WorkerHandle) -> bool:
        blk = self.segment.block(w.index)
        return blk.get(self.segment.layout.first(Scope.WORKER, 0) + _LIVE) == 1

    async def _monitor(self) -> None:
        while True:
            now = time.monotonic()
            for w in self.workers:
                proc = w.proc
                if proc is not None and proc.poll() is not None:
                    self._reap(w, proc.returncode, now)
                if (w.proc is None and not self.stopping and not self.draining
                        and now >= w.next_start):
                    w.restarts += 1
                    await self._start(w)
                if w.proc is not None and w.state == "starting" and self._live(w):
                    w.state = "serving"
            await trio.sleep(POLL_INTERVAL)

    def _reap(self, w: WorkerHandle, code: int, now: float) -> None:
        w.proc = None
        if w.control is not None:
            # Closed once, by its owner: the FdStream's holder (an os.close here too would
            # close the fd twice, the second time perhaps the replacement worker's new pipe).
            w.control.close()
            w.control = None
        w.last_exit = code
        self.segment.retire(w.index)  # keep its counters, drop its gauges, zero the slab
        if self.stopping or self.draining:
            # Drained on purpose: not replaced (POST /drain keeps the process up, idle).
            w.state = "stopped" if self.stopping else "drained"
            return
        lived = now - w.started_at
        w.quick_crashes = w.quick_crashes + 1 if lived < CRASH_WINDOW else 1
        delay = 0.0 if w.quick_crashes <= 1 else min(MAX_BACKOFF, 0.5 * 2 ** (w.quick_crashes - 2))
        w.next_start = now + delay
        w.state = "backoff" if delay else "restarting"
        how = f"signal {-code}" if code < 0 else f"status {code}"
        if delay:
            log.error("worker %d exited with %s %d times in a row within %.0f s of starting: "
                      "crash loop, restarting in %.1f s", w.index, how, w.quick_crashes,
                      CRASH_WINDOW, delay)
        else:
            log.warning("worker %d exited with %s after %.1f s; restarting it", w.index, how,
                        lived)

    @property
    def ready(self) -> bool:
        return (not self.draining and not self.stopping
                and all(w.proc is not None and w.state == "serving" and self._live(w)
                        for w in self.workers))

    async def drain(self) -> None:
        """Stop taking new connections everywhere; keep serving those open (POST /drain)."""
        self.draining = True
        self.health.stop()
        for w in self.workers:
            await self._send(w, DrainMsg(self.opts.drain_timeout))

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        if self.discovery is not None:
            await self.discovery.deregister()
        self.stopping = True
        self.draining = True
        self.health.stop()
        for w in self.workers:
            await self._send(w, DrainMsg(self.opts.drain_timeout))
        with trio.move_on_after(self.opts.drain_timeout + 5):
            while any(w.proc is not None and w.proc.poll() is None for w in self.workers):
                await trio.sleep(0.05)
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                log.warning("worker %d did not stop in time; killing it", w.index)
                w.proc.kill()
                w.proc.wait()
            if w.proc is not None:
                self._reap(w, w.proc.returncode, time.monotonic())

    # ---------------------------------------------------------------- main

    async def run(self) -> None:
        from meshproxy.admin.server import AdminServer

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async with trio.open_nursery() as nursery:
                admin = self._admin_address()
                if admin is not None:
                    self.admin_bound = await nursery.start(AdminServer(self).serve, *admin)
                    log.info("admin on %s:%d", *self.admin_bound)
                if self.opts.hold_until_config and self.discovery is not None:
                    nursery.start_soon(self.discovery.run)
                    log.info("holding the listeners until the first config is applied")
                    await self._adopted.wait()
                for w in self.workers:
                    await self._start(w)
                self._workers_started = True
                nursery.start_soon(self._monitor)
                nursery.start_soon(self._signals, sigs)
                nursery.start_soon(self._watch_certificates)
                if self.discovery is not None:
                    if not self.opts.hold_until_config:
                        nursery.start_soon(self.discovery.run)
                    nursery.start_soon(self._demands)
                self._nursery = nursery
                self.health.apply(self.config, nursery, self.material.files)
                with trio.move_on_after(30):
                    while not all(w.state == "serving" for w in self.workers):
                        await trio.sleep(0.02)
                for lst in self.config.listeners:
                    log.info("listener %s on %s:%d", lst.name, lst.address, lst.port)
                log.info("serving config version %d with %d workers", self.version,
                         len(self.workers))
                self._serving.set()
                await self._stop.wait()
                await self._shutdown()
                nursery.cancel_scope.cancel()
        for sock in self.reserved.values():
            sock.close()

    async def _signals(self, sigs: AsyncIterator[int]) -> None:
        async for signum in sigs:
            if signum == signal.SIGHUP:
                await self.reload()
            else:
                log.info("received %s: draining", signal.Signals(signum).name)
                self.stop()

    def _admin_address(self) -> tuple[str, int] | None:
        spec = self.opts.admin_address
        if spec == "off":
            return None
        if spec:
            host, _, port = spec.rpartition(":")
            return host or "127.0.0.1", int(port)
        if self.config.admin is None:
            return None
        return self.config.admin.address, self.config.admin.port

    def uptime(self) -> float:
        return time.monotonic() - self.started

