# cython: language_level=3
"""The HTTP/1.1 exchange's rules, sans-IO: heads in, decisions out (DESIGN.md section 6).

Everything that decides how a message is framed and whether a connection lives on is here,
in one place, so that the driver that moves the bytes (a trio task today, the reactor's
compiled fast path next) cannot disagree with itself. No trio, no sockets, no clock.

- `request_framing` and `response_framing` are RFC 9112 section 6.3's steps, numbered, as
  h11's `_body_framing` has them. The parser (http1_parser.pyx) has already refused what
  6.3 says to refuse (Transfer-Encoding and Content-Length together, a final coding other
  than chunked in a request, bad lengths), so only the choice is left.
- `plan_response` is the one place that decides what the proxy writes about framing and
  persistence to its client (h11's `_clean_up_response_headers_for_sending`): the length
  it states, chunked re-encoding or a close-delimited body for an HTTP/1.0 client (which
  has no chunked coding, RFC 9112 7), and `Connection: close` / `keep-alive`.
- `relay_informational`: a 1xx goes only to an HTTP/1.1 client (RFC 9110 15.2), 101 is not
  an informational response to relay but the switch itself.
- `ConnState` is the connection's state table (h11's `_state.py`): each side's state, and
  keep-alive as one predicate: both sides DONE with persistence still allowed start the
  next cycle; DONE without it is MUST_CLOSE.
"""

from meshproxy._core.http1_parser cimport MessageHead

# Framing kinds, states and events are the enums of http1_conn.pxd:
#   FRAMING_NONE     no body (HEAD, 1xx, 204, 304, a request without length)
#   FRAMING_LENGTH   Content-Length
#   FRAMING_CHUNKED  Transfer-Encoding: chunked
#   FRAMING_CLOSE    the body ends when the connection closes (responses only)
#   FRAMING_TUNNEL   CONNECT 2xx / 101: the connection stops being HTTP

cdef tuple TE_CHUNKED = (b"transfer-encoding", b"chunked")
cdef tuple CONN_CLOSE = (b"connection", b"close")
cdef tuple CONN_KEEP_ALIVE = (b"connection", b"keep-alive")


cpdef int request_framing(MessageHead head):
    """RFC 9112 6.3 for a request: (4) chunked last coding -> chunked; (6) a valid
    Content-Length -> that length; (7) neither -> no body (a request is never
    close-delimited)."""
    if head.chunked:
        return FRAMING_CHUNKED
    if head.content_length >= 0:
        return FRAMING_LENGTH
    return FRAMING_NONE


cpdef int response_framing(bytes request_method, MessageHead resp):
    """RFC 9112 6.3 for a response to `request_method`."""
    cdef int status = resp.status
    # (1) HEAD, 1xx, 204, 304: no body, whatever the fields say.
    if request_method == b"HEAD" or status < 200 or status == 204 or status == 304:
        if status == 101:
            return FRAMING_TUNNEL
        return FRAMING_NONE
    # (2) a 2xx to CONNECT: a tunnel from the end of the head.
    if request_method == b"CONNECT" and status < 300:
        return FRAMING_TUNNEL
    # (3)/(4) chunked as the final coding (a final coding other than chunked in a response
    # is close-delimited, RFC 9112 6.3 (3); the parser records it as not chunked).
    if resp.chunked:
        return FRAMING_CHUNKED
    if resp.te_count and not resp.te_ends_chunked:
        return FRAMING_CLOSE
    # (5)/(6) a valid Content-Length.
    if resp.content_length >= 0:
        return FRAMING_LENGTH
    # (8) otherwise: until the connection closes.
    return FRAMING_CLOSE


cdef class ResponsePlan:
    """What the proxy writes for a response: its framing from the origin (`framing`),
    whether it re-encodes the body as chunked for the client, whether the client
    connection lives on, and the framing and persistence fields to add."""

    def __init__(self, int framing, bint down_chunked, bint keep, list extra):
        self.framing = framing
        self.down_chunked = down_chunked
        self.keep = keep
        self.extra = extra


