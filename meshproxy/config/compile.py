"""Config -> an immutable runtime Snapshot (the types are in config.snapshot): route tables,
actions and cluster specs, all as bytes and seconds, so that the data path does no
conversions per request.

A Snapshot is built once per config version (in the supervisor, later sent to workers) and
never mutated; a worker swaps it in one assignment. This module is the assembler: it calls
the sans-IO policy compilers (filters' authorization and rate limit tables, TLS material)
and no module of the data path imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshproxy._core.route_table import HeaderMatcher, Route, RouteTable, VirtualHost
from meshproxy.config import schema
from meshproxy.config.destinations import (
    BLACKHOLE,
    PASSTHROUGH,
    DestinationSpec,
    DestinationTable,
)
from meshproxy.config.durations import parse_duration
from meshproxy.config.load import (
    BLACKHOLE_CLUSTER,
    INBOUND_PASSTHROUGH_CLUSTER,
    PASSTHROUGH_CLUSTER,
    ConfigError,
)
from meshproxy.config.snapshot import (
    PRINCIPAL_HEADER,
    REQUEST_SKIP,
    RESPONSE_SKIP,
    AccessLogSpec,
    BreakerSpec,
    ClusterAction,
    ClusterSpec,
    DirectAction,
    HeaderOps,
    Http2Spec,
    ListenerSpec,
    MatcherKind,
    OutlierSpec,
    PathKind,
    RedirectAction,
    RetrySpec,
    RouteFilters,
    Snapshot,
    TLSSpec,
    TracingSpec,
    UpstreamHttp2Spec,
    UpstreamTLSSpec,
    conditions,
    grpc_conditions,
)
from meshproxy.config.wire import wire_bytes
from meshproxy.filters.authz import Authorizer, compile_policies, wildcard_regex
from meshproxy.filters.cors import CorsPolicy, OriginMatch
from meshproxy.filters.fault import FaultPolicy, FaultSpec
from meshproxy.filters.local_ratelimit import (
    LocalRateLimiter,
    Memory,
    RateLimitSpec,
    private_memory,
)
from meshproxy.filters.mirror_diff import DiffSpec, json_path
from meshproxy.filters.python import FilterLoadError, LoadedFilter, load
from meshproxy.transport.tls_material import Bundle, KeyPair


def _tracing(t: schema.Tracing | None) -> TracingSpec | None:
    if t is None:
        return None
    path = t.collector.path or ("/v1/traces" if t.provider == "otlp" else "/api/v2/spans")
    return TracingSpec(t.provider, t.collector.address, t.collector.port, path, t.service_name,
                       t.random_sampling / 100.0, t.max_queue, t.batch_size,
                       parse_duration(t.flush_interval), parse_duration(t.export_timeout))


def _matcher(m: schema.QueryParameterMatch, lower: bool) -> HeaderMatcher:
    name = wire_bytes(m.name)
    kinds: tuple[MatcherKind, ...] = ("exact", "prefix", "suffix", "regex")
    for kind in kinds:
        value = getattr(m, kind)
        if value is not None:
            return HeaderMatcher(name, kind, wire_bytes(value), m.invert, lower)
    # load.check() has made sure exactly one of present: true / absent: true is set.
    return HeaderMatcher(name, "present" if m.present else "absent", b"", m.invert, lower)


def _ops(vh: schema.VirtualHost, route: schema.Route) -> HeaderOps:
    def merge(adds: list[schema.HeaderValue], removes: list[str], base: frozenset[bytes]
              ) -> tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]]:
        skip = set(base) | {wire_bytes(n.lower()) for n in removes}
        out: list[tuple[bytes, bytes]] = []
        for hv in adds:
            name = wire_bytes(hv.name.lower())
            if not hv.append:
                skip.add(name)
                out = [p for p in out if p[0] != name]
            out.append((name, wire_bytes(hv.value)))
        return frozenset(skip), tuple(out)

    rq_skip, rq_add = merge(vh.request_headers_to_add + route.request_headers_to_add,
                            vh.request_headers_to_remove + route.request_headers_to_remove,
                            REQUEST_SKIP)
    rs_skip, rs_add = merge(vh.response_headers_to_add + route.response_headers_to_add,
                            vh.response_headers_to_remove + route.response_headers_to_remove,
                            RESPONSE_SKIP)
    return HeaderOps(rq_skip, rq_add, rs_skip, rs_add)


def _action(vh: schema.VirtualHost, r: schema.Route, filters: RouteFilters | None) -> object:
    ops = _ops(vh, r)
    prefix = wire_bytes(r.match.prefix) if r.match.prefix is not None else None
    if r.route is not None:
        a = r.route
        if a.cluster is not None:
            clusters: tuple[tuple[str, int], ...] = ((a.cluster, 1),)
            total = 1
        else:
            acc = 0
            weighted = []
            for wc in a.weighted_clusters or ():
                if wc.weight:
                    acc += wc.weight
                    weighted.append((wc.name, acc))
            clusters, total = tuple(weighted), acc
        return ClusterAction(
            clusters, total, prefix,
            wire_bytes(a.prefix_rewrite) if a.prefix_rewrite is not None else None,
            wire_bytes(a.host_rewrite) if a.host_rewrite is not None else None,
            parse_duration(a.timeout), ops, _retry(a.retry_policy),
            tuple(("header", wire_bytes(h.header.lower())) if h.header is not None
                  else ("cookie", wire_bytes(h.cookie)) if h.cookie is not None
                  else ("source_ip", b"") for h in a.hash_policy), filters,
            tuple((mp.cluster, mp.percentage / 100.0, mp.body_limit,
                   diff_spec(mp.response_diff), r.name)
                  for mp in a.request_mirror_policies))
    if r.redirect is not None:
        d = r.redirect
        return RedirectAction(
            wire_bytes(d.scheme_redirect) if d.scheme_redirect else None,
            wire_bytes(d.host_redirect) if d.host_redirect else None,
            d.port_redirect,
            wire_bytes(d.path_redirect) if d.path_redirect is not None else None,
            prefix,
            wire_bytes(d.prefix_rewrite) if d.prefix_rewrite is not None else None,
            d.response_code, d.strip_query, ops, filters)
    assert r.direct_response is not None
    dr = r.direct_response
    return DirectAction(dr.status, dr.body.encode("utf-8"), wire_bytes(dr.content_type), ops,
                        filters)


def _retry(rp: schema.RetryPolicy | None) -> RetrySpec | None:
    if rp is None:
        return None
    base = parse_duration(rp.retry_back_off.base_interval)
    cap = rp.retry_back_off.max_interval
    return RetrySpec(conditions(rp.retry_on), rp.num_retries, parse_duration(rp.per_try_timeout),
                     frozenset(rp.retriable_status_codes), base,
                     parse_duration(cap) if cap is not None else 10 * base,
                     rp.include_attempt_count, rp.retry_buffer_limit,
                     grpc_conditions(rp.retry_on))


def _breakers(cb: schema.CircuitBreakers, workers: int) -> BreakerSpec:
    def share(limit: int) -> int:
        return -(-limit // workers)  # ceil

    budget = cb.retry_budget
    return BreakerSpec(share(cb.max_connections), share(cb.max_pending_requests),
                       share(cb.max_requests), share(cb.max_retries),
                       budget.budget_percent if budget is not None else None,
                       budget.min_retry_concurrency if budget is not None else 0,
                       parse_duration(budget.window) if budget and budget.window else 0.0)


def _outlier(od: schema.OutlierDetection | None) -> OutlierSpec | None:
    if od is None:
        return None
    return OutlierSpec(
        od.consecutive_5xx, od.consecutive_gateway_failure, od.enforcing_consecutive_5xx / 100,
        od.enforcing_consecutive_gateway_failure / 100, parse_duration(od.interval),
        parse_duration(od.base_ejection_time), parse_duration(od.max_ejection_time),
        od.max_ejection_percent, od.enforcing_success_rate / 100, od.success_rate_minimum_hosts,
        od.success_rate_request_volume, od.success_rate_stdev_factor / 1000,
        od.failure_percentage_threshold, od.enforcing_failure_percentage / 100,
        od.failure_percentage_minimum_hosts, od.failure_percentage_request_volume)


def _route(vh: schema.VirtualHost, r: schema.Route, filters: RouteFilters | None) -> Route:
    m = r.match
    kind: PathKind
    if m.prefix is not None:
        kind, path = "prefix", m.prefix
    elif m.path is not None:
        kind, path = "path", m.path
    else:
        kind, path = "regex", m.regex or ""
    methods = [wire_bytes(x.upper()) for x in m.methods] if m.methods else None
    headers = [_matcher(h, True) for h in m.headers]
    if m.source_principals is not None:
        headers.append(HeaderMatcher(PRINCIPAL_HEADER, "regex",
                                     wire_bytes(wildcard_regex(m.source_principals,
                                                         strip_scheme=True))))
    return Route(kind, wire_bytes(path), methods, headers,
                 [_matcher(q, False) for q in m.query_parameters],
                 _action(vh, r, filters), m.case_sensitive, r.name)


def _access_log(spec: schema.AccessLog | None, override: str | None) -> AccessLogSpec | None:
    if override is not None:
        if override in ("", "off", "none"):
            return None
        fmt = spec.format if spec is not None else "text"
        return AccessLogSpec(override, fmt, parse_duration(spec.flush_interval) if spec else 1.0)
    if spec is None:
        return None
    return AccessLogSpec(spec.path, spec.format, parse_duration(spec.flush_interval))


def _pair(chain: str, key: str, material: Mapping[str, bytes]) -> KeyPair:
    return KeyPair(chain, material[chain], key, material[key])


def _bundle(path: str | None, material: Mapping[str, bytes]) -> Bundle | None:
    return Bundle(path, material[path]) if path is not None else None


# What ALPN offers when the listener's TLS names no protocols: what its codec speaks, h2
# first (a server picks by its own order, RFC 7301 3.2).
CODEC_ALPN = {"auto": (b"h2", b"http/1.1"), "http1": (b"http/1.1",), "http2": (b"h2",)}


def listener_tls(t: schema.ListenerTLS | None, material: Mapping[str, bytes],
                 codec: str = "auto") -> TLSSpec | None:
    if t is None:
        return None
    alpn = tuple(a.encode() for a in t.alpn) if t.alpn is not None else CODEC_ALPN[codec]
    return TLSSpec(tuple(_pair(c.certificate_chain, c.private_key, material)
                         for c in t.certificates),
                   alpn, parse_duration(t.handshake_timeout),
                   _bundle(t.trusted_ca, material), t.require_client_certificate,
                   tuple(t.match_subject_alt_names), _bundle(t.crl, material),
                   t.only_verify_leaf_cert_crl, t.accept_plaintext)


def _http2(o: schema.Http2Options) -> Http2Spec:
    return Http2Spec(o.max_concurrent_streams, o.initial_stream_window_size,
                     o.initial_connection_window_size, o.hpack_table_size,
                     o.max_outbound_frames, o.max_outbound_control_frames,
                     o.max_consecutive_inbound_frames_with_empty_payload,
                     o.max_inbound_priority_frames_per_stream,
                     o.max_inbound_window_update_frames_per_data_frame_sent,
                     o.allow_connect)


def upstream_tls(t: schema.UpstreamTLS | None, material: Mapping[str, bytes]
                  ) -> UpstreamTLSSpec | None:
    if t is None:
        return None
    cert = (_pair(t.certificate_chain, t.private_key, material)
            if t.certificate_chain is not None and t.private_key is not None else None)
    return UpstreamTLSSpec(t.sni, cert, _bundle(t.trusted_ca, material),
                           tuple(t.match_subject_alt_names), _bundle(t.crl, material),
                           t.only_verify_leaf_cert_crl)


ORIGINAL_DST_ENDPOINT = "original_dst"


def _destinations(lst: schema.Listener, own_ports: frozenset[int]) -> DestinationTable:
    if lst.outbound_traffic_policy == "REGISTRY_ONLY":
        unmatched = DestinationSpec(BLACKHOLE_CLUSTER, BLACKHOLE, BLACKHOLE_CLUSTER)
    elif lst.passthrough_address is not None:
        unmatched = DestinationSpec(INBOUND_PASSTHROUGH_CLUSTER, PASSTHROUGH,
                                    INBOUND_PASSTHROUGH_CLUSTER)
    else:
        unmatched = DestinationSpec(PASSTHROUGH_CLUSTER, PASSTHROUGH, PASSTHROUGH_CLUSTER)
    # A domain that routes to each virtual host, wildcards made concrete ("*.a" -> "x.a",
    # "b*" -> "b", "*" -> "*": the route table takes "*" as any host).
    hosts = {vh.name: vh.domains[0].replace("*.", "x.", 1).rstrip("*").encode() or b"*"
             for vh in lst.virtual_hosts if vh.domains}
    return DestinationTable(list(lst.destinations), unmatched, lst.passthrough_address,
                            parse_duration(lst.protocol_detection_timeout), own_ports, hosts)


def own_clusters(config: schema.Config) -> list[str]:
    """The proxy's own clusters that its intercepting listeners use (the supervisor gives
    them stats slots like any cluster's; the passthrough ones count their connections on
    one endpoint, ORIGINAL_DST_ENDPOINT)."""
    names = []
    for lst in config.listeners:
        if lst.use_original_dst:
            names += [BLACKHOLE_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER
                      if lst.passthrough_address is not None else PASSTHROUGH_CLUSTER]
    return sorted(set(names))


def compile_config(config: schema.Config, version: int = 1,
                   access_log_override: str | None = None, workers: int = 1,
                   material: Mapping[str, bytes] | None = None,
                   memory: Memory = private_memory) -> Snapshot:
    """Build the runtime snapshot. The config must have passed load.check(); `material`
    holds the bytes of every file load.tls_files() names (the supervisor read them);
    `memory` places each rate limiter's bucket table (shared memory in workers)."""
    material = material or {}
    limiters: dict[str, LocalRateLimiter] = {}
    listeners = []
    own_ports = frozenset(lst.port for lst in config.listeners if lst.port)
    for lst in config.listeners:
        vhosts = []
        listener_authz = compile_policies(lst.authorization_policies)
        listener_python = python_filters(lst.filters, lst.name) if lst.filters else ()
        for vh in lst.virtual_hosts:
            routes = [_route(vh, r, _filters(lst, vh, k, r, memory, limiters, listener_authz,
                                             listener_python))
                      for k, r in enumerate(vh.routes)]
            vhosts.append((VirtualHost(vh.name, routes), list(vh.domains)))
        listeners.append(ListenerSpec(
            lst.name, lst.address, lst.port, RouteTable(vhosts),
            parse_duration(lst.request_headers_timeout), parse_duration(lst.idle_timeout),
            lst.max_request_line, lst.max_request_headers_kb * 1024, lst.max_headers_count,
            _access_log(lst.access_log or config.access_log, access_log_override),
            parse_duration(lst.max_connection_duration),
            listener_tls(lst.tls, material, lst.codec),
            any(r.match.source_principals is not None
                for vh in lst.virtual_hosts for r in vh.routes), listener_authz,
            parse_duration(lst.on_demand_timeout), lst.codec, _http2(lst.http2),
            _destinations(lst, own_ports) if lst.use_original_dst else None))
    clusters = {
        c.name: ClusterSpec(
            c.name, tuple((e.address, e.port, e.weight) for e in c.endpoints),
            parse_duration(c.connect_timeout), parse_duration(c.idle_timeout),
            c.max_idle_connections, _breakers(c.circuit_breakers, max(1, workers)),
            _outlier(c.outlier_detection), c.healthy_panic_threshold,
            c.health_check is not None, c.lb_policy,
            (("minimum_ring_size", c.minimum_ring_size),
             ("maximum_ring_size", c.maximum_ring_size), ("table_size", c.maglev_table_size),
             ("decay", parse_duration(c.peak_ewma_decay))),
            parse_duration(c.max_connection_duration),
            tuple((e.priority, e.locality) for e in c.endpoints),
            tuple(sorted(c.locality_weights.items())) if c.locality_weights is not None
            else None,
            c.overprovisioning_factor / 100, upstream_tls(c.tls, material), c.protocol,
            UpstreamHttp2Spec(c.http2.max_concurrent_streams,
                              c.http2.initial_stream_window_size,
                              c.http2.initial_connection_window_size,
                              c.http2.hpack_table_size))
        for c in config.clusters
    }
    for name in own_clusters(config):
        # No endpoints: a passed-through connection goes to its original destination,
        # a refused one nowhere; the spec gives them their stats and breakers.
        clusters[name] = ClusterSpec(name, (), 10.0, 60.0, 0)
    return Snapshot(version, config, tuple(listeners), clusters, _tracing(config.tracing))


