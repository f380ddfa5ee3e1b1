"""The runtime snapshot: what a worker serves from, as bytes and seconds, so that the data
path does no conversions per request. `config.compile` builds one per config version from
the schema; it is immutable and a worker swaps it in one assignment.

These are types and constants only. This module imports nothing above config (the
filters' compiled policy objects are named for type checking alone), so every layer of
the data path may import it and it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from meshproxy._core.route_table import RouteTable
from meshproxy.config import schema
from meshproxy.config.destinations import DestinationTable
from meshproxy.transport.tls_material import Bundle, KeyPair

if TYPE_CHECKING:
    from meshproxy.filters.authz import Authorizer
    from meshproxy.filters.cors import CorsPolicy
    from meshproxy.filters.fault import FaultPolicy
    from meshproxy.filters.local_ratelimit import LocalRateLimiter
    from meshproxy.filters.python import LoadedFilter

# Retry conditions (Envoy's retry_on), as bits of RetrySpec.conditions.
RETRY_5XX = 1
RETRY_GATEWAY = 2
RETRY_RESET = 4
RETRY_CONNECT = 8
RETRY_4XX = 16
RETRY_REFUSED = 32
RETRY_STATUS = 64
_BITS = {"5xx": RETRY_5XX, "gateway-error": RETRY_GATEWAY, "reset": RETRY_RESET,
         "connect-failure": RETRY_CONNECT, "retriable-4xx": RETRY_4XX,
         "refused-stream": RETRY_REFUSED, "retriable-status-codes": RETRY_STATUS}


# Envoy's gRPC retry_on conditions (x-envoy-retry-grpc-on): the grpc-status each
# retries, read from a trailers-only response's headers (protocol.grpc's codes).
GRPC_RETRY_CODES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8,
                    "internal": 13, "unavailable": 14}


def conditions(retry_on: str) -> int:
    """A retry_on list ("5xx,reset") as bits; the schema has checked every name."""
    bits = 0
    for c in retry_on.split(","):
        bits |= _BITS.get(c.strip(), 0)
    return bits


def grpc_conditions(retry_on: str) -> frozenset[int]:
    """The gRPC statuses a retry_on list retries."""
    return frozenset(GRPC_RETRY_CODES[c.strip()] for c in retry_on.split(",")
                     if c.strip() in GRPC_RETRY_CODES)


@dataclass(frozen=True, slots=True)
class RetrySpec:
    conditions: int
    num_retries: int
    per_try_timeout: float  # 0: none
    statuses: frozenset[int]
    base_interval: float
    max_interval: float
    include_attempt_count: bool
    buffer_limit: int
    grpc_codes: frozenset[int] = frozenset()


MatcherKind = Literal["exact", "prefix", "suffix", "regex", "present", "absent"]
PathKind = Literal["prefix", "path", "regex"]

# Request headers never forwarded as they came (RFC 9110 section 7.6.1 hop-by-hop fields,
# plus those the proxy itself rewrites: Host, the framing and Expect, which the proxy answers
# itself as Envoy does, and the x-forwarded-* it sets). x-forwarded-client-cert is Envoy's
# SANITIZE_SET: a client's own is dropped, the proxy sets it for a verified client.
# Framing rule: the framing the proxy forwards is the framing it decided. Content-Length and
# Transfer-Encoding are never copied from a peer's head (a duplicate `Content-Length: 5`
# line, a `5, 5` list or a value the parser refused to believe must not reach the next hop);
# the proxy writes one `content-length: N` or `transfer-encoding: chunked` of its own.
REQUEST_SKIP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-client-cert", b"content-length",
})
# The pseudo-header the route table matches source principals on. A colon cannot start a
# field name on the wire (RFC 9110 section 5.1), so a client cannot forge it.
PRINCIPAL_HEADER = b":source-principal"
# Response headers never forwarded as they came: hop-by-hop and the framing the proxy
# chooses for the downstream connection.
RESPONSE_SKIP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-connection", b"content-length",
})
# Trailer fields never relayed (RFC 9110 6.5.1: framing, routing and connection control
# cannot be sent after the content; a next hop that merges trailers into the header section
# must never find a second framing there).
TRAILER_SKIP = frozenset({
    b"content-length", b"transfer-encoding", b"host", b"connection", b"keep-alive", b"te",
    b"trailer", b"upgrade", b"proxy-connection", b"expect",
})


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Header mutations of a route merged with its virtual host's (route applied last)."""

    request_skip: frozenset[bytes]
    request_add: tuple[tuple[bytes, bytes], ...]
    response_skip: frozenset[bytes]
    response_add: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class BreakerSpec:
    """Per-worker shares of the cluster's pool-wide thresholds: each of the N workers
    enforces ceil(limit / N), so the pool as a whole stays within the limit rounded up to
    a multiple of N (documented in the README). The retry budget applies to each
    worker's own traffic: a percentage needs no sharing."""

    max_connections: int
    max_pending_requests: int
    max_requests: int
    max_retries: int
    budget_percent: float | None
    min_retry_concurrency: int
    budget_window: float


