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
