"""Request mirroring: Envoy's request_mirror_policies, Istio's mirror and mirrorPercentage.

A share of a route's requests is copied to another cluster, fire and forget:
- the copy's Host (:authority) is suffixed "-shadow", before a port if it has one
  (a.example:8080 -> a.example-shadow:8080), Envoy's rule: the shadow's own logs and routes
  can tell a copy from a request;
- it runs in the worker's nursery, never in the request's: the primary response neither
  waits for the copy nor fails with it. At most MAX_SHADOWS copies are in flight per
  worker; past that a request is not mirrored (shadow_rq_overflow);
- the request body is streamed to the copy as the primary sends it upstream (the
  BodyState's tap), up to the policy's body_limit (the retry buffer's bound): a body known
  to be longer (content-length) is not mirrored, one that grows past it (chunked, HTTP/2
  DATA) abandons its copy; both are counted (shadow_rq_body_too_large). A copy that falls
  behind holds at most body_limit bytes;
- the copy goes through the router as a request of its own (ShadowSide: a client side
  with no socket): the shadow cluster's pools, balancer, breakers and upstream_rq_*
  stats, the route's header rewrites and timeout (the timeout bounds the copy's life), no
  retries; the response is read and dropped.
Stats on the shadow cluster: shadow_rq_total, shadow_rq_failed (no whole response: the
shadow is down, timed out, or reset), shadow_rq_body_too_large, shadow_rq_overflow.

Dark launches (a policy's response_diff): the primary's response is captured as it is
written to the client (the HTTP/1.1 bytes, or an HTTP/2 stream's fields and DATA), the
copy's as the router relays it to its ShadowSide, and when both have ended they are
compared (filters.mirror_diff), counted on the route's mirror.<route>.same, different or
shadow_failed. A differing pair is recorded with what differed: the worker's latest
RING of them are on the admin server's /mirror_diffs (stats.diff_samples), and each is an
access log line (MIRROR_DIFF). A primary that did not end whole (the client went away)
is not compared.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from time import perf_counter
from typing import Any

import trio

from meshproxy._core.http1_parser import MessageHead, encode_chunk, encode_last_chunk
from meshproxy.config.snapshot import ClusterAction
from meshproxy.filters.mirror_diff import Capture, DiffSpec, compare
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.phases import PH_UPSTREAM
from meshproxy.proxy.relay import NO_DEADLINE
from meshproxy.proxy.router import forward
from meshproxy.transport.sockio import PeerClosed

log = logging.getLogger("meshproxy.mirror")

# Copies in flight per worker: a shadow that is slow or down must cost bounded memory and
# tasks, never the primary traffic's.
MAX_SHADOWS = 1024
# A copy's life when its route has no timeout (Envoy's route timeout default).
DEFAULT_TIMEOUT = 15.0


def shadow_host(host: bytes) -> bytes:
    """Envoy's shadow authority: "-shadow" after the host name, before any port."""
    if host.startswith(b"["):  # an IPv6 literal: [::1]:8080
        end = host.find(b"]")
        if end >= 0:
            return host[:end + 1] + b"-shadow" + host[end + 1:]
    name, colon, port = host.rpartition(b":")
    if colon and port.isdigit():
        return name + b"-shadow:" + port
    return host + b"-shadow"


