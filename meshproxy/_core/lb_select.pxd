cdef class _Rng:
    cdef unsigned long long state
    cdef inline unsigned long long next(self)


cdef class Balancer:
    cdef Py_ssize_t n
    cdef long *weights
    cdef long *active
    cdef long total
    cdef bint uniform
    cdef _Rng rng
    cpdef Py_ssize_t pick(self, unsigned long long key=*, int attempt=*)
    cpdef void start(self, Py_ssize_t i)
    cpdef void finish(self, Py_ssize_t i, double rtt, double now)
    cdef Py_ssize_t _random_weighted(self)


cdef class SmoothWeightedRoundRobin(Balancer):
    cdef long *current
    cdef Py_ssize_t next_i


cdef class Random(Balancer):
    pass


cdef class LeastRequest(Balancer):
    pass


cdef class PeakEwma(Balancer):
    cdef double decay
    cdef double *ewma
    cdef double *stamp
    cdef double _cost(self, Py_ssize_t i)


cdef class RingHash(Balancer):
    cdef Py_ssize_t size
    cdef unsigned long long *points
    cdef Py_ssize_t *owners


cdef class Maglev(Balancer):
    cdef Py_ssize_t size
    cdef Py_ssize_t *table


cpdef unsigned long long hash_bytes(bytes data)
