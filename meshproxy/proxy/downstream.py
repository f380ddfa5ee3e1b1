"""One downstream HTTP/1.1 connection: read heads, route, answer or forward, keep alive.

Structure (one trio task per connection, DESIGN.md section 6):
- the socket is a raw non-blocking socket driven by trio readiness waits (transport.sockio);
- heads are parsed by the compiled parser (`_core.http1_parser`) straight from the bytes
  received, routed by the compiled route table, passed through the filter chain
  (proxy.filter_chain) and either answered here or forwarded by the router
  (proxy.router, which relays through proxy.relay);
- this is the only writer of local replies (no route, redirects, direct responses,
  refusals, errors): the layers below return a LocalReply and the keep-alive decision for
  it is made here, in `_send_local`;
- requests are served in order, so pipelined requests are answered in order (RFC 9112
  section 9.3.2) simply by leaving unconsumed bytes in the buffer for the next turn.

Timeouts: a single CancelScope per connection whose deadline moves with the phase, which
is cheaper than a scope per wait. `phase` says what was being waited for when it fired:
  idle (keep-alive, nothing received)      -> close quietly
  head (request_headers_timeout; slowloris) -> 408 if anything was received, close
  request body (idle_timeout per progress)  -> 408, close
  upstream/response (the route timeout)     -> 504 UT, or a reset if the response started
A scope that fired stays cancelled, so every timeout ends the connection.

TLS termination and the connection's fast-path state are proxy.tls_termination's (the
base class); a connection on the fast path has no task until a request needs one
(proxy.fast_path). Size: past 400 lines because the request loop, the timeouts by phase
and the local replies share the connection's one cancel scope and phase.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from meshproxy._core.http1_parser import MessageHead, ParseError
from meshproxy.config.destinations import DestinationSpec
from meshproxy.config.snapshot import ClusterAction
from meshproxy.protocol import errors as flags
from meshproxy.protocol.http2 import PREFACE_LEN, preface_state
from meshproxy.proxy import tcp_proxy
from meshproxy.proxy.attempt import Resume
from meshproxy.proxy.context import ListenerContext
from meshproxy.proxy.dispatch import dispatch, forward_or_reply, reply
from meshproxy.proxy.downstream_h2 import H2Driver
from meshproxy.proxy.exchange import Exchange, begin, finish
from meshproxy.proxy.fast_path import Flight, serves
from meshproxy.proxy.local_reply import LocalReply
from meshproxy.proxy.phases import PH_HEAD, PH_IDLE, PH_REQ_BODY, PH_TCP
from meshproxy.proxy.tls_accept import Handshake
from meshproxy.proxy.tls_termination import TLSTermination
from meshproxy.transport.sockio import PeerClosed, abort, close

# Bound on writing a last error reply to a client after a timeout: it may not be reading.
FAREWELL_TIMEOUT = 1.0
# A keep-alive connection idle this long gives up its task and waits parked on the reactor
# (reactor.py): an idle connection then costs its objects and buffers, not a trio task and
# a chain of suspended coroutines (about 3.3 KB of the 5.4 KB it cost with a task, measured
# with tracemalloc). Waking it costs a task spawn, tens of microseconds, once per idle
# spell: a second of idleness is far above the gaps of a busy keep-alive connection.
PARK_AFTER = 1.0


class _Park(Exception):
    """Raised out of the read loop of a connection that goes to the reactor to wait."""

log = logging.getLogger("meshproxy.downstream")


class DownstreamConnection(TLSTermination):
    """The driver of one client connection (the I/O state the layers below share is
    ClientSide's, TLS termination TLSTermination's)."""

    __slots__ = ("ex", "requests", "cs", "cont", "counted", "h2", "destination")

    def __init__(self, ctx: ListenerContext, sock: socket.socket, peer: tuple) -> None:
        super().__init__(ctx, sock, peer)
        self.ex: Exchange | None = None  # the request being served, until it is logged
        self.requests = 0
        # The reactor's ticker cancels `cs` once `deadline` has passed (see reactor.py).
        self.cs = trio.CancelScope()
        self.counted = False  # counted in the cx stats and the reactor's timers (open())
        # `cont`: what a task does first when the fast path hands it an exchange it began.
        self.cont: Callable[[], Awaitable[bool]] | None = None
        self.h2: H2Driver | None = None  # the HTTP/2 codec, once the connection speaks it
        # An intercepted connection that is not (known to be) HTTP: proxy.tcp_proxy's.
        self.destination: DestinationSpec | None = None

    def open(self) -> None:
        """Count the connection in (cx stats, the reactor's deadlines), once."""
        self.counted = True
        self.reactor.timed.add(self)
        ls, ws = self.ctx.lstats, self.ctx.state.stats
        blk = ls.block
        blk.inc(ls.downstream_cx_total)
        blk.add(ls.downstream_cx_active, 1)
        blk.inc(ws.downstream_cx_total)
        blk.add(ws.downstream_cx_active, 1)

    def open_fast(self) -> None:
        """A new connection goes straight to the fast path: no task until a request needs
        one (the reactor reports bytes already queued at registration); on a TLS listener
        its handshake is stepped from the reactor first (proxy.tls_accept)."""
        self.open()
        tls = self.ctx.tls
        if tls is not None:
            # A client's hello is usually queued by the time its connection is accepted:
            # the first step is tried at once, which saves a pass of the reactor (the
            # registration reports an edge if it was not there yet).
            self.handshake = Handshake(self, tls)
            self.handshake.step()
            return
        if self.ctx.spec.codec == "http2":
            self.hand_off(None)  # HTTP/2 only: nothing for the HTTP/1.1 fast path
            return
        self.flight = Flight(self)
        self.fast_hint = True
        self.park(self.flight.client_cb)

    def hand_off(self, cont: Callable[[], Awaitable[bool]] | None) -> None:
        """The fast path gives the connection to a task: `cont` runs first (the exchange
        the fast path began goes on), then the connection is served as usual."""
        self.cont = cont
        self.ch.parked = None
        wake = self.ctx.state.wake
        if wake is None:
            self.close_taskless()  # the worker is stopping
        else:
            wake(self)

    def between_requests(self) -> bool:
        """Idle keep-alive, or nothing of a request received yet: closing now loses no
        request (a drain closes such connections at once; a timeout closes them quietly)."""
        if self.h2 is not None:
            return not self.h2.streams
        phase = self.phase
        return phase == PH_IDLE or (phase == PH_HEAD and self.ex is None
                                    and self.pos >= len(self.buf))

    def expire(self) -> None:
        """The deadline has passed (the reactor's ticker), or the worker drains an idle
        connection: a running connection's scope is cancelled and the phase decides what
        to answer; a parked one is idle by definition and just closes."""
        if self.h2 is not None:
            self.h2.expire()
        elif self.parked:
            self.close_parked()
        elif self.handshake is not None:
            self.handshake.expire()
        elif self.flight is not None and self.flight.waiting:
            self.flight.expire()
        else:
            self.cs.cancel()

    async def run(self) -> bool:
        """Serve the connection until it closes (False), or until it has been idle for
        PARK_AFTER and is parked on the reactor with no task (True); the worker then gives
        it a new task when the client sends again, and this is called once more."""
        first = not self.counted
        if first:
            self.open()
        else:
            self.cs = trio.CancelScope()  # a scope serves one `with` block
        parked = False
        try:
            with self.cs:
                if first and self.ctx.tls is not None and not await self._handshake():
                    return False
                dest = self.destination
                if dest is not None:
                    self.destination = None
                    assert self.original_dst is not None
                    if not await tcp_proxy.serve(self, dest, self.original_dst):
                        return False
                    self.phase = PH_HEAD  # AUTO found HTTP: served as such
                try:
                    cont = self.cont
                    if cont is not None:
                        self.cont = None
                        if not await cont():
                            return False
                    while await self._one_request():
                        pass
                except _Park:
                    parked = True
                    return True
            if self.cs.cancelled_caught:
                await self._on_timeout()
        except PeerClosed:
            if self.ex is not None:
                if self.ex.status == 0:
                    self.ex.flags = flags.DOWNSTREAM_CONNECTION_TERMINATION
                self._finish(self.ex)
        finally:
            if parked:
                flight = self.flight
                self.park(flight.client_cb if flight is not None and self.fast_hint
                          else self._wake)
            else:
                if self.ex is not None:
                    self._finish(self.ex)  # ended some other way (worker stopping, a bug)
                if self.upstream is not None:
                    self.upstream.abort()
                    self.upstream = None
                self._count_closed()
                if self.tls is not None and self.ch.sock.fileno() >= 0:
                    with trio.move_on_after(FAREWELL_TIMEOUT) as scope:
                        scope.shield = True
                        await self.tls.close_notify()
                close(self.ch)
        return False

    def _wake(self) -> None:
        """The reactor saw an edge on a parked connection: back to a task."""
        wake = self.ctx.state.wake
        if wake is None:
            self.close_parked()  # the worker is stopping: no task to hand it to
            return
        self.unpark()
        wake(self)

    def close_parked(self) -> None:
        """Close a parked connection without a task: its idle timeout passed, the worker
        drains or stops (the TLS close_notify is a best-effort send)."""
        self.unpark()
        self.close_taskless()

    def close_taskless(self) -> None:
        """Close a connection that has no task (parked, or on the fast path): the
        exchange the fast path has in flight ends first (the worker is stopping)."""
        self.ch.parked = None
        self.handshake = None
        flight = self.flight
        if flight is not None:
            flight.abandon()
        if self.ex is not None:
            self._finish(self.ex)
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        self._count_closed()
        if self.tls is not None and self.ch.sock.fileno() >= 0:
            self.tls.close_notify_nowait(self.sock)
        close(self.ch)
        leave = self.ctx.state.leave
        if leave is not None:
            leave()

    def _count_closed(self) -> None:
        self.reactor.timed.discard(self)
        ls, ws = self.ctx.lstats, self.ctx.state.stats
        blk = ls.block
        if self.h2 is None:
            hs = self.ctx.hstats
            hs.block.inc(hs.downstream_cx_http1_total)
        blk.add(ls.downstream_cx_active, -1)
        blk.inc(ls.downstream_cx_destroy)
        blk.add(ws.downstream_cx_active, -1)

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
            if ctx.state.wake is not None:
                ch = self.ch
                if (self.fast_hint and self.flight is not None and ch.drained
                        and not ch.ready and not ch.hup
                        and (self.tls is None or not self.tls.buffered())):
                    raise _Park()  # nothing is queued: the fast path serves what comes
                buf = await self._idle_wait()
            else:
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

    async def _idle_wait(self) -> bytes:
        """The next bytes of a keep-alive connection; raises _Park once it has been idle
        for PARK_AFTER (the wait's own coarse deadline, a set insertion)."""
        while True:
            try:
                return await self.recv_wait(deadline=self.reactor.now + PARK_AFTER)
            except trio.TooSlowError:
                ch = self.ch
                if ch.ready or ch.hup:
                    continue  # an edge came as the wait timed out: read it
                raise _Park() from None

    async def _one_request(self) -> bool:
        """Serve one request; True when the connection stays open for another."""
        if not self.requests and self.h2 is None and self.ctx.spec.codec != "http1":
            initial = await self._speaks_h2()
            if initial is not None:
                self.fast_hint = False
                self.flight = None  # the fast path is HTTP/1.1's
                driver = self.h2 = H2Driver(self)
                await driver.run(initial)
                return False
        try:
            head = await self._read_head()
        except ParseError as exc:
            hs = self.ctx.hstats
            hs.block.inc(hs.downstream_cx_protocol_error)
            ex = self._begin(None)
            await self.send_local(ex, None, exc.status, exc.reason.encode() + b"\n",
                                   flags.DOWNSTREAM_PROTOCOL_ERROR, close=True)
            self._finish(ex)
            return False
        if head is None:
            return False
        self.fast_hint = False
        self.requests += 1
        self.pos = head.end
        ex = self._begin(head)
        keep = await dispatch(self, head, ex)
        self._finish(ex)
        return keep

    async def _speaks_h2(self) -> bytes | None:
        """Whether the connection is HTTP/2, and if so what was read of it: ALPN h2 on TLS
        (RFC 9113 3.2), else the connection preface of a client with prior knowledge
        (3.3), told from an HTTP/1.1 request line by its first bytes (Envoy's AUTO codec);
        None for HTTP/1.1 (or a client that closed before saying)."""
        codec = self.ctx.spec.codec
        if self.tls is not None:
            alpn = self.tls.ssl.get_alpn_proto_negotiated()
            if alpn == b"h2" or (codec == "http2" and not alpn):
                return self.buf[self.pos:]
            return None
        if codec == "http2":
            return self.buf[self.pos:]
        buf, pos = self.buf, self.pos
        while True:
            state = preface_state(buf[pos:pos + PREFACE_LEN])
            if state < 0:
                return None
            if state > 0:
                return buf[pos:]
            data = await self.recv()
            if not data:
                return None
            buf, pos = buf[pos:] + data, 0
            self.buf, self.pos = buf, 0

    def _begin(self, head: MessageHead | None) -> Exchange:
        ex = self.ex = begin(self, head)
        return ex

    def _finish(self, ex: Exchange) -> None:
        """Count and log a request once, whichever way it ended."""
        if self.ex is ex:
            self.ex = None
        finish(self, ex)

    def forwarding(self, head: MessageHead, action: ClusterAction) -> None:
        """Requests like this one are the fast path's: the connection parks on it. Not
        when the route's clusters speak HTTP/2 to the origin, which the fast path hands to
        a task every time: the connection keeps its task for the next request instead of
        a park, a decline and a new task each."""
        self.fast_hint = (self.flight is not None and action.filters is None
                          and self.ctx.tracer is None and serves(head)
                          and not self._h2_upstream(action))

    def _h2_upstream(self, action: ClusterAction) -> bool:
        clusters = self.ctx.clusters
        for name, _weight in action.clusters:
            cluster = clusters.get(name)
            if cluster is not None and cluster.speaks_h2(False):
                return True
        return False

    # ------------------------------------------------------------------ from the fast path

    async def go_on(self, head: MessageHead, ex: Exchange, action: ClusterAction,
                    resume: Resume) -> bool:
        """An exchange the fast path began goes on in the router, from `resume`."""
        keep = await forward_or_reply(self, head, ex, action, resume)
        self._finish(ex)
        return keep

    async def answer_with(self, head: MessageHead, ex: Exchange, answer: LocalReply) -> bool:
        """The fast path's request is answered locally (the router's failure reply)."""
        keep = await reply(self, ex, head, answer)
        self._finish(ex)
        return keep

    async def timed_out(self) -> bool:
        """The route timeout fired while the fast path waited for the upstream."""
        await self._on_timeout()
        return False

    # ------------------------------------------------------------------ local replies

    async def _on_timeout(self) -> None:
        ex, phase = self.ex, self.phase
        if phase == PH_TCP:
            return  # a TCP session is closed and logged by proxy.tcp_proxy
        if self.upstream is not None:
            self.upstream.abort()
            self.upstream = None
        if self.between_requests():
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
                await self.send_local(ex, ex.head, status, body, flag, close=True)
            except PeerClosed:
                pass
        self._finish(ex)
