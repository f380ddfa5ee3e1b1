"""The configuration schema: one family of frozen msgspec Structs.

Names and defaults follow Envoy where Envoy has them (connect_timeout 5 s, route timeout
15 s, max_request_headers_kb 60, max_headers_count 100, request_headers_timeout), with a
flatter spelling. Durations are strings like "250ms", "1s", "1.5m", "1h", or a number of
seconds. Every Struct forbids unknown fields, so a typo is an error, not a silent default.
Cross-field rules (exactly one action, referenced clusters exist, ...) live in load.py.

Size: past 400 lines because it is the whole file format in one place (DESIGN.md habit 6:
one family of Structs); each Struct is a few lines of fields, defaults and constraints,
and a reader looks a field up here.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

DURATION_PATTERN = r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)\s*$"
Duration = Annotated[str, Meta(pattern=DURATION_PATTERN)] | Annotated[float, Meta(ge=0)]
Port = Annotated[int, Meta(ge=1, le=65535)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
HeaderName = Annotated[str, Meta(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]


class Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Admin(Base, frozen=True):
    address: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 9901


class AccessLog(Base, frozen=True):
    """`path`: "stdout", "stderr", or a file appended to. `format`: "text" or "json"."""

    path: NonEmptyStr = "stdout"
    format: Literal["text", "json"] = "text"
    # Envoy's access_log_flush_interval default: lines are written in batches, not a write
    # syscall per request.
    flush_interval: Duration = "1s"


class Endpoint(Base, frozen=True):
    address: NonEmptyStr
    port: Port
    weight: Annotated[int, Meta(ge=1, le=1_000_000)] = 1
    # Envoy's priority levels: 0 is used first; traffic fails over to 1, 2, ... as the
    # endpoints of lower levels become unhealthy.
    priority: Annotated[int, Meta(ge=0, le=127)] = 0
    # A locality (zone) name; weighted by the cluster's locality_weights.
    locality: str = ""


class RetryBudget(Base, frozen=True):
    """Bounds retries to a share of traffic, so that retries cannot multiply the load on a
    failing cluster. Concurrency form (Envoy's): retries in progress may not exceed
    max(min_retry_concurrency, budget_percent% of requests in progress). Windowed form
    (Linkerd's, when `window` is set): retries over the last `window` may not exceed
    max(min_retry_concurrency, budget_percent% of requests over it)."""

    budget_percent: Annotated[float, Meta(ge=0, le=100)] = 20.0
    min_retry_concurrency: Annotated[int, Meta(ge=0, le=1_000_000)] = 3
    window: Duration | None = None


class CircuitBreakers(Base, frozen=True):
    """Envoy's thresholds and defaults."""

    max_connections: Annotated[int, Meta(ge=1)] = 1024
    max_pending_requests: Annotated[int, Meta(ge=1)] = 1024
    max_requests: Annotated[int, Meta(ge=1)] = 1024
    max_retries: Annotated[int, Meta(ge=0)] = 3
    retry_budget: RetryBudget | None = None


Percent = Annotated[float, Meta(ge=0, le=100)]


class OutlierDetection(Base, frozen=True):
    """Envoy's passive health checking, names and defaults. 0 disables a rule."""

    consecutive_5xx: Annotated[int, Meta(ge=0)] = 5
    consecutive_gateway_failure: Annotated[int, Meta(ge=0)] = 5
    enforcing_consecutive_5xx: Percent = 100
    enforcing_consecutive_gateway_failure: Percent = 0
    interval: Duration = "10s"
    base_ejection_time: Duration = "30s"
    max_ejection_time: Duration = "300s"
    max_ejection_percent: Percent = 10
    enforcing_success_rate: Percent = 100
    success_rate_minimum_hosts: Annotated[int, Meta(ge=1)] = 5
    success_rate_request_volume: Annotated[int, Meta(ge=1)] = 100
    success_rate_stdev_factor: Annotated[int, Meta(ge=0)] = 1900  # in thousandths: 1.9
    failure_percentage_threshold: Percent = 85
    enforcing_failure_percentage: Percent = 0
    failure_percentage_minimum_hosts: Annotated[int, Meta(ge=1)] = 5
    failure_percentage_request_volume: Annotated[int, Meta(ge=1)] = 50


class HealthCheck(Base, frozen=True):
    """Active health checking, run once per proxy by the supervisor (Envoy's fields)."""

    type: Literal["http", "tcp", "grpc"] = "http"
    path: str = "/healthz"           # http: the request target
    # http: the Host header, grpc: :authority (default: the cluster name)
    host: str | None = None
    # grpc: the service whose health is asked (grpc.health.v1; "": the server's overall).
    service_name: str = ""
    expected_statuses: list[Annotated[int, Meta(ge=100, le=599)]] = msgspec.field(
        default_factory=lambda: [200])
    interval: Duration = "5s"
    timeout: Duration = "1s"
    interval_jitter: Duration = "0s"  # a random extra wait up to this, per check
    healthy_threshold: Annotated[int, Meta(ge=1)] = 2
    unhealthy_threshold: Annotated[int, Meta(ge=1)] = 3


class UpstreamTLS(Base, frozen=True):
    """TLS to a cluster's endpoints (Envoy's UpstreamTlsContext, flattened)."""

    # Server name sent in the handshake (default: none).
    sni: str = ""
    # The proxy's own certificate, for mTLS: both or neither.
    certificate_chain: NonEmptyStr | None = None
    private_key: NonEmptyStr | None = None
    # CA certificates the endpoints' certificates must chain to. Without it the endpoints
    # are not verified (Envoy's behaviour without a validation context).
    trusted_ca: NonEmptyStr | None = None
    # Envoy's match_subject_alt_names (exact): an endpoint's certificate must carry one of
    # these URI (SPIFFE ID) or DNS SANs, else the connection fails (503 UF).
    match_subject_alt_names: list[NonEmptyStr] = []
    # Revocation lists for the endpoints' certificates (as on listeners).
    crl: NonEmptyStr | None = None
    only_verify_leaf_cert_crl: bool = False


class UpstreamHttp2Options(Base, frozen=True):
    """Envoy's Http2ProtocolOptions for a cluster's HTTP/2 connections to its endpoints."""

    # Streams the proxy opens on one connection before it opens another one to the same
    # endpoint; the origin's SETTINGS_MAX_CONCURRENT_STREAMS applies when it is lower.
    # Envoy's default: 2^31-1, so that the origin's setting decides.
    max_concurrent_streams: Annotated[int, Meta(ge=1, le=2_147_483_647)] = 2_147_483_647
    # SETTINGS_INITIAL_WINDOW_SIZE for responses: what an origin may send on a stream
    # before the proxy has passed it on to the client, so the bound of a stream's response
    # buffer however slowly the client reads (Envoy's edge best practice, 64 KiB).
    initial_stream_window_size: Annotated[int, Meta(ge=65_535, le=2_147_483_647)] = 65_536
    # The connection's window: what all its streams together may buffer. Reopened as the
    # streams' data is taken, so it must be large enough that clients that stop reading
    # (each holding a stream window) do not stall the others: 256 such streams at 64 KiB.
    initial_connection_window_size: Annotated[
        int, Meta(ge=65_535, le=2_147_483_647)] = 16_777_216
    # SETTINGS_HEADER_TABLE_SIZE: the HPACK table the origin may make us keep.
    hpack_table_size: Annotated[int, Meta(ge=0, le=65_536)] = 4_096


class Cluster(Base, frozen=True):
    name: NonEmptyStr
    endpoints: list[Endpoint]
    connect_timeout: Duration = "5s"
    lb_policy: Literal["round_robin", "least_request", "random", "ring_hash", "maglev",
                       "peak_ewma"] = "round_robin"
    # ring_hash: points per unit of endpoint weight, so the ring has at least this many
    # (Envoy's minimum_ring_size); the ring never grows past maximum_ring_size points (Envoy's
    # name and default), past which every endpoint's share is scaled down to fit.
    minimum_ring_size: Annotated[int, Meta(ge=1, le=8_388_608)] = 1024
    maximum_ring_size: Annotated[int, Meta(ge=1, le=8_388_608)] = 8_388_608
    # maglev: lookup table size, a prime (Envoy's default 65537).
    maglev_table_size: Annotated[int, Meta(ge=3, le=5_000_011)] = 65537
    # peak_ewma: time constant of the latency average's decay.
    peak_ewma_decay: Duration = "10s"
    # Idle upstream keep-alive connections are closed after this. Shorter than the idle
    # timeouts of common servers (Apache and Node 5 s, nginx 75 s) so that the proxy, not the
    # origin, closes an idle connection and a request never races the origin's close.
    idle_timeout: Duration = "4s"
    # Idle connections kept per endpoint per worker; more are closed on release.
    max_idle_connections: Annotated[int, Meta(ge=0, le=100_000)] = 64
    # An upstream connection older than this is not reused (Envoy's
    # max_connection_duration for upstreams): traffic moves to new endpoints and DNS
    # answers in bounded time. 0 disables.
    max_connection_duration: Duration = 0
    circuit_breakers: CircuitBreakers = CircuitBreakers()
    outlier_detection: OutlierDetection | None = None
    health_check: HealthCheck | None = None
    # Below this share of healthy endpoints the balancer uses all of them (Envoy's
    # healthy_panic_threshold): better some errors than overloading the few left.
    healthy_panic_threshold: Percent = 50
    # Locality-weighted balancing (Envoy's locality_weighted_lb_config): traffic per
    # locality in proportion to these weights (missing localities weigh 1), scaled down
    # as a locality loses healthy endpoints.
    locality_weights: dict[str, Annotated[int, Meta(ge=0, le=1_000_000)]] | None = None
    # Envoy's overprovisioning factor, in percent: a level or locality with this much
    # more capacity than needed can lose 1 - 100/140 of its endpoints before traffic moves.
    overprovisioning_factor: Annotated[int, Meta(ge=100, le=1000)] = 140
    tls: UpstreamTLS | None = None
    # The protocol spoken to the endpoints (Envoy's explicit http_protocol_options,
    # http2_protocol_options, or use_downstream_protocol_config): HTTP/2 multiplexes a
    # worker's requests to an endpoint on one connection; over TLS it is offered by ALPN.
    protocol: Literal["http1", "http2", "downstream"] = "http1"
    http2: UpstreamHttp2Options = UpstreamHttp2Options()


class QueryParameterMatch(Base, frozen=True):
    """A predicate on a value. Exactly one of exact, prefix, suffix, regex (full match),
    present: true, absent: true; `invert` negates it."""

    name: NonEmptyStr
    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: str | None = None
    present: bool | None = None
    absent: bool | None = None
    invert: bool = False


class HeaderMatch(QueryParameterMatch, frozen=True):
    """The same predicates on a header; the name must be a valid field name."""

    name: HeaderName


class RouteMatch(Base, frozen=True):
    """Exactly one of prefix, path (exact), regex (full match)."""

    prefix: str | None = None
    path: str | None = None
    regex: str | None = None
    case_sensitive: bool = True
    methods: list[Annotated[str, Meta(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]] | None = None
    headers: list[HeaderMatch] = []
    query_parameters: list[QueryParameterMatch] = []
    # The request's source principal (the client certificate's SPIFFE ID without
    # "spiffe://", Istio's form) must match one of these: exact, "prefix*", "*suffix", or
    # "*" (any verified client). Requests without a verified client never match.
    source_principals: list[NonEmptyStr] | None = None


class WeightedCluster(Base, frozen=True):
    name: NonEmptyStr
    weight: Annotated[int, Meta(ge=0, le=1_000_000)]


RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx",
            "refused-stream", "retriable-status-codes",
            # gRPC (Envoy's x-envoy-retry-grpc-on): a trailers-only answer with that status
            "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")


class RetryBackOff(Base, frozen=True):
    """Fully jittered exponential back-off: before retry n, a uniform wait in
    [0, min(max_interval, base_interval * 2**(n-1))] (Envoy's)."""

    base_interval: Duration = "25ms"
    max_interval: Duration | None = None  # default: 10 x base_interval


class RetryPolicy(Base, frozen=True):
    """Envoy's route retry policy. `retry_on` is a comma-separated list of RETRY_ON."""

    retry_on: Annotated[str, Meta(min_length=1)]
    num_retries: Annotated[int, Meta(ge=0, le=100)] = 1
    # Bounds each attempt; 0 disables (the route timeout still bounds them all).
    per_try_timeout: Duration = 0
    retriable_status_codes: list[Annotated[int, Meta(ge=100, le=599)]] = []
    retry_back_off: RetryBackOff = RetryBackOff()
    # Send x-envoy-attempt-count upstream (1 for the first attempt).
    include_attempt_count: bool = False
    # A request body up to this size is kept for replay; a larger one is never retried
    # (Envoy's per_request_buffer_limit_bytes default is 64 KiB too).
    retry_buffer_limit: Annotated[int, Meta(ge=0, le=64 * 1024 * 1024)] = 65536


class HashPolicy(Base, frozen=True):
    """What a consistent-hashing balancer (ring_hash, maglev) hashes: exactly one of a
    header's value, a cookie's value, or the client's address. The first policy that
    yields a value is used; with none, a request goes to a random point."""

    header: HeaderName | None = None
    cookie: NonEmptyStr | None = None
    source_ip: bool = False


class ResponseDiff(Base, frozen=True):
    """Dark launches: each copy's response compared with the primary's, counted per route
    (mirror.<route>.same, different, shadow_failed). Compared: the status, `headers` by
    value, the body by SHA-256; JSON bodies (both application/json or +json, each within
    max_body_bytes) field by field instead, `ignore_json_paths` left out (dotted keys,
    `*` for any key or index, `[n]` for one index: "meta.generated_at", "items[*].id")."""

    headers: list[HeaderName] = []
    ignore_json_paths: list[NonEmptyStr] = []
    max_body_bytes: Annotated[int, Meta(ge=0, le=16 * 1024 * 1024)] = 1 << 20


class RequestMirrorPolicy(Base, frozen=True):
    """Envoy's RequestMirrorPolicy (Istio's mirror, mirrorPercentage): a copy of
    `percentage` of the route's requests goes to `cluster`, fire and forget, its Host
    suffixed -shadow. A body is streamed to it as it passes, up to `body_limit` bytes (the
    retry buffer's bound, 64 KiB); a longer one is not mirrored (counted)."""

    cluster: NonEmptyStr
    percentage: Percent = 100
    body_limit: Annotated[int, Meta(ge=0, le=64 * 1024 * 1024)] = 65536
    # Compare the copy's response with the primary's (the route needs a `name`).
    response_diff: ResponseDiff | None = None


class RouteAction(Base, frozen=True):
    """Exactly one of cluster, weighted_clusters."""

    cluster: str | None = None
    weighted_clusters: list[WeightedCluster] | None = None
    prefix_rewrite: str | None = None
    host_rewrite: str | None = None
    # Envoy's route timeout: from the end of the downstream request until the upstream
    # response is complete, covering every retry and back-off; 504 UT when it fires
    # before the response started. 0 disables.
    timeout: Duration = "15s"
    retry_policy: RetryPolicy | None = None
    hash_policy: list[HashPolicy] = []
    request_mirror_policies: list[RequestMirrorPolicy] = []


class RedirectAction(Base, frozen=True):
    scheme_redirect: Literal["http", "https"] | None = None
    host_redirect: str | None = None
    port_redirect: Port | None = None
    path_redirect: str | None = None
    prefix_rewrite: str | None = None
    response_code: Literal[301, 302, 303, 307, 308] = 301
    strip_query: bool = False


class DirectResponse(Base, frozen=True):
    status: Annotated[int, Meta(ge=200, le=599)]
    body: str = ""
    content_type: str = "text/plain"


class HeaderValue(Base, frozen=True):
    """append: true adds a value; false replaces any value of that name."""

    name: HeaderName
    value: str
    append: bool = True


class AuthzSource(Base, frozen=True):
    """Who sent the request (Istio's Source). Set fields must all match."""

    principals: list[NonEmptyStr] = []      # SPIFFE IDs without "spiffe://", with * wildcards
    not_principals: list[NonEmptyStr] = []
    namespaces: list[NonEmptyStr] = []
    not_namespaces: list[NonEmptyStr] = []
    ip_blocks: list[NonEmptyStr] = []       # the client address: "10.0.0.0/8", "192.0.2.7"
    not_ip_blocks: list[NonEmptyStr] = []


class AuthzOperation(Base, frozen=True):
    """What is asked for (Istio's Operation). Set fields must all match."""

    hosts: list[NonEmptyStr] = []
    not_hosts: list[NonEmptyStr] = []
    ports: list[Port] = []
    not_ports: list[Port] = []
    methods: list[NonEmptyStr] = []
    not_methods: list[NonEmptyStr] = []
    paths: list[NonEmptyStr] = []           # the path without its query
    not_paths: list[NonEmptyStr] = []


class AuthzCondition(Base, frozen=True):
    """Istio's Condition: `key` is request.headers[<name>], source.ip, source.principal,
    source.namespace, destination.port, request.method, request.path or request.host."""

    key: NonEmptyStr
    values: list[str] = []
    not_values: list[str] = []


class AuthzRule(Base, frozen=True):
    from_: list[AuthzSource] = msgspec.field(default_factory=list, name="from")
    to: list[AuthzOperation] = []
    when: list[AuthzCondition] = []


class AuthorizationPolicy(Base, frozen=True):
    """Istio's AuthorizationPolicy for this listener or route (see filters/authz.py)."""

    name: NonEmptyStr
    action: Literal["ALLOW", "DENY", "AUDIT"] = "ALLOW"
    rules: list[AuthzRule] = []


class TokenBucket(Base, frozen=True):
    """Envoy's token bucket: holds up to max_tokens, refilled by tokens_per_fill every
    fill_interval (continuously, pro rata, so that the rate is smooth)."""

    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000_000)]
    fill_interval: Duration
    tokens_per_fill: Annotated[int, Meta(ge=1, le=1_000_000_000)] = 1


