"""The one place that opens upstream connections on the data path (the supervisor's
active health checks have their own, over trio streams).

`establish` carries out the cluster's connection decision (Cluster.admit: reuse,
connect, close an idle one elsewhere then connect, wait as pending, or overflow); the
I/O happens here, after the decision. Connecting is bounded by the cluster's
connect_timeout, and with upstream TLS the handshake and the check of the endpoint's
identity are part of connecting.
"""

from __future__ import annotations

from functools import partial

import trio

from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import CONNECT_FAILURE, ProxyError
from meshproxy.transport.reactor import Reactor
from meshproxy.transport.sockio import PeerClosed, connect
from meshproxy.transport.tls_context import ClientTLS
from meshproxy.transport.tls_records import Records
from meshproxy.transport.tls_stream import TLSError, TLSStream, session_reused
from meshproxy.upstream.cluster_manager import (
    CLOSE_THEN_CONNECT,
    CONNECT,
    JOIN,
    OVERFLOW,
    WAIT,
    Cluster,
)
from meshproxy.upstream.conn_pool import Endpoint, UpstreamConn
from meshproxy.upstream.h2_origin import READY, H2Origin, refused

# Connections that may turn out to be going away before a stream is opened on one
# (each a fresh GOAWAY): past this the request fails as refused.
H2_ACQUIRE_TRIES = 3


async def establish(reactor: Reactor, cluster: Cluster, ep: Endpoint, kind: int,
                    conn: UpstreamConn | None) -> tuple[UpstreamConn, bool]:
    """Carry out Cluster.admit's answer when it was not REUSE (the caller takes a reused
    connection itself, with no await): a connection to `ep` and whether it was reused (one
    that came free while waiting may turn out stale)."""
    if kind == CLOSE_THEN_CONNECT:
        assert conn is not None
        conn.close()  # the oldest idle connection elsewhere gives way
    elif kind == WAIT:
        conn = await _wait_pending(reactor, cluster, ep)
        if conn is not None:
            return conn, True
    elif kind == OVERFLOW:
        raise ProxyError(503, flags.UPSTREAM_OVERFLOW, "upstream",
                         "upstream overflow: max_pending_requests reached")
    return await connect_endpoint(reactor, cluster, ep), False


async def _wait_pending(reactor: Reactor, cluster: Cluster,
                        ep: Endpoint) -> UpstreamConn | None:
    """Pending at max_connections: an idle connection of `ep` once one comes free, or None
    once there is room to connect. The route timeout bounds the wait."""
    try:
        while True:
            await cluster.freed()
            conn = ep.acquire(reactor.now)
            if conn is not None:
                return conn
            if cluster.breaker.connection_room(cluster.open_connections()):
                return None
    finally:
        cluster.end_pending()


async def connect_endpoint(reactor: Reactor, cluster: Cluster, ep: Endpoint,
                           h2: bool = False) -> UpstreamConn:
    """A new connection to `ep`; with upstream TLS the handshake (and the check of the
    endpoint's SANs) is part of connecting, bounded by the same connect_timeout; `h2`:
    for HTTP/2 (ALPN h2)."""
    conn = None
    with trio.move_on_after(cluster.spec.connect_timeout):
        try:
            conn = UpstreamConn(await connect(reactor, ep.address, ep.port), ep)
        except OSError as exc:
            raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                             f"upstream connect error: {exc.strerror or exc}",
                             retriable=True, stat="upstream_cx_connect_fail",
                             failure=CONNECT_FAILURE) from None
        conn.born = reactor.now
        tls = cluster.tls_h2 if h2 else cluster.tls
        if tls is not None:
            await _handshake(cluster, conn, tls)
        return conn
    if conn is not None:
        conn.abort()  # the TLS handshake did not finish in time
    raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                     "upstream connect error: connect timeout", retriable=True,
                     stat="upstream_cx_connect_timeout", failure=CONNECT_FAILURE)


async def _handshake(cluster: Cluster, conn: UpstreamConn, tls: ClientTLS) -> None:
    """Upstream TLS: verify the endpoint (chain to the trust bundle, validity, serverAuth,
    an expected SAN), then route the connection's I/O through the TLS stream. A failure is
    503 UF with the reason, as Envoy's "TLS error" transport failure."""
    st = cluster.stats
    ssl = tls.connection()
    ep = conn.endpoint
    if ep.tls_session is not None and ep.tls_session[0] is tls:
        ssl.set_session(ep.tls_session[1])  # resume; a rotated context starts afresh
    stream = TLSStream.over_channel(conn.ch, ssl)
    try:
        await stream.handshake()
    except (TLSError, PeerClosed) as exc:
        conn.abort()
        st.block.inc(st.ssl_connection_error)
        raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                         f"upstream connect error: TLS error: {exc}", retriable=True,
                         stat="upstream_cx_connect_fail", failure=CONNECT_FAILURE) from None
    problem = tls.check_peer(stream.ssl)
    if problem:
        conn.abort()
        st.block.inc(st.ssl_fail_verify_san)
        raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                         f"upstream connect error: TLS error: {problem}", retriable=True,
                         stat="upstream_cx_connect_fail", failure=CONNECT_FAILURE)
    st.block.inc(st.ssl_handshake)
    if session_reused(ssl):
        st.block.inc(st.ssl_session_reused)
    conn.tls = stream
    conn.records = Records(ssl)
    conn.tls_context = tls
    conn.recv, conn.recv_wait = stream.recv, stream.recv_wait
    conn.send = stream.send_all


async def acquire_h2(reactor: Reactor, cluster: Cluster, ep: Endpoint) -> H2Origin:
    """A ready HTTP/2 connection to `ep` with a stream slot reserved for the caller
    (Cluster.admit_h2 decides; the I/O is here): a new connection's task is started in
    the worker's nursery, and every request that joined it waits until it is ready."""
    tries = 0
    while tries < H2_ACQUIRE_TRIES:
        kind, origin = cluster.admit_h2(ep, reactor.now)
        if kind == OVERFLOW:
            raise ProxyError(503, flags.UPSTREAM_OVERFLOW, "upstream",
                             "upstream overflow: max_pending_requests reached")
        if kind == WAIT:
            try:
                await cluster.freed()
            finally:
                cluster.end_pending()
            continue
        assert origin is not None
        if kind == CONNECT:
            cluster.spawn(origin.run, partial(connect_endpoint, reactor, cluster, ep, True))
        if kind in (CONNECT, JOIN):
            try:
                await origin.ready.wait()
            except BaseException:
                origin.unreserve()
                raise
            if origin.state != READY:
                origin.unreserve()
                failure = origin.failure
                if failure is not None and failure.failure == CONNECT_FAILURE:
                    raise failure
                tries += 1
                continue
            if len(origin.streams) >= origin.codec.max_streams():
                # The origin's SETTINGS allow fewer streams than were waiting for it: the
                # rest look again (another connection opens for them).
                origin.unreserve()
                continue
        return origin
    raise refused("every connection went away")
