cdef class SmoothWeightedRoundRobin:
    cdef Py_ssize_t n
    cdef long *weights
    cdef long *current
    cdef long total
    cdef bint uniform
    cdef Py_ssize_t next
    cpdef Py_ssize_t pick(self)
    cpdef Py_ssize_t pick_other(self, Py_ssize_t avoid)
