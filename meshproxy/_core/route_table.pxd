cdef class HeaderMatcher:
    cdef readonly bytes name
    cdef readonly int kind
    cdef readonly bytes value
    cdef readonly object regex
    cdef readonly bint invert
    cdef bint match_value(self, object value)
    cdef bint match_headers(self, list headers)


cdef class Route:
    cdef readonly int path_kind
    cdef readonly bytes path
    cdef readonly object regex
    cdef readonly object methods
    cdef readonly tuple headers
    cdef readonly tuple query
    cdef readonly bint case_sensitive
    cdef readonly object action
    cdef readonly str name
    cdef bint matches(self, bytes method, bytes path, bytes query, list headers)


cdef class VirtualHost:
    cdef readonly str name
    cdef readonly list routes
    cdef readonly object extra
    cpdef Route find_route(self, bytes method, bytes path, bytes query, list headers)


cdef class RouteTable:
    cdef readonly dict exact
    cdef readonly tuple suffixes
    cdef readonly tuple prefixes
    cdef readonly VirtualHost default
    cpdef VirtualHost find_virtual_host(self, bytes host)
    cpdef tuple route(self, bytes host, bytes method, bytes target, list headers)
