# Declarations shared by the compiled modules that take heads apart (see http1_parser.pyx).

cdef class MessageHead:
    cdef public bytes method
    cdef public bytes target
    cdef public int status
    cdef public bytes reason
    cdef public int version
    cdef public list headers
    cdef public Py_ssize_t end
    cdef public long long content_length
    cdef public bint chunked
    cdef public int te_count
    cdef public bint te_invalid
    cdef public bint te_ends_chunked
    cdef public bint conn_close
    cdef public bint conn_keep_alive
    cdef public bint conn_upgrade
    cdef public list conn_extra
    cdef public bytes host
    cdef public int host_count
    cdef public bint expect_continue
    cdef public bytes upgrade
    cdef public bytes request_id
    cdef public bytes forwarded_for
    cdef public bytes grpc_timeout
    cdef public bytes deadline_ms


cdef class HeadParser:
    cdef public Py_ssize_t max_request_line
    cdef public Py_ssize_t max_header_bytes
    cdef public Py_ssize_t max_headers
    cdef Py_ssize_t _find_end(self, const unsigned char *p, Py_ssize_t start, Py_ssize_t n,
                              bint request) except -2
    cdef int _parse_fields(self, const unsigned char *p, Py_ssize_t i, Py_ssize_t end,
                           MessageHead head) except -1
    cdef object _response(self, bytes data, Py_ssize_t start)


cdef class ChunkedDecoder:
    cdef int state
    cdef long long remaining
    cdef bytearray line
    cdef public list trailers
    cdef Py_ssize_t trailer_bytes
    cdef Py_ssize_t max_trailer_bytes
    cdef int error_status
    cdef int _check_line_limit(self, Py_ssize_t ln) except -1
    cdef int _size_line(self, bytes line) except -1
    cdef int _trailer_line(self, bytes line) except -1
