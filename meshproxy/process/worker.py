"""A worker: one trio loop serving every listener of a snapshot.

The worker owns its accepted connections, its upstream pools and its load-balancer state;
it shares nothing with other workers but the listening port (SO_REUSEPORT). `serve` binds
every listener before it reports readiness, so a caller (the supervisor of issue 3, or a
test) knows the ports are open once `nursery.start(serve, ...)` returns.
"""

from __future__ import annotations

import logging
import signal
import socket

import trio

from meshproxy.config.compile import AccessLogSpec, Snapshot
from meshproxy.proxy.access_log import AccessLogger
from meshproxy.proxy.downstream import DownstreamConnection, ListenerContext
from meshproxy.transport.listener import accept_loop, bind_listener
from meshproxy.transport.reactor import Reactor
from meshproxy.upstream.cluster_manager import ClusterManager

log = logging.getLogger("meshproxy.worker")


async def _serve_connection(ctx: ListenerContext, sock: socket.socket, peer: tuple) -> None:
    try:
        await DownstreamConnection(ctx, sock, peer).run()
    except Exception:
        # A bug must cost one connection, never the worker and every other connection
        # (run() has closed the socket on its way out).
        log.exception("internal error on a connection from %s", peer)


async def serve(snapshot: Snapshot, *,
                task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
                ) -> None:
    clusters = ClusterManager(snapshot.clusters)
    reactor = Reactor()
    loggers: dict[AccessLogSpec, AccessLogger] = {}
    socks = []
    try:
        for spec in snapshot.listeners:
            try:
                socks.append(bind_listener(spec.address, spec.port))
            except OSError as exc:
                raise OSError(exc.errno, f"listener {spec.name!r}: cannot bind "
                                         f"{spec.address}:{spec.port}: {exc.strerror}") from None
        async with trio.open_nursery() as nursery:
            await nursery.start(reactor.run)
            nursery.start_soon(reactor.run_timers)
            nursery.start_soon(clusters.run_sweeper, reactor)
            bound = []
            for spec, lsock in zip(snapshot.listeners, socks, strict=True):
                logger = None
                if spec.access_log is not None:
                    logger = loggers.get(spec.access_log)
                    if logger is None:
                        logger = loggers[spec.access_log] = AccessLogger(spec.access_log)
                        nursery.start_soon(logger.run_flusher)
                ctx = ListenerContext(spec, clusters, logger, reactor)

                async def handler(sock: socket.socket, peer: tuple,
                                  ctx: ListenerContext = ctx) -> None:
                    await _serve_connection(ctx, sock, peer)

                nursery.start_soon(accept_loop, lsock, handler, nursery)
                host, port = lsock.getsockname()[:2]
                bound.append((host, port))
                log.info("listener %s on %s:%d", spec.name, host, port)
            task_status.started(bound)
    finally:
        for lsock in socks:
            trio.lowlevel.notify_closing(lsock)
            lsock.close()
        clusters.close_all()
        for logger in loggers.values():
            logger.close()


async def run_until_signal(snapshot: Snapshot) -> None:
    """Serve until SIGTERM or SIGINT, then stop (graceful draining arrives with issue 3)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, snapshot)
            async for signum in signals:
                log.info("received %s, stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
