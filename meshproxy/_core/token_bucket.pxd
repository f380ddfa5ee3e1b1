from libc.stdint cimport int64_t, uint64_t


cdef class TokenBuckets:
    cdef object _buf
    cdef int64_t *cells
    cdef Py_ssize_t nkeys
    cdef int64_t interval
    cdef int64_t tau
    cdef public int64_t max_tokens
    cdef public int64_t remaining
    cdef public double reset
    cdef int64_t* _slot(self, uint64_t key, int64_t now) noexcept
    cpdef bint take(self, uint64_t key=*, int64_t now=*)
