"""An intercepted connection that is not HTTP: proxied as bytes (Envoy's tcp_proxy).

What `serve` does with a connection whose original destination (config.destinations)
says TCP, AUTO, PASSTHROUGH or BLACKHOLE, once its TLS (if the listener has any) is done:
- AUTO: the HTTP inspector (protocol.http_inspector) reads the first bytes, within the
  listener's protocol_detection_timeout; HTTP goes back to the caller (True), which serves
  it with the virtual hosts, the bytes read still in its buffer; anything else, or
  silence (a protocol whose server speaks first), goes on as TCP to the destination's
  cluster;
- the authorization policies decide, as Istio's do for TCP (filters.authz.check_tcp): on
  the caller's identity, address and the destination port;
- TCP: an endpoint of the cluster (its balancer, its TLS: mTLS to another sidecar),
  connected within the cluster's connect_timeout;
- PASSTHROUGH: the original destination itself (PassthroughCluster), or the listener's
  passthrough_address with the original port (InboundPassthroughCluster: the workload's
  own port on its local address), never one of the proxy's own listener ports (a loop);
- BLACKHOLE: refused (REGISTRY_ONLY: no mesh service there), closed at once.
Then bytes go both ways (proxy.tunnel.splice) until both sides are done or the
listener's idle_timeout passes with no byte either way. Counted per listener (tcp.*) and
per cluster (upstream_cx_*, bytes), and logged once: method and path "-", protocol TCP,
the original destination as the authority, Envoy's flags (UH: refused or no endpoint, UF:
connect failure, UC: reset upstream, DC: reset by the client, NC: no such cluster), and
in the details why it was refused (blackhole, loop, the denying policy, idle_timeout).
"""

from __future__ import annotations

import time
from time import perf_counter

import trio

from meshproxy.config.destinations import (
    AUTO,
    BLACKHOLE,
    PASSTHROUGH,
    DestinationSpec,
    DestinationTable,
)
from meshproxy.filters.authz import Request as AuthzRequest
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import ProxyError
from meshproxy.protocol.http_inspector import (
    HTTP2,
    HTTP10,
    HTTP11,
    NEED_MORE,
    NOT_HTTP,
    inspect,
)
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.phases import PH_TCP
from meshproxy.proxy.tunnel import shutdown_writer, splice
from meshproxy.transport.sockio import PeerClosed, connect
from meshproxy.upstream.cluster_manager import Cluster
from meshproxy.upstream.conn_pool import UpstreamConn
from meshproxy.upstream.connect import connect_endpoint

_PROTOCOL = b"TCP"


def _no_header(_name: str) -> str | None:
    return None


class _Session:
    """One proxied connection's record, for its stats and its access log line."""

    __slots__ = ("start", "wall", "rx", "tx", "flags", "upstream", "details")

    def __init__(self) -> None:
        self.start = perf_counter()
        self.wall = time.time()
        self.rx = self.tx = 0
        self.flags = "-"
        self.upstream = "-"
        self.details = "-"


async def inspect_http(side: ClientSide, timeout: float) -> bool:
    """AUTO: whether the client speaks HTTP, from its first bytes (kept in side.buf)."""
    ls = side.ctx.lstats
    found = NEED_MORE
    with trio.move_on_after(timeout):  # the one bound: the reads have no deadline of their own
        while True:
            found = inspect(side.buf[side.pos:])
            if found != NEED_MORE:
                break
            data = await side.recv()
            if not data:
                break
            side.buf = side.buf[side.pos:] + data
            side.pos = 0
    blk = ls.block
    if found == HTTP11:
        blk.inc(ls.http_inspector_http11_found)
    elif found == HTTP10:
        blk.inc(ls.http_inspector_http10_found)
    elif found == HTTP2:
        blk.inc(ls.http_inspector_http2_found)
    else:
        blk.inc(ls.http_inspector_http_not_found)
    return found not in (NEED_MORE, NOT_HTTP)


async def serve(side: ClientSide, dest: DestinationSpec, dst: tuple[str, int]) -> bool:
    """Serve an intercepted connection as TCP; True when AUTO found HTTP instead (the
    caller serves it). Raises nothing the caller must answer: the session ends here."""
    ctx = side.ctx
    table = ctx.spec.destinations
    assert table is not None
    if dest.kind == AUTO and await inspect_http(side, table.detection_timeout):
        return True
    side.phase = PH_TCP
    side.deadline = side.reactor.now + ctx.spec.idle_timeout
    ls = ctx.lstats
    ls.block.inc(ls.tcp_downstream_cx_total)
    s = _Session()
    try:
        await _proxy(side, dest, dst, table, s)
    except PeerClosed:
        if s.flags == "-":
            s.flags = flags.DOWNSTREAM_CONNECTION_TERMINATION
    finally:
        if side.deadline <= side.reactor.now and s.flags == "-":
            ls.block.inc(ls.tcp_idle_timeout)
            s.details = "idle_timeout"
        _log(side, dst, s)
    return False


