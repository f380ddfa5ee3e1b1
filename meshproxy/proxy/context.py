"""What the connections of a listener and of a worker share: the listener's spec and its
compiled parser, clusters, access logger, tracer and TLS contexts, and the worker's
draining flag and on-demand discovery hooks.

A reload swaps a ListenerContext's fields in place (`update`); a request in flight keeps
what it already looked up, so it finishes on the snapshot it started with.
"""

from __future__ import annotations

from typing import Any

import trio

from meshproxy._core.http1_parser import HeadParser
from meshproxy.config.snapshot import ListenerSpec, TLSSpec
from meshproxy.proxy.access_log import AccessLogger
from meshproxy.stats.sink import Sink
from meshproxy.tracing.tracer import Tracer
from meshproxy.transport.reactor import Reactor
from meshproxy.transport.tls_context import ServerTLS
from meshproxy.upstream.cluster_manager import ClusterManager


class ListenerTLS:
    __slots__ = ("spec", "server", "handshake_timeout", "accept_plaintext")

    def __init__(self, spec: TLSSpec) -> None:
        self.spec = spec
        self.server = ServerTLS.from_spec(spec)
        self.handshake_timeout = spec.handshake_timeout
        self.accept_plaintext = spec.accept_plaintext


class WorkerState:
    """What every listener of a worker shares: its stats scope, whether it drains, and for
    on-demand discovery where to ask for a missing authority (`demand(authority)`) and
    the event set when the next snapshot is in (`changed`, replaced at each)."""

    __slots__ = ("stats", "draining", "demand", "changed", "asked", "wake", "leave",
                 "fast_path", "spawn", "shadows", "diff_sample")

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self.draining = False
        # Set by the worker: `wake(conn)` gives a parked connection a task again; `leave()`
        # counts a connection closed outside a task out of --max-connections. Without
        # them (None) connections never park.
        self.wake: Any = None  # Callable[[DownstreamConnection], None] | None
        self.leave: Any = None  # Callable[[], None] | None
        self.demand: Any = None  # Callable[[bytes], None] | None
        self.fast_path = False  # connections may be served by proxy.fast_path
        # Set by the worker: `spawn(fn, *args)` starts a task in the worker's nursery, for
        # work no request waits for (request mirrors, proxy.mirror; None: none). `shadows`:
        # mirror copies in flight.
        self.spawn: Any = None
        self.shadows = 0
        # Set by the worker: `diff_sample(dict)` records a mirrored pair that differed
        # (stats.diff_samples, read by the admin server); None: kept nowhere.
        self.diff_sample: Any = None
        self.changed = trio.Event()
        self.asked: set[bytes] = set()  # authorities asked for since the last snapshot

    def swapped(self) -> None:
        self.asked.clear()
        self.changed.set()
        self.changed = trio.Event()


class ListenerContext:
    """What the connections of one listener share inside a worker. A reload swaps `spec`,
    `parser` and `clusters` in place; a request in flight keeps what it already looked up."""

    __slots__ = ("spec", "parser", "clusters", "logger", "scheme", "reactor", "state",
                 "lstats", "hstats", "tracer", "tls", "slabs", "sink", "mirror_stats")

    def __init__(self, spec: ListenerSpec, clusters: ClusterManager,
                 logger: AccessLogger | None, reactor: Reactor, state: WorkerState,
                 sink: Sink) -> None:
        self.reactor = reactor
        self.state = state
        self.lstats = sink.listener(spec.name)
        self.hstats = sink.http(spec.name)
        # Every worker's stats, to read a proxy-wide gauge (fault.active_faults against
        # max_active_faults, filters.fault).
        self.slabs = sink.worker_blocks()
        self.sink = sink
        # mirror.<route> stats bound so far (proxy.mirror binds a route's at first use).
        self.mirror_stats: dict[str, Any] = {}
        self.tracer: Tracer | None = None
        self.tls: ListenerTLS | None = None
        self.update(spec, clusters, logger)

    def update(self, spec: ListenerSpec, clusters: ClusterManager,
               logger: AccessLogger | None, tracer: Tracer | None = None) -> None:
        self.tracer = tracer
        if spec.tls is None:
            self.tls = None
        elif self.tls is None or self.tls.spec != spec.tls:
            # Contexts are built once per listener config or rotation (the supervisor has
            # already checked the material); connections keep the contexts they started with.
            self.tls = ListenerTLS(spec.tls)
        self.scheme = b"https" if self.tls is not None else b"http"
        self.spec = spec
        self.parser = HeadParser(spec.max_request_line, spec.max_header_bytes, spec.max_headers)
        self.clusters = clusters
        self.logger = logger
