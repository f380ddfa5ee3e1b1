# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled routing: Host -> virtual host -> first matching route (Envoy's semantics).

Built once per config snapshot by meshproxy.config.compile; immutable afterwards, so a
worker swaps tables in one assignment and requests in flight keep the table they started on.

Virtual host selection (Envoy's order, most specific first):
  1. exact domain, by one dict lookup;
  2. suffix wildcard (`*.example.com`, `*-bar.example.com`): the longest that matches;
  3. prefix wildcard (`api.*`, `api-*`): the longest that matches;
  4. `*`.
Wildcards are grouped by length, one dict per length, so a lookup costs one hash probe per
distinct wildcard length, never a scan of every virtual host. A wildcard matches at least
one character. Hosts are compared lowercased and without their port.

Routes inside a virtual host are tried in order; the first whose every predicate matches
wins. Regexes are compiled once, here, and always matched in full (Envoy's safe_regex).
"""

import re
from urllib.parse import unquote_to_bytes

cdef enum:
    PATH_PREFIX = 0
    PATH_EXACT = 1
    PATH_REGEX = 2

cdef enum:
    H_EXACT = 0
    H_PREFIX = 1
    H_SUFFIX = 2
    H_REGEX = 3
    H_PRESENT = 4
    H_ABSENT = 5


cdef class HeaderMatcher:
    """A predicate on one header (or query parameter). Several values are joined with ','."""

    def __init__(self, bytes name, str kind, bytes value=b"", bint invert=False,
                 bint lower_name=True):
        # Header names are case-insensitive (RFC 9110 5.1); query parameter names are not.
        self.name = name.lower() if lower_name else name
        self.invert = invert
        self.value = value
        self.regex = None
        if kind == "exact":
            self.kind = H_EXACT
        elif kind == "prefix":
            self.kind = H_PREFIX
        elif kind == "suffix":
            self.kind = H_SUFFIX
        elif kind == "regex":
            self.kind = H_REGEX
            self.regex = re.compile(value)
        elif kind == "present":
            self.kind = H_PRESENT
        elif kind == "absent":
            self.kind = H_ABSENT
        else:
            raise ValueError(f"unknown matcher kind {kind!r}")

    cdef bint match_value(self, object value):
        cdef bint ok
        if value is None:
            ok = self.kind == H_ABSENT
        elif self.kind == H_EXACT:
            ok = value == self.value
        elif self.kind == H_PREFIX:
            ok = (<bytes>value).startswith(self.value)
        elif self.kind == H_SUFFIX:
            ok = (<bytes>value).endswith(self.value)
        elif self.kind == H_REGEX:
            ok = self.regex.fullmatch(value) is not None
        elif self.kind == H_PRESENT:
            ok = True
        else:
            ok = False
        return ok != self.invert

    cdef bint match_headers(self, list headers):
        cdef tuple pair
        cdef object found = None
        for pair in headers:
            if pair[0] == self.name:
                if found is None:
                    found = pair[1]
                else:
                    found = found + b"," + pair[1]
        return self.match_value(found)


cdef dict _parse_query(bytes query):
    """name -> first value, percent-decoded ('+' is left alone, as Envoy does)."""
    cdef dict out = {}
    cdef bytes part, k, v
    for part in query.split(b"&"):
        if not part:
            continue
        k, _, v = part.partition(b"=")
        k = unquote_to_bytes(k)
        if k not in out:
            out[k] = unquote_to_bytes(v)
    return out


cdef class Route:
    """One route: predicates plus an opaque `action` owned by the proxy layer."""

    def __init__(self, str path_kind, bytes path, object methods, list headers, list query,
                 object action, bint case_sensitive=True, str name=""):
        self.case_sensitive = case_sensitive
        self.regex = None
        if path_kind == "prefix":
            self.path_kind = PATH_PREFIX
        elif path_kind == "path":
            self.path_kind = PATH_EXACT
        elif path_kind == "regex":
            self.path_kind = PATH_REGEX
            self.regex = re.compile(path, 0 if case_sensitive else re.IGNORECASE)
        else:
            raise ValueError(f"unknown path match {path_kind!r}")
        self.path = path if case_sensitive else path.lower()
        self.methods = frozenset(methods) if methods else None
        self.headers = tuple(headers)
        self.query = tuple(query)
        self.action = action
        self.name = name

    cdef bint matches(self, bytes method, bytes path, bytes query, list headers):
        cdef HeaderMatcher m
        cdef dict params
        cdef bytes p = path if self.case_sensitive else path.lower()
        if self.path_kind == PATH_PREFIX:
            if not p.startswith(self.path):
                return False
        elif self.path_kind == PATH_EXACT:
            if p != self.path:
                return False
        elif self.regex.fullmatch(path) is None:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        for m in self.headers:
            if not m.match_headers(headers):
                return False
        if self.query:
            params = _parse_query(query)
            for m in self.query:
                if not m.match_value(params.get(m.name)):
                    return False
        return True


cdef class VirtualHost:
    def __init__(self, str name, list routes, object extra=None):
        self.name = name
        self.routes = routes
        self.extra = extra

    cpdef Route find_route(self, bytes method, bytes path, bytes query, list headers):
        cdef Route r
        for r in self.routes:
            if r.matches(method, path, query, headers):
                return r
        return None


cdef tuple _group_by_length(dict patterns):
    """{pattern: vhost} -> ((length, {pattern: vhost}), ...) longest first."""
    cdef dict groups = {}
    for pat, vh in patterns.items():
        groups.setdefault(len(pat), {})[pat] = vh
    return tuple(sorted(groups.items(), reverse=True))


cdef bytes _host_key(bytes host):
    """Lowercase, without a port; an IPv6 literal keeps its brackets."""
    cdef Py_ssize_t i
    if host.startswith(b"["):
        i = host.find(b"]")
        if i >= 0:
            return host[:i + 1].lower()
        return host.lower()
    i = host.rfind(b":")
    if i >= 0:
        host = host[:i]
    return host.lower()


cdef class RouteTable:
    """Domains -> VirtualHost. See the module docstring for the precedence."""

    def __init__(self, list virtual_hosts_with_domains):
        cdef dict exact = {}, suffix = {}, prefix = {}
        cdef VirtualHost vh
        self.default = None
        for vh, domains in virtual_hosts_with_domains:
            for d in domains:
                key = d.lower().encode("idna" if not d.isascii() else "ascii")
                if key == b"*":
                    self.default = vh
                elif key.startswith(b"*"):
                    suffix[key[1:]] = vh
                elif key.endswith(b"*"):
                    prefix[key[:len(key) - 1]] = vh
                else:
                    exact[key] = vh
        self.exact = exact
        self.suffixes = _group_by_length(suffix)
        self.prefixes = _group_by_length(prefix)

    cpdef VirtualHost find_virtual_host(self, bytes host):
        cdef bytes key = _host_key(host) if host else b""
        cdef Py_ssize_t n = len(key), length
        cdef dict group
        vh = self.exact.get(key)
        if vh is not None:
            return vh
        for length, group in self.suffixes:
            if length < n:
                vh = group.get(key[n - length:])
                if vh is not None:
                    return vh
        for length, group in self.prefixes:
            if length < n:
                vh = group.get(key[:length])
                if vh is not None:
                    return vh
        return self.default

    cpdef tuple route(self, bytes host, bytes method, bytes target, list headers):
        """(virtual_host, route) for an origin-form target; (vh or None, None) when nothing
        matches."""
        cdef VirtualHost vh = self.find_virtual_host(host)
        cdef Py_ssize_t q
        cdef bytes path, query
        if vh is None:
            return (None, None)
        q = target.find(b"?")
        if q < 0:
            path = target
            query = b""
        else:
            path = target[:q]
            query = target[q + 1:]
        return (vh, vh.find_route(method, path, query, headers))
