"""Authorization policies, sans-IO: Istio's matching and decision order."""

from __future__ import annotations

import msgspec
import pytest

from meshproxy.config import schema
from meshproxy.config.check_filters import check_policies
from meshproxy.filters.authz import Authorizer, Request


def policies(*raw: dict) -> Authorizer:
    return Authorizer([msgspec.convert(p, schema.AuthorizationPolicy) for p in raw])


def req(path: str = "/api/items", *, method: str = "GET", principal: str = "",
        ip: str = "10.1.2.3", host: str = "shop.example", port: int = 8443,
        headers: dict[str, str] | None = None) -> Request:
    hdrs = headers or {}
    ns = principal.split("/ns/")[1].split("/")[0] if "/ns/" in principal else ""
    return Request(method, path, host, port, ip, principal, ns, hdrs.get)


WEB = "cluster.local/ns/default/sa/web"
OPS = "cluster.local/ns/ops/sa/deployer"


def test_authz_no_policies_of_allow_kind_allows() -> None:
    a = policies({"name": "deny-admin", "action": "DENY",
                  "rules": [{"to": [{"paths": ["/admin*"]}]}]})
    assert a.check(req("/api")).allowed
    d = a.check(req("/admin/users"))
    assert not d.allowed and d.policy == "deny-admin"


def test_authz_allow_needs_a_match_and_deny_wins() -> None:
    a = policies(
        {"name": "web-reads", "action": "ALLOW",
         "rules": [{"from": [{"principals": ["cluster.local/ns/default/*"]}],
                    "to": [{"methods": ["GET", "HEAD"], "paths": ["/api/*"]}]}]},
        {"name": "block-flagged", "action": "DENY",
         "rules": [{"when": [{"key": "request.headers[x-flagged]", "values": ["*"]}]}]})
    assert a.check(req(principal=WEB)).allowed
    assert not a.check(req(principal=WEB, method="POST")).allowed      # no ALLOW matches
    assert not a.check(req(principal=OPS)).allowed                      # wrong namespace
    assert not a.check(req()).allowed                                   # no principal at all
    d = a.check(req(principal=WEB, headers={"x-flagged": "1"}))
    assert not d.allowed and d.policy == "block-flagged"                # DENY before ALLOW


def test_authz_allow_without_rules_allows_nothing() -> None:
    a = policies({"name": "allow-nothing", "action": "ALLOW"})
    assert not a.check(req(principal=WEB)).allowed


def test_authz_empty_rule_matches_everything() -> None:
    a = policies({"name": "deny-all", "action": "DENY", "rules": [{}]})
    assert not a.check(req()).allowed


def test_authz_fields_and_not_fields() -> None:
    a = policies({"name": "p", "action": "ALLOW", "rules": [{
        "from": [{"namespaces": ["default"], "not_principals": ["*/sa/legacy"]},
                 {"ip_blocks": ["192.168.0.0/16"], "not_ip_blocks": ["192.168.9.0/24"]}],
        "to": [{"hosts": ["*.example"], "ports": [8443], "not_paths": ["/private*"]}]}]})
    assert a.check(req(principal=WEB)).allowed
    assert not a.check(req(principal="cluster.local/ns/default/sa/legacy")).allowed
    assert a.check(req(ip="192.168.1.1")).allowed                       # the second source
    assert not a.check(req(ip="192.168.9.1")).allowed
    assert not a.check(req(principal=WEB, path="/private/x")).allowed
    assert not a.check(req(principal=WEB, port=80)).allowed
    assert not a.check(req(principal=WEB, host="shop.other")).allowed
    assert a.check(req(principal=WEB, host="SHOP.EXAMPLE".lower())).allowed


def test_authz_spiffe_scheme_in_principals_is_accepted() -> None:
    a = policies({"name": "p", "action": "ALLOW",
                  "rules": [{"from": [{"principals": ["spiffe://" + WEB]}]}]})
    assert a.check(req(principal=WEB)).allowed