class ShadowSide(ClientSide):
    """A copy's client side: its body comes from the primary's (feed, end), its response is
    read for its status (`response`, a Capture fed until it has one) and dropped, or read
    whole when it is compared (the Pair's Capture). No socket: nothing to read or close."""

    __slots__ = ("tx", "rx", "chunked", "framed", "fed", "limit", "pending", "tail",
                 "broken", "ended", "cluster", "response", "pair")

    def __init__(self, primary: ClientSide, head: MessageHead, cluster: Any,
                 limit: int) -> None:
        # Not ClientSide.__init__: there is no socket to register.
        self.ctx = primary.ctx
        self.reactor = primary.reactor
        self.ch = None  # type: ignore[assignment]
        self.sock = None  # type: ignore[assignment]
        self.peer = primary.peer
        self.peer_ip = primary.peer_ip
        self.identity = primary.identity
        self.original_dst = primary.original_dst
        self._remote = b""
        self.buf = b""
        self.pos = 0
        self.phase = PH_UPSTREAM
        self.upstream = None
        self.deadline = NO_DEADLINE
        self.born = primary.reactor.now
        self.tx, self.rx = trio.open_memory_channel[bytes](math.inf)
        self.chunked = head.chunked
        # What the tap gives: the body as the primary sent it over HTTP/1.1 (its chunks
        # framed, proxy.relay), or its payload alone (to an HTTP/2 origin, proxy.relay_h2).
        self.framed = True
        self.fed = 0
        self.limit = limit
        self.pending = b""
        self.tail = False  # the last chunk was given (a chunked body)
        self.broken = False
        self.ended = False
        self.cluster = cluster
        self.response = Capture(0, head.method == b"HEAD")
        self.pair: Pair | None = None  # when its response is compared with the primary's

    def compare_with(self, pair: Pair) -> None:
        """Its response is compared with the primary's: read whole, into the pair's."""
        self.pair = pair
        self.response = pair.shadow

    @property
    def status(self) -> int:
        """The final response's status; 0 before it, -1 for a response that was not one."""
        return self.response.status

    # The body, from the primary (BodyState.tap)

    def feed(self, data: bytes) -> None:
        if self.broken or self.ended:
            return
        self.fed += len(data)
        if self.fed > self.limit:
            st = self.cluster.stats
            st.block.inc(st.shadow_rq_body_too_large)
            self.abandon()
            return
        self.tx.send_nowait(data)

    def end(self) -> None:
        self.ended = True
        self.tx.close()

    def abandon(self) -> None:
        """The copy cannot be sent whole: its body reads fail, so the copy ends."""
        self.broken = self.ended = True
        self.tx.close()

    async def recv(self, size: int = 65536, deadline: float = 0.0) -> bytes:
        """The body's next piece as the relay reads it from a client: for a chunked head,
        chunk-framed (the relay decodes it as it would a client's)."""
        if self.pending:
            data, self.pending = self.pending[:size], self.pending[size:]
            return data
        try:
            data = await self.rx.receive()
        except trio.EndOfChannel:
            if self.broken:
                raise PeerClosed("the copy's body was abandoned") from None
            if self.chunked and not self.framed and not self.tail:
                self.tail = True
                return encode_last_chunk()
            return b""
        if self.chunked and not self.framed:
            data = encode_chunk(data)
        if len(data) > size:
            data, self.pending = data[:size], data[size:]
        return data

    recv_wait = recv

    async def send(self, data: bytes) -> None:
        """What a client would be sent: read until its status is known (whole when it is
        compared), then dropped."""
        if self.pair is not None or not self.response.status:
            self.response.wire(data)

    def reset(self) -> None:
        self.broken = True


class Pair:
    """A primary response and its copy's, compared once both have ended."""

    __slots__ = ("spec", "ctx", "route", "primary", "shadow", "primary_done", "shadow_done",
                 "shadow_ok", "ex", "cluster")

    def __init__(self, spec: DiffSpec, ctx: Any, route: str, primary: Capture,
                 head: MessageHead, ex: Exchange, cluster: str) -> None:
        self.spec = spec
        self.ctx = ctx
        self.route = route
        self.primary = primary
        self.shadow = Capture(spec.max_body, head.method == b"HEAD")
        self.primary_done = self.shadow_done = self.shadow_ok = False
        self.ex = ex
        self.cluster = cluster

    def ended(self, primary: bool, ok: bool = True) -> None:
        if primary:
            self.primary_done = True
        else:
            self.shadow_done = True
            self.shadow_ok = ok
        if self.primary_done and self.shadow_done:
            try:
                self._compare()
            except Exception:  # a comparison must never cost a request or the worker
                log.exception("comparing a mirrored response failed")

    def _compare(self) -> None:
        ctx = self.ctx
        st = ctx.mirror_stats.get(self.route)
        if st is None:
            st = ctx.mirror_stats[self.route] = ctx.sink.mirror(self.route)
        p, s = self.primary, self.shadow
        if not self.shadow_ok or not s.complete or s.status <= 0:
            st.block.inc(st.shadow_failed)
            return
        if not p.complete or p.status <= 0:
            return  # the primary did not end whole: nothing to compare it with
        reasons = compare(self.spec, p, s)
        if not reasons:
            st.block.inc(st.same)
            return
        st.block.inc(st.different)
        ex = self.ex
        request = {"method": ex.method.decode("latin-1"), "path": ex.target.decode("latin-1"),
                   "x_request_id": (ex.request_id or (ex.head.request_id if ex.head else None)
                                    or b"-").decode("latin-1"),
                   "shadow_cluster": self.cluster}
        sample = {"time": time.time(), "route": self.route, **request,
                  "differences": reasons, "primary": _summary(p), "shadow": _summary(s)}
        record = ctx.state.diff_sample
        if record is not None:
            record(sample)
        if ctx.logger is not None:
            ctx.logger.log_mirror_diff(self.route, request, reasons)


