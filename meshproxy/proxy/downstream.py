"""One downstream HTTP/1.1 connection: read heads, route, answer or forward, keep alive.

Structure (one trio task per connection, DESIGN.md section 6):
- the socket is a raw non-blocking socket driven by trio readiness waits (transport.sockio);
- heads are parsed by the compiled parser (`_core.http1_parser`) straight from the bytes
  received, routed by the compiled route table, and either answered here (local replies:
  no route, redirects, direct responses, errors) or forwarded by `proxy.forward`;
- requests are served in order, so pipelined requests are answered in order (RFC 9112
  section 9.3.2) simply by leaving unconsumed bytes in the buffer for the next turn.

Timeouts: a single CancelScope per connection whose deadline moves with the phase, which
is cheaper than a scope per wait. `phase` says what was being waited for when it fired:
  idle (keep-alive, nothing received)      -> close quietly
  head (request_headers_timeout; slowloris) -> 408 if anything was received, close
  request body (idle_timeout per progress)  -> 408, close
  upstream/response (the route timeout)     -> 504 UT, or a reset if the response started
A scope that fired stays cancelled, so every timeout ends the connection.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial
from time import perf_counter
from typing import Any

import trio

from meshproxy._core.http1_parser import HeadParser, MessageHead, ParseError
from meshproxy.config.snapshot import (
    PRINCIPAL_HEADER,
    ClusterAction,
    DirectAction,
    ListenerSpec,
    RedirectAction,
    RouteFilters,
    TLSSpec,
)
from meshproxy.filters.authz import Request as AuthzRequest
from meshproxy.protocol import errors as flags
from meshproxy.protocol.authority import service_authority
from meshproxy.proxy.access_log import AccessLogger, Entry, format_time, text
from meshproxy.proxy.local_reply import local_reply
from meshproxy.proxy.phases import PH_HEAD, PH_IDLE, PH_REQ_BODY
from meshproxy.proxy.router import forward
from meshproxy.stats.sink import Sink
from meshproxy.tracing.tracer import Active, Tracer
from meshproxy.transport.reactor import Reactor
from meshproxy.transport.sockio import PeerClosed, abort, close, recv_after_wait, recv_now, send_all
from meshproxy.transport.tls_context import SanRefused, ServerTLS
from meshproxy.transport.tls_material import PeerIdentity
from meshproxy.transport.tls_stream import TLSError, TLSStream
from meshproxy.upstream.cluster_manager import ClusterManager
from meshproxy.upstream.conn_pool import UpstreamConn

# Bound on writing a last error reply to a client after a timeout: it may not be reading.
FAREWELL_TIMEOUT = 1.0
# Envoy marks its local rate limit replies so that other Envoys do not retry them.
RATE_LIMITED = (b"x-envoy-ratelimited", b"true")

log = logging.getLogger("meshproxy.downstream")


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

    __slots__ = ("stats", "draining", "demand", "changed", "asked")

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self.draining = False
        self.demand: Any = None  # Callable[[bytes], None] | None
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
                 "lstats", "hstats", "tracer", "tls")

    def __init__(self, spec: ListenerSpec, clusters: ClusterManager,
                 logger: AccessLogger | None, reactor: Reactor, state: WorkerState,
                 sink: Sink) -> None:
        self.reactor = reactor
        self.state = state
        self.lstats = sink.listener(spec.name)
        self.hstats = sink.http(spec.name)
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


class Exchange:
    """One request and its response, as the access log and the error paths see it."""

    __slots__ = ("head", "method", "target", "host", "start", "wall_start", "status", "flags",
                 "bytes_in", "bytes_out", "upstream_host", "request_id", "response_started",
                 "upstream_status", "trace", "cluster", "details", "resp_extra")

    def __init__(self, head: MessageHead | None, start: float) -> None:
        self.head = head
        self.method = head.method if head is not None else b"-"
        self.target = head.target if head is not None else b"-"
        self.host = b""
        self.start = start
        self.wall_start = 0.0
        self.status = 0
        self.flags = "-"
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_host = "-"
        self.request_id: bytes | None = None
        self.response_started = False
        self.upstream_status = 0
        self.trace: Active | None = None
        self.cluster = "-"
        self.details = "-"  # why it failed, for the log (Envoy's response code details)
        # Headers every response to this request carries (x-ratelimit-*).
        self.resp_extra: list[tuple[bytes, bytes]] | None = None


class DownstreamConnection:
    __slots__ = ("ctx", "reactor", "ch", "sock", "peer", "peer_ip", "buf", "pos", "phase", "ex",
                 "requests", "upstream", "cs", "deadline", "born", "recv", "recv_wait", "send",
                 "tls", "identity")

    def __init__(self, ctx: ListenerContext, sock: socket.socket, peer: tuple) -> None:
        self.ctx = ctx
        self.reactor = ctx.reactor
        self.ch = ctx.reactor.register(sock)
        self.sock = sock
        # The connection's I/O: plain sockets call sockio directly (partials add no frame);
        # a TLS connection swaps in its stream's methods after the handshake.
        self.recv: Callable[..., Awaitable[bytes]] = partial(recv_now, self.ch)
        self.recv_wait: Callable[..., Awaitable[bytes]] = partial(recv_after_wait, self.ch)
        self.send: Callable[[bytes], Awaitable[None]] = partial(send_all, sock)
        self.tls: TLSStream | None = None
        # The verified client certificate's identity (mTLS), the source principal.
        self.identity: PeerIdentity | None = None
        self.peer = peer
        self.peer_ip = peer[0].encode("ascii") if peer else b"-"
        self.buf = b""
        self.pos = 0
        self.phase = PH_HEAD
        self.ex: Exchange | None = None
        self.requests = 0
        self.upstream: UpstreamConn | None = None
        # The reactor's ticker cancels `cs` once `deadline` has passed (see reactor.py).
        self.cs = trio.CancelScope()
        self.born = self.reactor.now
        self.deadline = self.born + ctx.spec.request_headers_timeout

    async def run(self) -> None:
        timed = self.reactor.timed
        timed.add(self)
        ls, ws = self.ctx.lstats, self.ctx.state.stats
        blk = ls.block
        blk.inc(ls.downstream_cx_total)
        blk.add(ls.downstream_cx_active, 1)
        blk.inc(ws.downstream_cx_total)
        blk.add(ws.downstream_cx_active, 1)
        try:
            with self.cs:
                if self.ctx.tls is not None and not await self._handshake():
                    return
                while await self._one_request():
                    pass
            if self.cs.cancelled_caught:
                await self._on_timeout()
        except PeerClosed:
            if self.ex is not None:
                if self.ex.status == 0:
                    self.ex.flags = flags.DOWNSTREAM_CONNECTION_TERMINATION
                self._finish(self.ex)
        finally:
            timed.discard(self)
            if self.ex is not None:
                self._finish(self.ex)  # ended some other way (worker stopping, a bug)
            blk.add(ls.downstream_cx_active, -1)
            blk.inc(ls.downstream_cx_destroy)
            blk.add(ws.downstream_cx_active, -1)
            if self.upstream is not None:
                self.upstream.abort()
                self.upstream = None
            if self.tls is not None and self.ch.sock.fileno() >= 0:
                with trio.move_on_after(FAREWELL_TIMEOUT) as scope:
                    scope.shield = True
                    await self.tls.close_notify()
            close(self.ch)

    async def _handshake(self) -> bool:
        """TLS termination: the handshake within the listener's handshake timeout; then
        every read and write of this connection goes through the TLS stream."""
        tls = self.ctx.tls
        assert tls is not None
        try:
            plaintext = tls.accept_plaintext and not await self._starts_tls(tls)
        except trio.TooSlowError:
            return False
        if plaintext:
            ls = self.ctx.lstats
            ls.block.inc(ls.downstream_cx_plaintext)
            return True  # PERMISSIVE, and this client speaks plaintext: no identity
        stream = self.tls = TLSStream.over_channel(self.ch, tls.server.connection())
        try:
            await stream.handshake(self.reactor.now + tls.handshake_timeout)
        except (TLSError, trio.TooSlowError) as exc:
            ls = self.ctx.lstats
            ls.block.inc(ls.ssl_connection_error)
            refused = stream.ssl.get_app_data()
            if isinstance(refused, SanRefused):
                # A trusted, valid certificate of an identity this listener does not take:
                # the operator's policy, worth a line in the log (the client got
                # bad_certificate).
                ls.block.inc(ls.ssl_fail_verify_san)
                log.info("refused the client certificate of %s: %s", self.peer, refused)
            else:
                log.debug("TLS handshake with %s failed: %s", self.peer, exc)
            return False
        self.recv = stream.recv
        self.recv_wait = stream.recv_wait
        self.send = stream.send_all
        self.identity = tls.server.peer(stream.ssl)
        ls = self.ctx.lstats
        ls.block.inc(ls.ssl_handshake)
        if tls.server.mtls and self.identity is None:
            ls.block.inc(ls.ssl_no_certificate)
        return True

    async def _starts_tls(self, tls: ListenerTLS) -> bool:
        """PERMISSIVE: whether the connection's first byte opens a TLS handshake record
        (content type 22, RFC 8446 5.1); peeked, so either path reads it again. A client
        that sends nothing within the handshake timeout is let go like a stalled TLS one."""
        deadline = self.reactor.now + tls.handshake_timeout
        while True:
            try:
                first = self.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                await self.ch.wait_readable(deadline)
                continue
            except (ConnectionResetError, ConnectionAbortedError, TimeoutError) as exc:
                raise PeerClosed(str(exc)) from None
            if not first:
                raise PeerClosed("closed before its first byte")
            return first[0] == 0x16

    # ------------------------------------------------------------------ heads

    async def _read_head(self) -> MessageHead | None:
        """The next request head; None when the client closed between requests."""
        ctx = self.ctx
        parser = ctx.parser
        buf, pos = self.buf, self.pos
        head = None
        if pos < len(buf):
            head = parser.parse_request(buf, pos)
            if head is not None:
                return head
            self.phase = PH_HEAD
            if self.requests:
                self.deadline = self.reactor.now + ctx.spec.request_headers_timeout
        elif self.requests:
            # Keep-alive: the client has just been answered, so nothing is queued yet; wait
            # before the recv instead of paying for a recv that fails with EAGAIN.
            self.phase = PH_IDLE
            self.deadline = self.reactor.now + ctx.spec.idle_timeout
            limit = ctx.spec.max_connection_duration
            if limit and self.born + limit < self.deadline:
                self.deadline = self.born + limit  # an idle connection past it just closes
            buf = await self.recv_wait()
            if not buf:
                return None
            pos = 0
            self.phase = PH_HEAD
            self.buf, self.pos = buf, 0
            head = parser.parse_request(buf, 0)
            if head is not None:
                return head
            self.deadline = self.reactor.now + ctx.spec.request_headers_timeout
        else:
            self.phase = PH_HEAD
        while head is None:
            data = await self.recv()
            if not data:
                self.buf, self.pos = buf, pos
                return None
            buf = buf[pos:] + data if pos < len(buf) else data
            pos = 0
            self.buf, self.pos = buf, 0
            head = parser.parse_request(buf, 0)
        return head

    async def _one_request(self) -> bool:
        """Serve one request; True when the connection stays open for another."""
        try:
            head = await self._read_head()
        except ParseError as exc:
            hs = self.ctx.hstats
            hs.block.inc(hs.downstream_cx_protocol_error)
            ex = self._begin(None)
            await self._send_local(ex, None, exc.status, exc.reason.encode() + b"\n",
                                   flags.DOWNSTREAM_PROTOCOL_ERROR, close=True)
            self._finish(ex)
            return False
        if head is None:
            return False
        self.requests += 1
        self.pos = head.end
        ex = self._begin(head)
        keep = await self._dispatch(head, ex)
        self._finish(ex)
        return keep

    def _begin(self, head: MessageHead | None) -> Exchange:
        ex = self.ex = Exchange(head, perf_counter())
        if self.ctx.logger is not None:
            ex.wall_start = time.time()
        if self.ctx.tracer is not None and head is not None:
            ex.trace = self.ctx.tracer.start(head.get)
        hs, ws = self.ctx.hstats, self.ctx.state.stats
        blk = hs.block
        blk.inc(hs.downstream_rq_total)
        blk.add(hs.downstream_rq_active, 1)
        blk.inc(ws.downstream_rq_total)
        return ex

    def _finish(self, ex: Exchange) -> None:
        """Count and log a request once, whichever way it ended."""
        if self.ex is not ex:
            return
        self.ex = None
        hs = self.ctx.hstats
        blk = hs.block
        blk.add(hs.downstream_rq_active, -1)
        status = ex.status
        if 100 <= status < 600:
            blk.inc(hs.downstream_rq_1xx + status // 100 - 1)
        flag = ex.flags
        if flag == flags.NO_ROUTE:
            blk.inc(hs.no_route)
        elif flag == flags.STREAM_IDLE_TIMEOUT:
            blk.inc(hs.downstream_rq_timeout)
        elif flag == flags.DOWNSTREAM_CONNECTION_TERMINATION:
            blk.inc(hs.downstream_rq_rx_reset)
        blk.observe(hs.downstream_rq_time, (perf_counter() - ex.start) * 1000.0)
        if ex.trace is not None and ex.trace.sampled and self.ctx.tracer is not None:
            self._span(self.ctx.tracer, ex)
        self._log(ex)

    def _span(self, tracer: Tracer, ex: Exchange) -> None:
        """Envoy's span tags for this request."""
        head = ex.head
        host = text(ex.host or (head.host if head is not None else None))
        tags = {
            "component": "proxy",
            "http.method": text(ex.method),
            "http.url": f"{self.ctx.scheme.decode()}://{host}{text(ex.target)}",
            "http.protocol": "HTTP/1.0" if head is not None and head.version == 10
            else "HTTP/1.1",
            "http.status_code": str(ex.status),
            "response_flags": ex.flags,
            "upstream_cluster": ex.cluster,
            "upstream_address": ex.upstream_host,
            "request_size": str(ex.bytes_in),
            "response_size": str(ex.bytes_out),
            "downstream_address": self.peer[0] if self.peer else "-",
            "guid:x-request-id": text(ex.request_id
                                      or (head.request_id if head is not None else None)),
            "user_agent": text(head.get(b"user-agent") if head is not None else None),
        }
        error = ex.status >= 500 or ex.status == 0 or ex.flags != "-"
        assert ex.trace is not None
        tracer.finish(ex.trace, text(ex.method), tags, error)

    # ------------------------------------------------------------------ routing

    async def _on_demand(self, host: bytes, method: bytes, target: bytes,
                         headers: list[tuple[bytes, bytes]]) -> tuple[ListenerSpec, Any]:
        """No virtual host serves `host` yet: ask the control plane for it (through the
        supervisor) and hold the request until a snapshot serves it, for at most the
        listener's on_demand_timeout (then the caller answers 404 NR)."""
        state = self.ctx.state
        spec = self.ctx.spec
        authority = service_authority(host)
        if authority is None:
            return spec, None
        if authority not in state.asked:
            state.asked.add(authority)
            state.demand(authority)
        with trio.move_on_after(spec.on_demand_timeout):
            while True:
                await state.changed.wait()
                spec = self.ctx.spec
                _vh, route = spec.route_table.route(host, method, target, headers)
                if route is not None:
                    return spec, route
                if authority not in state.asked:  # asked again after that snapshot
                    state.asked.add(authority)
                    state.demand(authority)
        return self.ctx.spec, None

    async def _dispatch(self, head: MessageHead, ex: Exchange) -> bool:
        target = head.target
        host = head.host or b""
        if target[:1] != b"/":
            split = split_absolute_form(target)
            if split is not None:
                # RFC 9112 section 3.2.2: the authority of an absolute-form target replaces
                # the Host header.
                host, target = split
            elif not (target == b"*" and head.method == b"OPTIONS"):
                return await self._send_local(ex, head, 400, b"unsupported request target\n",
                                              flags.DOWNSTREAM_PROTOCOL_ERROR, close=True)
        ex.host = host
        ex.target = target
        spec = self.ctx.spec
        headers = head.headers
        if spec.match_principal and self.identity is not None:
            headers = headers + [(PRINCIPAL_HEADER, self.identity.principal)]
        _vh, route = spec.route_table.route(host, head.method, target, headers)
        if route is None and spec.on_demand_timeout and self.ctx.state.demand is not None:
            spec, route = await self._on_demand(host, head.method, target, headers)
        if route is None:
            if spec.authz is not None:
                refusal = self._filter(RouteFilters(spec.authz, None), head, ex, host, target)
                if refusal is not None:
                    return await self._send_local(ex, head, *refusal)
            return await self._send_local(ex, head, 404, b"", flags.NO_ROUTE)
        action = route.action
        filters = action.filters
        if filters is not None:
            refusal = self._filter(filters, head, ex, host, target)
            if refusal is not None:
                return await self._send_local(ex, head, *refusal)
        kind = type(action)
        if kind is ClusterAction:
            return await forward(self, head, ex, action)
        if kind is DirectAction:
            return await self._send_local(ex, head, action.status, action.body, "-",
                                          extra=list(action.ops.response_add),
                                          content_type=action.content_type)
        assert kind is RedirectAction
        location = redirect_location(action, self.ctx.scheme, host, target)
        return await self._send_local(ex, head, action.status, b"", "-",
                                      extra=[(b"location", location)] +
                                      list(action.ops.response_add))

    # ------------------------------------------------------------------ filters

    def _filter(self, filters: RouteFilters, head: MessageHead, ex: Exchange, host: bytes,
                target: bytes) -> tuple[int, bytes, str] | None:
        """Authorization, then the rate limit: None to go on, else the local reply."""
        hs = self.ctx.hstats
        blk = hs.block
        if filters.authz is not None:
            decision = filters.authz.check(self._authz_request(head, host, target))
            if decision.audited:
                blk.inc(hs.rbac_logged)
                ex.details = f"rbac_audit_matched_policy[{decision.audited}]"
            if not decision.allowed:
                blk.inc(hs.rbac_denied)
                ex.details = f"rbac_access_denied_matched_policy[{decision.policy or 'none'}]"
                return 403, b"RBAC: access denied", "-"
            blk.inc(hs.rbac_allowed)
        limiter = filters.rate_limit
        if limiter is not None:
            blk.inc(hs.http_local_rate_limit_enabled)
            ident = self.identity
            ok, headers = limiter.take(limiter.key(
                head, self.peer_ip, ident.principal if ident is not None else None))
            if headers:
                ex.resp_extra = headers
            if not ok:
                blk.inc(hs.http_local_rate_limit_rate_limited)
                ex.resp_extra = [*headers, RATE_LIMITED]
                return 429, b"local_rate_limited", flags.RATE_LIMITED
            blk.inc(hs.http_local_rate_limit_ok)
        return None

    def _authz_request(self, head: MessageHead, host: bytes, target: bytes) -> AuthzRequest:
        ident = self.identity
        hostname = host.lower()
        if not hostname.endswith(b"]"):
            hostname = hostname.rpartition(b":")[0] or hostname  # the port is not the host

        def header(name: str) -> str | None:
            value = head.get(name.encode("latin-1"))
            return value.decode("latin-1") if value is not None else None

        return AuthzRequest(
            head.method.decode("latin-1"), target.partition(b"?")[0].decode("latin-1"),
            hostname.decode("latin-1"), self.ctx.spec.port, self.peer[0] if self.peer else "",
            ident.principal.decode() if ident is not None else "",
            ident.namespace if ident is not None else "", header)

    # ------------------------------------------------------------------ local replies

    def too_old(self) -> bool:
        """max_connection_duration reached: the next response says Connection: close."""
        limit = self.ctx.spec.max_connection_duration
        return bool(limit) and self.reactor.now - self.born >= limit

    def body_skippable(self, head: MessageHead) -> bool:
        """Consume an unread request body when all of it is already buffered; otherwise the
        connection must close after the reply (the rest of the body is still coming)."""
        if head.chunked:
            return False
        cl = head.content_length
        if cl <= 0:
            return True
        if len(self.buf) - self.pos >= cl:
            self.pos += cl
            return True
        return False

    async def _send_local(self, ex: Exchange, head: MessageHead | None, status: int, body: bytes,
                          flag: str, *, close: bool = False, body_done: bool = False,
                          extra: list[tuple[bytes, bytes]] | None = None,
                          content_type: bytes = b"text/plain") -> bool:
        keep = (head is not None and not close and head.keep_alive
                and not self.ctx.state.draining and not self.too_old()
                and (body_done or self.body_skippable(head)))
        hdrs = list(extra or ())
        if ex.resp_extra:
            hdrs += ex.resp_extra
        if keep and head is not None and head.version == 10:
            hdrs.append((b"connection", b"keep-alive"))
        head_only = head is not None and head.method == b"HEAD"
        data = local_reply(status, body, close=not keep, head_only=head_only,
                           content_type=content_type, extra=hdrs)
        ex.status = status
        ex.flags = flag
        ex.response_started = True
        ex.bytes_out = 0 if head_only else len(body)
        await self.send(data)
        return keep

    async def _on_timeout(self) -> None:
        ex, phase = self.ex, self.phase
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if phase == PH_IDLE or (phase == PH_HEAD and ex is None and self.pos >= len(self.buf)):
            return
        if ex is None:
            ex = self._begin(None)
        if ex.response_started:
            ex.flags = flags.UPSTREAM_REQUEST_TIMEOUT
            abort(self.ch)
            self._finish(ex)
            return
        if phase in (PH_HEAD, PH_REQ_BODY):
            status, flag, body = 408, flags.STREAM_IDLE_TIMEOUT, b"request timeout\n"
        else:
            status, flag, body = 504, flags.UPSTREAM_REQUEST_TIMEOUT, b"upstream request timeout\n"
        with trio.move_on_after(FAREWELL_TIMEOUT):
            try:
                await self._send_local(ex, ex.head, status, body, flag, close=True)
            except PeerClosed:
                pass
        self._finish(ex)

    def _log(self, ex: Exchange) -> None:
        logger = self.ctx.logger
        if logger is None:
            return
        head = ex.head
        logger.log(Entry(
            start_time=format_time(ex.wall_start or time.time()),
            method=text(ex.method), path=text(ex.target),
            protocol="HTTP/1.0" if head is not None and head.version == 10 else "HTTP/1.1",
            response_code=ex.status, response_flags=ex.flags,
            bytes_received=ex.bytes_in, bytes_sent=ex.bytes_out,
            duration=int((perf_counter() - ex.start) * 1000),
            upstream_host=ex.upstream_host,
            x_request_id=text(ex.request_id or (head.request_id if head is not None else None)),
            downstream_remote_address=f"{self.peer[0]}:{self.peer[1]}" if self.peer else "-",
            authority=text(ex.host or (head.host if head is not None else None)),
            user_agent=text(head.get(b"user-agent") if head is not None else None),
            x_forwarded_for=text(head.forwarded_for if head is not None else None),
            downstream_peer_uri_san=self.identity.spiffe_id or "-" if self.identity else "-",
            response_code_details=ex.details,
        ))


