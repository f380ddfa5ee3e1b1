"""Authorization policies with Istio's AuthorizationPolicy semantics (sans-IO).

A policy has an action (DENY, ALLOW, AUDIT) and rules. A rule matches when all of its
parts match: any of its `from` sources, any of its `to` operations, and every `when`
condition (a missing part matches anything). Within a source or operation every field that
is set must match, a field matching when any of its values does and none of its `not_`
values does. A policy matches when any of its rules does; a policy with no rules matches
nothing (so an ALLOW policy without rules is Istio's "allow nothing").

Decision (Istio's order): a matching DENY policy denies; otherwise, when there are ALLOW
policies, one of them must match or the request is denied; otherwise it is allowed. AUDIT
policies never change the decision: a match is counted (rbac.shadow_denied, Envoy's
shadow-rules stat) and named in the log.

Values are Istio's string matches: exact, "prefix*", "*suffix", or "*" (present). Each
field's values are compiled once per config snapshot into one full-match regex, so a check
is a handful of regex calls on short strings, only for requests a policy applies to.
TCP connections (an intercepting listener's, proxy.tcp_proxy) are decided as Istio decides
them: `check_tcp` on a Request with no method, path, host or headers, where a rule of an
ALLOW (or AUDIT) policy that needs an HTTP-only field (hosts, methods, paths, a request.*
condition, or their not_ forms) never matches, and a rule of a DENY policy is evaluated
without its HTTP-only fields (so it denies more, never less).
Principals are SPIFFE IDs without the scheme (cluster.local/ns/default/sa/web); a request
without a verified client certificate has no principal and no namespace, so it never
matches `principals: ["*"]` (Istio's way of saying "any authenticated client").
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from meshproxy.config import schema

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Request:
    """What a policy can look at, gathered by the data path for one request."""

    method: str
    path: str          # without the query
    host: str          # Host, lowercased, port dropped
    port: int          # the listener's port (Istio's destination port)
    source_ip: str
    principal: str     # "" without a verified client certificate
    namespace: str
    header: Callable[[str], str | None]  # a request header's value by lowercased name


def wildcard_regex(values: list[str], lower: bool = False, strip_scheme: bool = False) -> str:
    """Istio's string matches (exact, "prefix*", "*suffix", "*" = present) as one full-match
    regex; strip_scheme drops "spiffe://" (principals are written without it)."""
    alts = []
    for v in values:
        if strip_scheme and v.startswith("spiffe://"):
            v = v[len("spiffe://"):]
        if lower:
            v = v.lower()
        if v == "*":
            alts.append(".+")
        elif v.endswith("*"):
            alts.append(re.escape(v[:-1]) + ".*")
        elif v.startswith("*"):
            alts.append(".*" + re.escape(v[1:]))
        else:
            alts.append(re.escape(v))
    return "(?:" + "|".join(alts) + ")"


def _pattern(values: list[str], lower: bool = False, strip_scheme: bool = False) -> re.Pattern[str]:
    return re.compile(wildcard_regex(values, lower, strip_scheme), re.DOTALL)


class _Field:
    """One field of a source or operation: any of `values`, none of `not_values`; `http`:
    a field only HTTP requests have (not a TCP connection)."""

    __slots__ = ("get", "yes", "no", "http")

    def __init__(self, get: Callable[[Request], str | None], yes: re.Pattern[str] | None,
                 no: re.Pattern[str] | None, http: bool = False) -> None:
        self.get, self.yes, self.no, self.http = get, yes, no, http

    def matches(self, r: Request) -> bool:
        value = self.get(r)
        if self.yes is not None and (not value or self.yes.fullmatch(value) is None):
            return False
        return not (self.no is not None and value and self.no.fullmatch(value) is not None)


class _IPField:
    __slots__ = ("yes", "no")
    http = False

    def __init__(self, yes: list[IPNetwork], no: list[IPNetwork]) -> None:
        self.yes, self.no = yes, no

    def matches(self, r: Request) -> bool:
        try:
            ip = ipaddress.ip_address(r.source_ip)
        except ValueError:
            return not self.yes
        if self.yes and not any(ip in net for net in self.yes):
            return False
        return not any(ip in net for net in self.no)


Matcher = _Field | _IPField


def _field(get: Callable[[Request], str | None], yes: list[str], no: list[str],
           lower: bool = False, strip_scheme: bool = False,
           http: bool = False) -> _Field | None:
    if not yes and not no:
        return None
    return _Field(get, _pattern(yes, lower, strip_scheme) if yes else None,
                  _pattern(no, lower, strip_scheme) if no else None, http)


def _networks(blocks: list[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(b, strict=False) for b in blocks]


def _all(fields: list[Matcher | None]) -> tuple[Matcher, ...]:
    return tuple(f for f in fields if f is not None)


def _source(s: schema.AuthzSource) -> tuple[Matcher, ...]:
    ip = _IPField(_networks(s.ip_blocks), _networks(s.not_ip_blocks)) \
        if s.ip_blocks or s.not_ip_blocks else None
    return _all([
        _field(lambda r: r.principal, s.principals, s.not_principals, strip_scheme=True),
        _field(lambda r: r.namespace, s.namespaces, s.not_namespaces),
        ip,
    ])


def _operation(o: schema.AuthzOperation) -> tuple[Matcher, ...]:
    return _all([
        _field(lambda r: r.host, o.hosts, o.not_hosts, lower=True, http=True),
        _field(lambda r: str(r.port), [str(p) for p in o.ports], [str(p) for p in o.not_ports]),
        _field(lambda r: r.method, o.methods, o.not_methods, http=True),
        _field(lambda r: r.path, o.paths, o.not_paths, http=True),
    ])


def _condition_value(key: str) -> Callable[[Request], str | None]:
    if key.startswith("request.headers[") and key.endswith("]"):
        name = key[len("request.headers["):-1].lower()
        return lambda r: r.header(name)
    simple: dict[str, Callable[[Request], str | None]] = {
        "source.ip": lambda r: r.source_ip,
        "source.principal": lambda r: r.principal,
        "source.namespace": lambda r: r.namespace,
        "destination.port": lambda r: str(r.port),
        "request.method": lambda r: r.method,
        "request.path": lambda r: r.path,
        "request.host": lambda r: r.host,
    }
    return simple[key]  # load.check() has refused other keys


CONDITION_KEYS = ("request.headers[<name>]", "source.ip", "source.principal",
                  "source.namespace", "destination.port", "request.method", "request.path",
                  "request.host")


def known_condition_key(key: str) -> bool:
    return (key.startswith("request.headers[") and key.endswith("]") and len(key) > 17) or \
        key in CONDITION_KEYS[1:]


def _condition(c: schema.AuthzCondition) -> Matcher:
    if c.key == "source.ip":
        return _IPField(_networks(c.values), _networks(c.not_values))
    f = _field(_condition_value(c.key), c.values, c.not_values,
               strip_scheme=c.key == "source.principal", http=c.key.startswith("request."))
    assert f is not None  # load.check(): values or not_values
    return f


class _Rule:
    __slots__ = ("sources", "operations", "conditions")

    def __init__(self, rule: schema.AuthzRule) -> None:
        self.sources = [_source(s) for s in rule.from_]
        self.operations = [_operation(o) for o in rule.to]
        self.conditions = _all([_condition(c) for c in rule.when])

    def for_tcp(self, deny: bool) -> _Rule | None:
        """This rule as it applies to a TCP connection (the module's rules): None when it
        can never match one."""
        groups = [*self.sources, *self.operations, self.conditions]
        if not any(f.http for g in groups for f in g):
            return self
        if not deny:
            return None
        out = copy.copy(self)
        out.operations = [tuple(f for f in g if not f.http) for g in self.operations]
        out.conditions = tuple(f for f in self.conditions if not f.http)
        return out

    def matches(self, r: Request) -> bool:
        # Plain loops, not any()/all() over generators: this runs per request.
        if self.sources and not _any_group(self.sources, r):
            return False
        if self.operations and not _any_group(self.operations, r):
            return False
        for f in self.conditions:  # noqa: SIM110 - a loop: no generator per request
            if not f.matches(r):
                return False
        return True


def _any_group(groups: list[tuple[Matcher, ...]], r: Request) -> bool:
    """Any group whose every matcher matches (an empty group matches)."""
    for fs in groups:
        for f in fs:
            if not f.matches(r):
                break
        else:
            return True
    return False


class _Policy:
    __slots__ = ("name", "rules")

    def __init__(self, p: schema.AuthorizationPolicy) -> None:
        self.name = p.name
        self.rules = [_Rule(r) for r in p.rules]

    def for_tcp(self, deny: bool) -> _Policy:
        out = copy.copy(self)
        out.rules = [t for t in (r.for_tcp(deny) for r in self.rules) if t is not None]
        return out

    def matches(self, r: Request) -> bool:
        for rule in self.rules:  # noqa: SIM110 - a loop: no generator per request
            if rule.matches(r):
                return True
        return False


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy: str   # the deciding policy ("" when none matched)
    audited: str  # the AUDIT policy that matched, or ""


class Authorizer:
    """The compiled policies of one listener or route."""

    __slots__ = ("deny", "allow", "audit", "_tcp")

    def __init__(self, policies: list[schema.AuthorizationPolicy]) -> None:
        self.deny = [_Policy(p) for p in policies if p.action == "DENY"]
        self.allow = [_Policy(p) for p in policies if p.action == "ALLOW"]
        self.audit = [_Policy(p) for p in policies if p.action == "AUDIT"]
        self._tcp: Authorizer | None = None

    def check_tcp(self, r: Request) -> Decision:
        """A TCP connection's decision (the module's rules for HTTP-only fields)."""
        tcp = self._tcp
        if tcp is None:
            tcp = self._tcp = copy.copy(self)
            tcp.deny = [p.for_tcp(True) for p in self.deny]
            tcp.allow = [p.for_tcp(False) for p in self.allow]
            tcp.audit = [p.for_tcp(False) for p in self.audit]
        return tcp.check(r)

    def check(self, r: Request) -> Decision:
        audited = ""
        for p in self.audit:
            if p.matches(r):
                audited = p.name
                break
        for p in self.deny:
            if p.matches(r):
                return Decision(False, p.name, audited)
        if not self.allow:
            return Decision(True, "", audited)
        for p in self.allow:
            if p.matches(r):
                return Decision(True, p.name, audited)
        return Decision(False, "", audited)


def compile_policies(policies: list[schema.AuthorizationPolicy]) -> Authorizer | None:
    return Authorizer(policies) if policies else None
