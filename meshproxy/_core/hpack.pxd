# RFC 7541 header compression (hpack.pyx says why and how).

cdef class _Table:
    cdef list entries
    cdef Py_ssize_t size, maxsize
    cdef object get(self, Py_ssize_t index)
    cdef list add(self, bytes name, bytes value)
    cdef tuple _pop(self)
    cdef list resize(self, Py_ssize_t maxsize)


cdef class Decoder:
    cdef _Table table
    cdef public Py_ssize_t max_header_list_size
    cdef public Py_ssize_t max_allowed_table_size


cdef class Encoder:
    cdef _Table table
    cdef Py_ssize_t inserted
    cdef dict full
    cdef dict names
    cdef list sequence
    cdef Py_ssize_t pending_min, pending_final
    cdef bint size_changed
    cdef void _forget(self, list evicted)
    cdef Py_ssize_t _dynamic_index(self, Py_ssize_t seq)
