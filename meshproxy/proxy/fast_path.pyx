# cython: language_level=3
"""The fast path: a plain keep-alive exchange served from the reactor's batch, compiled.

DESIGN.md section 6: what costs a proxied request its CPU is Python per request (task
switches, coroutine resumes, objects), not the syscalls. A connection on the fast path has
no trio task: its channel's `parked` callback is `Flight.on_client`, which the reactor
calls from its batch when bytes arrive; the request is parsed, routed, balanced, counted
and sent upstream right there, and the upstream channel's `parked` callback,
`Flight.on_upstream`, relays the response when it comes, in the same way. No await, no
task switch, no coroutine; Python objects only where the shared code makes them (the
Exchange the access log reads, the parser's heads).

What it serves: a request whose head came whole, without a body or with a body already
received whole (at most FAST_BODY bytes), origin-form, no Upgrade, no Expect, no client
deadline header, on a route to a cluster (no filters, no tracing), over an idle pooled
connection (plaintext, or TLS through its compiled record layer); and a response whose
head and whole body (Content-Length, chunked, or none) are read at once, which is not
retried, and which the client's socket takes in one send. A plaintext connection starts here; a TLS one once its handshake is done (without
a task either, proxy.tls_accept), its records then read and written by the compiled
record layer (transport.tls_records) on the same SSL object. Anything else goes to a task
at the phase where it left the fast path, and that task carries on with the same code as
every other request (downstream, router, relay):
  before anything is counted (a partial or bad head, a request or route it does not serve,
  no cluster, no healthy endpoint): the task reads the buffer from the same position;
  with an endpoint picked and no idle connection: router.forward from the pick;
  once the attempt is open (router.Resume): the stale connection's resend, the error, the
  retriable or streaming response, the end of a request send, or of a 1xx head;
  the route timeout: the driver's timeout reply;
  a client that does not take the response at once: the rest is sent from a task.
So behaviour is the same either way, which the test suite checks by running with the fast
path off as well (`--no-fast-path`, MESHPROXY_FAST_PATH=off).

Size: past 400 lines because the client side, the upstream side and the endings of one
exchange share the Flight's fields and call each other as C functions; split, each half
would reach into the other's state.

Invariants: a connection is served either here or by a task, never both (`hand_off`
clears the channel's callbacks before the task exists); while an exchange waits on the
upstream (`waiting`), the connection's deadline is the nearer of the route timeout and the
per-try timeout, and `expire` says which fired; an attempt opened here (`lb` set) is closed
exactly once, here or by the router after a hand-off.
"""

import logging
from functools import partial
from time import perf_counter

from meshproxy._core.http1_conn import (
    FRAMING_CHUNKED,
    FRAMING_LENGTH,
    FRAMING_NONE,
    plan_response,
    upstream_reusable,
)
from meshproxy._core.http1_parser import (
    ChunkedDecoder,
    ParseError,
    encode_chunk,
    encode_last_chunk,
)
from meshproxy.config.snapshot import PRINCIPAL_HEADER, ClusterAction
from meshproxy.proxy.exchange import BodyState, begin, finish
from meshproxy.proxy.head_rewrite import build_upstream_head, relayed_trailers, serialize
from meshproxy.proxy.local_reply import reason
from meshproxy.proxy.phases import PH_IDLE, PH_RESP_BODY, PH_UPSTREAM
from meshproxy.proxy.origin_body import per_try_timeout, upstream_protocol_error
from meshproxy.proxy.relay import reset_during_head
from meshproxy.proxy.retry_policy import retriable_status
from meshproxy.proxy.attempt import Resume, close_attempt, failure_reply, open_attempt, overflow
from meshproxy.proxy.router import choose_cluster, hash_key
from meshproxy.transport.sockio import RECV_SIZE, send_all
from meshproxy.transport.tls_records import RecordError

log = logging.getLogger("meshproxy.fast_path")

# A request body the fast path sends with its head: it must have arrived with the head,
# and fit one send into an idle connection's empty socket buffer (Linux starts a TCP send
# buffer at 16 KiB and grows it; 64 KiB is past that only for the first bytes of a cold
# connection, and a short send is handled, just not on the fast path).
cdef Py_ssize_t FAST_BODY = 65536
cdef double INF = float("inf")

