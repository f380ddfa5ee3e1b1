"""A worker: one trio loop serving every listener of a snapshot.

The worker owns its accepted connections, its upstream pools and its load-balancer state;
it shares nothing with other workers but the listening ports (SO_REUSEPORT) and the stats
segment, where it writes only its own slab.

Reload (`apply`): a new snapshot is compiled by the caller and swapped in place. A listener
whose address is unchanged keeps its socket (no connection is closed or refused); its context
gets the new route table and cluster manager in one step, so new requests use the new
snapshot while requests in flight finish with what they already looked up. Endpoints that
stay keep their pools of warm connections.

Drain: stop accepting, close idle keep-alive connections, answer every request still in
flight with `Connection: close`, wait up to the drain timeout, then stop.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

from meshproxy.config.destinations import HTTP, PASSTHROUGH
from meshproxy.config.snapshot import AccessLogSpec, ListenerSpec, Snapshot
from meshproxy.proxy.access_log import AccessLogger
from meshproxy.proxy.context import ListenerContext, WorkerState
from meshproxy.proxy.downstream import DownstreamConnection
from meshproxy.stats.sink import Sink
from meshproxy.tracing.tracer import Tracer
from meshproxy.transport.listener import Admission, accept_loop, bind_listener
from meshproxy.transport.original_dst import original_dst
from meshproxy.transport.reactor import Reactor
from meshproxy.upstream.cluster_manager import ClusterManager

log = logging.getLogger("meshproxy.worker")


class _Listener:
    def __init__(self, spec: ListenerSpec, sock: socket.socket, ctx: ListenerContext) -> None:
        self.spec = spec
        self.sock = sock
        self.ctx = ctx
        self.scope = trio.CancelScope()

    def stop(self) -> None:
        self.scope.cancel()
        if self.sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


class Worker:
    def __init__(self, snapshot: Snapshot, sink: Sink | None = None,
                 max_connections: int = 0, fast_path: bool | None = None) -> None:
        self.snapshot = snapshot
        # Plaintext connections start on the compiled fast path (proxy.fast_path) unless
        # it is off: --no-fast-path, or MESHPROXY_FAST_PATH=off for workers made in
        # process (the test suite runs both ways).
        self.fast_path = (os.environ.get("MESHPROXY_FAST_PATH", "on") != "off"
                          if fast_path is None else fast_path)
        self.sink = sink or Sink.private()
        self.reactor = Reactor()
        self.stats = self.sink.worker()
        self.state = WorkerState(self.stats)
        self.state.fast_path = self.fast_path
        self.admission = Admission(max_connections)
        self.listeners: dict[str, _Listener] = {}
        self.loggers: dict[AccessLogSpec, AccessLogger] = {}
        self.clusters: ClusterManager | None = None
        self.tracer: Tracer | None = None
        self._tracer_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[list[tuple[str, str, int]]]
                  = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports [(listener, host, port)] once every port is bound."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.state.wake = self._wake
                self.state.leave = self.admission.leave
                self.state.spawn = nursery.start_soon  # request mirrors (proxy.mirror)
                await nursery.start(self.reactor.run)
                nursery.start_soon(self.reactor.run_timers)
                nursery.start_soon(self._sweep)
                bound = self.apply(self.snapshot)
                self.stats.block.set(self.stats.live, 1)
                task_status.started(bound)
        finally:
            self.state.wake = None
            self.state.spawn = None
            self._close_parked()  # connections with no task, which no cancellation reaches
            self.stats.block.set(self.stats.live, 0)
            for lst in self.listeners.values():
                lst.stop()
            if self.clusters is not None:
                self.clusters.close_all()
            for logger in self.loggers.values():
                logger.close()

    async def _sweep(self) -> None:
        """Once a second: close expired idle connections, run due outlier intervals."""
        while True:
            await trio.sleep(1.0)
            if self.clusters is not None:
                now = trio.current_time()
                self.clusters.sweep(now)
                self.clusters.outlier_tick(now)

    def apply(self, snapshot: Snapshot) -> list[tuple[str, str, int]]:
        """Adopt a snapshot (see the module docstring). Returns the bound listeners."""
        assert self._nursery is not None
        self.snapshot = snapshot
        clusters = ClusterManager(snapshot.clusters, self.sink, previous=self.clusters,
                                  spawn=self._nursery.start_soon)
        self.clusters = clusters
        self._apply_tracing(snapshot)
        loggers: dict[AccessLogSpec, AccessLogger] = {}
        bound = []
        wanted = {spec.name for spec in snapshot.listeners}
        for name in [n for n in self.listeners if n not in wanted]:
            self.listeners.pop(name).stop()
        for spec in snapshot.listeners:
            logger = None
            if spec.access_log is not None:
                logger = loggers.get(spec.access_log) or self.loggers.get(spec.access_log)
                if logger is None:
                    logger = AccessLogger(spec.access_log)
                    self._nursery.start_soon(logger.run_flusher)
                loggers[spec.access_log] = logger
            cur = self.listeners.get(spec.name)
            if cur is not None and (cur.spec.address, cur.spec.port) == (spec.address, spec.port):
                cur.ctx.update(spec, clusters, logger, self.tracer)
                cur.spec = spec
            else:
                if cur is not None:
                    cur.stop()
                try:
                    sock = bind_listener(spec.address, spec.port)
                except OSError as exc:
                    raise OSError(exc.errno, f"listener {spec.name!r}: cannot bind "
                                             f"{spec.address}:{spec.port}: {exc.strerror}"
                                  ) from None
                ctx = ListenerContext(spec, clusters, logger, self.reactor, self.state, self.sink)
                ctx.tracer = self.tracer
                cur = self.listeners[spec.name] = _Listener(spec, sock, ctx)
                self._nursery.start_soon(self._accept, cur)
            host, port = cur.sock.getsockname()[:2]
            bound.append((spec.name, host, port))
        for spec_key, logger in self.loggers.items():
            if spec_key not in loggers:
                logger.close()
        self.loggers = loggers
        self.stats.block.set(self.stats.config_version, snapshot.version)
        self.state.swapped()  # requests held for a missing authority look again
        return bound

    def _apply_tracing(self, snapshot: Snapshot) -> None:
        """Keep the tracer when its spec is unchanged; otherwise the old exporter flushes
        what it holds and stops, and a new one starts."""
        spec = snapshot.tracing
        if self.tracer is not None and self.tracer.spec == spec:
            return
        if self._tracer_scope is not None:
            self._tracer_scope.cancel()
            self._tracer_scope = None
        self.tracer = None
        if spec is None:
            return
        tracer = self.tracer = Tracer(spec, self.sink.tracing())
        scope = self._tracer_scope = trio.CancelScope()

        async def export() -> None:
            with scope:
                await tracer.run()

        assert self._nursery is not None
        self._nursery.start_soon(export)

    async def _drive(self, conn: DownstreamConnection) -> None:
        """One stretch of a connection's life in a task: until it closes, or parks (it
        stays counted in --max-connections while parked)."""
        parked = False
        try:
            parked = await conn.run()
        except Exception:
            # A bug costs one connection, never the worker (run() closed the socket).
            log.exception("internal error on a connection from %s", conn.peer)
        finally:
            if not parked:
                self.admission.leave()

    def _wake(self, conn: DownstreamConnection) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._drive, conn)

    def _close_parked(self) -> None:
        """Close the connections no task holds: parked, or waiting on the fast path."""
        for conn in [c for c in self.reactor.timed if isinstance(c, DownstreamConnection)]:
            if conn.parked:
                conn.close_parked()
            elif conn.handshake is not None or (conn.flight is not None
                                                and conn.flight.waiting):
                conn.close_taskless()

    async def _accept(self, lst: _Listener) -> None:
        ctx = lst.ctx
        admission = self.admission

        nursery = self._nursery
        assert nursery is not None

        table = ctx.spec.destinations

        def handler(sock: socket.socket, peer: tuple) -> None:
            conn = DownstreamConnection(ctx, sock, peer)
            if table is not None:
                # An intercepting listener: where the connection was going decides what
                # it is (config.destinations); one addressed to the listener itself is
                # HTTP, as on any listener.
                dst = conn.original_dst = original_dst(sock, peer)
                if dst is not None:
                    dest = table.match(dst[0], dst[1])
                    if dest.kind != HTTP:
                        if dest.kind >= PASSTHROUGH:
                            ls = ctx.lstats
                            ls.block.inc(ls.no_filter_chain_match)
                        conn.destination = dest
                        nursery.start_soon(self._drive, conn)
                        return
            if self.fast_path:
                conn.open_fast()
            else:
                nursery.start_soon(self._drive, conn)

        with lst.scope:
            await accept_loop(lst.sock, handler, admission)

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish (up to `timeout`), then return."""
        self.state.draining = True
        self.stats.block.set(self.stats.live, 0)
        for lst in self.listeners.values():
            lst.stop()
        with trio.move_on_after(timeout):
            while self.admission.active:
                for conn in list(self.reactor.timed):
                    # Idle keep-alive connections, and ones that have sent nothing yet, go
                    # now; the others close after their response (Connection: close).
                    if isinstance(conn, DownstreamConnection) and conn.between_requests():
                        conn.expire()
                await trio.sleep(0.05)
        if self.admission.active:
            log.warning("drain timeout: closing %d connections still open",
                        self.admission.active)


async def serve(snapshot: Snapshot, *,
                task_status: trio.TaskStatus[list[tuple[str, str, int]]]
                = trio.TASK_STATUS_IGNORED) -> None:
    """One unsupervised worker (the demo and in-process uses)."""
    await Worker(snapshot).run(task_status=task_status)

