"""Resources -> a proxy's config: checked with the data plane's own checks and compiler, so
that what the control plane would push is what a config file could say."""

from __future__ import annotations

from collections import Counter

import msgspec

from meshproxy.config.compile import compile_config
from meshproxy.config.load import check
from meshproxy.config.load import decode as decode_config
from meshproxy.control.resources import decode, load_documents
from meshproxy.control.translate import ProxyNode, cluster_name, translate
from tests.unit.test_control_resources import EXAMPLES

MESH = EXAMPLES + """
---
apiVersion: mesh/v1
kind: Workload
metadata: {name: reviews-v1-0, namespace: shop}
spec: {service: reviews, address: 10.0.0.11, port: 9080, labels: {version: v1}}
---
apiVersion: mesh/v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {ports: [{port: 8080}]}
---
apiVersion: mesh/v1
kind: Workload
metadata: {name: ratings-0, namespace: shop}
spec: {service: ratings, address: 10.0.1.1, port: 8080}
"""


def resources(text: str = MESH) -> list:
    return [decode(d) for d in load_documents(text)]


def valid(config) -> None:
    """The data plane takes it: its decode (every field), checks, and compile."""
    raw = msgspec.to_builtins(config)
    assert check(config) == []
    compile_config(decode_config(raw, "pushed"))


def test_control_translate_routes_clusters_and_endpoints() -> None:
    out = translate(resources(), ProxyNode("web-0", namespace="shop"))
    assert out.warnings == []
    valid(out.config)
    (listener,) = out.config.listeners
    assert (listener.address, listener.port) == ("127.0.0.1", 15001)
    hosts = {vh.name: vh for vh in listener.virtual_hosts}
    assert set(hosts) == {"shop/ratings", "shop/reviews"}
    assert "reviews.shop.svc.cluster.local" in hosts["shop/reviews"].domains
    canary, split = hosts["shop/reviews"].routes
    v1, v2 = cluster_name("shop/reviews", 9080, "v1"), cluster_name("shop/reviews", 9080, "v2")
    assert canary.match.headers[0].name == "x-canary"
    assert [(w.name, w.weight) for w in canary.route.weighted_clusters] == [(v2, 1)]
    assert [(w.name, w.weight) for w in split.route.weighted_clusters] == [(v1, 90), (v2, 10)]
    assert split.route.timeout == "2s" and split.route.retry_policy.num_retries == 2
    clusters = {c.name: c for c in out.config.clusters}
    assert v1 == "outbound|9080|v1|reviews.shop"
    assert [e.address for e in clusters[v1].endpoints] == ["10.0.0.11"]
    assert [e.address for e in clusters[v2].endpoints] == ["10.0.0.12"]
    assert clusters[v1].lb_policy == "least_request"  # the DestinationPolicy's
    assert clusters[v1].circuit_breakers.max_connections == 100
    # A service without a Route: one route to all its endpoints.
    (default,) = hosts["shop/ratings"].routes
    ratings = cluster_name("shop/ratings", 8080, None)
    assert default.match.prefix == "/" and default.route.weighted_clusters[0].name == ratings
    assert [e.address for e in clusters[ratings].endpoints] == ["10.0.1.1"]


def test_control_translate_scope_limits_what_a_proxy_gets() -> None:
    out = translate(resources(), ProxyNode("web-0", scope=frozenset({"shop/ratings",
                                                                     "shop/nothing"})))
    valid(out.config)
    assert [vh.name for vh in out.config.listeners[0].virtual_hosts] == ["shop/ratings"]
    assert [c.name for c in out.config.clusters] == [cluster_name("shop/ratings", 8080, None)]
    assert out.warnings == ["scope: no service shop/nothing"]


def test_control_translate_never_routes_to_a_cluster_it_lacks() -> None:
    """A subset nobody defined: that destination is dropped (said in the warnings); a rule
    left with none answers 503 itself rather than send its traffic elsewhere."""
    text = MESH + """
---
apiVersion: mesh/v1
kind: Route
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  rules:
    - name: ghost
      match: [{prefix: /ghost}]
      destinations: [{destination: {service: ratings, subset: v9}}]
    - destinations:
        - {destination: {service: ratings, subset: v9}, weight: 50}
        - {destination: {service: ratings}, weight: 50}
"""
    out = translate(resources(text), ProxyNode("web-0"))
    valid(out.config)
    routes = {vh.name: vh for vh in out.config.listeners[0].virtual_hosts}["shop/ratings"].routes
    ghost, rest = routes
    assert ghost.route is None and ghost.direct_response.status == 503
    assert [w.name for w in rest.route.weighted_clusters] == [
        cluster_name("shop/ratings", 8080, None)]
    assert len(out.warnings) == 2 and all("subset 'v9'" in w for w in out.warnings)
    names = {c.name for c in out.config.clusters}
    for vh in out.config.listeners[0].virtual_hosts:
        for r in vh.routes:
            for w in (r.route.weighted_clusters if r.route else []):
                assert w.name in names  # make before break


def test_control_translate_or_matches_and_is_deterministic() -> None:
    text = MESH.replace("match: [{prefix: /, headers: [{name: x-canary, exact: \"1\"}]}]",
                        "match: [{prefix: /a}, {prefix: /b}]")
    a = translate(resources(text), ProxyNode("p"))
    b = translate(list(reversed(resources(text))), ProxyNode("p"))
    assert msgspec.json.encode(a.config) == msgspec.json.encode(b.config)
    routes = {vh.name: vh for vh in a.config.listeners[0].virtual_hosts}["shop/reviews"].routes
    assert [r.match.prefix for r in routes] == ["/a", "/b", "/"]
    assert Counter(r.name for r in routes)["canary"] == 2  # one rule, two OR'd matches
