"""The mesh/v1 resources: every kind decodes from YAML, and every kind of mistake is
refused with the path of its field (so the operator API refuses it and it is never pushed)."""

from __future__ import annotations

import pytest

from meshproxy.config.load import ConfigError
from meshproxy.control.resources import RouteSpec, decode, load_documents

EXAMPLES = """
apiVersion: mesh/v1
kind: Service
metadata: {name: reviews, namespace: shop, labels: {team: books}}
spec:
  ports: [{port: 9080, protocol: http}, {name: grpc, port: 9090, protocol: grpc}]
---
apiVersion: mesh/v1
kind: Workload
metadata: {name: reviews-v2-0, namespace: shop}
spec:
  service: reviews
  address: 10.0.0.12
  port: 9080
  labels: {version: v2, zone: eu-west-1a}
  service_account: reviews
---
apiVersion: mesh/v1
kind: Route
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  rules:
    - name: canary
      match: [{prefix: /, headers: [{name: x-canary, exact: "1"}]}]
      destinations: [{destination: {service: reviews, subset: v2}}]
    - destinations:
        - {destination: {service: reviews, subset: v1}, weight: 90}
        - {destination: {service: reviews, subset: v2}, weight: 10}
      timeout: 2s
      retries: {retry_on: "5xx,reset", num_retries: 2, per_try_timeout: 500ms}
---
apiVersion: mesh/v1
kind: DestinationPolicy
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
  lb_policy: least_request
  circuit_breakers: {max_connections: 100, retry_budget: {budget_percent: 20}}
  outlier_detection: {consecutive_5xx: 3, interval: 5s}
---
apiVersion: mesh/v1
kind: AuthorizationPolicy
metadata: {name: reviews-readers, namespace: shop}
spec:
  selector: {match_labels: {app: reviews}}
  rules:
    - from: [{principals: ["cluster.local/ns/shop/sa/web"]}]
      to: [{methods: [GET]}]
---
apiVersion: mesh/v1
kind: RateLimit
metadata: {name: reviews, namespace: shop}
spec:
  service: reviews
  limit: {token_bucket: {max_tokens: 100, fill_interval: 1s, tokens_per_fill: 100}}
"""


def test_control_resources_every_kind_decodes() -> None:
    resources = [decode(d) for d in load_documents(EXAMPLES)]
    assert [r.kind for r in resources] == ["Service", "Workload", "Route", "DestinationPolicy",
                                           "AuthorizationPolicy", "RateLimit"]
    route = resources[2]
    assert route.key == "/mesh/v1/Route/shop/reviews"
    assert isinstance(route.spec, RouteSpec)
    assert [d.weight for d in route.spec.rules[1].destinations] == [90, 10]
    assert route.spec.rules[1].retries.num_retries == 2
    # A resource goes to the store and back unchanged.
    assert decode(route.to_builtins()) == route


def _doc(kind: str, spec: dict, name: str = "x") -> dict:
    return {"apiVersion": "mesh/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("doc, expected", [
    ({"apiVersion": "mesh/v2", "kind": "Route", "metadata": {"name": "x"}},
     "apiVersion: invalid enum value 'mesh/v2'"),
    ({"apiVersion": "mesh/v1", "kind": "Gateway", "metadata": {"name": "x"}},
     "kind: invalid enum value 'Gateway'"),
    (_doc("Service", {"ports": [{"port": 80}]}, name="Not_A_Name"),
     "metadata.name: expected str matching regex"),
    (_doc("Service", {"ports": []}), "spec.ports: expected array of length >= 1"),
    (_doc("Service", {"ports": [{"port": 80, "protocol": "udp"}]}),
     "spec.ports[0].protocol: invalid enum value 'udp'"),
    (_doc("Workload", {"service": "a", "address": "a.example", "port": 80}),
     "spec.address: not an IP address"),
    (_doc("Route", {"hosts": ["a"], "rules": [{"destinations": []}]}),
     "spec.rules[0].destinations: expected array of length >= 1"),
    (_doc("Route", {"hosts": ["a"], "rules": [
        {"destinations": [{"destination": {"service": "a"}, "weight": 0}]}]}),
     "spec.rules[0].destinations: weights must not all be 0"),
    (_doc("Route", {"hosts": ["a"], "rules": [
        {"match": [{"prefix": "/", "regex": "/x"}],
         "destinations": [{"destination": {"service": "a"}}]}]}),
     "spec.rules[0].match[0]: exactly one of prefix, path, regex"),
    (_doc("Route", {"hosts": ["a"], "rules": [
        {"match": [{"regex": "("}], "destinations": [{"destination": {"service": "a"}}]}]}),
     "spec.rules[0].match[0].regex: invalid regex"),
    (_doc("Route", {"hosts": ["a"], "rules": [
        {"destinations": [{"destination": {"service": "a"}}],
         "retries": {"retry_on": "sometimes"}}]}),
     "spec.rules[0].retries.retry_on: unknown condition 'sometimes'"),
    (_doc("Route", {"hosts": ["a"], "rules": [
        {"destinations": [{"destination": {"service": "a"}}], "timeuot": "1s"}]}),
     "spec.rules[0].timeuot: unknown field"),
    (_doc("DestinationPolicy", {"service": "a", "subsets": [
        {"name": "v1", "labels": {}}, {"name": "v1", "labels": {}}]}),
     "spec.subsets[1].name: duplicate subset 'v1'"),
    (_doc("AuthorizationPolicy", {"rules": [{"when": [{"key": "nope", "values": ["x"]}]}]}),
     "spec.rules[0].when[0].key: unknown key 'nope'"),
    (_doc("RateLimit", {"service": "a", "limit": {"token_bucket": {
        "max_tokens": 1, "fill_interval": "0s"}}}),
     "spec.limit.token_bucket.fill_interval: must be more than 0"),
])
def test_control_resources_refuse_with_the_field_path(doc: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        decode(doc)
    assert any(e.startswith(expected) for e in info.value.errors), info.value.errors


def test_control_resources_report_every_error_at_once() -> None:
    doc = _doc("Route", {"hosts": [], "rules": [{"destinations": [], "oops": 1}]},
               name="Bad")
    with pytest.raises(ConfigError) as info:
        decode(doc)
    errors = info.value.errors
    assert any(e.startswith("metadata.name:") for e in errors)
    assert any(e.startswith("spec.hosts:") for e in errors)
    assert any(e.startswith("spec.rules[0].oops: unknown field") for e in errors)


def test_control_resources_invalid_yaml_is_an_error() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_documents("kind: [unclosed")