def split_absolute_form(target: bytes) -> tuple[bytes, bytes] | None:
    """http://authority/path?q -> (authority, /path?q) (RFC 9112 section 3.2.2)."""
    lower = target[:8].lower()
    if lower.startswith(b"http://"):
        rest = target[7:]
    elif lower.startswith(b"https://"):
        rest = target[8:]
    else:
        return None
    cut = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    if not authority or b"@" in authority:
        return None  # userinfo is deprecated and a phishing vector (RFC 9110 section 4.2.4)
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority, path


def redirect_location(a: RedirectAction, scheme: bytes, host: bytes, target: bytes) -> bytes:
    path, sep, query = target.partition(b"?")
    if a.path is not None:
        new_path = a.path
        if b"?" in new_path:
            new_path, _, query = new_path.partition(b"?")
            sep = b"?"
    elif a.prefix_rewrite is not None and a.prefix is not None:
        new_path = a.prefix_rewrite + path[len(a.prefix):]
    else:
        new_path = path
    new_host = a.host if a.host is not None else host
    if a.port is not None:
        hostname = new_host.rsplit(b":", 1)[0] if not new_host.endswith(b"]") else new_host
        new_host = hostname + b":%d" % a.port
    location = (a.scheme or scheme) + b"://" + new_host + new_path
    if sep and query and not a.strip_query:
        location += b"?" + query
    return location

