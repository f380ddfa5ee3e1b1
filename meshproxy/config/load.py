"""Decode a YAML or JSON config into `schema.Config`, reporting every error with its path.

msgspec stops at the first error, so the raw document is first walked against the Struct
types field by field: each leaf is converted on its own and each failure is recorded with
its path (`listeners[0].virtual_hosts[0].routes[2].match.prefix: expected str, got int`).
Only a document with no structural error is converted in one call; then the cross-field
rules run (exactly one action, known clusters, unique names, compilable regexes).

Sans-IO apart from `load_file`, which reads the file and nothing else.
"""

from __future__ import annotations

import ipaddress
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import msgspec
import yaml

from meshproxy.config import schema
from meshproxy.config.check_filters import (
    check_cors,
    check_fault,
    check_policies,
    check_rate_limit,
)
from meshproxy.config.durations import parse_duration
from meshproxy.config.wire import wire_bytes
from meshproxy.filters.mirror_diff import json_path


class ConfigError(Exception):
    """A config that must not be adopted; `errors` lists one line per problem."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(errors))


_MSGSPEC_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<at>[^`]*)`)?$", re.S)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _reword(exc: msgspec.ValidationError, path: str) -> str:
    m = _MSGSPEC_AT.match(str(exc))
    assert m is not None
    msg = m.group("msg").replace("`", "")
    msg = msg[:1].lower() + msg[1:]
    msg = msg.replace(" | null", "")  # optional fields: say what is expected, not "or null"
    at = m.group("at") or ""
    full = (path + at).lstrip(".")
    return f"{full or '(root)'}: {msg}"


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return tp
    return None


def _optional_struct(tp: Any) -> type[msgspec.Struct] | None:
    """S for `S | None`, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _struct_of(args[0])
    return None


def _list_item_struct(tp: Any) -> type[msgspec.Struct] | None:
    """S for `list[S]`, `list[S] | None`, or either with constraints (Annotated)."""
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            return None
        tp = args[0]
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return _struct_of(item)
    return None


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


def walk(value: Any, cls: type[msgspec.Struct], path: str, errors: list[str]) -> None:
    """Record every structural error of `value` against Struct `cls`."""
    if not isinstance(value, dict):
        errors.append(f"{path or '(root)'}: expected object, got {_type_name(value)}")
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    for key in value:
        if key not in fields:
            errors.append(f"{_join(path, str(key))}: unknown field")
    for name, f in fields.items():
        sub = _join(path, name)
        if name not in value:
            if f.required:
                errors.append(f"{sub}: missing required field")
            continue
        v = value[name]
        struct = _struct_of(f.type) or (_optional_struct(f.type) if v is not None else None)
        item = _list_item_struct(f.type)
        if struct is not None:
            walk(v, struct, sub, errors)
        elif item is not None and isinstance(v, list):
            if typing.get_origin(f.type) is typing.Annotated:
                # The list's own constraints (a minimum length), then each item's fields.
                try:
                    msgspec.convert(v, typing.Annotated[list[Any], *typing.get_args(f.type)[1:]])
                except msgspec.ValidationError as exc:
                    errors.append(_reword(exc, sub))
            for i, element in enumerate(v):
                walk(element, item, f"{sub}[{i}]", errors)
        else:
            try:
                msgspec.convert(v, f.type)
            except msgspec.ValidationError as exc:
                errors.append(_reword(exc, sub))


def decode(raw: Any, source: str = "") -> schema.Config:
    """Raw document (dicts and lists) -> Config, or ConfigError listing every problem."""
    errors: list[str] = []
    walk(raw, schema.Config, "", errors)
    if errors:
        raise ConfigError(errors, source)
    try:
        config = msgspec.convert(raw, schema.Config)
    except msgspec.ValidationError as exc:  # the walk should have caught it; never lose it
        raise ConfigError([_reword(exc, "")], source) from None
    errors = check(config)
    if errors:
        raise ConfigError(errors, source)
    return config


