"""Active health checking, run once per proxy by the supervisor (never once per worker).

Each endpoint of a cluster with a `health_check` is probed every `interval` (plus a random
jitter up to `interval_jitter`): a TCP connect, an HTTP/1.1 GET of `path` whose status
must be in `expected_statuses`, or a gRPC grpc.health.v1.Health/Check over HTTP/2 (h2c, or
TLS with ALPN h2) for `service_name`, which must answer SERVING with grpc-status 0 (Envoy's
grpc_health_check), all within `timeout`. `unhealthy_threshold` failures in a
row mark it unhealthy, `healthy_threshold` successes in a row healthy again; an answer
carrying `x-envoy-immediate-health-check-fail` marks it unhealthy at once (Envoy's way for
a server to leave before it stops). Endpoints start healthy, so traffic flows from the
first moment and a failing endpoint is taken out after unhealthy_threshold x interval.

Results go to the `hc_failed` cell of each endpoint in the supervisor's own slab of the
stats segment, the one slab only the supervisor writes; every worker reads that cell when
its balancer picks. State is kept by endpoint across reloads.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

import h11
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import H2Error

from meshproxy.config import schema
from meshproxy.config.compile import upstream_tls
from meshproxy.config.durations import parse_duration
from meshproxy.protocol.grpc import (
    GRPC_CONTENT_TYPE,
    HEALTH_CHECK_PATH,
    health_request,
    health_serving,
    status_of,
)
from meshproxy.stats.names import Scope, offset
from meshproxy.stats.shared_memory import Segment, Slots
from meshproxy.stats.sink import endpoint_key
from meshproxy.transport.h11_io import next_event
from meshproxy.transport.sockio import PeerClosed
from meshproxy.transport.tls_context import DEFAULT_ALPN, ClientTLS
from meshproxy.transport.tls_stream import TLSError, TLSStream

log = logging.getLogger("meshproxy.health_check")

IMMEDIATE_FAIL = b"x-envoy-immediate-health-check-fail"


class _State:
    __slots__ = ("healthy", "successes", "failures")

    def __init__(self) -> None:
        self.healthy = True
        self.successes = 0
        self.failures = 0


class HealthChecker:
    def __init__(self, segment: Segment, slots: Slots) -> None:
        self.segment = segment
        self.slots = slots
        self.block = segment.block(segment.retired)
        self.states: dict[str, _State] = {}
        self._scope: trio.CancelScope | None = None

    def stop(self) -> None:
        """No more probes (the proxy is draining: its endpoints are none of its business)."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    def apply(self, config: schema.Config, nursery: trio.Nursery,
              material: Mapping[str, bytes] | None = None) -> None:
        """Probe the endpoints of `config` (stopping the probes of the previous one). A
        cluster with upstream TLS is probed over TLS, with its own client certificate and
        verification (`material`: the TLS files' bytes, as the workers have them)."""
        if self._scope is not None:
            self._scope.cancel()
        scope = self._scope = trio.CancelScope()
        probes = [(c, c.health_check, e) for c in config.clusters if c.health_check
                  for e in c.endpoints]
        tls = {c.name: ClientTLS.from_spec(
                   spec, (b"h2",) if c.health_check.type == "grpc" else DEFAULT_ALPN)
               for c in config.clusters
               if c.health_check and (spec := upstream_tls(c.tls, material or {})) is not None}
        wanted = {endpoint_key(c.name, f"{e.address}:{e.port}") for c, _, e in probes}
        for key in [k for k in self.states if k not in wanted]:
            del self.states[key]  # endpoints no longer checked are not reported failed

        async def run_all() -> None:
            with scope:
                async with trio.open_nursery() as inner:
                    for cluster, hc, ep in probes:
                        assert hc is not None
                        inner.start_soon(self._loop, cluster, hc, ep, tls.get(cluster.name))

        nursery.start_soon(run_all)
        for c in config.clusters:
            self._publish_healthy(c)

    def _cells(self, cluster: str, label: str) -> tuple[int, int]:
        layout = self.segment.layout
        ep_cell = (layout.first(Scope.ENDPOINT, self.slots.endpoints[endpoint_key(cluster, label)])
                   + offset(Scope.ENDPOINT, "hc_failed"))
        return ep_cell, layout.first(Scope.CLUSTER, self.slots.clusters[cluster])

    def _publish_healthy(self, cluster: schema.Cluster) -> None:
        if cluster.health_check is None:
            return
        healthy = sum(1 for e in cluster.endpoints
                      if self.states.get(endpoint_key(cluster.name, f"{e.address}:{e.port}"),
                                         _State()).healthy)
        base = self.segment.layout.first(Scope.CLUSTER, self.slots.clusters[cluster.name])
        self.block.set(base + offset(Scope.CLUSTER, "health_check.healthy"), healthy)

    async def _loop(self, cluster: schema.Cluster, hc: schema.HealthCheck,
                    ep: schema.Endpoint, tls: ClientTLS | None) -> None:
        label = f"{ep.address}:{ep.port}"
        key = endpoint_key(cluster.name, label)
        state = self.states.setdefault(key, _State())
        ep_cell, cbase = self._cells(cluster.name, label)
        interval = parse_duration(hc.interval)
        jitter = parse_duration(hc.interval_jitter)
        timeout = parse_duration(hc.timeout)
        blk = self.block
        blk.set(ep_cell, 0 if state.healthy else 1)
        while True:
            await trio.sleep(interval + random.random() * jitter)
            ok, immediate = await probe(hc, cluster.name, ep.address, ep.port, timeout, tls)
            blk.inc(cbase + offset(Scope.CLUSTER, "health_check.attempt"))
            blk.inc(cbase + offset(Scope.CLUSTER, "health_check.success" if ok
                                   else "health_check.failure"))
            was = state.healthy
            if ok:
                state.successes += 1
                state.failures = 0
                if not state.healthy and state.successes >= hc.healthy_threshold:
                    state.healthy = True
            else:
                state.failures += 1
                state.successes = 0
                if state.healthy and (immediate or state.failures >= hc.unhealthy_threshold):
                    state.healthy = False
            if state.healthy != was:
                log.warning("endpoint %s of cluster %s is now %s", label, cluster.name,
                            "healthy" if state.healthy else "unhealthy")
                blk.set(ep_cell, 0 if state.healthy else 1)
                self._publish_healthy(cluster)


