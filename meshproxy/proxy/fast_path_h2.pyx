# cython: language_level=3
"""The fast path of an HTTP/2 stream: a request that came whole (END_STREAM on its
HEADERS) served without a task, as proxy.fast_path serves a keep-alive HTTP/1.1 exchange.

The connection's driver (proxy.downstream_h2) opens the stream from its read of the
client's frames and, when the fast path is on, hands it to a StreamFlight at once. The
request is then parsed, routed, balanced, counted and sent to an HTTP/1.1 origin over an
idle pooled connection right there, and the upstream channel's callback relays the
response from the reactor's batch when it comes: HEADERS and DATA (and the trailers of a
chunked response) queued on the connection, the writer woken. No task, no cancel scope,
no coroutine per stream: those cost an HTTP/2 request more than the protocol itself
(DESIGN.md section 6; bench.h2_load says how much).

Everything is Flight's (proxy.fast_path) but the two ends: the request comes from the
stream's fields (its head as HTTP/1.1 bytes, protocol.http2.request_head) and the response
leaves as frames. What the fast path does not serve goes to a task at the phase reached,
exactly as an HTTP/1.1 connection's exchange does (the stream's `hand_off`): a request
or route it declines, no idle connection, an HTTP/2 origin, a retriable or 1xx or
unfinished response; and a response the client's windows cannot take at once, or while
more than the connection's WRITE_HIGH_WATER is queued, so that the relay's flow control
and backpressure hold for it.

Invariants: a stream is served here or by a task, never both (`hand_off` forgets the
flight before the task exists); a stream served here ends through its `fast_done` (the
exchange finished, the stream closed) or, when the client or the connection goes,
through `lost`, which abandons the attempt first.
"""

import logging

from meshproxy.proxy.head_rewrite import relayed_trailers
from meshproxy.transport.sockio import PeerClosed

from meshproxy.proxy.fast_path cimport DONE, HANDED, Flight

log = logging.getLogger("meshproxy.fast_path")


cdef class StreamFlight(Flight):
    """One HTTP/2 stream's exchange on the fast path (`dc` is the proxy.h2_stream.H2Stream)."""

    def begin(self):
        """Serve the stream's request: answered at once, waiting on the origin with no task,
        or given to a task."""
        st = self.dc
        st.buf = st.head_bytes
        st.pos = 0
        try:
            if self._serve() == DONE:
                self._next()
        except Exception:
            self._crash()

    cdef int _next(self) except -1:
        """The response is queued and the exchange finished: the stream ends."""
        self.dc.fast_done()
        return 0

    cdef bint _can_emit(self, Py_ssize_t n) except -1:
        return self.dc.can_emit(n)

    cdef int _emit(self, resp, int status, plan, int framing, data, trailers,
                   bint release) except -1:
        """The response as frames on the stream (H2Stream.emit, with relay_response's
        fields), then the exchange ends."""
        st = self.dc
        try:
            st.emit(resp, framing, self.action, self.ex, data,
                    relayed_trailers(trailers) if trailers else None)
        except PeerClosed:
            # The stream closed meanwhile: as a PeerClosed out of the relay.
            self._end_attempt(status)
            self._drop()
            st.close_taskless()
            return HANDED
        self._complete(release, status)
        return DONE

    cdef int _crash(self) except -1:
        """A bug costs this stream (reset), never the connection's other streams."""
        log.exception("internal error on the fast path of a stream from %s", self.dc.peer)
        self.abandon()
        self.dc.close_taskless()
        return 0