def parse_text(text: str, source: str = "") -> Any:
    """YAML (a superset of JSON) text -> raw document."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{where}invalid YAML/JSON: {problem}"], source) from None


def load_file(path: str | Path) -> schema.Config:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read config: {exc}"], source) from None
    return decode(parse_text(text, source), source)


# ---------------------------------------------------------------- cross-field rules


def _exactly_one(obj: Any, names: tuple[str, ...], path: str, errors: list[str]) -> None:
    given = [n for n in names if getattr(obj, n) not in (None, False)]
    if len(given) != 1:
        which = ", ".join(given) if given else "none"
        errors.append(f"{path}: exactly one of {', '.join(names)} is required (got {which})")


def _check_regex(pattern: str | None, path: str, errors: list[str]) -> None:
    if pattern is None:
        return
    try:
        re.compile(wire_bytes(pattern))  # as the route table compiles it (config.wire)
    except re.error as exc:
        errors.append(f"{path}: invalid regex: {exc}")


def check_duration(value: str | float, path: str, errors: list[str]) -> None:
    try:
        parse_duration(value)
    except ValueError as exc:
        errors.append(f"{path}: {exc}")


def _check_domain(domain: str, path: str, errors: list[str]) -> None:
    if domain == "*":
        return
    stars = domain.count("*")
    if stars > 1 or (stars == 1 and not (domain.startswith("*") or domain.endswith("*"))):
        errors.append(f"{path}: a wildcard is `*`, `*suffix` or `prefix*`, got {domain!r}")


_MATCHER_KINDS = ("exact", "prefix", "suffix", "regex", "present", "absent")


def check_match(match: schema.RouteMatch, path: str, errors: list[str]) -> None:
    """The rules of one RouteMatch (also the control plane's Route resources')."""
    _exactly_one(match, ("prefix", "path", "regex"), path, errors)
    if match.source_principals is not None and not match.source_principals:
        errors.append(f"{path}.source_principals: must not be empty")
    _check_regex(match.regex, f"{path}.regex", errors)
    groups: tuple[tuple[str, list[schema.QueryParameterMatch]], ...] = (
        ("headers", list(match.headers)), ("query_parameters", match.query_parameters))
    for kind, matchers in groups:
        for k, hm in enumerate(matchers):
            mp = f"{path}.{kind}[{k}]"
            _exactly_one(hm, _MATCHER_KINDS, mp, errors)
            _check_regex(hm.regex, f"{mp}.regex", errors)


def check_outlier(od: schema.OutlierDetection | None, path: str, errors: list[str]) -> None:
    if od is not None:
        for fname in ("interval", "base_ejection_time", "max_ejection_time"):
            check_duration(getattr(od, fname), f"{path}.{fname}", errors)


def check_retry_policy(rp: schema.RetryPolicy | None, path: str, errors: list[str]) -> None:
    if rp is None:
        return
    for cond in (c.strip() for c in rp.retry_on.split(",")):
        if cond not in schema.RETRY_ON:
            errors.append(f"{path}.retry_on: unknown condition {cond!r} "
                          f"(known: {', '.join(schema.RETRY_ON)})")
    check_duration(rp.per_try_timeout, f"{path}.per_try_timeout", errors)
    check_duration(rp.retry_back_off.base_interval,
                    f"{path}.retry_back_off.base_interval", errors)
    if rp.retry_back_off.max_interval is not None:
        check_duration(rp.retry_back_off.max_interval,
                        f"{path}.retry_back_off.max_interval", errors)


def _check_route(route: schema.Route, path: str, clusters: set[str], errors: list[str]) -> None:
    check_match(route.match, f"{path}.match", errors)
    if route.authorization_policies is not None:
        check_policies(route.authorization_policies, f"{path}.authorization_policies", errors)
    check_rate_limit(route.local_rate_limit, f"{path}.local_rate_limit", errors)
    check_fault(route.fault, f"{path}.fault", errors)
    check_cors(route.cors, f"{path}.cors", errors)
    _exactly_one(route, ("route", "redirect", "direct_response"), path, errors)
    action = route.route
    if action is not None:
        ap = f"{path}.route"
        _exactly_one(action, ("cluster", "weighted_clusters"), ap, errors)
        check_duration(action.timeout, f"{ap}.timeout", errors)
        if action.cluster is not None and action.cluster not in clusters:
            errors.append(f"{ap}.cluster: unknown cluster {action.cluster!r}")
        for k, mp in enumerate(action.request_mirror_policies):
            mpath = f"{ap}.request_mirror_policies[{k}]"
            if mp.cluster not in clusters:
                errors.append(f"{mpath}.cluster: unknown cluster {mp.cluster!r}")
            if mp.response_diff is not None:
                if not route.name:
                    errors.append(f"{mpath}.response_diff: the route needs a name (its "
                                  "diffs are counted as mirror.<name>.*)")
                for j, jp in enumerate(mp.response_diff.ignore_json_paths):
                    if json_path(jp) is None:
                        errors.append(f"{mpath}.response_diff.ignore_json_paths[{j}]: "
                                      f"not a path: {jp!r}")
        if action.weighted_clusters is not None:
            if not action.weighted_clusters:
                errors.append(f"{ap}.weighted_clusters: must not be empty")
            elif sum(w.weight for w in action.weighted_clusters) <= 0:
                errors.append(f"{ap}.weighted_clusters: weights must not all be 0")
            for k, wc in enumerate(action.weighted_clusters):
                if wc.name not in clusters:
                    errors.append(f"{ap}.weighted_clusters[{k}].name: unknown cluster {wc.name!r}")
        if action.prefix_rewrite is not None and route.match.prefix is None:
            errors.append(f"{ap}.prefix_rewrite: needs a prefix match")
        for k, hp in enumerate(action.hash_policy):
            given = [hp.header is not None, hp.cookie is not None, hp.source_ip]
            if sum(given) != 1:
                errors.append(f"{ap}.hash_policy[{k}]: exactly one of header, cookie, "
                              "source_ip is required")
        check_retry_policy(action.retry_policy, f"{ap}.retry_policy", errors)
    if route.redirect is not None and route.redirect.prefix_rewrite is not None:
        if route.redirect.path_redirect is not None:
            errors.append(f"{path}.redirect: path_redirect and prefix_rewrite exclude each other")
        if route.match.prefix is None:
            errors.append(f"{path}.redirect.prefix_rewrite: needs a prefix match")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    k = 2
    while k * k <= n:
        if n % k == 0:
            return False
        k += 1
    return True


def check(config: schema.Config) -> list[str]:
    """The rules a single field's type cannot express. Returns the errors, in order."""
    errors: list[str] = []
    clusters: set[str] = set()
    for i, c in enumerate(config.clusters):
        p = f"clusters[{i}]"
        if c.name in clusters:
            errors.append(f"{p}.name: duplicate cluster name {c.name!r}")
        if c.name in RESERVED_CLUSTERS:
            errors.append(f"{p}.name: {c.name!r} is the proxy's own (listeners that use "
                          "original destinations pass through to it or refuse with it)")
        clusters.add(c.name)
        check_duration(c.connect_timeout, f"{p}.connect_timeout", errors)
        check_duration(c.idle_timeout, f"{p}.idle_timeout", errors)
        check_duration(c.peak_ewma_decay, f"{p}.peak_ewma_decay", errors)
        check_duration(c.max_connection_duration, f"{p}.max_connection_duration", errors)
        if c.minimum_ring_size > c.maximum_ring_size:
            errors.append(f"{p}.maximum_ring_size: must be at least minimum_ring_size "
                          f"({c.minimum_ring_size}), got {c.maximum_ring_size}")
        if c.lb_policy == "maglev" and not _is_prime(c.maglev_table_size):
            errors.append(f"{p}.maglev_table_size: must be a prime, got {c.maglev_table_size}")
        if c.health_check is not None:
            for fname in ("interval", "timeout", "interval_jitter"):
                check_duration(getattr(c.health_check, fname), f"{p}.health_check.{fname}",
                                errors)
        check_outlier(c.outlier_detection, f"{p}.outlier_detection", errors)
        budget = c.circuit_breakers.retry_budget
        if budget is not None and budget.window is not None:
            check_duration(budget.window, f"{p}.circuit_breakers.retry_budget.window", errors)
        if c.tls is not None and (c.tls.certificate_chain is None) != (c.tls.private_key is None):
            errors.append(f"{p}.tls: certificate_chain and private_key go together")
        if c.tls is not None and c.tls.crl is not None and c.tls.trusted_ca is None:
            errors.append(f"{p}.tls.crl: needs trusted_ca (endpoints are verified against it)")
    if not config.listeners:
        errors.append("listeners: at least one listener is required")
    if config.tracing is not None:
        check_duration(config.tracing.flush_interval, "tracing.flush_interval", errors)
        check_duration(config.tracing.export_timeout, "tracing.export_timeout", errors)
    names: set[str] = set()
    binds: set[tuple[str, int]] = set()
    for i, lst in enumerate(config.listeners):
        p = f"listeners[{i}]"
        if lst.name in names:
            errors.append(f"{p}.name: duplicate listener name {lst.name!r}")
        names.add(lst.name)
        if lst.port and (lst.address, lst.port) in binds:
            errors.append(f"{p}.port: {lst.address}:{lst.port} is used by another listener")
        binds.add((lst.address, lst.port))
        check_duration(lst.request_headers_timeout, f"{p}.request_headers_timeout", errors)
        check_duration(lst.idle_timeout, f"{p}.idle_timeout", errors)
        check_duration(lst.max_connection_duration, f"{p}.max_connection_duration", errors)
        if lst.tls is not None:
            check_duration(lst.tls.handshake_timeout, f"{p}.tls.handshake_timeout", errors)
            alpn = lst.tls.alpn
            if alpn is not None:
                if not alpn:
                    errors.append(f"{p}.tls.alpn: must not be empty")
                elif lst.codec == "http1" and "h2" in alpn:
                    errors.append(f"{p}.tls.alpn: offers h2, but the codec is http1")
                elif lst.codec == "http2" and "http/1.1" in alpn:
                    errors.append(f"{p}.tls.alpn: offers http/1.1, but the codec is http2")
            if lst.tls.trusted_ca is None:
                for fname in ("require_client_certificate", "match_subject_alt_names", "crl"):
                    if getattr(lst.tls, fname):
                        errors.append(f"{p}.tls.{fname}: needs trusted_ca (client "
                                      "certificates are verified against it)")
        check_policies(lst.authorization_policies, f"{p}.authorization_policies", errors)
        _check_destinations(lst, p, clusters, errors)
        seen: dict[str, str] = {}
        for j, vh in enumerate(lst.virtual_hosts):
            vp = f"{p}.virtual_hosts[{j}]"
            check_rate_limit(vh.local_rate_limit, f"{vp}.local_rate_limit", errors)
            for k, d in enumerate(vh.domains):
                _check_domain(d, f"{vp}.domains[{k}]", errors)
                if d.lower() in seen:
                    errors.append(f"{vp}.domains[{k}]: {d!r} is already served by "
                                  f"virtual host {seen[d.lower()]!r}")
                seen[d.lower()] = vh.name
            for k, route in enumerate(vh.routes):
                _check_route(route, f"{vp}.routes[{k}]", clusters, errors)
    for where, path in tls_files(config):
        # "sds:" names are secrets the proxy holds in memory (its mesh identity), checked
        # by the supervisor when it resolves them (process/cert_watch.py).
        if not path.startswith("sds:") and not os.path.isfile(path):
            errors.append(f"{where}: no such file {path!r}")
    return errors


