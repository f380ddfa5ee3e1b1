"""Authorization policies end to end: SPIFFE principals from real client certificates
(curl over mTLS) decide; denials are 403 `RBAC: access denied`, never reach the origin,
and are counted and logged with the policy's name."""

from __future__ import annotations

import json

from tests.helpers import wait_for
from tests.integration.test_mtls import curl, mtls_proxy
from tests.integration.test_mtls import pki as pki  # the module's certificates fixture
from tests.integration.test_supervisor import stat

POLICIES = [
    {"name": "default-ns-reads", "action": "ALLOW", "rules": [{
        "from": [{"namespaces": ["default"]}],
        "to": [{"methods": ["GET"], "paths": ["/api/*"]}]}]},
    {"name": "ops-anything", "action": "ALLOW", "rules": [{
        "from": [{"principals": ["cluster.local/ns/ops/*"]}]}]},
    {"name": "no-debug", "action": "DENY", "rules": [{
        "to": [{"paths": ["/api/debug*"]}]}]},
    {"name": "audit-ops-writes", "action": "AUDIT", "rules": [{
        "from": [{"principals": ["cluster.local/ns/ops/*"]}],
        "to": [{"methods": ["POST"]}]}]},
]


def status_body(r) -> tuple[int, bytes]:
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_authz_policies_decide_on_spiffe_principals(origin, tmp_path, pki) -> None:
    p = mtls_proxy(tmp_path, origin, pki, policies=POLICIES)
    assert status_body(curl(pki, p, "/api/items", "web", "-i"))[0] == 200
    status, body = status_body(curl(pki, p, "/api/items", "web", "-i", "-X", "POST"))
    assert (status, body) == (403, b"RBAC: access denied")        # no ALLOW matches
    assert status_body(curl(pki, p, "/other", "web", "-i"))[0] == 403
    assert status_body(curl(pki, p, "/other", "ops", "-i", "-X", "POST"))[0] == 200
    assert status_body(curl(pki, p, "/api/debug", "ops", "-i"))[0] == 403  # DENY first
    assert [r.target for r in origin.requests] == [b"/api/items", b"/other"]
    assert stat(p, "http.ingress.rbac.allowed") == 2
    assert stat(p, "http.ingress.rbac.denied") == 3
    assert stat(p, "http.ingress.rbac.logged") == 1
    log = tmp_path / "access.log"
    entries = wait_for(lambda: [json.loads(x) for x in log.read_text().splitlines()]
                       if log.exists() and len(log.read_text().splitlines()) >= 5 else None)
    denied = [e for e in entries if e["response_code"] == 403]
    assert {e["response_code_details"] for e in denied} == {
        "rbac_access_denied_matched_policy[none]",
        "rbac_access_denied_matched_policy[no-debug]"}
    assert {e["downstream_peer_uri_san"] for e in denied} == {
        "spiffe://cluster.local/ns/default/sa/web", "spiffe://cluster.local/ns/ops/sa/deployer"}
    audited = [e for e in entries if e["method"] == "POST" and e["response_code"] == 200]
    assert audited[0]["response_code_details"] == "rbac_audit_matched_policy[audit-ops-writes]"


def test_authz_route_policies_replace_the_listeners(origin, tmp_path, pki) -> None:
    routes = [
        {"match": {"prefix": "/public"}, "route": {"cluster": "web"},
         "authorization_policies": []},
        {"match": {"prefix": "/"}, "route": {"cluster": "web"}},
    ]
    deny_all = [{"name": "deny-all", "action": "DENY", "rules": [{}]}]
    p = mtls_proxy(tmp_path, origin, pki, routes=routes, policies=deny_all)
    assert status_body(curl(pki, p, "/public/x", "web", "-i"))[0] == 200
    assert status_body(curl(pki, p, "/private", "web", "-i"))[0] == 403


def test_authz_listener_policies_decide_before_no_route(origin, tmp_path, pki) -> None:
    """A denied caller gets 403 whether or not the path exists (as with Envoy's RBAC filter,
    which runs before the router); an allowed one gets the 404."""
    routes = [{"match": {"prefix": "/api"}, "route": {"cluster": "web"}}]
    ops_only = [{"name": "ops-only", "action": "ALLOW",
                 "rules": [{"from": [{"namespaces": ["ops"]}]}]}]
    p = mtls_proxy(tmp_path, origin, pki, routes=routes, policies=ops_only)
    assert status_body(curl(pki, p, "/nothing-here", "web", "-i"))[0] == 403
    assert status_body(curl(pki, p, "/nothing-here", "ops", "-i"))[0] == 404
    assert stat(p, "http.ingress.no_route") == 1
