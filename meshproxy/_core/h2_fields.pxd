# h2's inbound field checks, compiled (h2_fields.pyx says which).

cdef void _check_field(bytes name, bytes value) except *
cdef void _require(bytes name, set pseudo) except *
cdef void _acceptable(set pseudo, object method, bint is_trailer, bint is_response) except *
