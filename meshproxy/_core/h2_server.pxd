# The server side of an HTTP/2 connection, compiled (h2_server.pyx says why and how).

from meshproxy._core.hpack cimport Decoder, Encoder


cdef class _Stream:
    cdef unsigned int sid
    cdef bint remote_closed, local_closed
    cdef long long in_window, out_window, unacked
    cdef long long expected, received


cdef class H2ServerConnection:
    cdef readonly unsigned int highest_inbound_stream_id
    cdef readonly long max_outbound_frame_size
    cdef public Decoder decoder
    cdef public Encoder encoder
    cdef dict streams
    cdef dict closed
    cdef unsigned int forgotten_below
    cdef list out
    # A frame partly received: its pieces, their length, the length that completes it,
    # its type once its header is in (-1 before).
    cdef list inparts
    cdef Py_ssize_t inlen, need
    cdef int partial_type
    cdef bint preface_seen, settings_seen, terminated
    # Our settings (in force from the preface on, as h2 applies them) and the peer's.
    cdef long max_concurrent_streams, local_initial_window, local_max_frame
    cdef long header_table_size, max_header_list_size
    cdef bint enable_connect
    cdef long long peer_initial_window
    # The connection's windows: what the client may still send, what we may.
    cdef long long in_window, in_target, unacked, out_window
    # A header block in progress (RFC 9113 6.10): its stream, END_STREAM, fragments.
    cdef unsigned int hb_sid
    cdef bint hb_end_stream
    cdef list hb_parts
    cdef Py_ssize_t hb_bytes

    cdef int _frame(self, int ftype, int flags, unsigned int sid, bytes payload,
                    list events) except -1
    cdef int _data(self, int flags, unsigned int sid, bytes payload, list events) except -1
    cdef int _headers(self, int flags, unsigned int sid, bytes payload, list events) except -1
    cdef int _continuation(self, int flags, unsigned int sid, bytes payload,
                           list events) except -1
    cdef int _block(self, unsigned int sid, bint end_stream, bytes block,
                    list events) except -1
    cdef int _settings(self, int flags, unsigned int sid, bytes payload,
                       list events) except -1
    cdef int _window_update(self, unsigned int sid, bytes payload, list events) except -1
    cdef int _rst_stream(self, unsigned int sid, bytes payload, list events) except -1
    cdef int _closed_frame(self, unsigned int sid, bint is_headers, list events) except -1
    cdef list _decode(self, bytes block)
    cdef int _stream_error(self, unsigned int sid, int code, list events) except -1
    cdef void _forget(self, _Stream st, int how)
    cdef void _credit(self, _Stream st, long long n)
    cdef void _emit(self, int ftype, int flags, unsigned int sid, const unsigned char* p,
                    Py_ssize_t n)
    cdef void _keep(self, bytes rest, int ftype, Py_ssize_t need)
    cdef void _emit_u32(self, int ftype, unsigned int sid, unsigned int value)
    cdef _Stream _sendable(self, unsigned int sid)
