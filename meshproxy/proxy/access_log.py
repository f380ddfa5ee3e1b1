"""Access log: one line per request, text (Envoy's default layout) or JSON (msgspec).

Lines are appended to an in-memory batch and written every `flush_interval` (Envoy's
access_log_flush_interval, 1 s by default), when the batch reaches FLUSH_SIZE, and when the
worker stops, so logging costs no syscall per request. Nothing is formatted when the log
is off: the data path checks `logger is None` before it calls `log_request`. A text line is
formatted as bytes from the request's own bytes in one %-format and checked for escapes in
one pass (no decode and re-encode, no Entry object; the date-time part of the timestamp is
formatted once a second), which keeps a logged request within about 10% of an unlogged
one; JSON lines go through an Entry.

Text layout (Envoy's default format, minus what HTTP/1.1 here has no value for):
[START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS BYTES_RECEIVED BYTES_SENT DURATION_MS
"X-FORWARDED-FOR" "USER-AGENT" "X-REQUEST-ID" "AUTHORITY" "UPSTREAM_HOST"
"DOWNSTREAM_PEER_URI_SAN" "RESPONSE_CODE_DETAILS"
The last two: the client certificate's SPIFFE ID (mTLS) and why a request failed (an
upstream TLS verification failure says which SAN was missing).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

import msgspec
import trio

from meshproxy.config.snapshot import AccessLogSpec
from meshproxy.protocol.grpc import status_name

log = logging.getLogger("meshproxy.access_log")


class Entry(msgspec.Struct, omit_defaults=False):
    start_time: str
    method: str
    path: str
    protocol: str
    response_code: int
    response_flags: str
    bytes_received: int
    bytes_sent: int
    duration: int  # milliseconds, like Envoy's %DURATION%
    upstream_host: str
    x_request_id: str
    downstream_remote_address: str
    authority: str
    user_agent: str
    x_forwarded_for: str
    downstream_peer_uri_san: str = "-"
    response_code_details: str = "-"
    grpc_status: str = "-"  # Envoy's %GRPC_STATUS%: the call's status by name


def format_time(t: float) -> str:
    """ISO 8601 UTC with milliseconds, Envoy's %START_TIME% default."""
    secs = int(t)
    millis = int((t - secs) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{millis:03d}Z"


def _qb(b: bytes | None) -> bytes:
    """A field for a text line: `-` when absent, quotes escaped; a value with bytes past
    ASCII (obs-text) is written as its latin-1 characters in UTF-8, as in JSON lines."""
    if not b:
        return b"-"
    if not b.isascii():
        b = b.decode("latin-1").encode("utf-8")
    return b.replace(b'"', b'\\"') if b'"' in b else b


# Envoy's file access log flushes its buffer past 64 KiB as well as on the interval: one
# write(2) per some 400 lines, and never a second's worth (megabytes at full load) at once,
# which would hold the worker's loop for milliseconds and show in every client's p99.
FLUSH_SIZE = 65536

_TEXT = b'[%s.%03dZ] "%s %s %s" %d %s %d %d %d "%s" "%s" "%s" "%s" "%s" "%s" "%s"\n'
_QUOTES = _TEXT.count(b'"')


class AccessLogger:
    def __init__(self, spec: AccessLogSpec) -> None:
        self.spec = spec
        self._json = spec.format == "json"
        self._encoder = msgspec.json.Encoder()
        self._batch: list[bytes] = []
        self._size = 0  # bytes in the batch
        self.write_errors = 0
        self._second = -1
        self._second_text = b""
        self._file: IO[bytes]
        self._owned = False
        if spec.path == "stdout":
            self._file = sys.stdout.buffer
        elif spec.path == "stderr":
            self._file = sys.stderr.buffer
        else:
            self._file = open(spec.path, "ab")  # noqa: SIM115 - closed by close()
            self._owned = True

    def log_request(self, start: float, method: bytes, path: bytes, protocol: bytes,
                    code: int, flags: str, received: int, sent: int, duration: int,
                    upstream_host: str, request_id: bytes | None, remote: bytes,
                    authority: bytes | None, user_agent: bytes | None,
                    forwarded_for: bytes | None, peer_san: str, details: str,
                    grpc_status: int = -1) -> None:
        """One request's line, from its fields as the data path has them."""
        if self._json:
            line = self._encoder.encode(Entry(
                start_time=format_time(start), method=text(method), path=text(path),
                protocol=protocol.decode(), response_code=code, response_flags=flags,
                bytes_received=received, bytes_sent=sent, duration=duration,
                upstream_host=upstream_host, x_request_id=text(request_id),
                downstream_remote_address=text(remote), authority=text(authority),
                user_agent=text(user_agent), x_forwarded_for=text(forwarded_for),
                downstream_peer_uri_san=peer_san, response_code_details=details,
                grpc_status=status_name(grpc_status))) + b"\n"
        else:
            # The date-time part of the timestamp is formatted once a second.
            secs = int(start)
            if secs != self._second:
                self._second = secs
                self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S",
                                                  time.gmtime(secs)).encode()
            millis = int((start - secs) * 1000)
            # The common line (every field ASCII, none with a quote) is formatted once and
            # checked once: the layout has exactly _QUOTES quote characters of its own, so
            # a line with more has a field to escape, and only then is it formatted field
            # by field. Fields come from the parser's heads, which hold no CR, LF or NUL.
            line = _TEXT % (
                self._second_text, millis, method, path, protocol, code, flags.encode(),
                received, sent, duration, forwarded_for or b"-", user_agent or b"-",
                request_id or b"-", authority or b"-", upstream_host.encode(),
                peer_san.encode() or b"-", details.encode() or b"-")
            if not line.isascii() or line.count(b'"') != _QUOTES:
                line = _TEXT % (
                    self._second_text, millis, _qb(method), _qb(path), protocol, code,
                    flags.encode(), received, sent, duration, _qb(forwarded_for),
                    _qb(user_agent), _qb(request_id), _qb(authority),
                    upstream_host.encode(), _qb(peer_san.encode()), _qb(details.encode()))
        self._batch.append(line)
        self._size += len(line)
        if self._size >= FLUSH_SIZE:
            self.flush()

    def log_mirror_diff(self, route: str, request: dict[str, str],
                        differences: list[str]) -> None:
        """A mirrored request whose copy's response differed from the primary's
        (proxy.mirror): a line of its own, after the request's."""
        now = time.time()
        if self._json:
            line = self._encoder.encode({"start_time": format_time(now), "mirror_diff": {
                "route": route, **request, "differences": differences}}) + b"\n"
        else:
            fields = (route, f"{request['method']} {request['path']}",
                      request["x_request_id"], request["shadow_cluster"],
                      "; ".join(differences))
            line = b"[%s] MIRROR_DIFF %s\n" % (format_time(now).encode(), b" ".join(
                b'"%s"' % _qb(f.encode("utf-8", "replace")) for f in fields))
        self._batch.append(line)
        self._size += len(line)
        if self._size >= FLUSH_SIZE:
            self.flush()

    def flush(self) -> None:
        if self._batch:
            data = b"".join(self._batch)
            self._batch.clear()
            self._size = 0
            try:
                self._file.write(data)
                self._file.flush()
            except OSError as e:
                # A full disk or a closed pipe loses these lines, never the requests: the
                # flush runs on the data path, which must not fail for the log's sake.
                self.write_errors += 1
                if self.write_errors == 1:
                    log.warning("access log %s: write failed (%s); lines are dropped "
                                "while it fails", self.spec.path, e)

    async def run_flusher(self) -> None:
        try:
            while True:
                await trio.sleep(self.spec.flush_interval)
                self.flush()
        finally:
            self.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self._file.close()


def text(b: bytes | None) -> str:
    return b.decode("latin-1") if b else "-"