async def _proxy(side: ClientSide, dest: DestinationSpec, dst: tuple[str, int],
                 table: DestinationTable, s: _Session) -> None:
    ctx = side.ctx
    ls = ctx.lstats
    authz = ctx.spec.authz
    if authz is not None:
        ident = side.identity
        decision = authz.check_tcp(AuthzRequest(
            "", "", "", dst[1], side.peer[0] if side.peer else "",
            ident.principal.decode() if ident is not None else "",
            ident.namespace if ident is not None else "", _no_header))
        hs = ctx.hstats
        hs.block.inc(hs.rbac_allowed if decision.allowed else hs.rbac_denied)
        if not decision.allowed:
            s.details = f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]"
            return
    cluster = ctx.clusters.get(dest.cluster)
    if cluster is None:
        s.flags = flags.NO_CLUSTER
        return
    st = cluster.stats
    kind = dest.kind
    if kind == PASSTHROUGH:
        address = table.passthrough_address or dst[0]
        if dst[1] in table.own_ports and (table.passthrough_address is not None
                                          or _local(side, dst[0])):
            kind = BLACKHOLE  # it would come straight back to this proxy
    if kind == BLACKHOLE:
        st.block.inc(st.upstream_cx_none_healthy)
        ls.block.inc(ls.tcp_downstream_cx_no_route)
        s.flags = flags.NO_HEALTHY_UPSTREAM
        s.details = "blackhole" if dest.kind == BLACKHOLE else "loop"
        return
    try:
        if kind == PASSTHROUGH:
            conn = await _connect_passthrough(side, cluster, address, dst[1])
        else:
            ep = cluster.pick(side.reactor.now)
            if ep is None:
                st.block.inc(st.upstream_cx_none_healthy)
                ls.block.inc(ls.tcp_downstream_cx_no_route)
                s.flags = flags.NO_HEALTHY_UPSTREAM
                return
            conn = await connect_endpoint(side.reactor, cluster, ep)
    except ProxyError as exc:
        st.block.inc(getattr(st, exc.stat or "upstream_cx_connect_fail"))
        s.flags = exc.flag
        s.details = exc.detail
        return
    s.upstream = f"{conn.endpoint.address}:{conn.endpoint.port}" if kind != PASSTHROUGH \
        else f"{address}:{dst[1]}"
    side.upstream = conn
    blk, rx_total, tx_total = ls.block, ls.tcp_downstream_cx_rx_bytes_total, \
        ls.tcp_downstream_cx_tx_bytes_total
    cblk, up_tx, up_rx = st.block, st.upstream_cx_tx_bytes_total, st.upstream_cx_rx_bytes_total

    def counted(upstream_bound: bool, n: int) -> None:
        if upstream_bound:
            s.rx += n
            blk.add(rx_total, n)
            cblk.add(up_tx, n)
        else:
            s.tx += n
            blk.add(tx_total, n)
            cblk.add(up_rx, n)

    try:
        if side.pos < len(side.buf):  # what the HTTP inspector read
            early = side.buf[side.pos:]
            side.buf, side.pos = b"", 0
            await conn.send(early)
            counted(True, len(early))
        broken = await splice(side, conn.recv, conn.send, shutdown_writer(conn.sock),
                              side.send, shutdown_writer(side.sock), counted)
        if broken:
            s.flags = flags.UPSTREAM_CONNECTION_TERMINATION
    finally:
        side.upstream = None
        conn.close()


def _local(side: ClientSide, address: str) -> bool:
    """Whether `address` is this host's, as far as the connection tells: the address it
    arrived on, or loopback."""
    try:
        here = side.sock.getsockname()[0]
    except OSError:
        return True
    here = here[7:] if here.startswith("::ffff:") else here
    return address == here or address.startswith("127.") or address == "::1"


async def _connect_passthrough(side: ClientSide, cluster: Cluster, address: str,
                               port: int) -> UpstreamConn:
    """A plain connection to where the client was going, within the passthrough cluster's
    connect_timeout; counted on the cluster's one endpoint (Cluster.original_dst), whose
    own address is never used."""
    with trio.move_on_after(cluster.spec.connect_timeout):
        try:
            return UpstreamConn(await connect(side.reactor, address, port),
                                cluster.original_dst())
        except OSError as exc:
            raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                             f"upstream connect error: {exc.strerror or exc}") from None
    raise ProxyError(503, flags.UPSTREAM_CONNECT_FAILURE, "upstream",
                     "upstream connect error: connect timeout",
                     stat="upstream_cx_connect_timeout")


def _log(side: ClientSide, dst: tuple[str, int], s: _Session) -> None:
    logger = side.ctx.logger
    if logger is None:
        return
    ident = side.identity
    host, port = dst
    authority = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
    logger.log_request(
        s.wall, b"-", b"-", _PROTOCOL, 0, s.flags, s.rx, s.tx,
        int((perf_counter() - s.start) * 1000), s.upstream, None, side.remote(), authority,
        None, None, ident.spiffe_id or "-" if ident else "-", s.details)
