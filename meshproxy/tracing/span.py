"""A finished span and its two wire encodings, sans-IO.

OTLP/HTTP JSON (OpenTelemetry protocol, `POST /v1/traces`): trace and span ids as hex
strings, times as unix nanoseconds in strings (int64 in the proto JSON mapping), kind 2
(SERVER). Zipkin v2 JSON (`POST /api/v2/spans`): a list of spans, times in microseconds.

Attributes follow Envoy's span tags (component, http.method, http.url, http.status_code,
upstream_cluster, upstream_address, response_flags, guid:x-request-id, ...); a 5xx or a
response flag marks the span as an error, as Envoy does.
"""

from __future__ import annotations

import msgspec


class Span(msgspec.Struct):
    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    start_ns: int
    end_ns: int
    tags: dict[str, str]
    error: bool


def _attr(key: str, value: str) -> dict:
    return {"key": key, "value": {"stringValue": value}}


def otlp_json(spans: list[Span], service: str) -> bytes:
    out = []
    for s in spans:
        span: dict = {
            "traceId": s.trace_id, "spanId": s.span_id, "name": s.name, "kind": 2,
            "startTimeUnixNano": str(s.start_ns), "endTimeUnixNano": str(s.end_ns),
            "attributes": [_attr(k, v) for k, v in s.tags.items()],
            "status": {"code": 2} if s.error else {"code": 0},
        }
        if s.parent_id:
            span["parentSpanId"] = s.parent_id
        out.append(span)
    return msgspec.json.encode({"resourceSpans": [{
        "resource": {"attributes": [_attr("service.name", service)]},
        "scopeSpans": [{"scope": {"name": "meshproxy"}, "spans": out}],
    }]})


def zipkin_json(spans: list[Span], service: str) -> bytes:
    out = []
    for s in spans:
        tags = dict(s.tags)
        if s.error:
            tags["error"] = "true"
        span: dict = {
            "traceId": s.trace_id, "id": s.span_id, "name": s.name, "kind": "SERVER",
            "timestamp": s.start_ns // 1000, "duration": max(1, (s.end_ns - s.start_ns) // 1000),
            "localEndpoint": {"serviceName": service}, "tags": tags,
        }
        if s.parent_id:
            span["parentId"] = s.parent_id
        out.append(span)
    return msgspec.json.encode(out)
