"""Access log: one line per request, text (Envoy's default layout) or JSON (msgspec).

Lines are appended to an in-memory batch and written every `flush_interval` (Envoy's
access_log_flush_interval, 1 s by default) and when the worker stops, so logging costs no
syscall per request. Nothing is formatted when the log is off: the data path checks
`logger is None` before it builds an entry.

Text layout (Envoy's default format, minus what HTTP/1.1 here has no value for):
[START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS BYTES_RECEIVED BYTES_SENT DURATION_MS
"X-FORWARDED-FOR" "USER-AGENT" "X-REQUEST-ID" "AUTHORITY" "UPSTREAM_HOST"
"DOWNSTREAM_PEER_URI_SAN" "RESPONSE_CODE_DETAILS"
The last two: the client certificate's SPIFFE ID (mTLS) and why a request failed (an
upstream TLS verification failure says which SAN was missing).
"""

from __future__ import annotations

import sys
import time
from typing import IO

import msgspec
import trio

from meshproxy.config.snapshot import AccessLogSpec


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


def format_time(t: float) -> str:
    """ISO 8601 UTC with milliseconds, Envoy's %START_TIME% default."""
    secs = int(t)
    millis = int((t - secs) * 1000)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(secs))}.{millis:03d}Z"


def _q(s: str) -> str:
    return s.replace('"', '\\"') if '"' in s else s


def format_text(e: Entry) -> str:
    return (f'[{e.start_time}] "{_q(e.method)} {_q(e.path)} {e.protocol}" {e.response_code} '
            f'{e.response_flags} {e.bytes_received} {e.bytes_sent} {e.duration} '
            f'"{_q(e.x_forwarded_for)}" "{_q(e.user_agent)}" "{_q(e.x_request_id)}" '
            f'"{_q(e.authority)}" "{e.upstream_host}" "{_q(e.downstream_peer_uri_san)}" '
            f'"{_q(e.response_code_details)}"\n')


class AccessLogger:
    def __init__(self, spec: AccessLogSpec) -> None:
        self.spec = spec
        self._json = spec.format == "json"
        self._encoder = msgspec.json.Encoder()
        self._batch: list[bytes] = []
        self._file: IO[bytes]
        self._owned = False
        if spec.path == "stdout":
            self._file = sys.stdout.buffer
        elif spec.path == "stderr":
            self._file = sys.stderr.buffer
        else:
            self._file = open(spec.path, "ab")  # noqa: SIM115 - closed by close()
            self._owned = True

    def log(self, entry: Entry) -> None:
        if self._json:
            self._batch.append(self._encoder.encode(entry) + b"\n")
        else:
            self._batch.append(format_text(entry).encode("utf-8", "replace"))

    def flush(self) -> None:
        if self._batch:
            data = b"".join(self._batch)
            self._batch.clear()
            self._file.write(data)
            self._file.flush()

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