def test_authz_when_conditions_all_must_hold() -> None:
    a = policies({"name": "p", "action": "ALLOW", "rules": [{"when": [
        {"key": "request.headers[x-tenant]", "values": ["acme", "beta*"]},
        {"key": "source.ip", "values": ["10.0.0.0/8"]},
        {"key": "source.namespace", "not_values": ["ops"]}]}]})
    assert a.check(req(headers={"x-tenant": "beta-2"})).allowed
    assert not a.check(req(headers={"x-tenant": "other"})).allowed
    assert not a.check(req(headers={"x-tenant": "acme"}, ip="172.16.0.1")).allowed
    assert not a.check(req(headers={"x-tenant": "acme"}, principal=OPS)).allowed


def test_authz_audit_never_decides() -> None:
    a = policies({"name": "audit-writes", "action": "AUDIT",
                  "rules": [{"to": [{"methods": ["POST"]}]}]})
    d = a.check(req(method="POST"))
    assert d.allowed and d.audited == "audit-writes"
    assert a.check(req()).audited == ""


@pytest.mark.parametrize(("raw", "message"), [
    ({"name": "p", "rules": [{"from": [{"ip_blocks": ["10.0.0.0/33"]}]}]},
     "rules[0].from[0].ip_blocks[0]: not an IP address"),
    ({"name": "p", "rules": [{"when": [{"key": "request.body", "values": ["x"]}]}]},
     "rules[0].when[0].key: unknown key"),
    ({"name": "p", "rules": [{"when": [{"key": "source.principal"}]}]},
     "rules[0].when[0]: values or not_values is required"),
    ({"name": "p", "rules": [{"to": [{"paths": ["/a*b*"]}]}]},
     "rules[0].to[0].paths[0]: a match is exact"),
])
def test_authz_config_errors_name_the_field(raw: dict, message: str) -> None:
    errors: list[str] = []
    check_policies([msgspec.convert(raw, schema.AuthorizationPolicy)], "policies", errors)
    assert any(message in e for e in errors), errors


def test_authz_listener_policies_compiled_once_per_snapshot() -> None:
    from meshproxy.config.compile import compile_config
    from meshproxy.config.load import decode

    routes = [{"match": {"prefix": f"/r{i}"}, "direct_response": {"status": 200}}
              for i in range(3)]
    routes.append({"match": {"prefix": "/own"}, "direct_response": {"status": 200},
                   "authorization_policies": [{"name": "own", "rules": [{}]}]})
    cfg = decode({"listeners": [{
        "name": "in", "port": 0,
        "authorization_policies": [{"name": "p", "action": "DENY", "rules": [{}]}],
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}]})
    listener = compile_config(cfg).listeners[0]
    vh = listener.route_table.default
    assert vh is not None
    shared = {id(r.action.filters.authz) for r in vh.routes[:3]}
    assert shared == {id(listener.authz)}  # one Authorizer for the listener's routes
    assert vh.routes[3].action.filters.authz is not listener.authz


def test_authz_tcp_connections_follow_istios_rules_for_http_only_fields() -> None:
    a = policies(
        {"name": "web-gets", "action": "ALLOW",
         "rules": [{"from": [{"principals": [WEB]}], "to": [{"methods": ["GET"]}]},
                   {"from": [{"principals": [OPS]}], "to": [{"ports": [5432]}]}]},
        {"name": "no-web-posts", "action": "DENY",
         "rules": [{"from": [{"principals": [WEB]}], "to": [{"methods": ["POST"]}]}]})

    def tcp(principal: str, port: int = 5432) -> Request:
        return req("", method="", host="", principal=principal, port=port)

    # HTTP: web may GET, not POST.
    assert a.check(req(principal=WEB)).allowed
    assert not a.check(req(principal=WEB, method="POST")).allowed
    # TCP: the ALLOW rule that needs a method never matches, the DENY rule is taken
    # without its method (it denies web's connections outright).
    d = a.check_tcp(tcp(WEB))
    assert not d.allowed and d.policy == "no-web-posts"
    # The other ALLOW rule has no HTTP-only field: it applies as written.
    assert a.check_tcp(tcp(OPS)).allowed
    assert not a.check_tcp(tcp(OPS, port=22)).allowed
    # The HTTP decisions are unchanged by the TCP copy.
    assert a.check(req(principal=WEB)).allowed
