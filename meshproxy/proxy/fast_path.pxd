# The fast path's Flight, declared for the modules that extend it (proxy.fast_path_h2:
# an HTTP/2 stream's exchange, which differs only in how the response is written).

# What a step left the connection doing.
cdef enum:
    HANDED = 0   # a task has it now, or it is closed
    WAITING = 1  # an exchange waits on the upstream, with no task
    DONE = 2     # the exchange is over and the connection is free for the next request


cdef class Flight:
    cdef object dc, ch, sock
    cdef public object records  # the TLS record layer of a TLS connection, else None
    cdef public object client_cb, upstream_cb
    cdef public bint waiting
    # The exchange in flight (None between exchanges).
    cdef object head, ex, action, cluster, ep, conn, lb, ubuf, buf
    cdef Py_ssize_t lb_index, body_end
    cdef object key
    cdef double started, route_deadline, try_deadline

    cdef int _read_client(self) except -1
    cdef object _decrypt(self, data)
    cdef int _next(self) except -1
    cdef int _park_idle(self) except -1
    cdef int _serve(self) except -1
    cdef int _start(self, head, bytes buf) except -1
    cdef int _read_upstream(self) except -1
    cdef object _decrypt_upstream(self, urecords, data)
    cdef int _stale(self) except -1
    cdef int _respond(self, resp, bytes ubuf) except -1
    cdef bint _can_emit(self, Py_ssize_t n) except -1
    cdef int _emit(self, resp, int status, plan, int framing, data, trailers,
                   bint release) except -1
    cdef int _complete(self, bint release, int status) except -1
    cdef int _end_attempt(self, int status) except -1
    cdef int _stop_waiting(self) except -1
    cdef int _drop(self) except -1
    cdef object _opened(self, error)
    cdef object _with_response(self, resp, bytes ubuf)
    cdef int _go_on(self, resume) except -1
    cdef int _handed(self, cont) except -1
    cdef int _decline(self) except -1
    cdef int _crash(self) except -1