class RateLimitKey(Base, frozen=True):
    """A bucket per distinct value of exactly one of these."""

    header: HeaderName | None = None
    source_principal: bool = False
    remote_address: bool = False


class LocalRateLimit(Base, frozen=True):
    """Envoy's local rate limit, for the whole worker pool of this proxy."""

    token_bucket: TokenBucket
    # Without `key`, one bucket for every request of the route or virtual host.
    key: RateLimitKey | None = None
    # Buckets kept for distinct keys (a shared table); keys beyond it share buckets.
    max_keys: Annotated[int, Meta(ge=1, le=1_048_576)] = 4096
    # x-ratelimit-limit, -remaining, -reset on every response of a limited route
    # (Envoy's enable_x_ratelimit_headers: DRAFT_VERSION_03).
    response_headers: bool = True


class FaultDelay(Base, frozen=True):
    """Envoy's FaultDelay: `fixed_delay` for `percentage` of the requests; with
    `header_delay`, a request's x-envoy-fault-delay-request (milliseconds) instead, for
    x-envoy-fault-delay-request-percentage of them (capped by `percentage`)."""

    fixed_delay: Duration | None = None
    header_delay: bool = False
    percentage: Percent = 100


class FaultAbort(Base, frozen=True):
    """Envoy's FaultAbort: `http_status` or `grpc_status` for `percentage` of the
    requests; with `header_abort`, the request's x-envoy-fault-abort-request (an HTTP
    status) or x-envoy-fault-abort-grpc-request (a gRPC status) instead, for
    x-envoy-fault-abort-request-percentage of them (capped by `percentage`)."""

    http_status: Annotated[int, Meta(ge=200, le=599)] | None = None
    grpc_status: Annotated[int, Meta(ge=0, le=16)] | None = None
    header_abort: bool = False
    percentage: Percent = 100


