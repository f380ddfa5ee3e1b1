"""Distributed tracing on the wire: context propagation to the origin (W3C, B3 single and
multi), spans exported to a real HTTP collector (OTLP/HTTP JSON and Zipkin v2 JSON), head
sampling, and a bounded queue that never holds up requests."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time

import pytest

from tests.helpers import Proxy, config, raw_exchange, wait_for
from tests.integration.test_supervisor import _admin_port, admin

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Collector:
    """A real HTTP collector: records every POST (path, JSON body)."""

    def __init__(self, hang: bool = False) -> None:
        self.posts: list[tuple[str, object]] = []
        self.hang = hang
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if outer.hang:
                    time.sleep(10)
                    return
                outer.posts.append((self.path, json.loads(body)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def otlp_spans(self) -> list[dict]:
        return [s for _, body in self.posts for rs in body["resourceSpans"]  # type: ignore[index]
                for ss in rs["scopeSpans"] for s in ss["spans"]]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.stop()


def traced(origin, tmp_path, collector, provider: str = "otlp", **tracing) -> Proxy:
    cfg = config(origin.port)
    cfg["tracing"] = {"provider": provider, "flush_interval": "100ms",
                      "collector": {"address": "127.0.0.1", "port": collector.port},
                      **tracing}
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path)
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def send(p: Proxy, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return raw_exchange(p.port, f"GET /t HTTP/1.1\r\nHost: a\r\n{extra}"
                                f"Connection: close\r\n\r\n".encode())


def attrs(span: dict) -> dict[str, str]:
    return {a["key"]: a["value"]["stringValue"] for a in span["attributes"]}


def test_tracing_w3c_child_span_propagated_and_exported(origin, tmp_path, collector) -> None:
    p = traced(origin, tmp_path, collector)
    out = send(p, f"traceparent: 00-{TRACE}-{PARENT}-01", "tracestate: vendor=opaque",
               "X-Request-Id: rid-1")
    assert out.startswith(b"HTTP/1.1 200")
    seen = origin.requests[-1]
    version, trace, span_id, flags = seen.header(b"traceparent").decode().split("-")
    assert (version, trace, flags) == ("00", TRACE, "01") and span_id != PARENT
    assert seen.header(b"tracestate") == b"vendor=opaque"  # passed through unchanged
    assert seen.all(b"traceparent") == [seen.header(b"traceparent")]  # replaced, not added
    span = wait_for(lambda: collector.otlp_spans())[0]
    assert collector.posts[0][0] == "/v1/traces"
    assert span["traceId"] == TRACE and span["parentSpanId"] == PARENT
    assert span["spanId"] == span_id  # the upstream's parent is the proxy's span
    assert span["kind"] == 2 and int(span["endTimeUnixNano"]) >= int(span["startTimeUnixNano"])
    a = attrs(span)
    assert a["http.method"] == "GET" and a["http.status_code"] == "200"
    assert a["upstream_cluster"] == "web" and a["upstream_address"].endswith(str(origin.port))
    assert a["guid:x-request-id"] == "rid-1" and a["http.url"] == "http://a/t"
    assert span["status"] == {"code": 0}
    body = collector.posts[0][1]
    service = body["resourceSpans"][0]["resource"]["attributes"][0]  # type: ignore[index]
    assert service == {"key": "service.name", "value": {"stringValue": "meshproxy"}}
    p.stop()


def test_tracing_root_span_without_context(origin, tmp_path, collector) -> None:
    p = traced(origin, tmp_path, collector)
    send(p)
    _, trace, span_id, flags = origin.requests[-1].header(b"traceparent").decode().split("-")
    assert len(trace) == 32 and flags == "01"
    span = wait_for(lambda: collector.otlp_spans())[0]
    assert span["traceId"] == trace and span["spanId"] == span_id
    assert "parentSpanId" not in span
    p.stop()


def test_tracing_b3_single_and_multi_propagated(origin, tmp_path, collector) -> None:
    p = traced(origin, tmp_path, collector)
    send(p, f"b3: {TRACE}-{PARENT}-1")
    seen = origin.requests[-1]
    trace, span_id, sampled, parent = seen.header(b"b3").decode().split("-")
    assert (trace, sampled, parent) == (TRACE, "1", PARENT) and span_id != PARENT
    assert seen.header(b"traceparent").decode() == f"00-{TRACE}-{span_id}-01"
    send(p, f"X-B3-TraceId: {TRACE[16:]}", f"X-B3-SpanId: {PARENT}", "X-B3-Sampled: 1")
    seen = origin.requests[-1]
    assert seen.header(b"x-b3-traceid").decode() == "0" * 16 + TRACE[16:]  # 64-bit padded
    assert seen.header(b"x-b3-parentspanid").decode() == PARENT
    assert seen.header(b"x-b3-sampled") == b"1"
    spans = wait_for(lambda: len(collector.otlp_spans()) == 2 and collector.otlp_spans())
    assert {s["parentSpanId"] for s in spans} == {PARENT}
    p.stop()


def test_tracing_head_sampling_honours_incoming_flag(origin, tmp_path, collector) -> None:
    p = traced(origin, tmp_path, collector, random_sampling=0)
    send(p)  # no decision came in: 0% means not sampled, but still propagated
    assert origin.requests[-1].header(b"traceparent").endswith(b"-00")
    send(p, f"traceparent: 00-{TRACE}-{PARENT}-01")  # sampled upstream of us: honoured
    span = wait_for(lambda: collector.otlp_spans())[0]
    assert span["traceId"] == TRACE
    time.sleep(0.4)
    assert len(collector.otlp_spans()) == 1
    p.stop()
    q = traced(origin, tmp_path, collector, random_sampling=100)
    send(q, f"traceparent: 00-{'1' * 32}-{PARENT}-00")  # not sampled upstream: honoured
    time.sleep(0.4)
    assert all(s["traceId"] != "1" * 32 for s in collector.otlp_spans())
    q.stop()


def test_tracing_zipkin_format_and_error_span(tmp_path, collector) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    class Dead:
        port = dead

    p = traced(Dead, tmp_path, collector, provider="zipkin", service_name="edge")
    out = send(p, f"b3: {TRACE}-{PARENT}-1")
    assert out.startswith(b"HTTP/1.1 503")
    path, body = wait_for(lambda: collector.posts)[0]
    assert path == "/api/v2/spans"
    span = body[0]  # type: ignore[index]
    assert span["traceId"] == TRACE and span["parentId"] == PARENT and span["kind"] == "SERVER"
    assert span["localEndpoint"] == {"serviceName": "edge"}
    assert span["tags"]["response_flags"] == "UF" and span["tags"]["error"] == "true"
    assert span["duration"] >= 1 and span["timestamp"] > 1_600_000_000_000_000
    p.stop()


def test_tracing_slow_collector_never_blocks_requests(origin, tmp_path) -> None:
    hanging = Collector(hang=True)
    p = traced(origin, tmp_path, hanging, max_queue=5, batch_size=2, export_timeout="300ms")
    t0 = time.monotonic()
    for _ in range(40):
        assert send(p).startswith(b"HTTP/1.1 200")
    assert time.monotonic() - t0 < 10  # the collector hangs; requests do not

    def stats() -> dict[str, int]:
        body = json.loads(admin(p, "/stats?format=json")[1])
        return {s["name"]: s["value"] for s in body["stats"] if s["name"].startswith("tracing.")}

    got = wait_for(lambda: (s := stats())["tracing.spans_failed"] > 0 and s)
    assert got["tracing.spans_sampled"] == 40
    assert got["tracing.spans_dropped"] > 0  # the bounded queue overflowed
    assert got["tracing.spans_sent"] == 0
    p.stop()
    hanging.stop()
