"""Per-worker tracer: starts spans at the request head, finishes them at the end, exports
them in batches to the collector.

The data path only ever appends to a bounded deque: a full queue drops the span (counted
in tracing.spans_dropped), so a slow or dead collector costs spans, never latency. The
exporter task sends a batch when `batch_size` spans are waiting or every
`flush_interval`, as one HTTP/1.1 POST (OTLP/HTTP JSON or Zipkin v2 JSON), bounded by
`export_timeout`; a failed export loses its batch (counted in tracing.spans_failed)
rather than piling up behind a collector that is down.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from typing import Any

import h11
import trio

from meshproxy.config.snapshot import TracingSpec
from meshproxy.tracing.context import B3_MULTI, NONE, decide, extract, outgoing, random_hex
from meshproxy.tracing.span import Span, otlp_json, zipkin_json
from meshproxy.transport.h11_io import next_event

log = logging.getLogger("meshproxy.tracing")

_random = random.random


class Active:
    """A request's span while it runs; `sampled` False means propagate only."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "fmt", "start_ns")

    def __init__(self, trace_id: bytes, span_id: bytes, parent_id: bytes | None, sampled: bool,
                 fmt: str) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.fmt = fmt
        self.start_ns = time.time_ns()

    def headers(self) -> list[tuple[bytes, bytes]]:
        return outgoing(self.trace_id, self.span_id, self.parent_id, self.sampled, self.fmt)


class Tracer:
    def __init__(self, spec: TracingSpec, stats: Any) -> None:
        self.spec = spec
        self.stats = stats
        self.queue: deque[Span] = deque()
        self._wake = trio.Event()
        self._encode = otlp_json if spec.provider == "otlp" else zipkin_json
        # Zipkin's own tracer speaks B3: a request without context gets B3 headers too.
        self._default_fmt = B3_MULTI if spec.provider == "zipkin" else NONE

    def start(self, get: Any) -> Active:
        incoming = extract(get)
        sampled = decide(incoming, self.spec.rate, _random())
        fmt = incoming.fmt if incoming.fmt != NONE else self._default_fmt
        trace_id = incoming.trace_id or random_hex(16)
        return Active(trace_id, random_hex(8), incoming.parent_id, sampled, fmt)

    def finish(self, active: Active, name: str, tags: dict[str, str], error: bool) -> None:
        st = self.stats
        st.block.inc(st.spans_sampled)
        if len(self.queue) >= self.spec.max_queue:
            st.block.inc(st.spans_dropped)
            return
        self.queue.append(Span(active.trace_id.decode(), active.span_id.decode(),
                               active.parent_id.decode() if active.parent_id else None,
                               name, active.start_ns, time.time_ns(), tags, error))
        if len(self.queue) >= self.spec.batch_size:
            self._wake.set()

    async def run(self) -> None:
        """The exporter: until cancelled; on cancellation one last batch is attempted."""
        try:
            while True:
                with trio.move_on_after(self.spec.flush_interval):
                    await self._wake.wait()
                self._wake = trio.Event()
                while self.queue:
                    await self._export_batch()
                    if len(self.queue) < self.spec.batch_size:
                        break
        finally:
            if self.queue:
                with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                    await self._export_batch()

    async def _export_batch(self) -> None:
        n = min(len(self.queue), self.spec.batch_size)
        batch = [self.queue.popleft() for _ in range(n)]
        st = self.stats
        st.block.inc(st.exports_total)
        try:
            with trio.fail_after(self.spec.timeout):
                status = await self._post(self._encode(batch, self.spec.service))
        except (OSError, trio.TooSlowError, h11.ProtocolError) as exc:
            st.block.add(st.spans_failed, n)
            log.warning("span export to %s:%d failed: %s", self.spec.address, self.spec.port,
                        exc or type(exc).__name__)
            return
        if 200 <= status < 300:
            st.block.add(st.spans_sent, n)
        else:
            st.block.add(st.spans_failed, n)
            log.warning("span export to %s:%d answered %d", self.spec.address,
                        self.spec.port, status)

    async def _post(self, body: bytes) -> int:
        spec = self.spec
        stream = await trio.open_tcp_stream(spec.address, spec.port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            data = conn.send(h11.Request(method="POST", target=spec.path, headers=[
                ("host", f"{spec.address}:{spec.port}"), ("content-type", "application/json"),
                ("content-length", str(len(body))), ("connection", "close")]))
            data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            while True:
                ev = await next_event(conn, stream)
                if isinstance(ev, h11.Response):
                    return int(ev.status_code)
                if isinstance(ev, h11.ConnectionClosed):
                    raise OSError("collector closed the connection without answering")
