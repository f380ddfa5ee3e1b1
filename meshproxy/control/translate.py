"""Resources -> one proxy's data-plane config (a schema.Config, the same Structs and checks
as a config file), sans-IO: the mesh's state and the proxy's identity in, the config and
what could not be honoured out.

What a sidecar gets:
- one outbound listener (`ProxyNode.outbound_address:outbound_port`) with a virtual host
  per service in the proxy's scope, reached by the names a client uses: `name`,
  `name.namespace`, `name.namespace.svc`, `name.namespace.svc.cluster.local` (compared
  without the port; a service answers on its first port unless a destination names one);
- the virtual host's routes are the service's Route resource (Istio's VirtualService,
  hosts resolved in the Route's namespace): each rule becomes one data-plane route per
  match (matches are OR'd; none matches every request), in order, with the rule's
  weighted destinations, rewrites, timeout, retries and header mutations; a service
  without a Route gets one route to all its endpoints;
- a cluster per (service, port, subset) that a route can reach, named as Istio names them
  (`outbound|<port>|<subset>|<name>.<namespace>`), with the service's DestinationPolicy
  (load balancing, connect timeout, circuit breakers and retry budget, outlier detection;
  its hash policy goes on the routes, where the data plane keeps it) and as endpoints the
  Workloads of the service whose labels include the subset's.
- with a workload and an inbound port, an inbound listener on that port for its callers
  (the workload registers the inbound port, so the mesh reaches it through its sidecar),
  forwarding to the workload on loopback (`inbound|<port>||<name>.<namespace>`), with the
  AuthorizationPolicies whose selector matches the workload's labels in its namespace
  (Istio's: an empty selector matches every workload of the namespace) and the service's
  RateLimit without a route_rule; a RateLimit naming a route rule limits that rule's routes
  in every caller's outbound config instead.
- mesh identity (a proxy that joined with a token): mTLS is automatic (Istio's auto mTLS):
  a cluster whose endpoints all have a mesh identity (sidecars that joined) is reached
  with the proxy's own certificate, verifying that each endpoint presents one of those
  SPIFFE IDs; one with any plain endpoint, or whose DestinationPolicy says DISABLE, is
  plaintext; ISTIO_MUTUAL forces mTLS. The inbound listener takes what the workload's
  PeerAuthentication says (most specific wins: workload selector and port, then
  namespace, then the mesh's root namespace; PERMISSIVE when none says): STRICT is mTLS
  only, PERMISSIVE mTLS and plaintext on the one port (told apart by the first byte),
  DISABLE plaintext. The certificates are named as secrets (messages.WORKLOAD_CHAIN, ...)
  that the proxy fills in from its own identity.
- sidecar mode (`intercept`, behind `meshproxy iptables`): the outbound listener takes the
  app's intercepted connections (use_original_dst) by where they were going: a service's
  addresses on its ports, and its workloads' own address and port, as that service port
  says (http: the routes, by Host, the service's addresses being domains too; tcp: its
  cluster as bytes; auto: sniffed); anything else ALLOW_ANY or REGISTRY_ONLY, as the
  proxy asked. The inbound listener takes callers' connections to the workload's port,
  forwarded to it on 127.0.0.1, and passes through (to 127.0.0.1, same port) those to
  ports the service does not declare.
Make before break: a route is emitted only with clusters that are emitted with it. A
destination whose subset no DestinationPolicy defines is dropped with a warning, and a rule
left without destinations answers 503 itself (Istio's NC: no cluster), never traffic meant
for a subset going to another.

Size: past 400 lines because each resource kind's translation is short and they read each
other's results (a Route's destinations need the DestinationPolicy's subsets and the
Workloads); one module keeps that order visible.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from meshproxy.config import schema
from meshproxy.control.messages import ROOT_CA, WORKLOAD_CHAIN, WORKLOAD_KEY
from meshproxy.control.resources import (
    ROOT_NAMESPACE,
    AuthorizationPolicySpec,
    Destination,
    DestinationPolicySpec,
    PeerAuthenticationSpec,
    RateLimitSpec,
    Resource,
    RouteRule,
    RouteSpec,
    ServiceSpec,
    WeightedDestination,
    WorkloadSpec,
)

# A service port's protocol -> what an intercepting listener makes of it.
Sniff = Literal["http", "tcp", "auto"]
_SNIFF: dict[str, Sniff] = {"http": "http", "http2": "http", "grpc": "http", "tcp": "tcp",
                            "auto": "auto"}
OUTBOUND = "outbound"
INBOUND = "inbound"
# The dependency every inbound listener has: a policy changed somewhere (policies are few
# and rarely change; every proxy with an inbound side looks again).
POLICIES = "*policies"
CLUSTER_DOMAIN = "svc.cluster.local"


@dataclass(frozen=True)
class ProxyNode:
    """Who the config is for."""

    id: str
    namespace: str = "default"
    outbound_address: str = "127.0.0.1"
    outbound_port: int = 15001
    # Services ("namespace/name") the proxy calls; None: every service (prefetch all).
    scope: frozenset[str] | None = None
    # The outbound listener asks for services outside its scope (and holds the request
    # this long): on-demand discovery.
    on_demand_timeout: float = 0.0
    # The workload this sidecar fronts, and where its inbound listener listens (0: none).
    workload: WorkloadSpec | None = None
    inbound_address: str = "127.0.0.1"
    inbound_port: int = 0
    # It holds a mesh identity (joined with a join token): mTLS by policy.
    mtls: bool = False
    # Sidecar mode (`run --sidecar`, behind `meshproxy iptables`): both listeners take
    # intercepted connections by their original destination.
    intercept: bool = False
    outbound_traffic_policy: str = "ALLOW_ANY"


@dataclass
class Translation:
    config: schema.Config
    warnings: list[str] = field(default_factory=list)
    deps: set[str] = field(default_factory=set)  # "ns/name" of every service it used


class MeshIndex:
    """The mesh's resources indexed by service ("ns/name"), kept up to date one resource at
    a time (the control plane applies each watched change), so that translating one
    proxy's config costs its scope, not the mesh."""

    def __init__(self) -> None:
        self.services: dict[str, Resource] = {}
        self._workloads: dict[str, dict[str, WorkloadSpec]] = {}  # svc -> id -> spec
        self._routes: dict[str, dict[str, RouteSpec]] = {}  # svc -> "ns/route" -> spec
        self.policies: dict[str, DestinationPolicySpec] = {}
        self._policy_owner: dict[str, str] = {}
        self.authz: dict[str, dict[str, AuthorizationPolicySpec]] = {}  # ns -> name -> spec
        self.limits: dict[str, dict[str, RateLimitSpec]] = {}  # "ns/svc" -> name -> spec
        self.peer_auth: dict[str, dict[str, PeerAuthenticationSpec]] = {}  # ns -> name ->

    def put(self, r: Resource) -> set[str]:
        """Add `r` (a replaced resource is removed first); the services it touches."""
        ns = r.metadata.namespace
        if r.kind == "Service":
            key = f"{ns}/{r.metadata.name}"
            self.services[key] = r
            return {key}
        if r.kind == "Workload":
            return {self.put_workload(f"Workload/{ns}/{r.metadata.name}", ns, r.spec)}
        if r.kind == "DestinationPolicy":
            key = f"{ns}/{r.spec.service}"
            self.policies[key] = r.spec
            self._policy_owner[key] = f"{ns}/{r.metadata.name}"
            return {key}
        if r.kind == "Route":
            keys = {service_key(h, ns) for h in r.spec.hosts}
            for key in keys:
                self._routes.setdefault(key, {})[f"{ns}/{r.metadata.name}"] = r.spec
            return keys
        if r.kind == "AuthorizationPolicy":
            self.authz.setdefault(ns, {})[r.metadata.name] = r.spec
            return {POLICIES}
        if r.kind == "PeerAuthentication":
            self.peer_auth.setdefault(ns, {})[r.metadata.name] = r.spec
            return {POLICIES}
        if r.kind == "RateLimit":
            key = f"{ns}/{r.spec.service}"
            self.limits.setdefault(key, {})[r.metadata.name] = r.spec
            return {key, POLICIES}
        return set()

    def remove(self, r: Resource) -> set[str]:
        ns = r.metadata.namespace
        if r.kind == "Service":
            key = f"{ns}/{r.metadata.name}"
            self.services.pop(key, None)
            return {key}
        if r.kind == "Workload":
            return {self.remove_workload(f"Workload/{ns}/{r.metadata.name}", ns,
                                         r.spec.service)}
        if r.kind == "DestinationPolicy":
            key = f"{ns}/{r.spec.service}"
            if self._policy_owner.get(key) == f"{ns}/{r.metadata.name}":
                del self.policies[key], self._policy_owner[key]
            return {key}
        if r.kind == "Route":
            keys = {service_key(h, ns) for h in r.spec.hosts}
            for key in keys:
                routes = self._routes.get(key, {})
                routes.pop(f"{ns}/{r.metadata.name}", None)
                if not routes:
                    self._routes.pop(key, None)
            return keys
        if r.kind == "AuthorizationPolicy":
            self.authz.get(ns, {}).pop(r.metadata.name, None)
            return {POLICIES}
        if r.kind == "PeerAuthentication":
            self.peer_auth.get(ns, {}).pop(r.metadata.name, None)
            return {POLICIES}
        if r.kind == "RateLimit":
            key = f"{ns}/{r.spec.service}"
            self.limits.get(key, {}).pop(r.metadata.name, None)
            return {key, POLICIES}
        return set()

    def put_workload(self, ident: str, ns: str, spec: WorkloadSpec) -> str:
        key = f"{ns}/{spec.service}"
        self._workloads.setdefault(key, {})[ident] = spec
        return key

    def remove_workload(self, ident: str, ns: str, service: str) -> str:
        key = f"{ns}/{service}"
        found = self._workloads.get(key)
        if found is not None:
            found.pop(ident, None)
            if not found:
                del self._workloads[key]
        return key

    def workloads(self, key: str) -> list[WorkloadSpec]:
        found = self._workloads.get(key)
        return [found[i] for i in sorted(found)] if found else []

    def mtls_mode(self, namespace: str, labels: dict[str, str], port: int) -> str:
        """Istio's PeerAuthentication resolution for one workload port: the workload's own
        policy (selector; its port level first), then its namespace's, then the mesh's;
        UNSET defers to the next; PERMISSIVE when none decides. Among several policies of
        one level the first by name decides (Istio takes the oldest)."""
        def level(ns: str, selected: bool) -> list[PeerAuthenticationSpec]:
            found = self.peer_auth.get(ns, {})
            return [found[n] for n in sorted(found)
                    if bool(found[n].selector.match_labels) == selected
                    and all(labels.get(k) == v
                            for k, v in found[n].selector.match_labels.items())]
        for spec in level(namespace, True)[:1]:
            at_port = spec.port_level_mtls.get(str(port))
            if at_port is not None and at_port.mode != "UNSET":
                return at_port.mode
            if spec.mtls.mode != "UNSET":
                return spec.mtls.mode
        for ns in (namespace, ROOT_NAMESPACE):
            for spec in level(ns, False)[:1]:
                if spec.mtls.mode != "UNSET":
                    return spec.mtls.mode
        return "PERMISSIVE"

    def route(self, key: str, warnings: list[str]) -> RouteSpec | None:
        """The Route for a service: the first by namespace/name (Istio merges nothing
        either); the others are said in the warnings."""
        found = self._routes.get(key)
        if not found:
            return None
        owners = sorted(found)
        for other in owners[1:]:
            warnings.append(f"Route {other}: a host is already routed by Route {owners[0]} "
                            f"({key}); ignored")
        return found[owners[0]]