def _summary(c: Capture) -> dict[str, Any]:
    return {"status": c.status, "body_bytes": c.size, "sha256": c.sha.hexdigest()}


class Tap:
    """The primary's body, given to every copy of the request (BodyState.tap), and the
    primary's response capture when copies are compared."""

    __slots__ = ("shadows", "capture", "pairs")

    def __init__(self, shadows: list[ShadowSide], capture: Capture | None,
                 pairs: list[Pair]) -> None:
        self.shadows = shadows
        self.capture = capture
        self.pairs = pairs

    def response_written(self) -> None:
        """The primary's response is written (or never will be)."""
        if self.capture is not None:
            self.capture.closed()
        for pair in self.pairs:
            pair.ended(primary=True)

    # A copy must never cost the primary request: whatever goes wrong in giving it the
    # body abandons that copy, never raises into the primary's relay.

    def feed(self, data: bytes) -> None:
        for s in self.shadows:
            try:
                s.feed(data)
            except Exception:
                log.exception("a request copy's body failed")
                s.abandon()

    def end(self) -> None:
        for s in self.shadows:
            try:
                s.end()
            except Exception:
                log.exception("a request copy's body failed")
                s.abandon()

    def unframed(self) -> None:
        """The body comes as its payload (an HTTP/2 origin's relay), not HTTP/1.1 bytes."""
        for s in self.shadows:
            s.framed = False


def start_mirrors(side: ClientSide, head: MessageHead, ex: Exchange,
                  action: ClusterAction) -> Tap | None:
    """Decide which of the route's mirror policies copy this request, and start each copy
    in the worker's nursery; the tap that streams the body to them (None: no copy)."""
    state = side.ctx.state
    if state.spawn is None:
        return None
    shadows = []
    pairs: list[Pair] = []
    capture: Capture | None = None
    for name, fraction, limit, spec, route in action.mirrors:
        if fraction < 1.0 and random.random() >= fraction:
            continue
        cluster = side.ctx.clusters.get(name)
        if cluster is None:
            continue
        st = cluster.stats
        blk = st.block
        if state.shadows >= MAX_SHADOWS:
            blk.inc(st.shadow_rq_overflow)
            continue
        if head.content_length > limit:
            blk.inc(st.shadow_rq_body_too_large)
            continue
        blk.inc(st.shadow_rq_total)
        shadow = ShadowSide(side, head, cluster, limit)
        if spec is not None:
            if capture is None:
                capture = Capture(max(s.max_body for *_x, s, _r in action.mirrors
                                      if s is not None), head.method == b"HEAD")
            pair = Pair(spec, side.ctx, route, capture, head, ex, name)
            shadow.compare_with(pair)
            pairs.append(pair)
        shadows.append(shadow)
        state.shadows += 1
        state.spawn(_copy, shadow, head, ex, action, name)
    if not shadows:
        return None
    if not (head.chunked or head.content_length > 0):
        for sh in shadows:
            sh.end()
    return Tap(shadows, capture, pairs)


async def _copy(shadow: ShadowSide, head: MessageHead, ex: Exchange, action: ClusterAction,
                name: str) -> None:
    """One copy, to its end; whatever happens to it stays here."""
    st = shadow.cluster.stats
    ok = False
    try:
        copy = Exchange(head, perf_counter())
        copy.host = ex.host
        copy.target = ex.target
        copy.request_id = ex.request_id  # the primary's x-request-id (Envoy keeps it)
        copy.grpc = ex.grpc
        shadow_action = dataclasses.replace(
            action, clusters=((name, 1),), total_weight=1, retry=None, filters=None,
            mirrors=(), host_rewrite=shadow_host(action.host_rewrite or ex.host))
        with trio.move_on_after(action.timeout or DEFAULT_TIMEOUT):
            result = await forward(shadow, head, copy, shadow_action, None)
            ok = type(result) is bool and shadow.status > 0 and not shadow.broken
    except PeerClosed:
        pass  # its body was abandoned, or its upstream went away
    except Exception:
        log.exception("mirroring to %s failed", name)
    finally:
        shadow.ctx.state.shadows -= 1
        if shadow.upstream is not None:
            shadow.upstream.abort()
            shadow.upstream = None
        if not ok:
            st.block.inc(st.shadow_rq_failed)
        if shadow.pair is not None:
            shadow.pair.shadow.closed()
            shadow.pair.ended(primary=False, ok=ok)
