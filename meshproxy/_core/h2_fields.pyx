"""The checks and normalization h2 makes of every header block it receives, compiled.

h2 (4.4) validates inbound fields with a chain of generators (h2.utilities
validate_headers and normalize_inbound_headers), a few Python frames per field; these
are the same rules in one pass, with the same ProtocolError (a connection error in h2),
in the same order (field by field, each through the checks in h2's order, then the
block's own), so that h2 behaves as before, only faster. protocol.http2 installs them
in h2.stream; tests/differential/test_h2_fields_vs_h2.py holds them to h2's originals.

What is checked (RFC 9113):
- 8.2.1: a field name has no byte in 0x00-0x20, 0x41-0x5a (uppercase) or 0x7f-0xff, no
  colon after its first byte, and is not empty; a value has no NUL, LF or CR and does
  not begin or end with SP or HTAB;
- 8.2.2: no connection-specific field (Connection, Proxy-Connection, Keep-Alive,
  Transfer-Encoding, Upgrade); TE only as "trailers";
- 8.3: pseudo-header fields known, once each, before every regular field, none in
  trailers; a request has :method, and :scheme and :path unless it is a plain CONNECT
  (which has neither; RFC 8441 4: an extended CONNECT has both, and :protocol only
  with CONNECT); a response has :status and no request pseudo-header; a request's
  :path is not empty;
- 8.3.1: a request has :authority or Host, not two Hosts, and the two agree.
Normalization (8.2.3): a request's cookie fields are joined with "; " into one, last.
"""

import base64
import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from h2.exceptions import ProtocolError

from meshproxy._core.http1_parser cimport MessageHead
from hpack import NeverIndexedHeaderTuple

