# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Strict, incremental, sans-IO HTTP/1.1 message heads and chunked framing (RFC 9112).

Rules:
- No I/O, no clock: bytes in, a `MessageHead` (or None: need more bytes) out, or a
  `ParseError` carrying the status to answer (400, 414, 431, 501, 505).
- One pass over the head in C; the only Python objects made are the head, the header
  list and its (name, value) pairs. Names are lowercased (as Envoy's codec does), values
  are stripped of optional whitespace (RFC 9110 section 5.5).
- Anything a request-smuggling attack relies on is rejected, never repaired: CL with TE,
  differing CLs, a TE other than a single `chunked`, whitespace before the colon, obs-fold,
  bare CR or bare LF, CTLs anywhere in a head, invalid chunk sizes.

Invariant: a head is returned only once its terminating empty line is in the buffer, and
`head.end` is the index just past it, so the caller slices the body/pipeline from there.

Size: past 700 lines because the request and response heads share one C scanner (the
request line and status line differ, the header block and its smuggling checks do not)
and the chunked decoder shares its CTL and size rules; split, the checks that keep the
two sides equally strict would live twice.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from libc.string cimport memchr, memcpy

cdef extern from "string.h" nogil:
    void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen)


class ParseError(Exception):
    """A message that must be refused. `status` is what a server answers (RFC 9112)."""

    def __init__(self, int status, str reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


# Character classes (RFC 9110 section 5.6.2 tchar; 5.5 field-vchar and obs-text).
cdef unsigned char TCHAR[256]
cdef unsigned char VALUE_OK[256]   # field-vchar / SP / HTAB / obs-text
cdef unsigned char TARGET_OK[256]  # VCHAR: request-target has no whitespace or CTL
cdef unsigned char LOWER[256]
cdef unsigned char HEXVAL[256]     # 0..15, or 255 for not-a-hex-digit


cdef void _init_tables():
    cdef int c
    cdef bytes extra = b"!#$%&'*+-.^_`|~"
    for c in range(256):
        TCHAR[c] = 0
        VALUE_OK[c] = 1 if (c == 9 or c == 32 or (0x21 <= c <= 0x7E) or c >= 0x80) else 0
        TARGET_OK[c] = 1 if 0x21 <= c <= 0x7E else 0
        LOWER[c] = c + 32 if 65 <= c <= 90 else c
        HEXVAL[c] = 255
    for c in range(48, 58):
        TCHAR[c] = 1
        HEXVAL[c] = c - 48
    for c in range(65, 91):
        TCHAR[c] = 1
        TCHAR[c + 32] = 1
    for c in range(6):
        HEXVAL[65 + c] = 10 + c
        HEXVAL[97 + c] = 10 + c
    for c in extra:
        TCHAR[c] = 1


_init_tables()

# The largest body length (Content-Length, a chunk size) accepted: 2**62 bytes, far beyond
# any real body, and a quarter of the signed 64-bit range, so that the sums the proxy makes
# from a length it was told (position + length, length * 10 + digit while parsing, 16 *
# size + hexdigit) cannot overflow a `long long`. Every accumulation checks that the NEXT
# value stays within this bound before computing it (checking after is too late: 2**64 + 5
# wraps to 5 and smuggles a request).
cdef long long MAX_BODY_LENGTH = 4611686018427387904
# A chunk-size line (size plus extensions) longer than this is an attack, not data:
# extensions carry no meaning for a proxy and must not be an unbounded buffer.
cdef Py_ssize_t MAX_CHUNK_LINE = 4096

cdef bytes CRLFCRLF = b"\r\n\r\n"


cdef class MessageHead:
    """A parsed request or response head. Framing facts are computed during the parse."""

    def __cinit__(self):
        self.content_length = -1
        self.status = 0

    @property
    def keep_alive(self):
        """Persistence per RFC 9112 section 9.3."""
        if self.conn_close:
            return False
        if self.version >= 11:
            return True
        return self.conn_keep_alive

    def get(self, bytes name, default=None):
        """First value of a (lowercase) header name, or `default`."""
        cdef tuple pair
        for pair in self.headers:
            if pair[0] == name:
                return pair[1]
        return default

    def get_all(self, bytes name):
        cdef tuple pair
        return [pair[1] for pair in self.headers if pair[0] == name]

    def __repr__(self):
        if self.status:
            return f"<MessageHead {self.status} {self.headers!r}>"
        return f"<MessageHead {self.method!r} {self.target!r} {self.headers!r}>"


cdef inline bint _eq_lower(const unsigned char *p, Py_ssize_t n, const char *lit, Py_ssize_t ln):
    """Case-insensitive compare of p[0:n] with a lowercase literal."""
    cdef Py_ssize_t i
    if n != ln:
        return False
    for i in range(n):
        if LOWER[p[i]] != <unsigned char>lit[i]:
            return False
    return True


cdef inline Py_ssize_t _trim_end(const unsigned char *p, Py_ssize_t a, Py_ssize_t b):
    while b > a and (p[b - 1] == 32 or p[b - 1] == 9):
        b -= 1
    return b


cdef long long _parse_content_length(const unsigned char *p, Py_ssize_t a, Py_ssize_t b) except -2:
    """A Content-Length value: 1*DIGIT, or a comma list of identical values (RFC 9112 6.3)."""
    cdef long long value = -1, cur, d
    cdef Py_ssize_t i = a, digits
    while True:
        while i < b and (p[i] == 32 or p[i] == 9):
            i += 1
        cur = 0
        digits = 0
        while i < b and 48 <= p[i] <= 57:
            d = p[i] - 48
            # Before the arithmetic: cur * 10 + d <= MAX_BODY_LENGTH, so it cannot wrap.
            if cur > (MAX_BODY_LENGTH - d) // 10:
                raise ParseError(400, "Content-Length overflows")
            cur = cur * 10 + d
            digits += 1
            i += 1
        if digits == 0:
            raise ParseError(400, "invalid Content-Length")
        if value != -1 and value != cur:
            raise ParseError(400, "conflicting Content-Length values")
        value = cur
        while i < b and (p[i] == 32 or p[i] == 9):
            i += 1
        if i == b:
            return value
        if p[i] != 44:  # ','
            raise ParseError(400, "invalid Content-Length")
        i += 1


cdef class HeadParser:
    """Parses request or response heads under configured limits.

    Limits and why:
    - max_request_line (8 KiB, answered 414): what nginx and Apache accept by default, so a
      URL that works behind them works here; a longer line is a client bug or an attack.
    - max_header_bytes (60 KiB, answered 431): Envoy's max_request_headers_kb default.
    - max_headers (100, answered 431): Envoy's max_headers_count default; bounds the per
      request objects a client can make us allocate.
    """

    def __init__(self, Py_ssize_t max_request_line=8192, Py_ssize_t max_header_bytes=61440,
                 Py_ssize_t max_headers=100):
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers

    cdef Py_ssize_t _find_end(self, const unsigned char *p, Py_ssize_t start, Py_ssize_t n,
                              bint request) except -2:
        """Index just past the head's empty line, or -1 when more bytes are needed."""
        cdef const unsigned char *hit
        cdef const unsigned char *lf
        cdef Py_ssize_t avail = n - start, line_len
        # RFC 9112 section 2.2: ignore empty lines before a request-line.
        hit = <const unsigned char *>memmem(p + start, avail, <const char *>b"\r\n\r\n", 4)
        if hit != NULL:
            if hit - (p + start) + 4 > self.max_header_bytes:
                raise ParseError(431, "request header fields too large")
            return hit - p + 4
        # Incomplete: decide now whether it can ever become valid.
        lf = <const unsigned char *>memchr(p + start, 10, avail)
        if lf == NULL:
            line_len = avail
        else:
            line_len = lf - (p + start)
        if request and line_len > self.max_request_line:
            raise ParseError(414, "request line too long")
        if avail > self.max_header_bytes:
            raise ParseError(431, "request header fields too large")
        while lf != NULL:
            if lf == p + start or (lf - 1)[0] != 13:
                raise ParseError(400, "bare LF in message head")
            lf = <const unsigned char *>memchr(lf + 1, 10, (p + n) - (lf + 1))
        return -1

    def parse_request(self, bytes data, Py_ssize_t start=0):
        """Parse a request head from data[start:]. None when incomplete."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i, a, end
        cdef MessageHead head
        # Skip empty lines a client may send between pipelined requests (RFC 9112 2.2).
        while start + 1 < n and p[start] == 13 and p[start + 1] == 10:
            start += 2
        if start >= n:
            return None
        end = self._find_end(p, start, n, True)
        if end < 0:
            return None
        head = MessageHead()
        head.end = end
        i = start
        # method = token
        a = i
        while TCHAR[p[i]]:
            i += 1
        if i == a or p[i] != 32:
            raise ParseError(400, "invalid method")
        head.method = PyBytes_FromStringAndSize(<const char *>p + a, i - a)
        i += 1
        a = i
        while TARGET_OK[p[i]]:
            i += 1
        if i == a or p[i] != 32:
            raise ParseError(400, "invalid request target")
        if i - start > self.max_request_line:
            raise ParseError(414, "request line too long")
        if memchr(p + a, 35, i - a) != NULL:  # '#'
            # RFC 9112 3.2: a request-target has no fragment (the client keeps it). Refused,
            # never stripped, as Envoy does by default: an origin that read `/a#/../b` as a
            # path would see a different resource than the one the route matched.
            raise ParseError(400, "fragment in request target")
        head.target = PyBytes_FromStringAndSize(<const char *>p + a, i - a)
        i += 1
        i = _parse_version(p, i, head)
        if p[i] != 13 or p[i + 1] != 10:
            raise ParseError(400, "invalid request line")
        self._parse_fields(p, i + 2, end, head)
        _check_request_framing(head)
        return head

    def parse_response(self, bytes data, Py_ssize_t start=0):
        """Parse a response head (status line and fields) from data[start:]. Every refusal is
        a 502: the version, field and size rules are the request's, but a response that
        breaks them is the origin's fault (RFC 9110 15.6.3)."""
        try:
            return self._response(data, start)
        except ParseError as exc:
            if exc.status == 502:
                raise
            raise ParseError(502, exc.reason) from None

    cdef object _response(self, bytes data, Py_ssize_t start):
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i, a, end
        cdef MessageHead head
        if start >= n:
            return None
        end = self._find_end(p, start, n, False)
        if end < 0:
            return None
        head = MessageHead()
        head.end = end
        i = _parse_version(p, start, head)
        if p[i] != 32:
            raise ParseError(502, "invalid status line")
        i += 1
        if not (48 <= p[i] <= 57 and 48 <= p[i + 1] <= 57 and 48 <= p[i + 2] <= 57):
            raise ParseError(502, "invalid status code")
        head.status = (p[i] - 48) * 100 + (p[i + 1] - 48) * 10 + (p[i + 2] - 48)
        if head.status < 100 or head.status > 599:
            # RFC 9110 15: every valid status code is in 100..599. A peer-chosen value outside
            # it must not index per-class counters (1xx..5xx) or reach a client.
            raise ParseError(502, "invalid status code")
        i += 3
        a = i
        if p[i] == 32:
            i += 1
            a = i
            while p[i] != 13:
                if not VALUE_OK[p[i]]:
                    raise ParseError(502, "invalid reason phrase")
                i += 1
        if p[i] != 13 or p[i + 1] != 10:
            raise ParseError(502, "invalid status line")
        head.reason = PyBytes_FromStringAndSize(<const char *>p + a, i - a)
        self._parse_fields(p, i + 2, end, head)
        _check_response_framing(head)
        return head

    cdef int _parse_fields(self, const unsigned char *p, Py_ssize_t i, Py_ssize_t end,
                           MessageHead head) except -1:
        """Field lines from i up to the empty line ending at `end` (RFC 9112 section 5)."""
        cdef list headers = []
        cdef Py_ssize_t a, na, nb, va, vb, k, count = 0
        cdef bytes name, value
        cdef char *q
        head.headers = headers
        while i < end - 2:
            c = p[i]
            if c == 32 or c == 9:
                raise ParseError(400, "obs-fold or leading whitespace in field line")
            na = i
            while TCHAR[p[i]]:
                i += 1
            nb = i
            if p[i] != 58:  # ':'
                if nb > na and (p[i] == 32 or p[i] == 9):
                    raise ParseError(400, "whitespace before colon in field name")
                raise ParseError(400, "invalid character in field name")
            if nb == na:
                raise ParseError(400, "empty field name")
            i += 1
            while p[i] == 32 or p[i] == 9:
                i += 1
            va = i
            while VALUE_OK[p[i]]:
                i += 1
            if p[i] != 13 or p[i + 1] != 10:
                if p[i] == 13:
                    raise ParseError(400, "bare CR in field value")
                raise ParseError(400, "invalid character in field value")
            vb = _trim_end(p, va, i)
            i += 2
            count += 1
            if count > self.max_headers:
                raise ParseError(431, "too many header fields")
            name = PyBytes_FromStringAndSize(NULL, nb - na)
            q = PyBytes_AS_STRING(name)
            for k in range(nb - na):
                q[k] = LOWER[p[na + k]]
            value = PyBytes_FromStringAndSize(<const char *>p + va, vb - va)
            headers.append((name, value))
            _note_field(p, na, nb, va, vb, head, value)
        return 0


cdef Py_ssize_t _parse_version(const unsigned char *p, Py_ssize_t i, MessageHead head) except -1:
    """HTTP-version = "HTTP/" DIGIT "." DIGIT (RFC 9112 section 2.3)."""
    if not (p[i] == 72 and p[i + 1] == 84 and p[i + 2] == 84 and p[i + 3] == 80 and p[i + 4] == 47
            and 48 <= p[i + 5] <= 57 and p[i + 6] == 46 and 48 <= p[i + 7] <= 57):
        raise ParseError(400, "invalid HTTP version")
    if p[i + 5] != 49:
        raise ParseError(505, "HTTP version not supported")
    head.version = 10 if p[i + 7] == 48 else 11
    return i + 8


cdef int _note_field(const unsigned char *p, Py_ssize_t na, Py_ssize_t nb, Py_ssize_t va,
                     Py_ssize_t vb, MessageHead head, bytes value) except -1:
    """Record the framing and routing facts a proxy needs, while the line is at hand."""
    cdef Py_ssize_t ln = nb - na, s
    cdef long long cl
    cdef const unsigned char *nm = p + na
    if ln == 4 and _eq_lower(nm, 4, "host", 4):
        head.host_count += 1
        head.host = value
    elif ln == 14 and _eq_lower(nm, 14, "content-length", 14):
        cl = _parse_content_length(p, va, vb)
        if head.content_length != -1 and head.content_length != cl:
            raise ParseError(400, "conflicting Content-Length values")
        head.content_length = cl
    elif ln == 17 and _eq_lower(nm, 17, "transfer-encoding", 17):
        head.te_count += 1
        if _eq_lower(p + va, vb - va, "chunked", 7) and not head.chunked:
            head.chunked = True
        else:
            head.te_invalid = True
            # Is the last coding of the list `chunked`? (decides 501 versus 400)
            s = vb
            while s > va and p[s - 1] != 44:
                s -= 1
            while s < vb and (p[s] == 32 or p[s] == 9):
                s += 1
            head.te_ends_chunked = _eq_lower(p + s, vb - s, "chunked", 7)
    elif ln == 10 and _eq_lower(nm, 10, "connection", 10):
        _note_connection(p, va, vb, head)
    elif ln == 6 and _eq_lower(nm, 6, "expect", 6):
        if _eq_lower(p + va, vb - va, "100-continue", 12):
            head.expect_continue = True
    elif ln == 7 and _eq_lower(nm, 7, "upgrade", 7):
        head.upgrade = value
    elif ln == 12 and _eq_lower(nm, 12, "x-request-id", 12):
        if head.request_id is None:
            head.request_id = value
    elif ln == 12 and _eq_lower(nm, 12, "grpc-timeout", 12):
        if head.grpc_timeout is None:
            head.grpc_timeout = value
    elif ln == 23 and _eq_lower(nm, 23, "x-meshproxy-deadline-ms", 23):
        if head.deadline_ms is None:
            head.deadline_ms = value
    elif ln == 15 and _eq_lower(nm, 15, "x-forwarded-for", 15):
        # Several lines are one list (RFC 9110 5.3); the proxy appends to the combined value.
        head.forwarded_for = value if head.forwarded_for is None else head.forwarded_for + b", " + value
    return 0


cdef int _note_connection(const unsigned char *p, Py_ssize_t a, Py_ssize_t b, MessageHead head) except -1:
    """Connection = #connection-option (RFC 9110 section 7.6.1); options are lowercased."""
    cdef Py_ssize_t s, e, k
    cdef bytes tok
    cdef char *q
    while a < b:
        while a < b and (p[a] == 32 or p[a] == 9 or p[a] == 44):
            a += 1
        s = a
        while a < b and p[a] != 44:
            a += 1
        e = _trim_end(p, s, a)
        if e == s:
            continue
        if _eq_lower(p + s, e - s, "close", 5):
            head.conn_close = True
        elif _eq_lower(p + s, e - s, "keep-alive", 10):
            head.conn_keep_alive = True
        elif _eq_lower(p + s, e - s, "upgrade", 7):
            head.conn_upgrade = True
        else:
            tok = PyBytes_FromStringAndSize(NULL, e - s)
            q = PyBytes_AS_STRING(tok)
            for k in range(e - s):
                q[k] = LOWER[p[s + k]]
            if head.conn_extra is None:
                head.conn_extra = [tok]
            else:
                head.conn_extra.append(tok)
    return 0


cdef int _check_request_framing(MessageHead head) except -1:
    """RFC 9112 section 6.3: a request whose body length is ambiguous is refused."""
    if head.te_count:
        if head.version < 11:
            # 6.1: TE in an HTTP/1.0 message means faulty framing.
            raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if head.content_length != -1:
            raise ParseError(400, "both Content-Length and Transfer-Encoding")
        if head.te_invalid:
            if head.te_ends_chunked and head.te_count == 1:
                raise ParseError(501, "unsupported transfer coding")
            raise ParseError(400, "Transfer-Encoding other than a final chunked")
    if head.version >= 11 and head.host_count != 1:
        raise ParseError(400, "missing Host header" if head.host_count == 0
                         else "more than one Host header")
    if head.host_count > 1:
        raise ParseError(400, "more than one Host header")
    return 0


cdef int _check_response_framing(MessageHead head) except -1:
    if head.te_count:
        if head.content_length != -1:
            raise ParseError(502, "both Content-Length and Transfer-Encoding")
        if head.te_invalid:
            raise ParseError(502, "unsupported Transfer-Encoding")
    return 0


# ---------------------------------------------------------------- chunked framing

cdef enum:
    ST_SIZE = 0
    ST_DATA = 1
    ST_DATA_CR = 2
    ST_DATA_LF = 3
    ST_TRAILER = 4
    ST_DONE = 5


cdef inline Py_ssize_t _bws(const unsigned char *p, Py_ssize_t i, Py_ssize_t n):
    while i < n and (p[i] == 32 or p[i] == 9):
        i += 1
    return i


cdef int _chunk_ext(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, int status) except -1:
    """Chunk extensions, exactly as RFC 9112 7.1.1 has them (they carry no meaning for a
    proxy, but a peer that reads them more loosely than the next hop is how chunked bodies
    get smuggled, so anything else is refused):
        chunk-ext = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
        chunk-ext-name = token; chunk-ext-val = token / quoted-string
    """
    cdef Py_ssize_t a
    cdef bint first = True
    while True:
        i = _bws(p, i, n)
        if i == n:
            if first:  # BWS belongs to an extension: "5 " alone is no chunk-size line
                raise ParseError(status, "invalid chunk size")
            return 0
        if p[i] != 59:  # ';'
            raise ParseError(status, "invalid chunk size" if first else
                             "invalid chunk extension")
        first = False
        i = _bws(p, i + 1, n)
        a = i
        while i < n and TCHAR[p[i]]:
            i += 1
        if i == a:
            raise ParseError(status, "invalid chunk extension")
        i = _bws(p, i, n)
        if i == n or p[i] != 61:  # '='
            continue
        i = _bws(p, i + 1, n)
        if i < n and p[i] == 34:  # quoted-string (RFC 9110 5.6.4)
            i += 1
            while True:
                if i == n:
                    raise ParseError(status, "invalid chunk extension")
                if p[i] == 34:
                    i += 1
                    break
                if p[i] == 92:  # quoted-pair: "\" ( HTAB / SP / VCHAR / obs-text )
                    i += 1
                    if i == n or not VALUE_OK[p[i]]:
                        raise ParseError(status, "invalid chunk extension")
                elif not VALUE_OK[p[i]]:
                    raise ParseError(status, "invalid chunk extension")
                i += 1
        else:
            a = i
            while i < n and TCHAR[p[i]]:
                i += 1
            if i == a:
                raise ParseError(status, "invalid chunk extension")


cdef class ChunkedDecoder:
    """Incremental chunked decoder (RFC 9112 section 7.1).

    `feed(data, start)` returns (payload_parts, new_pos); payload parts are slices of the
    input in order. After the last chunk and trailer section `done` is True, `trailers`
    holds the trailer fields and new_pos points at the first byte after the message.
    """

    def __init__(self, Py_ssize_t max_trailer_bytes=61440, int error_status=400):
        self.state = ST_SIZE
        self.remaining = 0
        self.line = bytearray()
        self.trailers = []
        self.trailer_bytes = 0
        self.max_trailer_bytes = max_trailer_bytes
        self.error_status = error_status

    @property
    def done(self):
        return self.state == ST_DONE

    def feed(self, bytes data, Py_ssize_t start=0):
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i = start, take, le
        cdef const unsigned char *lf
        cdef list parts = []
        cdef bytes line
        while i < n and self.state != ST_DONE:
            if self.state == ST_DATA:
                take = n - i
                if take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                if i == 0 and take == n:
                    parts.append(data)
                else:
                    parts.append(data[i:i + take])
                i += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = ST_DATA_CR
            elif self.state == ST_DATA_CR:
                if p[i] != 13:
                    raise ParseError(self.error_status, "missing CRLF after chunk data")
                i += 1
                self.state = ST_DATA_LF
            elif self.state == ST_DATA_LF:
                if p[i] != 10:
                    raise ParseError(self.error_status, "missing CRLF after chunk data")
                i += 1
                self.state = ST_SIZE
            else:
                lf = <const unsigned char *>memchr(p + i, 10, n - i)
                if lf == NULL:
                    self.line += data[i:]
                    self._check_line_limit(len(self.line))
                    i = n
                    break
                le = lf - p + 1
                if self.line:
                    self.line += data[i:le]
                    line = bytes(self.line)
                    self.line.clear()
                else:
                    line = data[i:le]
                self._check_line_limit(len(line))
                i = le
                if self.state == ST_SIZE:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
        return parts, i

    cdef int _check_line_limit(self, Py_ssize_t ln) except -1:
        if self.state == ST_SIZE and ln > MAX_CHUNK_LINE:
            raise ParseError(self.error_status, "chunk size line too long")
        if self.state == ST_TRAILER and self.trailer_bytes + ln > self.max_trailer_bytes:
            raise ParseError(431 if self.error_status == 400 else self.error_status,
                             "trailer section too large")
        return 0

    cdef int _size_line(self, bytes line) except -1:
        """chunk-size [ chunk-ext ] CRLF; size is 1*HEXDIG (RFC 9112 section 7.1)."""
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(line)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(line), i = 0
        cdef unsigned long long size = 0
        cdef unsigned char h
        if n < 2 or p[n - 2] != 13:
            raise ParseError(self.error_status, "bare LF in chunk size line")
        n -= 2
        while i < n and HEXVAL[p[i]] != 255:
            h = HEXVAL[p[i]]
            # Before the shift: size * 16 + h <= MAX_BODY_LENGTH (leading zeros cost nothing).
            if size > <unsigned long long>((MAX_BODY_LENGTH - h) >> 4):
                raise ParseError(self.error_status, "chunk size overflows")
            size = (size << 4) | h
            i += 1
        if i == 0:
            raise ParseError(self.error_status, "invalid chunk size")
        if i < n:
            _chunk_ext(p, i, n, self.error_status)
        if size == 0:
            self.state = ST_TRAILER
        else:
            self.remaining = size
            self.state = ST_DATA
        return 0

    cdef int _trailer_line(self, bytes line) except -1:
        cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(line)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(line), i = 0, nb, va, vb, k
        cdef bytes name
        cdef char *q
        if n < 2 or p[n - 2] != 13:
            raise ParseError(self.error_status, "bare LF in trailer section")
        n -= 2
        if n == 0:
            self.state = ST_DONE
            return 0
        self.trailer_bytes += n + 2
        while i < n and TCHAR[p[i]]:
            i += 1
        nb = i
        if nb == 0 or i == n or p[i] != 58:
            raise ParseError(self.error_status, "invalid trailer field")
        i += 1
        while i < n and (p[i] == 32 or p[i] == 9):
            i += 1
        va = i
        while i < n:
            if not VALUE_OK[p[i]]:
                raise ParseError(self.error_status, "invalid trailer field value")
            i += 1
        vb = _trim_end(p, va, n)
        name = PyBytes_FromStringAndSize(NULL, nb)
        q = PyBytes_AS_STRING(name)
        for k in range(nb):
            q[k] = LOWER[p[k]]
        self.trailers.append((name, PyBytes_FromStringAndSize(<const char *>p + va, vb - va)))
        return 0


# ---------------------------------------------------------------- serialization

def encode_chunk(bytes data):
    """One chunk: size in hex, CRLF, data, CRLF. Empty data encodes to nothing."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n == 0:
        return b""
    return b"%x\r\n%b\r\n" % (n, data)


def encode_last_chunk(list trailers=None):
    """last-chunk plus trailer section (RFC 9112 section 7.1.2)."""
    cdef tuple pair
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + b"".join([pair[0] + b": " + pair[1] + b"\r\n" for pair in trailers]) + b"\r\n"


def serialize_head(bytes first_line, list headers, skip, list extra):
    """first_line CRLF, each (name, value) of `headers` whose name is not in `skip`, then each
    of `extra`, then the empty line: one bytes object, sized once and filled with memcpy."""
    cdef Py_ssize_t total = PyBytes_GET_SIZE(first_line) + 4
    cdef tuple pair
    cdef bytes name, value, out
    cdef char *q
    cdef Py_ssize_t ln
    cdef list keep = []
    for pair in headers:
        if pair[0] in skip:
            continue
        keep.append(pair)
        total += PyBytes_GET_SIZE(<bytes>pair[0]) + PyBytes_GET_SIZE(<bytes>pair[1]) + 4
    for pair in extra:
        total += PyBytes_GET_SIZE(<bytes>pair[0]) + PyBytes_GET_SIZE(<bytes>pair[1]) + 4
    out = PyBytes_FromStringAndSize(NULL, total)
    q = PyBytes_AS_STRING(out)
    ln = PyBytes_GET_SIZE(first_line)
    memcpy(q, PyBytes_AS_STRING(first_line), ln)
    q += ln
    q[0] = 13
    q[1] = 10
    q += 2
    for lst in (keep, extra):
        for pair in <list>lst:
            name = <bytes>pair[0]
            value = <bytes>pair[1]
            ln = PyBytes_GET_SIZE(name)
            memcpy(q, PyBytes_AS_STRING(name), ln)
            q += ln
            q[0] = 58
            q[1] = 32
            q += 2
            ln = PyBytes_GET_SIZE(value)
            memcpy(q, PyBytes_AS_STRING(value), ln)
            q += ln
            q[0] = 13
            q[1] = 10
            q += 2
    q[0] = 13
    q[1] = 10
    return out
