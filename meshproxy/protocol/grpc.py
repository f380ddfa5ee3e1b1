"""gRPC over HTTP/2 as the proxy sees it, sans-IO: which requests are calls, the status a
call ended with, and the status the proxy answers when it fails a call itself.

- A call is a request whose content-type is application/grpc (with an optional "+proto"
  or ";" suffix), as gRPC's PROTOCOL-HTTP2 defines it.
- Its status is `grpc-status` in the trailers, or in the response's headers for a
  trailers-only response (HEADERS with END_STREAM: how servers answer failures, and how
  the proxy answers its own).
- A local reply to a call (no route, overflow, connect failure, timeout, rate limit...) is
  trailers-only: `:status 200`, `content-type: application/grpc`, `grpc-status` and the
  reason as `grpc-message` (percent-encoded). The status is Envoy's: DEADLINE_EXCEEDED
  for a timeout the router enforced (Envoy since 2026, envoyproxy/envoy#44479), else the
  HTTP status mapped as gRPC's http-grpc-status-mapping (Envoy's httpToGrpcStatus). An
  origin's non-gRPC error answer (an HTTP error without grpc-status) is mapped the same
  way, so that a gRPC client always gets a gRPC status.
"""

from __future__ import annotations

from meshproxy._core.http1_parser import MessageHead

GRPC_CONTENT_TYPE = b"application/grpc"

# The canonical codes (grpc/doc/statuscodes.md), by name: the stats and retry_on use them.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 1, 2, 3, 4
NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, RESOURCE_EXHAUSTED = 5, 6, 7, 8
FAILED_PRECONDITION, ABORTED, OUT_OF_RANGE, UNIMPLEMENTED, INTERNAL = 9, 10, 11, 12, 13
UNAVAILABLE, DATA_LOSS, UNAUTHENTICATED = 14, 15, 16
STATUS_COUNT = 17
STATUS_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
                "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")

_HTTP_TO_GRPC = {400: INTERNAL, 401: UNAUTHENTICATED, 403: PERMISSION_DENIED,
                 404: UNIMPLEMENTED, 429: UNAVAILABLE, 502: UNAVAILABLE, 503: UNAVAILABLE,
                 504: UNAVAILABLE}

# RFC 3986 unreserved plus the printable ASCII gRPC leaves as is; anything else in a
# grpc-message is percent-encoded (PROTOCOL-HTTP2: Status-Message).
_PLAIN = frozenset(range(0x20, 0x7F)) - {ord("%")}


def is_call(head: MessageHead) -> bool:
    ct = head.get(b"content-type")
    if ct is None or not ct.startswith(GRPC_CONTENT_TYPE):
        return False
    rest = ct[len(GRPC_CONTENT_TYPE):]
    return not rest or rest[:1] in (b"+", b";")


def status_name(code: int) -> str:
    """A status as Envoy's %GRPC_STATUS% writes it: its name, the number past the known
    codes, `-` for none (not a call, or no status seen)."""
    if code < 0:
        return "-"
    return STATUS_NAMES[code] if code < STATUS_COUNT else str(code)


def http_to_grpc(status: int) -> int:
    return _HTTP_TO_GRPC.get(status, UNKNOWN)


def local_status(http_status: int, timed_out: bool) -> int:
    """The grpc-status of the proxy's own answer to a call."""
    return DEADLINE_EXCEEDED if timed_out else http_to_grpc(http_status)


def status_of(fields: list[tuple[bytes, bytes]]) -> int:
    """grpc-status among `fields` (-1: none, or not a number)."""
    for name, value in fields:
        if name == b"grpc-status":
            return int(value) if value.isdigit() and len(value) <= 3 else -1
    return -1


def encode_message(text: bytes) -> bytes:
    """A grpc-message value: printable ASCII kept, the rest percent-encoded."""
    if all(b in _PLAIN for b in text):
        return text
    return b"".join(bytes((b,)) if b in _PLAIN else b"%%%02X" % b for b in text)


def trailers_only(code: int, message: bytes,
                  extra: list[tuple[bytes, bytes]] | None = None
                  ) -> list[tuple[bytes, bytes]]:
    """The fields of a trailers-only answer (one HEADERS frame ending the stream)."""
    out = [(b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE),
           (b"grpc-status", b"%d" % code)]
    if message:
        out.append((b"grpc-message", encode_message(message)))
    if extra:
        out += extra
    return out


# ---------------------------------------------------------------- grpc.health.v1

HEALTH_CHECK_PATH = b"/grpc.health.v1.Health/Check"
SERVING = 1  # HealthCheckResponse.ServingStatus


def frame_message(message: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed (PROTOCOL-HTTP2: Length-Prefixed-Message)."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def health_request(service: str) -> bytes:
    """HealthCheckRequest{service = 1} in protobuf's wire format, framed: field 1, wire type
    2 (length-delimited); an empty service is the server's overall health."""
    name = service.encode()
    if not name:
        return frame_message(b"")
    return frame_message(b"\x0a" + _varint(len(name)) + name)


def health_serving(body: bytes) -> bool:
    """Whether a HealthCheckResponse (framed) says SERVING: field 1, wire type 0 (varint).
    Unknown fields are skipped, as protobuf readers must; anything malformed is not."""
    if len(body) < 5 or body[0] != 0:
        return False
    n = int.from_bytes(body[1:5], "big")
    msg = body[5:5 + n]
    if len(msg) != n:
        return False
    pos = 0
    status = 0
    while pos < len(msg):
        key, pos = _read_varint(msg, pos)
        if pos < 0:
            return False
        kind = key & 7
        if kind == 0:
            value, pos = _read_varint(msg, pos)
            if pos < 0:
                return False
            if key >> 3 == 1:
                status = value
        elif kind == 2:
            size, pos = _read_varint(msg, pos)
            if pos < 0 or pos + size > len(msg):
                return False
            pos += size
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            return False
    return status == SERVING


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); position -1 when truncated or longer than 10 bytes."""
    value = shift = 0
    for i in range(pos, min(len(data), pos + 10)):
        b = data[i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i + 1
        shift += 7
    return 0, -1
