"""Every stat, declared once. This declaration *is* the shared-memory layout.

Names follow Envoy: `listener.<name>.downstream_cx_total`, `http.<listener>.downstream_rq_2xx`,
`cluster.<name>.upstream_rq_total`, `server.worker_<i>.*`. A scope kind (listener, http,
cluster, endpoint, worker) declares its stats; each scope instance (one listener, one
cluster...) gets a slot of that kind; each worker writes only its own slab. A stat that
is not declared here has no offset and so cannot be written.

Cells are 8-byte signed integers. A counter or gauge is one cell. A histogram is
len(BUCKETS) + 1 bucket cells (the last for values above every bound), then sum and count;
values are recorded in milliseconds with microsecond precision kept in the sum (sum is in
microseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# Envoy's default histogram bucket bounds, in milliseconds.
BUCKETS: tuple[float, ...] = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
                              30000, 60000, 300000, 600000, 1800000, 3600000)
HIST_CELLS = len(BUCKETS) + 1 + 2


class Kind(Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Stat:
    name: str
    kind: Kind
    help: str
    # A gauge of things in progress: the counter of its scope that counts them as ended
    # when their worker dies with them (its connections and requests are gone), so that
    # totals balance: total = ended + in progress, whatever happened to the workers.
    ends_as: str | None = None

    @property
    def cells(self) -> int:
        return HIST_CELLS if self.kind is Kind.HISTOGRAM else 1


def counter(name: str, help: str) -> Stat:
    return Stat(name, Kind.COUNTER, help)


def gauge(name: str, help: str, ends_as: str | None = None) -> Stat:
    return Stat(name, Kind.GAUGE, help, ends_as)


def histogram(name: str, help: str) -> Stat:
    return Stat(name, Kind.HISTOGRAM, help)


def _statuses(prefix: str, what: str) -> list[Stat]:
    return [counter(f"{prefix}_{c}xx", f"{what} with a {c}xx status") for c in range(1, 6)]


def _grpc(what: str) -> list[Stat]:
    """Per-call stats by gRPC status (protocol.grpc; Envoy's grpc_stats names without the
    per-method part, which would make names from requests): grpc.0 to grpc.16 in code
    order, so a call's slot is grpc.0 plus its code."""
    return [counter("grpc.total", f"gRPC calls {what}"),
            counter("grpc.success", f"gRPC calls {what} that ended with status 0 (OK)"),
            counter("grpc.failure", f"gRPC calls {what} that ended with another status, "
                    "or none"),
            *[counter(f"grpc.{c}", f"gRPC calls {what} that ended with status {c}")
              for c in range(17)]]


LISTENER = (
    counter("downstream_cx_total", "connections accepted"),
    gauge("downstream_cx_active", "connections open", ends_as="downstream_cx_destroy"),
    counter("downstream_cx_destroy", "connections closed"),
    gauge("downstream_cx_parked",
          "idle keep-alive connections waiting with no task (parked on the reactor)"),
    counter("ssl.handshake", "TLS handshakes completed"),
    counter("ssl.connection_error", "TLS handshakes that failed or timed out"),
    counter("ssl.no_certificate",
            "mTLS handshakes completed without a client certificate (optional mode)"),
    counter("ssl.fail_verify_san",
            "client certificates refused by match_subject_alt_names (bad_certificate)"),
    counter("downstream_cx_plaintext",
            "connections a PERMISSIVE TLS listener served as plaintext (first byte not 0x16)"),
    # Intercepting listeners (use_original_dst; Envoy's listener, tcp_proxy and
    # http_inspector stats, the TCP proxy's under tcp.* here rather than tcp.<prefix>.*).
    counter("no_filter_chain_match",
            "intercepted connections whose original destination matched no destination "
            "(passed through, or refused under REGISTRY_ONLY)"),
    counter("tcp.downstream_cx_total", "connections proxied as TCP"),
    counter("tcp.downstream_cx_no_route",
            "TCP connections refused: REGISTRY_ONLY, no healthy endpoint, or a loop"),
    counter("tcp.downstream_cx_rx_bytes_total", "bytes received from TCP clients"),
    counter("tcp.downstream_cx_tx_bytes_total", "bytes sent to TCP clients"),
    counter("tcp.idle_timeout", "TCP connections closed idle (idle_timeout)"),
    counter("http_inspector.http10_found", "auto destinations whose client spoke HTTP/1.0"),
    counter("http_inspector.http11_found", "auto destinations whose client spoke HTTP/1.1"),
    counter("http_inspector.http2_found",
            "auto destinations whose client spoke HTTP/2 (the connection preface)"),
    counter("http_inspector.http_not_found",
            "auto destinations whose client did not speak HTTP (proxied as TCP)"),
)