def rate_limit_specs(lst: schema.Listener, vh: schema.VirtualHost, k: int, r: schema.Route
                     ) -> RateLimitSpec | None:
    """The limit of route k of `vh`: the route's own, else its virtual host's. The name is
    the shared table's: a virtual host's limit is one set of buckets for all its routes."""
    rl = r.local_rate_limit or vh.local_rate_limit
    if rl is None:
        return None
    where = f"{lst.name}/{vh.name}" + (f"/routes[{k}]" if r.local_rate_limit else "")
    tb = rl.token_bucket
    window = parse_duration(tb.fill_interval)
    key, header = "", b""
    if rl.key is not None:
        if rl.key.header is not None:
            key, header = "header", wire_bytes(rl.key.header.lower())
        elif rl.key.source_principal:
            key = "source_principal"
        else:
            key = "remote_address"
    nkeys = rl.max_keys if key else 1
    return RateLimitSpec(f"{where}#{nkeys}", tb.max_tokens, tb.tokens_per_fill / window,
                         window, key, header, nkeys, rl.response_headers)


def diff_spec(d: schema.ResponseDiff | None) -> DiffSpec | None:
    """A mirror policy's response comparison (filters.mirror_diff), or None."""
    if d is None:
        return None
    paths = tuple(p for p in (json_path(x) for x in d.ignore_json_paths) if p is not None)
    return DiffSpec(tuple(wire_bytes(h.lower()) for h in d.headers), paths, d.max_body_bytes)