@dataclass(frozen=True, slots=True)
class OutlierSpec:
    consecutive_5xx: int
    consecutive_gateway: int
    enforcing_5xx: float          # 0..1
    enforcing_gateway: float
    interval: float
    base_ejection_time: float
    max_ejection_time: float
    max_ejection_percent: float   # 0..100
    enforcing_success_rate: float
    sr_minimum_hosts: int
    sr_request_volume: int
    sr_stdev_factor: float        # e.g. 1.9
    fp_threshold: float           # 0..100
    enforcing_failure_percentage: float
    fp_minimum_hosts: int
    fp_request_volume: int


@dataclass(frozen=True, slots=True)
class RouteFilters:
    """The filters a route's requests pass before its action: CORS (a preflight is
    answered before authorization), authorization (so a denied request takes no token),
    the rate limit, then faults. None on an action: no filter applies."""

    authz: Authorizer | None
    rate_limit: LocalRateLimiter | None
    fault: FaultPolicy | None = None
    cors: CorsPolicy | None = None
    # Python filters (filters.python): the listener's, then the route's, in order.
    python: tuple[LoadedFilter, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterAction:
    """Forward upstream. `clusters` holds (name, cumulative weight); one entry unless
    weighted_clusters, where a request goes to the first whose cumulative weight exceeds a
    uniform draw in [0, total)."""

    clusters: tuple[tuple[str, int], ...]
    total_weight: int
    prefix: bytes | None
    prefix_rewrite: bytes | None
    host_rewrite: bytes | None
    timeout: float
    ops: HeaderOps
    retry: RetrySpec | None = None
    # (kind, name): ("header", b"x-user"), ("cookie", b"session"), ("source_ip", b"")
    hash_policy: tuple[tuple[str, bytes], ...] = ()
    filters: RouteFilters | None = None
    # Request mirroring (proxy.mirror): (cluster, fraction 0..1, body limit in bytes,
    # filters.mirror_diff.DiffSpec or None, the route's name for mirror.<route>.*).
    mirrors: tuple[tuple[str, float, int, Any, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RedirectAction:
    scheme: bytes | None
    host: bytes | None
    port: int | None
    path: bytes | None
    prefix: bytes | None
    prefix_rewrite: bytes | None
    status: int
    strip_query: bool
    ops: HeaderOps
    filters: RouteFilters | None = None


@dataclass(frozen=True, slots=True)
class DirectAction:
    status: int
    body: bytes
    content_type: bytes
    ops: HeaderOps
    filters: RouteFilters | None = None


@dataclass(frozen=True, slots=True)
class UpstreamHttp2Spec:
    """A cluster's HTTP/2 settings (schema.UpstreamHttp2Options says why)."""

    max_concurrent_streams: int = 2_147_483_647
    initial_stream_window_size: int = 65_536
    initial_connection_window_size: int = 16_777_216
    hpack_table_size: int = 4_096


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    name: str
    endpoints: tuple[tuple[str, int, int], ...]  # (address, port, weight)
    connect_timeout: float
    idle_timeout: float
    max_idle_connections: int
    breakers: BreakerSpec | None = None
    outlier: OutlierSpec | None = None
    panic_threshold: float = 50.0
    health_checked: bool = False
    lb_policy: str = "round_robin"
    lb_options: tuple[tuple[str, float], ...] = ()
    max_connection_duration: float = 0.0
    # (priority, locality) per endpoint, in the order of `endpoints`
    placement: tuple[tuple[int, str], ...] = ()
    locality_weights: tuple[tuple[str, int], ...] | None = None
    overprovisioning: float = 1.4
    tls: UpstreamTLSSpec | None = None
    protocol: str = "http1"  # http1 | http2 | downstream
    http2: UpstreamHttp2Spec = UpstreamHttp2Spec()


@dataclass(frozen=True, slots=True)
class AccessLogSpec:
    path: str
    format: str
    flush_interval: float


@dataclass(frozen=True, slots=True)
class TLSSpec:
    """A listener's TLS: the material itself (bytes the supervisor checked), so that a
    rotated file yields a different spec and workers rebuild their contexts."""

    certificates: tuple[KeyPair, ...]
    alpn: tuple[bytes, ...]
    handshake_timeout: float
    trusted_ca: Bundle | None = None
    require_client: bool = False
    match_sans: tuple[str, ...] = ()
    crl: Bundle | None = None  # revocation lists (PEM), same shape as a bundle
    crl_leaf_only: bool = False
    accept_plaintext: bool = False  # PERMISSIVE: a first byte other than 0x16 is plaintext


@dataclass(frozen=True, slots=True)
class UpstreamTLSSpec:
    sni: str
    certificate: KeyPair | None
    trusted_ca: Bundle | None
    match_sans: tuple[str, ...]
    crl: Bundle | None = None
    crl_leaf_only: bool = False


@dataclass(frozen=True, slots=True)
class Http2Spec:
    """A listener's HTTP/2 settings and flood limits (schema.Http2Options says why)."""

    max_concurrent_streams: int = 100
    initial_stream_window_size: int = 65_536
    initial_connection_window_size: int = 1_048_576
    hpack_table_size: int = 4_096
    max_outbound_frames: int = 10_000
    max_outbound_control_frames: int = 1_000
    max_empty_frames: int = 1
    max_priority_frames_per_stream: int = 100
    max_window_updates_per_data_frame: int = 10
    allow_connect: bool = True


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    name: str
    address: str
    port: int
    route_table: RouteTable
    request_headers_timeout: float
    idle_timeout: float
    max_request_line: int
    max_header_bytes: int
    max_headers: int
    access_log: AccessLogSpec | None
    max_connection_duration: float = 0.0
    tls: TLSSpec | None = None
    # Some route matches on the source principal: requests of verified clients carry it.
    match_principal: bool = False
    # The listener's authorization policies: also decide requests that match no route
    # (a caller the policies deny learns nothing about which paths exist: 403, not 404).
    authz: Authorizer | None = None
    on_demand_timeout: float = 0.0  # seconds; 0: a missing authority is 404 NR at once
    codec: str = "auto"  # auto | http1 | http2 (schema.Listener.codec)
    http2: Http2Spec = field(default_factory=lambda: Http2Spec())
    # use_original_dst: what each intercepted connection becomes (config.destinations).
    destinations: DestinationTable | None = None


@dataclass(frozen=True, slots=True)
class TracingSpec:
    provider: str
    address: str
    port: int
    path: str
    service: str
    rate: float  # 0..1
    max_queue: int
    batch_size: int
    flush_interval: float
    timeout: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    config: schema.Config
    listeners: tuple[ListenerSpec, ...]
    clusters: dict[str, ClusterSpec] = field(default_factory=dict)
    tracing: TracingSpec | None = None