class Fault(Base, frozen=True):
    """Envoy's HTTP fault filter on a route (Istio's HTTPFaultInjection): the delay, then
    the abort. `max_active_faults`: at most this many requests faulted at once in the
    whole proxy; past it a request is served without its fault (None: no limit)."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    max_active_faults: Annotated[int, Meta(ge=0)] | None = None


class PythonFilter(Base, frozen=True):
    """A Python filter (filters.python): "package.module:Class", built once per snapshot
    with `config`; every call of a phase is bounded by `timeout`. `name` (default: the
    class path) is what the log and stats call it."""

    python: Annotated[str, Meta(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]
    config: dict[str, object] = {}
    timeout: Duration = "1s"
    name: str = ""


class StringMatch(Base, frozen=True):
    """Exactly one of exact, prefix, suffix, regex (full match); Envoy's StringMatcher."""

    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    regex: str | None = None
    ignore_case: bool = False


class Cors(Base, frozen=True):
    """Envoy's CorsPolicy (Istio's corsPolicy) on a route. Origins allowed by
    `allow_origins`; the lists are sent as comma-separated values; `max_age` as seconds;
    preflights from origins not allowed go upstream unless
    `forward_not_matching_preflights` is false (then answered 200 without CORS headers)."""

    allow_origins: Annotated[list[StringMatch], Meta(min_length=1)]
    allow_methods: list[Annotated[str, Meta(pattern=r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")]] = []
    allow_headers: list[HeaderName] = []
    expose_headers: list[HeaderName] = []
    max_age: Duration | None = None
    allow_credentials: bool = False
    forward_not_matching_preflights: bool = True


class Route(Base, frozen=True):
    """Exactly one of route, redirect, direct_response."""

    match: RouteMatch
    name: str = ""
    route: RouteAction | None = None
    redirect: RedirectAction | None = None
    direct_response: DirectResponse | None = None
    request_headers_to_add: list[HeaderValue] = []
    request_headers_to_remove: list[HeaderName] = []
    response_headers_to_add: list[HeaderValue] = []
    response_headers_to_remove: list[HeaderName] = []
    # Replace the listener's policies for this route (Envoy's per-route RBAC); [] turns
    # authorization off for it. None: the listener's apply.
    authorization_policies: list[AuthorizationPolicy] | None = None
    # Replaces the virtual host's limit for this route.
    local_rate_limit: LocalRateLimit | None = None
    # Fault injection (after authorization and the rate limit, before the router).
    fault: Fault | None = None
    # CORS, the first filter: a preflight is answered before authorization (a browser
    # sends it without credentials).
    cors: Cors | None = None
    # Python filters, after the listener's and the built-in ones, in order.
    filters: list[PythonFilter] = []


class VirtualHost(Base, frozen=True):
    name: NonEmptyStr
    domains: list[NonEmptyStr]
    routes: list[Route]
    request_headers_to_add: list[HeaderValue] = []
    request_headers_to_remove: list[HeaderName] = []
    response_headers_to_add: list[HeaderValue] = []
    response_headers_to_remove: list[HeaderName] = []
    local_rate_limit: LocalRateLimit | None = None


class TLSCertificate(Base, frozen=True):
    certificate_chain: NonEmptyStr  # PEM file: leaf first, then intermediates
    private_key: NonEmptyStr        # PEM file


class ListenerTLS(Base, frozen=True):
    """Downstream TLS termination. Several certificates are chosen by SNI (exact name,
    then wildcard); the first is the default."""

    certificates: Annotated[list[TLSCertificate], Meta(min_length=1)]
    # The protocols offered by ALPN, in the server's order of preference (RFC 7301). None:
    # what the listener's codec speaks (auto: h2 then http/1.1, as Istio's gateways offer).
    alpn: list[Literal["h2", "http/1.1"]] | None = None
    # A client must finish its handshake within this (Envoy's
    # transport_socket_connect_timeout).
    handshake_timeout: Duration = "10s"
    # mTLS (Envoy's validation_context.trusted_ca): PEM CA certificates a client certificate
    # must chain to. With it, a client certificate is asked for and verified when sent; its
    # SPIFFE ID becomes the request's source principal.
    trusted_ca: NonEmptyStr | None = None
    # Envoy's require_client_certificate (default false, which is Istio's PERMISSIVE for
    # certificates): true fails a handshake without a client certificate (STRICT).
    require_client_certificate: bool = False
    # Envoy's match_subject_alt_names (exact): a client certificate must carry one of these
    # URI (SPIFFE ID) or DNS SANs, else the handshake fails. Empty: any verified client.
    match_subject_alt_names: list[NonEmptyStr] = []
    # Envoy's crl: PEM certificate revocation lists; a revoked client certificate fails the
    # handshake. Every certificate of the chain is checked unless only_verify_leaf_cert_crl.
    crl: NonEmptyStr | None = None
    only_verify_leaf_cert_crl: bool = False
    # Istio's PERMISSIVE on one port: a connection whose first byte is not a TLS handshake
    # record (0x16, RFC 8446 5.1) is served as plaintext, without a peer identity (Envoy's
    # tls_inspector choosing between a TLS and a raw_buffer filter chain).
    accept_plaintext: bool = False


class Http2Options(Base, frozen=True):
    """Envoy's Http2ProtocolOptions, with the defaults Envoy's edge best practices give
    (its own defaults trust the client with 256 MiB windows and unbounded streams)."""

    # RFC 9113 6.5.2 SETTINGS_MAX_CONCURRENT_STREAMS: streams one client may have open.
    max_concurrent_streams: Annotated[int, Meta(ge=1, le=2_147_483_647)] = 100
    # SETTINGS_INITIAL_WINDOW_SIZE: what a client may send on a stream before the proxy
    # has passed it on; the window is the bound of a stream's request buffer. RFC 9113
    # 6.9.2: at least the 65,535 of the protocol's own default, at most 2^31-1.
    initial_stream_window_size: Annotated[int, Meta(ge=65_535, le=2_147_483_647)] = 65_536
    # The connection's window (a WINDOW_UPDATE on stream 0 right after the preface).
    initial_connection_window_size: Annotated[
        int, Meta(ge=65_535, le=2_147_483_647)] = 1_048_576
    # SETTINGS_HEADER_TABLE_SIZE: the HPACK dynamic table the client may make us keep
    # (RFC 7541 4.2); 4,096 is the protocol's default.
    hpack_table_size: Annotated[int, Meta(ge=0, le=65_536)] = 4_096
    # Flood limits (Envoy's names and defaults, CVE-2019-9512/9515/9518): frames queued
    # for a client that does not read; control frames (PING/SETTINGS ACKs, RST_STREAM)
    # among them; frames with an empty payload in a row (empty DATA without END_STREAM,
    # empty CONTINUATION); PRIORITY frames per stream opened; WINDOW_UPDATEs per DATA
    # frame sent.
    max_outbound_frames: Annotated[int, Meta(ge=1)] = 10_000
    max_outbound_control_frames: Annotated[int, Meta(ge=1)] = 1_000
    max_consecutive_inbound_frames_with_empty_payload: Annotated[int, Meta(ge=0)] = 1
    max_inbound_priority_frames_per_stream: Annotated[int, Meta(ge=0)] = 100
    max_inbound_window_update_frames_per_data_frame_sent: Annotated[int, Meta(ge=1)] = 10
    # Envoy's allow_connect: SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441), the extended
    # CONNECT that carries a WebSocket over an HTTP/2 stream to an HTTP/1.1 WebSocket
    # origin. On by default (Envoy's is off) because the HTTP/1.1 WebSocket upgrade is on
    # by default here, and the two should agree.
    allow_connect: bool = True


class DestinationMatch(Base, frozen=True):
    """What a connection to an original destination becomes, on a listener that uses them
    (a sidecar's intercepting listener, `use_original_dst`); Envoy's filter_chain_match on
    destination_port and prefix_ranges. The most specific match wins: an address with the
    port, an address with any port, a CIDR (the longest prefix) with the port then any,
    then the port at any address, then any."""

    # IPs or CIDRs the connection was going to; []: any address.
    addresses: list[NonEmptyStr] = []
    port: Annotated[int, Meta(ge=0, le=65535)] = 0  # 0: any port
    # http: the listener's virtual hosts route it (by Host); tcp: proxied as bytes to
    # `cluster`; auto: told apart by its first bytes (Envoy's HTTP inspector), HTTP to the
    # virtual hosts, anything else to `cluster` as TCP.
    protocol: Literal["http", "tcp", "auto"] = "http"
    cluster: NonEmptyStr | None = None
    # The stats and access log name it (Envoy's stat_prefix); default: the cluster's.
    name: str = ""
    # http, auto: the virtual host that routes a request whose Host no virtual host
    # serves (a client that called the service by an address): the service this
    # destination is.
    virtual_host: NonEmptyStr | None = None


class Listener(Base, frozen=True):
    name: NonEmptyStr
    port: Annotated[int, Meta(ge=0, le=65535)]
    virtual_hosts: list[VirtualHost]
    address: str = "0.0.0.0"
    # Envoy's request_headers_timeout, on by default here: a client that sends nothing or
    # trickles its head (slowloris) is cut off after this long.
    request_headers_timeout: Duration = "10s"
    # Keep-alive connections with no request in flight are closed after this (nginx: 75 s).
    idle_timeout: Duration = "60s"
    # Envoy's max_connection_duration: a client connection older than this gets
    # `Connection: close` on its next response (or is closed when idle). 0 disables.
    max_connection_duration: Duration = 0
    max_request_line: Annotated[int, Meta(ge=64, le=1_048_576)] = 8192
    max_request_headers_kb: Annotated[int, Meta(ge=1, le=8192)] = 60
    max_headers_count: Annotated[int, Meta(ge=1, le=10_000)] = 100
    access_log: AccessLog | None = None
    tls: ListenerTLS | None = None
    # Checked for every request of the listener, after routing (a route may replace them).
    authorization_policies: list[AuthorizationPolicy] = []
    # Python filters every route's requests pass first (filters.python).
    filters: list[PythonFilter] = []
    # A sidecar's outbound listener under a control plane: a request for an authority no
    # virtual host serves asks the control plane for it and waits up to this long for the
    # config that serves it (Envoy's on-demand VHDS/ODCDS), then 404 NR. 0: off.
    on_demand_timeout: Duration = 0
    # Envoy's codec_type: auto tells HTTP/2 from HTTP/1.1 by the connection preface on
    # plaintext (RFC 9113 3.4) and by ALPN on TLS; http1 and http2 take only that one.
    codec: Literal["auto", "http1", "http2"] = "auto"
    http2: Http2Options = Http2Options()
    # A sidecar's intercepting listener (sidecar mode): each connection's original
    # destination (SO_ORIGINAL_DST, where the iptables rules redirected it from) picks what
    # it becomes among `destinations`; one that was not redirected (addressed to the
    # listener itself) is served as HTTP by the virtual hosts.
    use_original_dst: bool = False
    destinations: list[DestinationMatch] = []
    # Istio's outboundTrafficPolicy for a destination that matches none: ALLOW_ANY passes
    # it through as TCP (PassthroughCluster), REGISTRY_ONLY refuses it (BlackHoleCluster).
    outbound_traffic_policy: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"
    # Where a passed-through connection goes: None, its original destination (outbound);
    # an address, that address with the original port (inbound: the workload's own
    # ports on its local address, InboundPassthroughCluster).
    passthrough_address: NonEmptyStr | None = None
    # How long the HTTP inspector waits for a client's first bytes on an `auto`
    # destination before it takes the connection for TCP (a protocol where the server
    # speaks first); Istio's protocolDetectionTimeout was 100 ms.
    protocol_detection_timeout: Duration = "100ms"


class TracingCollector(Base, frozen=True):
    address: NonEmptyStr
    port: Port
    # Default: /v1/traces for otlp (OTLP/HTTP), /api/v2/spans for zipkin.
    path: str | None = None


class Tracing(Base, frozen=True):
    """Spans for proxied requests, exported in batches to a collector."""

    provider: Literal["otlp", "zipkin"]
    collector: TracingCollector
    service_name: NonEmptyStr = "meshproxy"
    # Envoy's random_sampling: percent of requests without an incoming decision that are
    # sampled (an incoming sampled flag is always honoured).
    random_sampling: Annotated[float, Meta(ge=0, le=100)] = 100.0
    # Spans waiting for export, per worker; beyond it new spans are dropped and counted
    # (tracing.spans_dropped): the data path never waits for the collector.
    max_queue: Annotated[int, Meta(ge=1, le=1_000_000)] = 4096
    batch_size: Annotated[int, Meta(ge=1, le=100_000)] = 512
    flush_interval: Duration = "1s"
    export_timeout: Duration = "5s"


class Config(Base, frozen=True):
    listeners: list[Listener]
    clusters: list[Cluster] = []
    admin: Admin | None = None
    # The default for listeners that have no access_log of their own.
    access_log: AccessLog | None = None
    tracing: Tracing | None = None