HTTP = (
    counter("downstream_rq_total", "requests received"),
    gauge("downstream_rq_active", "requests in progress", ends_as="downstream_rq_tx_reset"),
    *_statuses("downstream_rq", "responses"),
    counter("downstream_rq_rx_reset", "requests abandoned by the client"),
    counter("downstream_rq_tx_reset",
            "requests reset by the proxy: a worker died with them in progress"),
    counter("downstream_rq_timeout", "requests cut off by a downstream timeout (408)"),
    counter("downstream_cx_protocol_error", "connections closed on a malformed request"),
    counter("no_route", "requests with no matching route (404 NR)"),
    # Envoy's RBAC filter stats: enforced decisions and AUDIT (shadow) matches.
    counter("rbac.allowed", "requests the authorization policies allowed"),
    counter("rbac.denied", "requests the authorization policies denied (403)"),
    counter("rbac.logged", "requests an AUDIT policy matched (logged, never denied)"),
    # Envoy's local rate limit stats.
    counter("http_local_rate_limit.enabled", "requests a local rate limit applied to"),
    counter("http_local_rate_limit.ok", "requests within the limit"),
    counter("http_local_rate_limit.rate_limited", "requests over the limit (429 RL)"),
    counter("python_filter.errors", "Python filter phases that raised (500 FE)"),
    counter("python_filter.timeouts",
            "Python filter phases that outlasted their timeout (500 FE)"),
    counter("cors.origin_valid", "CORS requests from an allowed origin"),
    counter("cors.origin_invalid", "CORS requests from an origin not allowed"),
    counter("fault.delays_injected", "requests a fault filter delayed (DI)"),
    counter("fault.aborts_injected", "requests a fault filter aborted (FI)"),
    gauge("fault.active_faults", "requests being delayed or aborted by a fault filter"),
    counter("fault.faults_overflow",
            "faults not injected because max_active_faults were active"),
    histogram("downstream_rq_time", "request duration, first byte in to last byte out (ms)"),
    *_grpc("on this listener"),
    # The compiled fast path (proxy.fast_path): what it served, and what it gave to a task.
    counter("fast_path.rq_total", "requests the fast path began"),
    counter("fast_path.handed_off",
            "requests the fast path began and a task finished (a retry, a streamed body, "
            "no idle upstream connection, a slow client, a timeout)"),
    counter("fast_path.declined",
            "requests the fast path read and left to a task whole (filters, tracing, "
            "a body still coming, a partial or bad head, no route, ...)"),
    # Connections by codec, and Envoy's http2.* codec stats (proxy.downstream_h2).
    counter("downstream_cx_http1_total", "connections served as HTTP/1.1"),
    counter("downstream_cx_http2_total", "connections served as HTTP/2"),
    gauge("downstream_cx_http2_active", "HTTP/2 connections open"),
    gauge("http2.streams_active", "HTTP/2 streams open"),
    counter("http2.rx_reset", "streams the client reset (RST_STREAM received)"),
    counter("http2.tx_reset", "streams the proxy reset (RST_STREAM sent)"),
    counter("http2.goaway_sent", "GOAWAY frames sent (drain, age, idle, errors)"),
    counter("http2.rx_messaging_error",
            "connections closed on a protocol error (invalid frame, header or state)"),
    counter("http2.header_overflow", "header lists past max_request_headers_kb"),
    counter("http2.too_many_streams",
            "streams refused past max_concurrent_streams (REFUSED_STREAM)"),
    counter("http2.trailers", "request trailers received"),
    counter("http2.inbound_empty_frames_flood",
            "connections closed on frames with empty payloads in a row"),
    counter("http2.inbound_priority_frames_flood",
            "connections closed on too many PRIORITY frames"),
    counter("http2.inbound_window_update_frames_flood",
            "connections closed on too many WINDOW_UPDATE frames"),
    counter("http2.outbound_flood", "connections closed with too many frames unread"),
    counter("http2.outbound_control_flood",
            "connections closed with too many control frames (PING, SETTINGS) unread"),
    counter("http2.keepalive_timeout", "connections closed idle (idle_timeout)"),
    counter("downstream_rq_too_many_premature_resets",
            "connections closed because most of their streams were reset at once "
            "(rapid reset, CVE-2023-44487)"),
)

