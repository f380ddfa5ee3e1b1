"""Responses the proxy writes itself (errors, redirects, direct responses).

Envoy's shape: a short text/plain body saying what happened, Content-Length framing, and
`connection: close` when the connection is not going to be reused (after a framing error
or an unread request body).

Layers below the downstream driver never write a reply: a filter or the router returns a
LocalReply (what to answer), and the driver alone writes it (proxy.downstream), so the
keep-alive decision for it is made in one place.
"""

from __future__ import annotations

import time
from email.utils import formatdate

_REASONS = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 201: b"Created",
    202: b"Accepted", 204: b"No Content", 301: b"Moved Permanently", 302: b"Found",
    303: b"See Other", 304: b"Not Modified", 307: b"Temporary Redirect",
    308: b"Permanent Redirect", 400: b"Bad Request", 401: b"Unauthorized",
    403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


_date_cache: tuple[int, bytes] = (0, b"")


class LocalReply:
    """What to answer instead of forwarding. `close`: the connection must not be reused
    (the framing of the request was broken, or its body is only partly sent); `body_done`:
    the request body was consumed whole (so the connection may stay open); `grpc_status`:
    the gRPC status a gRPC call gets (-1: the one Envoy maps from `status`)."""

    __slots__ = ("status", "body", "flag", "close", "body_done", "extra", "content_type",
                 "grpc_status")

    def __init__(self, status: int, body: bytes, flag: str, *, close: bool = False,
                 body_done: bool = False, extra: list[tuple[bytes, bytes]] | None = None,
                 content_type: bytes = b"text/plain", grpc_status: int = -1) -> None:
        self.status = status
        self.body = body
        self.flag = flag
        self.close = close
        self.body_done = body_done
        self.extra = extra
        self.content_type = content_type
        self.grpc_status = grpc_status


def http_date() -> bytes:
    """IMF-fixdate of now, formatted at most once a second (RFC 9110 section 5.6.7)."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True).encode("ascii"))
    return _date_cache[1]


def reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def local_reply(status: int, body: bytes, *, close: bool, head_only: bool = False,
                content_type: bytes = b"text/plain",
                extra: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete response. `head_only` for HEAD requests: the same head, no body."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason(status)),
             b"date: " + http_date(), b"server: meshproxy"]
    if body or status not in (204, 304):
        lines.append(b"content-length: %d" % len(body))
    if body:
        lines.append(b"content-type: " + content_type)
    for name, value in extra:
        lines.append(name + b": " + value)
    if close:
        lines.append(b"connection: close")
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    return head if head_only else head + body