def index(resources: Iterable[Resource]) -> MeshIndex:
    mesh = MeshIndex()
    for r in resources:
        mesh.put(r)
    return mesh


def service_key(host: str, namespace: str) -> str:
    """A host as a client names it, resolved in `namespace` -> "ns/name"."""
    parts = host.lower().split(".")
    if len(parts) == 1:
        return f"{namespace}/{parts[0]}"
    return f"{parts[1]}/{parts[0]}"


def cluster_name(service_key: str, port: int, subset: str | None) -> str:
    ns, name = service_key.split("/", 1)
    return f"outbound|{port}|{subset or ''}|{name}.{ns}"


class _Builder:
    def __init__(self, mesh: MeshIndex, warnings: list[str], mtls: bool = False) -> None:
        self.mesh = mesh
        self.mtls = mtls
        self.warnings = warnings
        self.clusters: dict[str, schema.Cluster] = {}

    def port_of(self, key: str, wanted: int | None) -> int | None:
        svc = self.mesh.services.get(key)
        if svc is None:
            return None
        spec: ServiceSpec = svc.spec
        if wanted is None:
            return spec.ports[0].port
        return wanted if any(p.port == wanted for p in spec.ports) else None

    def cluster(self, key: str, port: int, subset: str | None) -> str | None:
        """The name of the cluster for (service, port, subset), built on first use; None
        when the subset does not exist."""
        name = cluster_name(key, port, subset)
        if name in self.clusters:
            return name
        policy = self.mesh.policies.get(key)
        labels: dict[str, str] = {}
        if subset is not None:
            found = [s for s in (policy.subsets if policy else []) if s.name == subset]
            if not found:
                return None
            labels = found[0].labels
        endpoints = [schema.Endpoint(address=w.address, port=w.port, weight=w.weight,
                                     locality=w.locality)
                     for w in self.mesh.workloads(key)
                     if all(w.labels.get(k) == v for k, v in labels.items())]
        extra: dict = {}
        if policy is not None:
            extra = {"lb_policy": policy.lb_policy, "connect_timeout": policy.connect_timeout,
                     "circuit_breakers": policy.circuit_breakers,
                     "outlier_detection": policy.outlier_detection,
                     "max_connection_duration": policy.max_connection_duration}
        tls = self.upstream_tls(name, [w for w in self.mesh.workloads(key)
                                       if all(w.labels.get(k) == v for k, v in labels.items())],
                                policy)
        self.clusters[name] = schema.Cluster(name=name, endpoints=endpoints, tls=tls, **extra)
        return name

    def upstream_tls(self, name: str, workloads: list[WorkloadSpec],
                     policy: DestinationPolicySpec | None) -> schema.UpstreamTLS | None:
        """Auto mTLS (see the module's rules)."""
        mode = policy.tls.mode if policy is not None and policy.tls is not None else "AUTO"
        if not self.mtls or mode == "DISABLE" or not workloads:
            return None
        ids = sorted({w.identity for w in workloads if w.identity})
        if mode == "AUTO" and len(ids) == 0:
            return None
        if mode == "AUTO" and any(not w.identity for w in workloads):
            self.warnings.append(f"cluster {name}: endpoints with and without a mesh "
                                 "identity; plaintext to all (a STRICT one refuses it)")
            return None
        return schema.UpstreamTLS(certificate_chain=WORKLOAD_CHAIN, private_key=WORKLOAD_KEY,
                                  trusted_ca=ROOT_CA, match_subject_alt_names=ids)

    def action(self, key: str, rule: RouteRule, where: str) -> schema.RouteAction | None:
        weighted = []
        for k, d in enumerate(rule.destinations):
            dest_key = service_key(d.destination.service, key.split("/", 1)[0])
            port = self.port_of(dest_key, d.destination.port)
            name = None if port is None else self.cluster(dest_key, port, d.destination.subset)
            if name is None:
                if dest_key not in self.mesh.services:
                    what = "service"
                elif port is None:
                    what = f"port {d.destination.port}"
                else:
                    what = f"subset {d.destination.subset!r}"
                self.warnings.append(f"{where}.destinations[{k}]: {dest_key} has no such "
                                     f"{what}; dropped")
                continue
            weighted.append(schema.WeightedCluster(name=name, weight=d.weight))
        if not weighted or sum(w.weight for w in weighted) == 0:
            return None
        policy = self.mesh.policies.get(key)
        return schema.RouteAction(
            weighted_clusters=weighted, prefix_rewrite=rule.prefix_rewrite,
            host_rewrite=rule.host_rewrite, timeout=rule.timeout, retry_policy=rule.retries,
            hash_policy=list(policy.hash_policy) if policy else [],
            request_mirror_policies=self.mirrors(key, rule, where))

    def mirrors(self, key: str, rule: RouteRule, where: str
                ) -> list[schema.RequestMirrorPolicy]:
        """Istio's mirror: the destination's cluster (made before the route that names it,
        like any destination's), or nothing with a warning when it does not exist."""
        m = rule.mirror
        if m is None:
            return []
        dest_key = service_key(m.service, key.split("/", 1)[0])
        port = self.port_of(dest_key, m.port)
        name = None if port is None else self.cluster(dest_key, port, m.subset)
        if name is None:
            self.warnings.append(f"{where}.mirror: {dest_key} has no such destination; "
                                 "not mirrored")
            return []
        return [schema.RequestMirrorPolicy(cluster=name, percentage=rule.mirror_percentage,
                                           response_diff=rule.mirror_response_diff)]

    def rule_limit(self, key: str, rule: str | None) -> schema.LocalRateLimit | None:
        if rule is None:
            return None
        found = [self.mesh.limits[key][n].limit for n in sorted(self.mesh.limits.get(key, {}))
                 if self.mesh.limits[key][n].route_rule == rule]
        return found[0] if found else None

    def destinations(self, keys: list[str]) -> list[schema.DestinationMatch]:
        """Sidecar mode's outbound destinations (see the module's rules); an address and
        port that two services claim goes to the first by name, with a warning."""
        groups: dict[tuple[int, Sniff, str | None, str], list[str]] = {}
        seen: dict[tuple[str, int], str] = {}
        for key in keys:
            svc = self.mesh.services[key]
            spec: ServiceSpec = svc.spec
            targets = [(a, p.port) for p in spec.ports for a in spec.addresses]
            first = spec.ports[0]
            targets += [(w.address, w.port) for w in self.mesh.workloads(key)]
            for address, port in targets:
                sp = next((p for p in spec.ports if p.port == port), first)
                protocol = _SNIFF.get(sp.protocol, "http")
                cluster = (self.cluster(key, sp.port, None) if protocol != "http" else None)
                where = (address, port)
                if where in seen:
                    if seen[where] != key:
                        self.warnings.append(f"Service {key}: {address}:{port} is already "
                                             f"{seen[where]}'s; ignored")
                    continue
                seen[where] = key
                groups.setdefault((port, protocol, cluster, key), []).append(address)
        return [schema.DestinationMatch(addresses=addrs, port=port, protocol=protocol,
                                        cluster=cluster, name=cluster or key,
                                        virtual_host=key if protocol != "tcp" else None)
                for (port, protocol, cluster, key), addrs in sorted(
                    groups.items(), key=lambda g: (g[0][0], g[0][1], g[0][2] or "", g[0][3]))]

    def inbound(self, node: ProxyNode) -> tuple[schema.Listener, schema.Cluster]:
        w = node.workload
        assert w is not None
        key = f"{node.namespace}/{w.service}"
        port = w.port if node.intercept else node.inbound_port
        name = f"inbound|{port}||{w.service}.{node.namespace}"
        policies = [schema.AuthorizationPolicy(name=f"{node.namespace}/{n}", action=p.action,
                                               rules=p.rules)
                    for n, p in sorted(self.mesh.authz.get(node.namespace, {}).items())
                    if all(w.labels.get(k) == v for k, v in p.selector.match_labels.items())]
        limits = [self.mesh.limits[key][n].limit for n in sorted(self.mesh.limits.get(key, {}))
                  if self.mesh.limits[key][n].route_rule is None]
        vhost = schema.VirtualHost(
            name=name, domains=["*"], local_rate_limit=limits[0] if limits else None,
            routes=[schema.Route(match=schema.RouteMatch(prefix="/"),
                                 route=schema.RouteAction(cluster=name))])
        tls = None
        mode = self.mesh.mtls_mode(node.namespace, w.labels, w.port)
        if node.mtls and mode != "DISABLE":
            tls = schema.ListenerTLS(
                certificates=[schema.TLSCertificate(certificate_chain=WORKLOAD_CHAIN,
                                                    private_key=WORKLOAD_KEY)],
                trusted_ca=ROOT_CA, require_client_certificate=mode == "STRICT",
                accept_plaintext=mode == "PERMISSIVE")
        intercept: dict = {}
        if node.intercept:
            svc = self.mesh.services.get(key)
            sp = svc.spec.ports[0].protocol if svc is not None else "http"
            intercept = {"address": "::", "use_original_dst": True,
                         "passthrough_address": "127.0.0.1",
                         "destinations": [schema.DestinationMatch(
                             port=w.port, protocol=_SNIFF.get(sp, "http"),
                             cluster=name, name=name)]}
        listener = schema.Listener(**{"name": INBOUND, "address": node.inbound_address,
                                      "port": node.inbound_port, "virtual_hosts": [vhost],
                                      "authorization_policies": policies, "tls": tls,
                                      **intercept})
        cluster = schema.Cluster(name=name, endpoints=[
            schema.Endpoint(address="127.0.0.1", port=w.port)])
        return listener, cluster

    def virtual_host(self, key: str) -> schema.VirtualHost | None:
        ns, name = key.split("/", 1)
        port = self.port_of(key, None)
        if port is None:
            return None
        spec = self.mesh.route(key, self.warnings)
        rules = spec.rules if spec is not None else [
            RouteRule(destinations=[WeightedDestination(destination=Destination(service=name))])]
        routes: list[schema.Route] = []
        for i, rule in enumerate(rules):
            where = f"Route for {key}: rules[{i}]"
            action = self.action(key, rule, where)
            matches = rule.match or [schema.RouteMatch(prefix="/")]
            refused = None if action is not None else schema.DirectResponse(
                status=503, body=f"no cluster for {where}\n")
            limit = self.rule_limit(key, rule.name)
            for m in matches:
                routes.append(schema.Route(
                    match=m, name=rule.name, route=action, direct_response=refused,
                    local_rate_limit=limit, fault=rule.fault, cors=rule.cors,
                    filters=rule.filters,
                    request_headers_to_add=rule.request_headers_to_add,
                    request_headers_to_remove=rule.request_headers_to_remove,
                    response_headers_to_add=rule.response_headers_to_add,
                    response_headers_to_remove=rule.response_headers_to_remove))
        domains = [name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.{CLUSTER_DOMAIN}"]
        svc: ServiceSpec = self.mesh.services[key].spec
        # Its addresses name it too (a Host of 10.96.0.10:8080, or [fd00::10]:8080).
        domains += [f"[{a}]" if ":" in a else a for a in svc.addresses]
        return schema.VirtualHost(name=key, domains=domains, routes=routes)


def translate(resources: Iterable[Resource] | MeshIndex, node: ProxyNode) -> Translation:
    """One proxy's config. `resources` may be a MeshIndex the caller keeps up to date."""
    warnings: list[str] = []
    mesh = resources if isinstance(resources, MeshIndex) else index(resources)
    builder = _Builder(mesh, warnings, node.mtls)
    if node.scope is None:
        keys = sorted(mesh.services)
    else:
        keys = sorted(k for k in node.scope if k in mesh.services)
        for k in sorted(node.scope - set(mesh.services)):
            warnings.append(f"scope: no service {k}")
    vhosts = [vh for vh in (builder.virtual_host(k) for k in keys) if vh is not None]
    intercept: dict = {}
    if node.intercept:
        intercept = {"use_original_dst": True, "destinations": builder.destinations(keys),
                     "outbound_traffic_policy": node.outbound_traffic_policy}
    listener = schema.Listener(**{"name": OUTBOUND, "address": node.outbound_address,
                                  "port": node.outbound_port, "virtual_hosts": vhosts,
                                  "on_demand_timeout": node.on_demand_timeout, **intercept})
    listeners = [listener]
    clusters = [builder.clusters[n] for n in sorted(builder.clusters)]
    extra: set[str] = set()
    if node.workload is not None and node.inbound_port:
        inbound, local = builder.inbound(node)
        listeners.append(inbound)
        clusters.append(local)
        extra = {POLICIES, f"{node.namespace}/{node.workload.service}"}
    config = schema.Config(listeners=listeners, clusters=clusters)
    # Every service the config depends on: its scope and the services its routes reach.
    # (The whole scope: a service asked for that does not exist yet is pushed when it does.)
    deps = set(keys if node.scope is None else node.scope) | extra | {
        _cluster_service(n) for n in builder.clusters}
    return Translation(config, warnings, deps)


def _cluster_service(name: str) -> str:
    """`outbound|port|subset|name.ns` -> "ns/name"."""
    host = name.rsplit("|", 1)[1]
    svc, ns = host.split(".", 1)
    return f"{ns}/{svc}"
