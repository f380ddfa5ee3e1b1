"""Resources -> a proxy's config: checked with the data plane's own checks and compiler, so
that what the control plane would push is what a config file could say."""

from __future__ import annotations

from collections import Counter

import msgspec

from meshproxy.config.compile import compile_config
from meshproxy.config.load import check, tls_files
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
    # Secrets are resolved by the proxy's supervisor; compiling only carries their bytes.
    compile_config(decode_config(raw, "pushed"),
                   material={p: b"" for _, p in tls_files(config)})


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


MTLS_MESH = """
apiVersion: mesh/v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 8080}]}
---
apiVersion: mesh/v1
kind: Workload
metadata: {name: web-0, namespace: shop}
spec: {service: web, address: 10.0.0.1, port: 8080, labels: {app: web},
       identity: "spiffe://cluster.local/ns/shop/sa/web"}
---
apiVersion: mesh/v1
kind: Workload
metadata: {name: web-1, namespace: shop}
spec: {service: web, address: 10.0.0.2, port: 8080, labels: {app: web},
       identity: "spiffe://cluster.local/ns/shop/sa/web-canary"}
---
apiVersion: mesh/v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: mesh/v1
kind: Workload
metadata: {name: legacy-0, namespace: shop}
spec: {service: legacy, address: 10.0.0.3, port: 80}
"""


def _pa(name: str, ns: str, mode: str, labels: dict | None = None,
        ports: dict | None = None) -> str:
    sel = f"selector: {{match_labels: {labels}}}, " if labels else ""
    pl = (", port_level_mtls: {" + ", ".join(f'"{p}": {{mode: {m}}}'
                                            for p, m in (ports or {}).items()) + "}"
          if ports else "")
    return (f"\n---\napiVersion: mesh/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, "
            f"namespace: {ns}}}\nspec: {{{sel}mtls: {{mode: {mode}}}{pl}}}\n")


def _inbound_tls(text: str, mtls: bool = True):
    from meshproxy.control.resources import WorkloadSpec

    w = WorkloadSpec(service="web", address="10.0.0.1", port=8080, labels={"app": "web"})
    tr = translate(resources(text), ProxyNode("web-0", "shop", workload=w, inbound_port=15006,
                                              mtls=mtls))
    valid(tr.config)
    return tr.config.listeners[1].tls


def test_control_translate_auto_mtls_follows_the_endpoints_identities() -> None:
    tr = translate(resources(MTLS_MESH), ProxyNode("c", "shop", mtls=True))
    clusters = {c.name: c for c in tr.config.clusters}
    web = clusters["outbound|8080||web.shop"].tls
    assert web is not None and web.certificate_chain == "sds:default/cert-chain"
    assert web.match_subject_alt_names == ["spiffe://cluster.local/ns/shop/sa/web",
                                           "spiffe://cluster.local/ns/shop/sa/web-canary"]
    assert clusters["outbound|80||legacy.shop"].tls is None  # no sidecar: plaintext
    # A proxy without an identity speaks plaintext everywhere.
    plain = translate(resources(MTLS_MESH), ProxyNode("c", "shop"))
    assert all(c.tls is None for c in plain.config.clusters)
    # DISABLE per destination.
    off = MTLS_MESH + ("\n---\napiVersion: mesh/v1\nkind: DestinationPolicy\nmetadata: "
                       "{name: web, namespace: shop}\nspec: {service: web, tls: {mode: DISABLE}}\n")
    tr = translate(resources(off), ProxyNode("c", "shop", mtls=True))
    assert all(c.tls is None for c in tr.config.clusters)
    valid(tr.config)