CLUSTER = (
    counter("upstream_rq_total", "requests sent upstream"),
    counter("shadow_rq_total", "request copies a mirror policy sent to this cluster"),
    counter("shadow_rq_failed", "request copies that got no whole response"),
    counter("shadow_rq_body_too_large",
            "requests not mirrored: a body past the mirror policy's body_limit"),
    counter("shadow_rq_overflow", "requests not mirrored: too many copies in flight"),
    gauge("upstream_rq_active", "upstream requests in progress",
          ends_as="upstream_rq_tx_reset"),
    counter("upstream_rq_tx_reset",
            "upstream requests reset by the proxy: a worker died with them in progress"),
    *_statuses("upstream_rq", "upstream responses"),
    counter("upstream_rq_timeout", "upstream requests that hit the route timeout (504 UT)"),
    counter("upstream_rq_retry", "retries (and requests replayed after a stale pooled "
            "connection)"),
    counter("upstream_rq_retry_success", "requests that succeeded after being retried"),
    counter("upstream_rq_retry_overflow",
            "retries not made: the retry budget or max_retries was exhausted"),
    counter("upstream_rq_retry_limit_exceeded", "retries not made: num_retries was reached"),
    counter("upstream_rq_per_try_timeout", "attempts that hit the per-try timeout"),
    gauge("upstream_rq_retry_active", "retries in progress"),
    counter("upstream_cx_rx_bytes_total", "bytes received from TCP-proxied connections"),
    counter("upstream_cx_tx_bytes_total", "bytes sent on TCP-proxied connections"),
    counter("upstream_cx_total", "upstream connections opened"),
    gauge("upstream_cx_active", "upstream connections open", ends_as="upstream_cx_destroy"),
    counter("upstream_cx_destroy", "upstream connections closed"),
    counter("upstream_cx_connect_fail", "upstream connects refused or failed (UF)"),
    counter("upstream_cx_connect_timeout", "upstream connects that timed out (UF)"),
    counter("upstream_cx_destroy_remote_with_active_rq",
            "upstream connections closed by the origin during a request (UC)"),
    counter("upstream_cx_protocol_error", "upstream responses with broken framing (UPE)"),
    counter("upstream_cx_http2_total", "upstream connections that speak HTTP/2"),
    counter("upstream_cx_close_notify", "upstream HTTP/2 connections the origin ended "
            "with GOAWAY"),
    counter("upstream_rq_rx_reset", "upstream streams the origin reset (RST_STREAM)"),
    counter("ssl.handshake", "upstream TLS handshakes completed"),
    counter("ssl.session_reused", "upstream TLS handshakes that resumed a session"),
    counter("ssl.connection_error", "upstream TLS handshakes that failed (503 UF)"),
    counter("ssl.fail_verify_san",
            "upstream certificates without an expected SAN (503 UF)"),
    counter("upstream_cx_none_healthy", "requests with no endpoint to pick (UH)"),
    counter("upstream_cx_overflow", "times max_connections made a request wait or fail"),
    counter("upstream_rq_pending_total", "requests that waited for a connection slot"),
    gauge("upstream_rq_pending_active", "requests waiting for a connection slot"),
    counter("upstream_rq_pending_overflow",
            "requests refused by max_requests or max_pending_requests (503 UO)"),
    # Capacity left, summed over workers (Envoy's names).
    gauge("circuit_breakers.default.remaining_cx", "connections that may still be opened"),
    gauge("circuit_breakers.default.remaining_pending",
          "requests that may still wait for a connection"),
    gauge("circuit_breakers.default.remaining_rq", "requests that may still start"),
    gauge("circuit_breakers.default.remaining_retries", "retries that may still start"),
    counter("outlier_detection.ejections_enforced_total", "ejections enforced"),
    gauge("outlier_detection.ejections_active", "endpoints ejected now"),
    counter("outlier_detection.ejections_enforced_consecutive_5xx",
            "ejections for consecutive 5xx"),
    counter("outlier_detection.ejections_enforced_consecutive_gateway_failure",
            "ejections for consecutive gateway failures"),
    counter("outlier_detection.ejections_enforced_success_rate",
            "ejections for a success rate far below the others'"),
    counter("outlier_detection.ejections_enforced_failure_percentage",
            "ejections for a failure percentage above the threshold"),
    counter("outlier_detection.ejections_overflow",
            "ejections not enforced because of max_ejection_percent"),
    counter("lb_healthy_panic", "picks made among all endpoints because too few were healthy"),
    counter("health_check.attempt", "active health checks made"),
    counter("health_check.success", "active health checks passed"),
    counter("health_check.failure", "active health checks failed"),
    gauge("health_check.healthy", "endpoints the active health check finds healthy"),
    histogram("upstream_rq_time", "upstream request time, request sent to response complete (ms)"),
    *_grpc("routed to this cluster"),
)

