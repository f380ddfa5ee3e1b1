"""Per-worker, per-endpoint pool of idle HTTP/1.1 keep-alive connections.

Decide, then do I/O: `acquire` and `release` are synchronous bookkeeping; they return the
connection to use or close, and the caller does the connecting and closing.

Rules:
- LIFO: the most recently used idle connection is reused first, so the rest age out and the
  pool shrinks back after a burst; the oldest are at the front, where `sweep` looks.
- A connection idle longer than `idle_timeout` is never reused (the origin may be closing
  it); `sweep`, run every second by the worker, closes those so no descriptor lingers.
- At most `max_idle` idle connections per endpoint; one more is closed on release.
- A reused connection may still have been closed by the origin in the instant before the
  request was written; the data path retries such a request once on a new connection
  when nothing of the response arrived and the request can be replayed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from meshproxy._core.circuit_state import OutlierState
from meshproxy.transport.reactor import Channel
from meshproxy.transport.sockio import abort, close, recv_after_wait, recv_now, send_all


class UpstreamConn:
    """An open upstream connection; opening and closing it keep the cx gauges true."""

    multiplexed = False  # an HTTP/1.1 connection (upstream.h2_origin's streams say True)

    __slots__ = ("ch", "sock", "endpoint", "idle_since", "requests", "open", "born", "recv",
                 "recv_wait", "send", "tls", "tls_context", "records")

    def __init__(self, ch: Channel, endpoint: Endpoint) -> None:
        self.ch = ch
        self.sock = ch.sock
        # The connection's I/O, as on the downstream side: plain socket calls, replaced by
        # the TLS stream's methods after an upstream TLS handshake.
        self.recv: Callable[..., Awaitable[bytes]] = partial(recv_now, ch)
        self.recv_wait: Callable[..., Awaitable[bytes]] = partial(recv_after_wait, ch)
        self.send: Callable[[bytes], Awaitable[None]] = partial(send_all, ch.sock)
        self.tls: Any = None  # the TLSStream of a TLS connection
        # Its compiled record layer on the same SSL object (transport.tls_records), for
        # the fast path.
        self.records: Any = None
        # The ClientTLS it was made with, until its session is kept by the endpoint.
        self.tls_context: Any = None
        self.endpoint = endpoint
        self.idle_since = 0.0
        self.born = 0.0  # when it was opened (reactor time), for max_connection_duration
        self.requests = 0
        self.open = True
        endpoint.open += 1
        cs, es = endpoint.cstats, endpoint.stats
        cs.block.inc(cs.upstream_cx_total)
        cs.block.add(cs.upstream_cx_active, 1)
        es.block.add(es.cx_active, 1)
        endpoint.changed()

    def _closed(self) -> None:
        self.open = False
        ep = self.endpoint
        ep.open -= 1
        cs, es = ep.cstats, ep.stats
        cs.block.add(cs.upstream_cx_active, -1)
        cs.block.inc(cs.upstream_cx_destroy)
        es.block.add(es.cx_active, -1)
        ep.changed()
        ep.notify()  # a connection slot is free

    def close(self) -> None:
        if self.open:
            self._closed()
            if self.tls is not None:
                self.tls.close_notify_nowait(self.sock)
            close(self.ch)

    def abort(self) -> None:
        if self.open:
            self._closed()
            abort(self.ch)


class Endpoint:
    """One upstream host:port of a cluster, with its pool of idle connections."""

    __slots__ = ("address", "port", "weight", "label", "idle", "idle_timeout", "max_idle",
                 "stats", "cstats", "open", "notify", "changed", "outlier", "hc", "index",
                 "max_duration", "lb", "secure", "tls_session", "h2")

    def __init__(self, address: str, port: int, weight: int, idle_timeout: float,
                 max_idle: int, stats: Any, cstats: Any) -> None:
        self.address = address
        self.port = port
        self.weight = weight
        self.label = f"{address}:{port}"
        self.idle: list[UpstreamConn] = []
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.stats = stats      # endpoint scope (stats.names.ENDPOINT)
        self.cstats = cstats    # its cluster's scope
        self.open = 0           # connections open (busy or idle), for max_connections
        self.outlier = OutlierState()  # passive health, kept across reloads
        # (block, cell) of the supervisor's active health check result, or None.
        self.hc: tuple[Any, int] | None = None
        self.index = 0  # position in its group's balancer, `lb`
        self.lb: Any = None
        self.max_duration = 0.0  # max_connection_duration (0: none)
        self.secure = False  # its connections are TLS (a pool never mixes the two)
        # (ClientTLS, session) of its last TLS connection: new connections made with the
        # same context resume it (an abbreviated handshake, no certificate exchange).
        self.tls_session: tuple[Any, Any] | None = None
        # HTTP/2 connections (upstream.h2_origin.H2Origin), oldest first: connecting, ready
        # or going away; a request takes a stream on the first with room.
        self.h2: list[Any] = []
        # Set by the cluster that owns the endpoint: `notify` wakes requests waiting for a
        # connection slot; `changed` republishes the remaining_cx gauge.
        self.notify: Callable[[], None] = _nothing
        self.changed: Callable[[], None] = _nothing

    def acquire(self, now: float) -> UpstreamConn | None:
        """An idle connection young enough to reuse, or None (connect a new one)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.idle_timeout:
                return conn
            conn.close()
        return None

    def release(self, conn: UpstreamConn, now: float) -> None:
        """Back to the pool after a clean exchange, unless the pool is full or the
        connection has lived past max_connection_duration."""
        if conn.tls_context is not None:
            # After a whole exchange a TLS 1.3 server's session ticket has been read: keep
            # the session for the next connection (once per connection).
            self.tls_session = (conn.tls_context, conn.tls.ssl.get_session())
            conn.tls_context = None
        if len(self.idle) >= self.max_idle or (
                self.max_duration and now - conn.born >= self.max_duration):
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)
        self.notify()  # a pending request may take it

    def sweep(self, now: float) -> None:
        for origin in self.h2:
            if origin.idle_expired(now, self.idle_timeout, self.max_duration):
                origin.go_away()
        idle = self.idle
        expired = 0
        for conn in idle:
            if now - conn.idle_since < self.idle_timeout:
                break
            conn.close()
            expired += 1
        if expired:
            del idle[:expired]

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
        for origin in list(self.h2):
            origin.close()


def _nothing() -> None:
    pass
