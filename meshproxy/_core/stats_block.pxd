cdef class StatsBlock:
    cdef long long[::1] _view
    cdef long long *cells
    cdef Py_ssize_t ncells
    cpdef void inc(self, Py_ssize_t i)
    cpdef void add(self, Py_ssize_t i, long long n)
    cpdef void set(self, Py_ssize_t i, long long v)
    cpdef long long get(self, Py_ssize_t i)
    cpdef void observe(self, Py_ssize_t i, double ms)