ENDPOINT = (
    counter("rq_total", "requests sent to this endpoint"),
    gauge("rq_active", "requests in progress on this endpoint", ends_as="rq_error"),
    counter("rq_error", "requests that failed on this endpoint (5xx or reset)"),
    gauge("cx_active", "connections open to this endpoint"),
    gauge("ejected", "1 while the worker's outlier detection has ejected this endpoint"),
    # Written by the supervisor only (in its own slab), read by every worker.
    gauge("hc_failed", "1 while the active health check finds this endpoint unhealthy"),
)

WORKER = (
    gauge("live", "1 while the worker serves, 0 while it starts or drains"),
    counter("downstream_cx_total", "connections accepted by this worker"),
    gauge("downstream_cx_active", "connections open on this worker"),
    counter("downstream_rq_total", "requests received by this worker"),
    gauge("config_version", "config version the worker serves"),
)


# The supervisor's own, not in shared memory: its discovery client's state (Envoy's
# control_plane.connected_state, and its xDS update_success / update_rejected).
CONTROL_PLANE = (
    gauge("connected_state", "1 while the discovery stream to the control plane is up"),
    gauge("stale", "1 while the config in service is not confirmed by the control plane "
                   "(disconnected, or the persisted config of a previous run)"),
    counter("update_success", "pushes every worker applied (then ACKed)"),
    counter("update_rejected", "pushes refused (NACKed); the config in service stayed"),
)


TRACING = (
    counter("spans_sampled", "requests whose span was recorded"),
    counter("spans_sent", "spans the collector accepted"),
    counter("spans_dropped", "spans dropped because the export queue was full"),
    counter("spans_failed", "spans lost because an export failed"),
    counter("exports_total", "export requests sent to the collector"),
)


# A mirrored route's response diffs (proxy.mirror_diff), per route: mirror.<route>.*.
MIRROR = (
    counter("same", "request copies whose response matched the primary's"),
    counter("different", "request copies whose response differed from the primary's"),
    counter("shadow_failed", "request copies that got no whole response to compare"),
)


class Scope(Enum):
    """Kinds of scope, each with its stats and the prefix of their full names."""

    LISTENER = ("listener", LISTENER)
    HTTP = ("http", HTTP)
    CLUSTER = ("cluster", CLUSTER)
    ENDPOINT = ("endpoint", ENDPOINT)
    WORKER = ("server", WORKER)
    TRACING = ("tracing", TRACING)
    MIRROR = ("mirror", MIRROR)

    def __init__(self, prefix: str, stats: tuple[Stat, ...]) -> None:
        self.prefix = prefix
        self.stats = stats
        offsets = {}
        at = 0
        for s in stats:
            offsets[s.name] = at
            at += s.cells
        self.offsets: dict[str, int] = offsets
        self.cells = at
        for st in stats:
            if st.ends_as is not None and st.ends_as not in offsets:
                raise ValueError(f"{prefix}.{st.name}: ends_as {st.ends_as!r} is not declared")


def offset(scope: Scope, name: str) -> int:
    """Cell offset of a stat inside its scope; KeyError for an undeclared stat."""
    return scope.offsets[name]