# The clusters a listener with use_original_dst passes through to and refuses with
# (Istio's names); a config's own cluster may not take them.
PASSTHROUGH_CLUSTER = "PassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
RESERVED_CLUSTERS = (PASSTHROUGH_CLUSTER, INBOUND_PASSTHROUGH_CLUSTER, BLACKHOLE_CLUSTER)


def _check_destinations(lst: schema.Listener, p: str, clusters: set[str],
                        errors: list[str]) -> None:
    check_duration(lst.protocol_detection_timeout, f"{p}.protocol_detection_timeout", errors)
    if lst.destinations and not lst.use_original_dst:
        errors.append(f"{p}.destinations: need use_original_dst (they match the original "
                      "destination of intercepted connections)")
    if lst.passthrough_address is not None:
        try:
            ipaddress.ip_address(lst.passthrough_address)
        except ValueError:
            errors.append(f"{p}.passthrough_address: {lst.passthrough_address!r} is not an "
                          "IP address")
    seen: set[tuple[str, int]] = set()
    for j, d in enumerate(lst.destinations):
        dp = f"{p}.destinations[{j}]"
        for k, a in enumerate(d.addresses):
            try:
                net = ipaddress.ip_network(a, strict=True)
            except ValueError as exc:
                errors.append(f"{dp}.addresses[{k}]: {exc}")
                continue
            if (str(net), d.port) in seen:
                errors.append(f"{dp}.addresses[{k}]: {a}:{d.port} is matched by an earlier "
                              "destination")
            seen.add((str(net), d.port))
        if not d.addresses:
            if ("", d.port) in seen:
                errors.append(f"{dp}.port: any address on port {d.port} is matched by an "
                              "earlier destination")
            seen.add(("", d.port))
        if d.protocol in ("tcp", "auto") and d.cluster is None:
            errors.append(f"{dp}.cluster: a {d.protocol} destination needs a cluster")
        if d.cluster is not None and d.cluster not in clusters:
            errors.append(f"{dp}.cluster: no cluster named {d.cluster!r}")
        if d.virtual_host is not None:
            vh = next((v for v in lst.virtual_hosts if v.name == d.virtual_host), None)
            if vh is None or not vh.domains:
                errors.append(f"{dp}.virtual_host: no virtual host named {d.virtual_host!r} "
                              "with a domain")


def tls_files(config: schema.Config) -> list[tuple[str, str]]:
    """Every certificate, key and bundle file the config names, with the field naming it:
    what the supervisor reads, checks, watches for rotation and sends to the workers."""
    out: list[tuple[str, str]] = []
    for i, lst in enumerate(config.listeners):
        if lst.tls is None:
            continue
        p = f"listeners[{i}].tls"
        for k, cert in enumerate(lst.tls.certificates):
            out.append((f"{p}.certificates[{k}].certificate_chain", cert.certificate_chain))
            out.append((f"{p}.certificates[{k}].private_key", cert.private_key))
        for fname in ("trusted_ca", "crl"):
            path = getattr(lst.tls, fname)
            if path is not None:
                out.append((f"{p}.{fname}", path))
    for i, c in enumerate(config.clusters):
        if c.tls is None:
            continue
        for fname in ("certificate_chain", "private_key", "trusted_ca", "crl"):
            path = getattr(c.tls, fname)
            if path is not None:
                out.append((f"clusters[{i}].tls.{fname}", path))
    return out