def compared_routes(config: schema.Config) -> list[str]:
    """The routes whose mirrored responses are compared: each has mirror.<name>.* stats
    (the supervisor gives them slots)."""
    out: dict[str, None] = {}
    for lst in config.listeners:
        for vh in lst.virtual_hosts:
            for r in vh.routes:
                if r.route is not None and any(
                        mp.response_diff is not None for mp in r.route.request_mirror_policies):
                    out[r.name] = None
    return list(out)


def rate_limit_tables(config: schema.Config) -> dict[str, int]:
    """name -> int64 cells of every rate limiter's bucket table (the supervisor places
    them in shared memory)."""
    out: dict[str, int] = {}
    for lst in config.listeners:
        for vh in lst.virtual_hosts:
            for k, r in enumerate(vh.routes):
                spec = rate_limit_specs(lst, vh, k, r)
                if spec is not None:
                    out[spec.name] = spec.cells
    return out


def python_filters(filters: list[schema.PythonFilter], where: str) -> tuple[LoadedFilter, ...]:
    """Import and build a list of Python filters (filters.python) once for this snapshot;
    ConfigError names the filter that could not be."""
    out = []
    errors = []
    for k, f in enumerate(filters):
        try:
            out.append(load(f.python, f.config, parse_duration(f.timeout), f.name))
        except FilterLoadError as exc:
            errors.append(f"{where}.filters[{k}].python: {exc}")
    if errors:
        raise ConfigError(errors)
    return tuple(out)


