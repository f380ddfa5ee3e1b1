cdef class RetryBudget:
    cdef double percent
    cdef long min_retries
    cdef double window
    cdef double width
    cdef long long requests[10]
    cdef long long retries[10]
    cdef long long epoch
    cdef void _advance(self, double now)
    cpdef void record_request(self, double now)
    cpdef bint allow(self, double now, long active_requests, long active_retries)
    cpdef void record_retry(self, double now)


cdef class Breaker:
    cdef public long max_connections
    cdef public long max_pending
    cdef public long max_requests
    cdef public long max_retries
    cdef readonly long requests
    cdef readonly long pending
    cdef readonly long retries
    cpdef bint try_request(self)
    cpdef void end_request(self)
    cpdef bint connection_room(self, long open_connections)
    cpdef bint try_pending(self)
    cpdef void end_pending(self)
    cpdef bint retry_room(self)
    cpdef bint try_retry(self)
    cpdef void end_retry(self)


cdef class OutlierState:
    cdef public long consecutive_5xx
    cdef public long consecutive_gateway
    cdef public long successes
    cdef public long failures
    cdef public long times_ejected
    cdef public double ejected_until
    cdef public bint ejected
    cpdef int record(self, bint error, bint gateway, long max_5xx, long max_gateway)
    cpdef void eject(self, double now, double base, double max_time)
    cpdef bint maybe_return(self, double now)
    cpdef void end_interval(self)