# What a step left the connection doing: HANDED, WAITING, DONE (fast_path.pxd).

_reset_errors = (ConnectionResetError, ConnectionAbortedError, TimeoutError)
_send_errors = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


cpdef bint serves(head):
    """Whether the fast path takes a request with this head (the route and the body's
    arrival aside): not chunked, no Expect, no Upgrade, no client deadline header, an
    origin-form target."""
    cdef bytes target = head.target
    return not (head.chunked or head.expect_continue or head.upgrade is not None
                or head.deadline_ms is not None or head.grpc_timeout is not None
                or not target or target[0] != 47)  # "/"


cdef Py_ssize_t _send_now(sock, data) except -2:
    """What one send took (0: the buffer is full), or -1: the peer is gone."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0
    except _send_errors:
        return -1


def _nothing():
    pass


cdef class Flight:
    """The fast path of one client connection, and the exchange it has in flight (its
    fields are declared in fast_path.pxd)."""

    def __init__(self, dc, records=None):
        self.dc = dc
        self.records = records
        self.ch = dc.ch
        self.sock = dc.sock
        # Made once: the reactor is handed the same callables at every park.
        self.client_cb = self.on_client
        self.upstream_cb = self.on_upstream
        self.waiting = False
        self.ubuf = b""

    # ------------------------------------------------------------------ reactor entries

    def on_client(self):
        """An edge on the parked client connection."""
        self.dc.unpark()
        try:
            self._read_client()
        except Exception:
            self._crash()

    def after_handshake(self):
        """A TLS connection whose handshake has just been done without a task
        (proxy.tls_accept): the plaintext that came with the client's Finished, if any,
        then whatever else the socket has."""
        dc, ch = self.dc, self.ch
        try:
            data = self._decrypt(b"")
            if data is None:
                return
            if data:
                dc.buf = data
                dc.pos = 0
                if self._serve() != DONE:
                    return
            if ch.ready or ch.hup or not ch.drained:
                self._read_client()
            else:
                dc.park(self.client_cb)
        except Exception:
            self._crash()

    def on_upstream(self):
        """An edge on the upstream connection of the exchange in flight."""
        try:
            if self._read_upstream() == DONE:
                self._next()
        except Exception:
            self._crash()

    def expire(self):
        """The connection's deadline passed while the exchange waited on the upstream: the
        per-try timeout (the router decides: retry, or 504 UT), else the route timeout
        (router.forward's count, then the driver's 504 UT; the connection closes)."""
        if self.try_deadline and self.dc.reactor.now >= self.try_deadline \
                and self.try_deadline < self.route_deadline:
            self._go_on(self._opened(per_try_timeout()))
            return
        cst = self.cluster.stats
        cst.block.inc(cst.upstream_rq_timeout)
        self._stop_waiting()
        self._end_attempt(0)
        self._drop()
        self._handed(self.dc.timed_out)

    def abandon(self):
        """The connection closes with no task (the worker stops, or a step failed): an
        attempt still open is closed; the driver finishes the exchange."""
        if self.waiting:
            self._stop_waiting()
        self._end_attempt(0)
        self._drop()
        self.client_cb = self.upstream_cb = _nothing  # no cycle left through them

    async def tail(self, rest, bint release, bint keep, int status):
        """A task sends what the client's socket did not take at once (ciphertext, on a
        TLS connection), then the exchange ends as on the fast path."""
        try:
            await send_all(self.sock, rest)
        except BaseException:
            self._end_attempt(status)  # the driver finishes the exchange, aborts upstream
            self._drop()
            raise
        self._complete(release, status)
        return keep

    # ------------------------------------------------------------------ the client side

    cdef int _read_client(self) except -1:
        dc, ch, sock = self.dc, self.ch, self.sock
        while True:
            ch.ready = False
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                dc.park(self.client_cb)
                return WAITING
            except _reset_errors:
                data = b""
            if not data:
                dc.close_taskless()  # the client closed between requests
                return HANDED
            # A short read emptied the receive queue (reactor.py's edge-triggered rules).
            ch.drained = len(data) < RECV_SIZE
            records = self.records
            if records is not None:
                data = self._decrypt(data)
                if data is None:
                    return HANDED
                if not data:  # no whole record yet
                    if not (ch.ready or ch.hup or not ch.drained):
                        dc.park(self.client_cb)
                        return WAITING
                    continue
            dc.buf = data
            dc.pos = 0
            if self._serve() != DONE:
                return 0
            if not (ch.ready or ch.hup or not ch.drained):
                self._park_idle()
                return WAITING

    cdef object _decrypt(self, data):
        """The plaintext of `data` (b"": no whole record yet), or None when the connection
        ended (close_notify, or a broken record: closed)."""
        records = self.records
        try:
            data = records.decrypt(data)
        except RecordError:
            self.dc.close_taskless()
            return None
        answer = records.outgoing()  # a KeyUpdate's answer, an alert
        if answer and _send_now(self.sock, answer) < 0:
            self.dc.close_taskless()
            return None
        if records.eof and not data:
            self.dc.close_taskless()
            return None
        return data

    cdef int _next(self) except -1:
        """After a response relayed from an upstream edge: the pipelined requests already
        received, then more bytes if the client may have sent them, else park."""
        ch = self.ch
        if self._serve() != DONE:
            return 0
        if ch.ready or ch.hup or not ch.drained:
            return self._read_client()
        self._park_idle()
        return WAITING

    cdef int _park_idle(self) except -1:
        """Keep-alive with nothing received: the idle timeout, capped by
        max_connection_duration, as downstream._read_head sets it."""
        dc = self.dc
        spec = dc.ctx.spec
        deadline = dc.reactor.now + spec.idle_timeout
        limit = spec.max_connection_duration
        if limit and dc.born + limit < deadline:
            deadline = dc.born + limit
        dc.phase = PH_IDLE
        dc.deadline = deadline
        dc.park(self.client_cb)
        return 0

    cdef int _serve(self) except -1:
        """The requests in the buffer, in order (RFC 9112 section 9.3.2)."""
        dc = self.dc
        parser = dc.ctx.parser
        cdef int r
        while True:
            buf = dc.buf
            pos = dc.pos
            if pos >= len(buf):
                return DONE
            try:
                head = parser.parse_request(buf, pos)
            except ParseError:
                head = None  # the task answers it (400, 431, ...)
            if head is None:
                return self._decline()  # partial: the task reads on (header timeout)
            r = self._start(head, buf)
            if r != DONE:
                return r

    cdef int _start(self, head, bytes buf) except -1:
        dc = self.dc
        ctx = dc.ctx
        cdef Py_ssize_t cl = head.content_length
        cdef Py_ssize_t end = head.end
        cdef bytes target = head.target
        if (ctx.tracer is not None or not serves(head)
                or (cl > 0 and (cl > FAST_BODY or len(buf) - end < cl))):
            return self._decline()
        host = head.host or b""
        spec = ctx.spec
        headers = head.headers
        if spec.match_principal and dc.identity is not None:
            # Routes that match the caller's identity see it as a header (downstream).
            headers = headers + [(PRINCIPAL_HEADER, dc.identity.principal)]
        route = spec.route_table.route(host, head.method, target, headers)[1]
        if route is None:
            return self._decline()
        action = route.action
        if (type(action) is not ClusterAction or action.filters is not None
                or action.mirrors):
            return self._decline()  # filters and mirrors are the task path's
        name = choose_cluster(action)
        cluster = ctx.clusters.get(name)
        if cluster is None or cluster.speaks_h2(dc.multiplexed):
            return self._decline()  # an HTTP/2 origin's streams are the relay's
        key = hash_key(dc, head, action.hash_policy) if action.hash_policy else 0
        now = dc.reactor.now
        ep = cluster.pick(now, None, key)
        if ep is None:
            return self._decline()
        # Committed: the request is counted in, and goes on here or in a task.
        hs = ctx.hstats
        hs.block.inc(hs.fast_path_rq_total)
        dc.fast_hint = True
        dc.requests += 1
        dc.pos = end
        ex = dc.ex = begin(dc, head)
        ex.host = host
        ex.target = target
        ex.cluster = name
        conn = ep.acquire(now)
        if conn is None:
            self._handed(partial(dc.go_on, head, ex, action, Resume(cluster, ep, key)))
            return HANDED
        if cluster.budget is not None:
            cluster.budget.record_request(now)
        lb, lb_index = ep.lb, ep.index  # kept: a reload may replace both meanwhile
        if not open_attempt(cluster, ep, 1, now):
            ep.idle.append(conn)  # unused: back in the pool as it was
            self._handed(partial(dc.answer_with, head, ex,
                                 failure_reply(ex, overflow(), False, False)))
            return HANDED
        self.head, self.ex, self.action, self.buf = head, ex, action, buf
        self.cluster, self.ep, self.conn, self.key = cluster, ep, conn, key
        self.lb, self.lb_index, self.started = lb, lb_index, perf_counter()
        retry = action.retry
        up_head = build_upstream_head(
            dc, head, ex, action, False,
            1 if retry is not None and retry.include_attempt_count else 0, None, False)
        dc.upstream = conn
        ex.upstream_host = ep.label
        self.body_end = end + cl if cl > 0 else end
        first = up_head + buf[end:self.body_end] if cl > 0 else up_head
        # The route timeout starts once the request is sent (once per request), and the
        # per-try timeout bounds the response head.
        timeout = action.timeout
        self.route_deadline = now + timeout if timeout else INF
        per_try = retry.per_try_timeout if retry is not None else 0.0
        self.try_deadline = now + per_try if per_try else 0.0
        urecords = conn.records
        if urecords is not None:
            first = urecords.encrypt(first)  # a TLS upstream: its records, in one send
        cdef Py_ssize_t sent = _send_now(conn.sock, first)
        if sent < 0:
            return self._stale()
        # Sent, as relay.attempt's buffered case: the body is consumed.
        dc.pos = self.body_end
        ex.bytes_in = cl if cl > 0 else 0
        dc.phase = PH_UPSTREAM
        dc.deadline = self.try_deadline if self.try_deadline and \
            self.try_deadline < self.route_deadline else self.route_deadline
        self.ubuf = b""
        if sent < len(first):
            resume = self._opened(None)
            resume.unsent = first[sent:]
            self._go_on(resume)
            return HANDED
        self.waiting = True
        uch = conn.ch
        if uch.ready or uch.hup or not uch.drained:
            return self._read_upstream()
        uch.parked = self.upstream_cb
        return WAITING

    # ------------------------------------------------------------------ the upstream side

    cdef int _read_upstream(self) except -1:
        conn = self.conn
        uch = conn.ch
        sock = conn.sock
        while True:
            uch.ready = False
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                uch.parked = self.upstream_cb
                return WAITING
            except _reset_errors:
                data = b""
            if data:
                uch.drained = len(data) < RECV_SIZE
                urecords = conn.records
                if urecords is not None:
                    data = self._decrypt_upstream(urecords, data)
                    if data is None:
                        return HANDED
                    if not data:  # no whole record yet, or session tickets only
                        if uch.drained and not uch.hup and not urecords.eof:
                            uch.parked = self.upstream_cb
                            return WAITING
                        if not urecords.eof:
                            continue
            if not data:  # the origin closed (a FIN, a reset, its close_notify)
                if not self.ubuf:
                    return self._stale()
                return self._go_on(self._opened(reset_during_head()))
            ubuf = self.ubuf + data if self.ubuf else data
            try:
                resp = self.dc.ctx.parser.parse_response(ubuf, 0)
            except ParseError as exc:
                return self._go_on(self._opened(upstream_protocol_error(exc)))
            if resp is not None:
                return self._respond(resp, ubuf)
            self.ubuf = ubuf
            if uch.drained and not uch.hup:
                uch.parked = self.upstream_cb
                return WAITING

    cdef object _decrypt_upstream(self, urecords, data):
        """The plaintext of an upstream TLS connection's `data` (b"": none yet), or None
        once the exchange went on elsewhere: a broken record or an alert is the
        connection failing, as a task's relay takes a TLS error (before any response
        byte the stale connection's resend, after one a reset during the head)."""
        try:
            data = urecords.decrypt(data)
        except RecordError:
            if not self.ubuf:
                self._stale()
            else:
                self._go_on(self._opened(reset_during_head()))
            return None
        answer = urecords.outgoing()  # a KeyUpdate's answer
        if answer:
            _send_now(self.conn.sock, answer)
        return data

    cdef int _stale(self) except -1:
        """The reused connection was closed by the origin before any response byte: the
        request never ran (relay.attempt's stale case). It is counted as a retry and sent
        once more, body and all, on another connection by the router."""
        dc = self.dc
        self.conn.close()
        dc.upstream = None
        cst = self.cluster.stats
        cst.block.inc(cst.upstream_rq_retry)
        dc.pos = self.head.end  # the body is sent again from the buffer
        self.ex.bytes_in = 0
        resume = self._opened(None)
        resume.stale = True
        resume.state = None
        return self._go_on(resume)

    cdef int _respond(self, resp, bytes ubuf) except -1:
        cdef int status = resp.status
        if status < 200:
            if status == 101:
                self.conn.requests += 1
                return self._go_on(self._with_response(resp, ubuf))  # 502: not asked for
            resume = self._opened(None)  # an interim response: the relay reads on
            resume.ubuf = ubuf
            return self._go_on(resume)
        self.conn.requests += 1
        action = self.action
        retry = action.retry
        if retry is not None and status >= 400 and retriable_status(retry, status):
            return self._go_on(self._with_response(resp, ubuf))  # the router may retry
        dc = self.dc
        plan = plan_response(self.head, resp, True,
                             not dc.ctx.state.draining and not dc.too_old())
        framing = plan.framing
        cdef Py_ssize_t upos = resp.end
        cdef Py_ssize_t take = 0
        data = b""       # the body, as the origin's framing delimits it (chunks decoded)
        trailers = None  # a chunked body's trailers, as received
        if framing == FRAMING_LENGTH:
            take = resp.content_length
            if len(ubuf) - upos < take:
                return self._go_on(self._with_response(resp, ubuf))  # streamed by the relay
            if take:
                data = ubuf[upos:upos + take]
                upos += take
        elif framing == FRAMING_CHUNKED:
            # Served here only when the last chunk is already in: one decode of what was
            # read (relay._relay_response's rule). Anything else, a malformed chunk
            # included, is the relay's, which decodes from the head on.
            dec = ChunkedDecoder(error_status=502)
            try:
                parts, cend = dec.feed(ubuf, upos)
            except ParseError:
                return self._go_on(self._with_response(resp, ubuf))
            if not dec.done:
                return self._go_on(self._with_response(resp, ubuf))  # streamed by the relay
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            take = len(data)
            trailers = dec.trailers
            upos = cend
        elif framing != FRAMING_NONE:
            return self._go_on(self._with_response(resp, ubuf))
        if not self._can_emit(take):
            return self._go_on(self._with_response(resp, ubuf))  # written by the relay
        # The whole response is here: router._one_attempt's outcome, relay._relay_response.
        self._stop_waiting()
        cluster, ex = self.cluster, self.ex
        if cluster.outlier is not None:
            cluster.outlier.on_result(self.ep, status, False, dc.reactor.now)
        ex.upstream_status = status
        ex.status = status
        dc.phase = PH_RESP_BODY
        ex.response_started = True
        ex.bytes_out = take
        return self._emit(resp, status, plan, framing, data, trailers,
                          upstream_reusable(True, resp, framing) and upos >= len(ubuf))

    cdef bint _can_emit(self, Py_ssize_t n) except -1:
        """Whether the client side takes a body of n bytes now (HTTP/1.1: a send is tried,
        and what it leaves is a task's)."""
        return True

    cdef int _emit(self, resp, int status, plan, int framing, data, trailers,
                   bint release) except -1:
        """The response to the client, in one send: its head, and the body (re-encoded as
        one chunk when it came chunked, raw for an HTTP/1.0 client, which reads to the
        close); then the exchange ends (`release`: the upstream connection is reusable)."""
        dc, ex, action = self.dc, self.ex, self.action
        extra = plan.extra
        if ex.resp_extra:
            extra += ex.resp_extra
        out = serialize(b"HTTP/1.1 %d %s" % (status, resp.reason or reason(status)), resp,
                        action.ops.response_skip, action.ops.response_add, extra)
        if trailers is not None and plan.down_chunked:
            out += (encode_chunk(data) if data else b"") + \
                encode_last_chunk(relayed_trailers(trailers))
        elif data:
            out += data
        records = self.records
        if records is not None:
            out = records.encrypt(out)
        cdef Py_ssize_t sent = _send_now(self.sock, out)
        if sent < 0:
            # The client is gone: as a PeerClosed out of the relay (the attempt counts its
            # response; the driver finishes the exchange and aborts the upstream).
            self._end_attempt(status)
            self._drop()
            dc.close_taskless()
            return HANDED
        if sent < len(out):
            self._handed(partial(self.tail, out[sent:], release, plan.keep, status))
            return HANDED
        self._complete(release, status)
        if not plan.keep:
            dc.close_taskless()
            return HANDED
        return DONE

    # ------------------------------------------------------------------ endings

    cdef int _complete(self, bint release, int status) except -1:
        """The response is relayed: the connection back to the pool (or closed), the
        attempt closed, the exchange finished (the logging phase)."""
        dc = self.dc
        conn = self.conn
        dc.upstream = None
        if release:
            conn.endpoint.release(conn, dc.reactor.now)
        else:
            conn.close()
        self._end_attempt(status)
        ex = self.ex
        self._drop()
        if dc.ex is ex:
            dc.ex = None
        finish(dc, ex)
        return 0

    cdef int _end_attempt(self, int status) except -1:
        if self.lb is not None:
            lb, self.lb = self.lb, None
            close_attempt(self.cluster, self.ep.stats, lb, self.lb_index, self.started,
                          status, self.dc.reactor.now)
        return 0

    cdef int _stop_waiting(self) except -1:
        self.waiting = False
        if self.conn is not None:
            self.conn.ch.parked = None
        return 0

    cdef int _drop(self) except -1:
        """Forget the exchange (the Exchange, heads and buffers go with it)."""
        self.head = self.ex = self.action = self.cluster = self.ep = self.conn = None
        self.buf = None
        self.ubuf = b""
        return 0

    cdef object _opened(self, error):
        """The hand-off of an open attempt to the router: what went upstream, and how."""
        resume = Resume(self.cluster, self.ep, self.key)
        resume.opened = True
        resume.lb, resume.lb_index, resume.started = self.lb, self.lb_index, self.started
        resume.conn = self.conn
        resume.deadline = self.try_deadline
        resume.error = error
        retry = self.action.retry
        state = BodyState(retry.buffer_limit if retry is not None else 0)
        state.started = state.done = state.timer_started = True
        if self.body_end > self.head.end:
            state.keep(self.buf[self.head.end:self.body_end])
        resume.state = state
        return resume

    cdef object _with_response(self, resp, bytes ubuf):
        resume = self._opened(None)
        resume.resp = resp
        resume.ubuf = ubuf
        return resume

    cdef int _go_on(self, resume) except -1:
        """The router carries on from `resume`, in a task; the attempt is its to close."""
        dc = self.dc
        head, ex, action = self.head, self.ex, self.action
        self._stop_waiting()
        self.lb = None
        self._drop()
        if resume.opened:
            dc.deadline = self.route_deadline  # the per-try one is the router's now
        self._handed(partial(dc.go_on, head, ex, action, resume))
        return HANDED

    cdef int _handed(self, cont) except -1:
        """A request it began goes on in a task, `cont` first."""
        hs = self.dc.ctx.hstats
        hs.block.inc(hs.fast_path_handed_off)
        self.dc.hand_off(cont)
        return 0

    cdef int _decline(self) except -1:
        """A task serves the request from the buffer as it is, as if it had read it."""
        hs = self.dc.ctx.hstats
        hs.block.inc(hs.fast_path_declined)
        self.dc.hand_off(None)
        return HANDED

    cdef int _crash(self) except -1:
        """A bug costs this connection, never the worker."""
        log.exception("internal error on the fast path of a connection from %s",
                      self.dc.peer)
        if self.ch.sock.fileno() >= 0:
            self.dc.close_taskless()
        return 0