def _filters(lst: schema.Listener, vh: schema.VirtualHost, k: int, r: schema.Route,
             memory: Memory, limiters: dict[str, LocalRateLimiter],
             listener_authz: Authorizer | None,
             listener_python: tuple[LoadedFilter, ...] = ()) -> RouteFilters | None:
    # Compiled once per listener; a route with its own policies compiles those.
    authz = (compile_policies(r.authorization_policies)
             if r.authorization_policies is not None else listener_authz)
    spec = rate_limit_specs(lst, vh, k, r)
    limiter = None
    if spec is not None:
        limiter = limiters.get(spec.name)
        if limiter is None:
            limiter = limiters[spec.name] = LocalRateLimiter(spec, memory)
    fault = fault_policy(r.fault) if r.fault is not None else None
    cors = cors_policy(r.cors) if r.cors is not None else None
    python = listener_python + (python_filters(r.filters, f"{lst.name}/{vh.name}/routes[{k}]")
                                if r.filters else ())
    if authz is None and limiter is None and fault is None and cors is None and not python:
        return None
    return RouteFilters(authz, limiter, fault, cors, python)


def cors_policy(c: schema.Cors) -> CorsPolicy:
    """A route's CORS policy (filters.cors): origins as bytes, max_age in seconds."""
    matches = []
    for m in c.allow_origins:
        kind = next(k for k in ("exact", "prefix", "suffix", "regex") if getattr(m, k) is not None)
        value = getattr(m, kind).encode("latin-1")
        if m.ignore_case and kind != "regex":
            value = value.lower()
        matches.append(OriginMatch(kind, value, m.ignore_case))
    return CorsPolicy(matches, c.allow_methods, c.allow_headers, c.expose_headers,
                      parse_duration(c.max_age) if c.max_age is not None else None,
                      c.allow_credentials, c.forward_not_matching_preflights)


def fault_policy(f: schema.Fault) -> FaultPolicy:
    """A route's fault configuration in seconds and fractions (filters.fault)."""
    d, a = f.delay, f.abort
    return FaultPolicy(FaultSpec(
        delay=parse_duration(d.fixed_delay) if d is not None and d.fixed_delay is not None
        else None,
        delay_fraction=d.percentage / 100.0 if d is not None else 0.0,
        header_delay=d is not None and d.header_delay,
        abort_status=a.http_status or 0 if a is not None else 0,
        abort_grpc=a.grpc_status if a is not None and a.grpc_status is not None else -1,
        abort_fraction=a.percentage / 100.0 if a is not None else 0.0,
        header_abort=a is not None and a.header_abort,
        max_active=f.max_active_faults if f.max_active_faults is not None else -1))
