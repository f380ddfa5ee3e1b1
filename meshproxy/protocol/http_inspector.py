"""Whether a connection's first bytes are HTTP (Envoy's HTTP inspector), sans-IO.

Used on an intercepted connection whose destination port declares no protocol (`auto`):
HTTP goes to the listener's virtual hosts, anything else is proxied as TCP. HTTP/2 is its
connection preface (RFC 9113 3.4); HTTP/1.x is a request line, `method SP target SP
HTTP/1.0|1.1 CRLF` (RFC 9112 3), the method a token (RFC 9110 5.6.2). The answer comes as
soon as the bytes so far decide it: a byte no request line could have there says NOT_HTTP
at once (a TLS ClientHello, a database handshake), so only an HTTP client waits for its
line to end. A line longer than MAX_LINE is not taken for HTTP (the listener's own limit,
max_request_line, would refuse it anyway).
"""

from __future__ import annotations

import re

NEED_MORE = 0
HTTP10 = 1
HTTP11 = 2
HTTP2 = 3
NOT_HTTP = 4

MAX_LINE = 8192
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_LINE = re.compile(rb"%s+ [\x21-\x7e]+ HTTP/1\.([01])\r?\n" % _TCHAR)
# What a request line may look like before its end has come.
_PARTIAL = re.compile(
    rb"%s+(?: [\x21-\x7e]*(?: (?:H(?:T(?:T(?:P(?:/(?:1(?:\.(?:[01]\r?)?)?)?)?)?)?)?)?)?)?"
    % _TCHAR)


def inspect(data: bytes) -> int:
    """NEED_MORE, HTTP10, HTTP11, HTTP2 or NOT_HTTP for a connection's first bytes."""
    if not data:
        return NEED_MORE
    if data[:1] == b"P" and PREFACE.startswith(data[:len(PREFACE)]):
        if len(data) >= len(PREFACE):
            return HTTP2
        if b"\n" not in data:
            return NEED_MORE  # "PRI * HTTP/2..." so far: the preface, or a PRI request
    m = _LINE.match(data, 0, MAX_LINE + 2)
    if m is not None:
        return HTTP11 if m.group(1) == b"1" else HTTP10
    head = data[:MAX_LINE]
    if b"\n" in head or len(head) >= MAX_LINE:
        return NOT_HTTP
    return NEED_MORE if _PARTIAL.fullmatch(head) else NOT_HTTP
