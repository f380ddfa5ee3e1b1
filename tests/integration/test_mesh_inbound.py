"""The inbound side of a sidecar under the control plane, real processes: a workload
registered with --inbound-port is reached through its sidecar's inbound listener, which
enforces the AuthorizationPolicies selecting it and its service's RateLimit, pushed as
they change; a RateLimit naming a route rule limits that rule in the callers instead."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import wait_for
from tests.mesh import ControlPlane, Sidecar, free_port, service


def _policy(name: str, action: str, paths: list[str], labels: dict) -> dict:
    return {"apiVersion": "mesh/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": {"match_labels": labels}, "action": action,
                     "rules": [{"to": [{"paths": paths}]}]}}


def _limit(name: str, tokens: int, rule: str | None = None) -> dict:
    spec: dict = {"service": "web", "limit": {"token_bucket": {
        "max_tokens": tokens, "tokens_per_fill": 1, "fill_interval": "1h"}}}
    if rule is not None:
        spec["route_rule"] = rule
    return {"apiVersion": "mesh/v1", "kind": "RateLimit",
            "metadata": {"name": name, "namespace": "default"}, "spec": spec}


def test_inbound_listener_enforces_policies_and_limits(tmp_path: Path,
                                                       origin_factory) -> None:
    cp = ControlPlane(tmp_path / "cp")
    o = origin_factory()
    cp.apply(service("web", 8080))
    inbound = free_port()
    web = Sidecar(cp, tmp_path / "web", "web-0", "--inbound-port", str(inbound), "--label",
                  "app=web", service="web", workload_port=o.port)
    client = Sidecar(cp, tmp_path / "client", "client-0", "--calls", "web")
    # Registered with its inbound port: callers go through the workload's sidecar.
    wait_for(lambda: [r["port"] for r in cp.registry()["registrations"]] == [inbound], 5)
    wait_for(lambda: client.get("web")[0] == 200, 10)
    seen = o.requests[-1]
    assert seen.header(b"x-forwarded-for") is not None  # it crossed two proxies
    names = [lst["name"] for lst in web.admin("/config_dump")["config"]["listeners"]]
    assert names == ["outbound", "inbound"]

    cp.apply(_policy("no-admin", "DENY", ["/admin*"], {"app": "web"}))
    wait_for(lambda: client.get("web", "/admin/x")[0] == 403, 5)
    assert client.get("web", "/public")[0] == 200
    cp.apply(_policy("other-app", "DENY", ["/public"], {"app": "other"}))  # not selected
    cp.call("DELETE", "/apis/mesh/v1/namespaces/default/authorizationpolicies/no-admin")
    wait_for(lambda: client.get("web", "/admin/x")[0] == 200, 5)
    assert client.get("web", "/public")[0] == 200

    cp.apply(_limit("web", 3))
    wait_for(lambda: client.get("web", "/limited")[0] == 429, 5)
    before = len(o.requests)
    for _ in range(5):
        assert client.get("web", "/limited")[0] == 429
    assert len(o.requests) == before  # refused by the inbound sidecar: nothing reached it


def test_rate_limit_on_a_route_rule_limits_it_in_the_callers(tmp_path: Path,
                                                            origin_factory) -> None:
    cp = ControlPlane(tmp_path / "cp")
    o = origin_factory()
    cp.apply(service("web", 8080))
    Sidecar(cp, tmp_path / "web", "web-0", service="web", workload_port=o.port)
    cp.apply({"apiVersion": "mesh/v1", "kind": "Route",
              "metadata": {"name": "web", "namespace": "default"},
              "spec": {"hosts": ["web"], "rules": [
                  {"name": "search", "match": [{"prefix": "/search"}],
                   "destinations": [{"destination": {"service": "web"}}]},
                  {"destinations": [{"destination": {"service": "web"}}]}]}})
    cp.apply(_limit("search", 2, rule="search"))
    client = Sidecar(cp, tmp_path / "client", "client-0", "--calls", "web")
    wait_for(lambda: client.get("web", "/search")[0] in (200, 429), 10)
    statuses = [client.get("web", "/search")[0] for _ in range(4)]
    assert statuses.count(429) >= 3, statuses
    assert all(client.get("web", "/other")[0] == 200 for _ in range(5))
