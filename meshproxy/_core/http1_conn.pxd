# Declarations of http1_conn.pyx (the HTTP/1.1 exchange's decisions and state table).

from meshproxy._core.http1_parser cimport MessageHead

cpdef enum:
    FRAMING_NONE = 0
    FRAMING_LENGTH = 1
    FRAMING_CHUNKED = 2
    FRAMING_CLOSE = 3
    FRAMING_TUNNEL = 4

cpdef enum:
    IDLE = 0
    SEND_BODY = 1
    DONE = 2
    MUST_CLOSE = 3
    CLOSED = 4
    SWITCHED = 5
    ERROR = 6

cpdef enum:
    EV_REQUEST = 0
    EV_INFORMATIONAL = 1
    EV_RESPONSE = 2
    EV_END = 3
    EV_CLOSED = 4
    EV_SWITCH = 5

cpdef int request_framing(MessageHead head)
cpdef int response_framing(bytes request_method, MessageHead resp)

cdef class ResponsePlan:
    cdef public int framing
    cdef public bint down_chunked
    cdef public bint keep
    cdef public list extra

cpdef ResponsePlan plan_response(MessageHead req, MessageHead resp, bint request_complete,
                                 bint may_keep)
cpdef bint relay_informational(MessageHead req, int status)
cpdef bint upstream_reusable(bint request_complete, MessageHead resp, int framing)

cdef class ConnState:
    cdef public int client
    cdef public int server
    cdef public bint keep_alive
    cpdef int event(self, int role, int ev) except -1
    cpdef void no_keep_alive(self)
    cpdef bint next_cycle(self)
