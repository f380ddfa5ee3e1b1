"""Checks of the filter configuration a field's type cannot express (authorization
policies, local rate limits, faults, CORS); every error names the field's path."""

from __future__ import annotations

import ipaddress
import re

from meshproxy.config import schema
from meshproxy.config.durations import parse_duration
from meshproxy.filters.authz import CONDITION_KEYS, known_condition_key


def _networks(blocks: list[str], path: str, errors: list[str]) -> None:
    for k, b in enumerate(blocks):
        try:
            ipaddress.ip_network(b, strict=False)
        except ValueError:
            errors.append(f"{path}[{k}]: not an IP address or CIDR block: {b!r}")


def _wildcards(values: list[str], path: str, errors: list[str]) -> None:
    for k, v in enumerate(values):
        inner = v[1:] if v.startswith("*") else v[:-1] if v.endswith("*") else v
        if "*" in inner:
            errors.append(f"{path}[{k}]: a match is exact, `prefix*`, `*suffix` or `*`, "
                          f"got {v!r}")


def check_policies(policies: list[schema.AuthorizationPolicy], path: str,
                   errors: list[str]) -> None:
    names: set[str] = set()
    for i, pol in enumerate(policies):
        pp = f"{path}[{i}]"
        if pol.name in names:
            errors.append(f"{pp}.name: duplicate policy name {pol.name!r}")
        names.add(pol.name)
        for j, rule in enumerate(pol.rules):
            rp = f"{pp}.rules[{j}]"
            for k, src in enumerate(rule.from_):
                sp = f"{rp}.from[{k}]"
                _networks(src.ip_blocks, f"{sp}.ip_blocks", errors)
                _networks(src.not_ip_blocks, f"{sp}.not_ip_blocks", errors)
                for fname in ("principals", "not_principals", "namespaces", "not_namespaces"):
                    _wildcards(getattr(src, fname), f"{sp}.{fname}", errors)
            for k, op in enumerate(rule.to):
                for fname in ("hosts", "not_hosts", "methods", "not_methods", "paths",
                              "not_paths"):
                    _wildcards(getattr(op, fname), f"{rp}.to[{k}].{fname}", errors)
            for k, cond in enumerate(rule.when):
                cp = f"{rp}.when[{k}]"
                if not known_condition_key(cond.key):
                    errors.append(f"{cp}.key: unknown key {cond.key!r} (known: "
                                  f"{', '.join(CONDITION_KEYS)})")
                    continue
                if not cond.values and not cond.not_values:
                    errors.append(f"{cp}: values or not_values is required")
                if cond.key == "source.ip":
                    _networks(cond.values, f"{cp}.values", errors)
                    _networks(cond.not_values, f"{cp}.not_values", errors)
                else:
                    _wildcards(cond.values, f"{cp}.values", errors)
                    _wildcards(cond.not_values, f"{cp}.not_values", errors)


def check_rate_limit(rl: schema.LocalRateLimit | None, path: str, errors: list[str]) -> None:
    if rl is None:
        return
    try:
        if parse_duration(rl.token_bucket.fill_interval) <= 0:
            errors.append(f"{path}.token_bucket.fill_interval: must be more than 0")
    except ValueError as exc:
        errors.append(f"{path}.token_bucket.fill_interval: {exc}")
    if rl.key is not None:
        given = [rl.key.header is not None, rl.key.source_principal, rl.key.remote_address]
        if sum(given) != 1:
            errors.append(f"{path}.key: exactly one of header, source_principal, "
                          "remote_address is required")


# A configured delay is at most an hour (a fault tests a caller's patience; it is not a
# way to hold connections open indefinitely).
MAX_FAULT_DELAY = 3600.0


def check_fault(fault: schema.Fault | None, path: str, errors: list[str]) -> None:
    """Envoy's HTTPFault rules: a delay or an abort; a delay is fixed or the header's, an
    abort an HTTP status, a gRPC status or the header's."""
    if fault is None:
        return
    if fault.delay is None and fault.abort is None:
        errors.append(f"{path}: at least one of delay, abort is required")
    d = fault.delay
    if d is not None:
        if (d.fixed_delay is not None) == d.header_delay:
            errors.append(f"{path}.delay: exactly one of fixed_delay, header_delay is required")
        if d.fixed_delay is not None:
            try:
                if parse_duration(d.fixed_delay) > MAX_FAULT_DELAY:
                    errors.append(f"{path}.delay.fixed_delay: at most 1h")
            except ValueError as exc:
                errors.append(f"{path}.delay.fixed_delay: {exc}")
    a = fault.abort
    if a is not None and (a.http_status is not None) + (a.grpc_status is not None) + (
            a.header_abort) != 1:
        errors.append(f"{path}.abort: exactly one of http_status, grpc_status, "
                      "header_abort is required")


def check_cors(cors: schema.Cors | None, path: str, errors: list[str]) -> None:
    """Each allowed origin is exactly one match, its regex compiles; max_age parses."""
    if cors is None:
        return
    for k, m in enumerate(cors.allow_origins):
        mp = f"{path}.allow_origins[{k}]"
        given = [n for n in ("exact", "prefix", "suffix", "regex") if getattr(m, n) is not None]
        if len(given) != 1:
            errors.append(f"{mp}: exactly one of exact, prefix, suffix, regex is required")
        if m.regex is not None:
            try:
                re.compile(m.regex)
            except re.error as exc:
                errors.append(f"{mp}.regex: invalid regex: {exc}")
    if cors.max_age is not None:
        try:
            parse_duration(cors.max_age)
        except ValueError as exc:
            errors.append(f"{path}.max_age: {exc}")