cdef frozenset CONNECTION_HEADERS = frozenset((
    b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade"))
cdef frozenset ALLOWED_PSEUDO = frozenset((
    b":method", b":scheme", b":authority", b":path", b":status", b":protocol"))
cdef frozenset REQUEST_ONLY = frozenset((
    b":scheme", b":path", b":authority", b":method", b":protocol"))


def normalize_inbound_headers(headers, flags) -> list:
    """8.2.3: cookie fields joined, last (h2's _combine_cookie_fields)."""
    cdef list out = []
    cdef list cookies = None
    for h in headers:
        if h[0] == b"cookie":
            if cookies is None:
                cookies = []
            cookies.append(h[1])
        else:
            out.append(h)
    if cookies is not None:
        out.append(NeverIndexedHeaderTuple(b"cookie", b"; ".join(cookies)))
    return out


cdef void _check_field(bytes name, bytes value) except *:
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name), i
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if 0x41 <= c <= 0x5a:
            raise ProtocolError(f"Received uppercase header name {name!r}.")
        if c <= 0x20 or c >= 0x7f:
            raise ProtocolError(f"Illegal character '{chr(c)}' in header name: {name!r}")
    for i in range(1, n):
        if p[i] == 0x3a:
            raise ProtocolError(f"Illegal character ':' in header name: {name!r}")
    p = <const unsigned char*>PyBytes_AS_STRING(value)
    n = PyBytes_GET_SIZE(value)
    if n:
        for i in range(n):
            c = p[i]
            if c == 0 or c == 0x0a or c == 0x0d:
                raise ProtocolError(
                    f"Illegal character '{chr(c)}' in header value: {value!r}")
        if p[0] == 0x20 or p[0] == 0x09 or p[n - 1] == 0x20 or p[n - 1] == 0x09:
            raise ProtocolError(f"Received header value surrounded by whitespace {value!r}")


def validate_headers(headers, flags) -> list:
    """h2.utilities.validate_headers, compiled: the fields, or ProtocolError."""
    cdef bint is_trailer = flags.is_trailer
    cdef bint is_response = flags.is_response_header
    cdef bint request = not is_trailer and not is_response
    cdef list out = list(headers)
    cdef set pseudo = set()
    cdef bint regular_seen = False
    cdef object method = None, authority = None, host = None
    cdef bytes name, value
    for h in out:
        name = h[0]
        value = h[1]
        _check_field(name, value)
        if not name:
            raise ProtocolError("Received header name with zero length.")
        if name == b"te" and value.lower() != b"trailers":
            raise ProtocolError(f"Invalid value for TE header: {value!r}")
        if name in CONNECTION_HEADERS:
            raise ProtocolError(f"Connection-specific header field present: {name!r}.")
        if PyBytes_AS_STRING(name)[0] == b":":
            if name in pseudo:
                raise ProtocolError(f"Received duplicate pseudo-header field {name!r}")
            pseudo.add(name)
            if regular_seen:
                raise ProtocolError(f"Received pseudo-header field out of sequence: {name!r}")
            if name not in ALLOWED_PSEUDO:
                raise ProtocolError(f"Received custom pseudo-header field {name!r}")
            if name == b":method":
                method = value
        else:
            regular_seen = True
        if request:
            if name == b":authority":
                authority = value
            elif name == b"host":
                if host is not None:
                    raise ProtocolError("Request header block has multiple Host headers.")
                host = value
            if name == b":path" and not value:
                raise ProtocolError("An empty :path header is forbidden")
    _acceptable(pseudo, method, is_trailer, is_response)
    if request:
        if authority is None and host is None:
            raise ProtocolError(
                "Request header block does not have an :authority or Host header.")
        if authority is not None and host is not None and authority != host:
            raise ProtocolError(
                "Request header block has mismatched :authority and Host headers: "
                f"{authority!r} / {host!r}")
    return out


cdef void _require(bytes name, set pseudo) except *:
    if name not in pseudo:
        raise ProtocolError(f"Header block missing mandatory {name!r} header")


cdef void _acceptable(set pseudo, object method, bint is_trailer, bint is_response) except *:
    """The block's pseudo-header fields, as h2's _check_pseudo_header_field_acceptability."""
    cdef bint connect, extended
    if is_trailer and pseudo:
        raise ProtocolError(f"Received pseudo-header in trailer {pseudo}")
    if is_response:
        _require(b":status", pseudo)
        if pseudo & REQUEST_ONLY:
            raise ProtocolError(f"Encountered request-only headers {pseudo & REQUEST_ONLY}")
    elif not is_trailer:
        _require(b":method", pseudo)
        connect = method == b"CONNECT"
        extended = connect and b":protocol" in pseudo
        if connect and not extended:
            if b":scheme" in pseudo or b":path" in pseudo:
                raise ProtocolError("Ordinary CONNECT MUST NOT include :scheme or :path")
        else:
            _require(b":scheme", pseudo)
            _require(b":path", pseudo)
        if b":status" in pseudo:
            raise ProtocolError("Encountered response-only headers {b':status'}")
        if not connect and b":protocol" in pseudo:
            raise ProtocolError("Encountered connect-request-only headers {b':protocol'}")


# How a stream's DATA is read, as request_head decides it: as it comes (a content-length,
# or no body), re-framed chunked (a body without a content-length), or a tunnel's bytes.
BODY_AS_IS, BODY_CHUNKED, BODY_TUNNEL = 0, 1, 2


def request_head(list fields, bint end_stream) -> tuple:
    """A request's fields (validated by validate_headers: one of each pseudo-header,
    lowercase names, no connection-specific fields) as the HTTP/1.1 head the compiled
    parser reads. :authority becomes Host (RFC 9113 8.3.1); a body that will follow
    without a content-length is marked chunked, which is how the relay frames it upstream.
    Returns (head bytes, the body's reading BODY_*, the fields the client sent
    never-indexed or None), the last kept so to an HTTP/2 origin (RFC 7541 7.1.3).

    An extended CONNECT (RFC 8441 4: CONNECT with :protocol) becomes the HTTP/1.1 upgrade
    it stands for, as Envoy translates it: GET :path with `Upgrade: <protocol>` and
    `Connection: upgrade`; for a WebSocket the Sec-WebSocket-Key HTTP/2 does without
    (RFC 8441 5) is made up, since an HTTP/1.1 origin requires one (RFC 6455 4.1). The
    stream's DATA is then the tunnel's bytes, never chunk-framed."""
    cdef bytes method = b"", path = b"", authority = b"", protocol = b""
    cdef bytes name, value
    cdef list lines = []
    cdef list never = None
    cdef bint has_length = False, has_host = False, has_key = False
    cdef int body = BODY_AS_IS
    for f in fields:
        name = f[0]
        value = f[1]
        if type(f) is NeverIndexedHeaderTuple:
            if never is None:
                never = []
            never.append((name, value))
        if PyBytes_GET_SIZE(name) and PyBytes_AS_STRING(name)[0] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                protocol = value
            continue
        if name == b"content-length":
            has_length = True
        elif name == b"host":
            has_host = True
        elif name == b"sec-websocket-key":
            has_key = True
        lines.append(name + b": " + value)
    if authority and not has_host:
        lines.append(b"host: " + authority)
    if protocol:
        body = BODY_TUNNEL
        method = b"GET"
        lines.append(b"connection: upgrade")
        lines.append(b"upgrade: " + protocol)
        if protocol.lower() == b"websocket" and not has_key:
            lines.append(b"sec-websocket-key: " + base64.b64encode(os.urandom(16)))
    else:
        if not end_stream and not has_length:
            body = BODY_CHUNKED
            lines.append(b"transfer-encoding: chunked")
        if method == b"CONNECT" and not path:
            path = authority  # RFC 9113 8.5: authority-form
    lines.append(b"\r\n")
    return (method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(lines), body,
            frozenset(never) if never is not None else None)


def response_fields(int status, MessageHead resp, frozenset base, frozenset skip,
                    tuple add, list extra, long long length, frozenset never) -> list:
    """An HTTP/1.1 response head as HTTP/2 fields: the fields in `base` (those HTTP/2
    forbids, RFC 9113 8.2.2, and content-length, restated from the framing), the route's
    `skip` and those the Connection header names dropped; the fields an HTTP/2 origin sent
    never-indexed (`never`) kept so (RFC 7541 7.1.3); content-length when the length is
    known (`length` >= 0); then the proxy's `extra` and the route's `add`."""
    cdef list out = [(b":status", b"%d" % status)]
    cdef list conn_extra = resp.conn_extra
    cdef bytes name
    for field in resp.headers:
        name = field[0]
        if name in base or name in skip or (conn_extra and name in conn_extra):
            continue
        if never is not None and field in never:
            field = NeverIndexedHeaderTuple(name, field[1])
        out.append(field)
    if length >= 0:
        out.append((b"content-length", b"%d" % length))
    if extra:
        out += extra
    if add:
        out += add
    return out