def test_control_translate_peer_authentication_most_specific_wins() -> None:
    base = MTLS_MESH
    t = _inbound_tls(base)
    assert t is not None and t.accept_plaintext and not t.require_client_certificate
    t = _inbound_tls(base + _pa("mesh", "mesh-system", "STRICT"))
    assert t.require_client_certificate and not t.accept_plaintext
    t = _inbound_tls(base + _pa("mesh", "mesh-system", "STRICT") + _pa("ns", "shop", "DISABLE"))
    assert t is None
    t = _inbound_tls(base + _pa("ns", "shop", "DISABLE")
                     + _pa("w", "shop", "UNSET", {"app": "web"}, {8080: "STRICT"}))
    assert t.require_client_certificate
    t = _inbound_tls(base + _pa("ns", "shop", "STRICT")
                     + _pa("w", "shop", "UNSET", {"app": "web"}, {9999: "DISABLE"}))
    assert t.require_client_certificate  # another port's rule does not apply
    t = _inbound_tls(base + _pa("ns", "shop", "STRICT") + _pa("other", "shop", "DISABLE",
                                                            {"app": "other"}))
    assert t.require_client_certificate  # a selector that does not pick it
    assert _inbound_tls(base + _pa("ns", "shop", "STRICT"), mtls=False) is None


SIDECAR_MESH = MESH + """
---
apiVersion: mesh/v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {ports: [{port: 5432, protocol: tcp, name: pg}], addresses: [10.96.0.20, "fd00::20"]}
---
apiVersion: mesh/v1
kind: Workload
metadata: {name: db-0, namespace: shop}
spec: {service: db, address: 10.0.2.1, port: 5432}
---
apiVersion: mesh/v1
kind: Service
metadata: {name: legacy, namespace: shop}
spec: {ports: [{port: 7000, protocol: auto}], addresses: [10.96.0.30]}
---
apiVersion: mesh/v1
kind: Workload
metadata: {name: legacy-0, namespace: shop}
spec: {service: legacy, address: 10.0.1.1, port: 8080}
"""


def test_control_translate_sidecar_mode_takes_connections_by_destination() -> None:
    from meshproxy.control.resources import WorkloadSpec

    node = ProxyNode("ratings-0", namespace="shop", outbound_address="::",
                     intercept=True, outbound_traffic_policy="REGISTRY_ONLY",
                     workload=WorkloadSpec(service="ratings", address="10.0.1.1", port=8080),
                     inbound_address="10.0.1.1", inbound_port=15006)
    out = translate(resources(SIDECAR_MESH), node)
    valid(out.config)
    outbound, inbound = out.config.listeners
    assert outbound.use_original_dst and outbound.outbound_traffic_policy == "REGISTRY_ONLY"
    found = {(a, d.port): (d.protocol, d.cluster) for d in outbound.destinations
             for a in d.addresses}
    db = cluster_name("shop/db", 5432, None)
    assert found[("10.96.0.20", 5432)] == ("tcp", db)
    assert found[("fd00::20", 5432)] == ("tcp", db)
    assert found[("10.0.2.1", 5432)] == ("tcp", db)  # the workload's own address
    assert found[("10.0.0.11", 9080)] == ("http", None)
    by_vh = {(a, d.port): d.virtual_host for d in outbound.destinations for a in d.addresses}
    assert by_vh[("10.0.0.11", 9080)] == "shop/reviews"  # its routes take a Host of none
    assert by_vh[("10.96.0.20", 5432)] is None
    assert found[("10.96.0.30", 7000)] == ("auto", cluster_name("shop/legacy", 7000, None))
    # 10.0.1.1:8080 is both ratings-0's and legacy-0's: the first service by name keeps it.
    assert found[("10.0.1.1", 8080)] == ("auto", cluster_name("shop/legacy", 7000, None))
    assert any("10.0.1.1:8080 is already shop/legacy's" in w for w in out.warnings)
    hosts = {vh.name: vh for vh in outbound.virtual_hosts}
    assert "[fd00::20]" in hosts["shop/db"].domains and "10.96.0.20" in hosts["shop/db"].domains
    # Inbound: the workload's port to the app on loopback, the rest passed through there.
    assert (inbound.address, inbound.port, inbound.use_original_dst) == ("::", 15006, True)
    assert inbound.passthrough_address == "127.0.0.1"
    (d,) = inbound.destinations
    assert (d.port, d.protocol, d.cluster) == (8080, "http", "inbound|8080||ratings.shop")