class _TrioTLS(trio.abc.Stream):
    """A TLSStream over a trio stream, as the trio.abc.Stream h11_io reads from."""

    def __init__(self, raw: trio.abc.Stream, tls: ClientTLS) -> None:
        self.raw = raw
        self.tls = tls

        async def send(data: bytes) -> None:
            try:
                await raw.send_all(data)
            except (trio.BrokenResourceError, OSError) as exc:
                raise PeerClosed(str(exc)) from None

        async def recv(size: int, deadline: float) -> bytes:
            try:
                return bytes(await raw.receive_some(size))
            except (trio.BrokenResourceError, OSError) as exc:
                raise PeerClosed(str(exc)) from None

        self.stream = TLSStream(tls.connection(), send, recv)

    async def handshake(self) -> bool:
        try:
            await self.stream.handshake()
        except (TLSError, PeerClosed):
            return False
        return not self.tls.check_peer(self.stream.ssl)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.raw.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.stream.recv(max_bytes or 65536)

    async def aclose(self) -> None:
        await self.raw.aclose()


async def probe(hc: schema.HealthCheck, cluster: str, address: str, port: int,
                timeout: float, tls: ClientTLS | None = None) -> tuple[bool, bool]:
    """(passed, asked to fail immediately). With `tls`, an HTTP check runs over TLS and
    fails when the endpoint's certificate does not verify (as a request would: 503 UF)."""
    with trio.move_on_after(timeout):
        try:
            raw = await trio.open_tcp_stream(address, port)
        except OSError:
            return False, False
        async with raw:
            if hc.type == "tcp":
                return True, False
            stream: trio.abc.Stream = raw
            if tls is not None:
                stream = _TrioTLS(raw, tls)
                if not await stream.handshake():
                    return False, False
            if hc.type == "grpc":
                try:
                    return await _grpc_check(stream, hc, cluster, tls is not None), False
                except (OSError, trio.BrokenResourceError, H2Error, PeerClosed):
                    return False, False
            conn = h11.Connection(h11.CLIENT)
            try:
                await stream.send_all(conn.send(h11.Request(
                    method="GET", target=hc.path,
                    headers=[("host", hc.host or cluster), ("user-agent", "meshproxy-hc"),
                             ("connection", "close")])) + conn.send(h11.EndOfMessage()))
                ev = await next_event(conn, stream)
            except (OSError, trio.BrokenResourceError, h11.ProtocolError, PeerClosed):
                return False, False
            if not isinstance(ev, h11.Response):
                return False, False
            if any(name == IMMEDIATE_FAIL for name, _ in ev.headers):
                return False, True
            return ev.status_code in hc.expected_statuses, False
    return False, False


async def _grpc_check(stream: trio.abc.Stream, hc: schema.HealthCheck, cluster: str,
                      secure: bool) -> bool:
    """One grpc.health.v1.Health/Check call on a new HTTP/2 connection (h2 as the client):
    healthy when the answer is :status 200, grpc-status 0 and SERVING."""
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(1, [
        (b":method", b"POST"), (b":scheme", b"https" if secure else b"http"),
        (b":path", HEALTH_CHECK_PATH), (b":authority", (hc.host or cluster).encode()),
        (b"content-type", GRPC_CONTENT_TYPE), (b"te", b"trailers"),
        (b"user-agent", b"meshproxy-hc")])
    conn.send_data(1, health_request(hc.service_name), end_stream=True)
    await stream.send_all(conn.data_to_send())
    headers: list[tuple[bytes, bytes]] = []
    trailers: list[tuple[bytes, bytes]] = []
    body = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return False
        ev: object
        for ev in conn.receive_data(data):
            if isinstance(ev, ResponseReceived) and ev.stream_id == 1:
                headers = list(ev.headers)
            elif isinstance(ev, DataReceived) and ev.stream_id == 1:
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, 1)
                if len(body) > 65536:
                    return False  # a health answer is a few bytes
            elif isinstance(ev, TrailersReceived) and ev.stream_id == 1:
                trailers = list(ev.headers)
            elif isinstance(ev, StreamEnded) and ev.stream_id == 1:
                status = status_of(trailers) if trailers else status_of(headers)
                return ((b":status", b"200") in headers and status == 0
                        and health_serving(body))
            elif isinstance(ev, (StreamReset, ConnectionTerminated)):
                return False
        out = conn.data_to_send()
        if out:
            await stream.send_all(out)