cpdef ResponsePlan plan_response(MessageHead req, MessageHead resp, bint request_complete,
                                 bint may_keep):
    """The one place the proxy decides its response's framing fields and persistence.
    `request_complete`: the request body was read to its end (else the connection cannot
    be reused: what is left of it would be taken for the next request); `may_keep`: the
    driver's own reasons allow persistence (not draining, not past max duration)."""
    cdef int framing = response_framing(req.method, resp)
    cdef bint keep = req.keep_alive and request_complete and may_keep
    cdef bint down_chunked = False
    cdef list extra = []
    cdef int status = resp.status
    if framing == FRAMING_TUNNEL:
        keep = False  # a CONNECT tunnel is relayed until either side closes
    if framing == FRAMING_LENGTH or (framing == FRAMING_NONE and status != 204
                                     and resp.content_length >= 0):
        # Stated from the parsed length (RFC 9110 8.6: a HEAD or 304 response may carry
        # the length the full response would have; a 204 never carries one).
        extra.append((b"content-length", b"%d" % resp.content_length))
    if framing == FRAMING_CHUNKED or framing == FRAMING_CLOSE:
        if req.version == 10:
            keep = False  # HTTP/1.0 has no chunked coding: the body ends when we close
        else:
            down_chunked = True
            extra.append(TE_CHUNKED)
    if not keep:
        extra.append(CONN_CLOSE)
    elif req.version == 10:
        extra.append(CONN_KEEP_ALIVE)  # RFC 9112 9.3: an HTTP/1.0 client must be told
    return ResponsePlan(framing, down_chunked, keep, extra)


cpdef bint relay_informational(MessageHead req, int status):
    """A 1xx from the origin goes on to the client only if it speaks HTTP/1.1 (RFC 9110
    15.2: a server must not send a 1xx to an HTTP/1.0 client); 101 is the switch itself."""
    return status < 200 and status != 101 and req.version >= 11


cpdef bint upstream_reusable(bint request_complete, MessageHead resp, int framing):
    """The origin's connection may carry another request: the request was sent whole, the
    origin keeps it alive, and the body ended by its framing rather than by a close."""
    return (request_complete and resp.keep_alive and framing != FRAMING_CLOSE
            and framing != FRAMING_TUNNEL)


# ---------------------------------------------------------------- the state table

# Each side's states are h11's (the enum in the .pxd); events: EV_REQUEST (a request
# head, client), EV_INFORMATIONAL (a 1xx other than 101, server), EV_RESPONSE (a final
# head, server), EV_END (a body's end), EV_CLOSED (a side closed its half), EV_SWITCH
# (a 101 or a CONNECT 2xx, server: both sides leave HTTP).
STATE_NAMES = ("IDLE", "SEND_BODY", "DONE", "MUST_CLOSE", "CLOSED", "SWITCHED_PROTOCOL",
               "ERROR")

# (role, state, event) -> state; role 0 = client, 1 = server. Missing: a protocol error.
cdef dict _TABLE = {
    (0, IDLE, EV_REQUEST): SEND_BODY,
    (0, SEND_BODY, EV_END): DONE,
    (1, IDLE, EV_INFORMATIONAL): IDLE,
    (1, IDLE, EV_RESPONSE): SEND_BODY,
    (1, SEND_BODY, EV_END): DONE,
}


cdef class ConnState:
    """Both sides of one HTTP/1.1 connection. `keep_alive` turns False once either side
    said `Connection: close`, spoke HTTP/1.0 without keep-alive, framed a body by closing,
    or a request body was abandoned; after that, DONE is MUST_CLOSE."""

    def __init__(self):
        self.client = IDLE
        self.server = IDLE
        self.keep_alive = True

    cpdef int event(self, int role, int ev) except -1:
        """Apply one event of `role`; returns that side's new state (ERROR when the event
        is not allowed there, which the caller answers as a protocol error)."""
        cdef int state = self.client if role == 0 else self.server
        cdef int new
        if ev == EV_CLOSED:
            new = CLOSED
        elif role == 1 and self.client == IDLE:
            new = ERROR  # the server speaks only after a request (h11's SEND_RESPONSE)
        elif ev == EV_SWITCH and role == 1:
            self.client = self.server = SWITCHED
            return SWITCHED
        else:
            new = _TABLE.get((role, state, ev), ERROR)
        if new == DONE and not self.keep_alive:
            new = MUST_CLOSE
        if role == 0:
            self.client = new
        else:
            self.server = new
        if new == CLOSED or new == ERROR:
            self.keep_alive = False
            if self.client == DONE:
                self.client = MUST_CLOSE
            if self.server == DONE:
                self.server = MUST_CLOSE
        return new

    cpdef void no_keep_alive(self):
        self.keep_alive = False
        if self.client == DONE:
            self.client = MUST_CLOSE
        if self.server == DONE:
            self.server = MUST_CLOSE

    cpdef bint next_cycle(self):
        """Start the next request on the connection if both sides are DONE (the one
        keep-alive predicate); False when it must close instead."""
        if self.client == DONE and self.server == DONE and self.keep_alive:
            self.client = self.server = IDLE
            return True
        return False
