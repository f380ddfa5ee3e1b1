"""The operator's resources (apiVersion mesh/v1): what `meshctl apply` sends and the store
keeps, checked here so that a bad resource is refused at the API and never pushed.

Every resource is an envelope (apiVersion, kind, metadata: name, namespace, labels,
resourceVersion) around a kind's spec. Meanings follow Istio's kinds, with the data plane's
spelling where the data plane has the field already (its Structs are reused, so a field means
the same thing in a file and in the mesh):

  Service              a name and its ports with their protocol (Kubernetes Service)
  Workload             one instance: address, port, labels (version, zone), service account
                       (Istio's WorkloadEntry; sidecars register their own through the registry)
  Route                Istio's VirtualService: hosts, ordered rules, each with OR'd matches,
                       weighted destinations by subset, rewrites, timeout, retries, headers
  DestinationPolicy    Istio's DestinationRule: subsets by labels, load balancing,
                       circuit breakers and retry budget, outlier detection
  AuthorizationPolicy  the data plane's (Istio's) semantics, for the workloads a selector picks
  RateLimit            a local rate limit for a service's inbound traffic, or one route of it
  PeerAuthentication   Istio's: whether a workload's inbound side takes mTLS only (STRICT),
                       mTLS and plaintext on the same port (PERMISSIVE) or plaintext only
                       (DISABLE); mesh-wide in the root namespace, per namespace, per
                       workload (selector), per port; the most specific wins

Errors name the path of the field (`spec.rules[0].destinations[1].weight: ...`), as the
data plane's config errors do. This module is sans-IO: documents in, resources or errors out.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

import msgspec
import yaml
from msgspec import Meta

from meshproxy.config import schema
from meshproxy.config.check_filters import (
    check_cors,
    check_fault,
    check_policies,
    check_rate_limit,
)
from meshproxy.config.load import (
    ConfigError,
    check_duration,
    check_match,
    check_outlier,
    check_retry_policy,
    walk,
)
from meshproxy.config.schema import Base, Duration, HeaderName, NonEmptyStr, Port

API_VERSION = "mesh/v1"
# RFC 1123 labels (Kubernetes' names): they become parts of host names and store keys.
Name = Annotated[str, Meta(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
LabelKey = Annotated[str, Meta(pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_./]{0,251}[A-Za-z0-9])?$")]
LabelValue = Annotated[str, Meta(pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")]
Labels = dict[LabelKey, LabelValue]


class Metadata(Base, frozen=True):
    name: Name
    namespace: Name = "default"
    labels: Labels = {}
    # Set by the control plane: the store revision of the resource's last change. Sent back
    # on a write, it makes the write conditional (a stale one is refused: 409).
    resource_version: str | None = msgspec.field(default=None, name="resourceVersion")


# ---------------------------------------------------------------- Service, Workload

class ServicePort(Base, frozen=True):
    port: Port
    name: NonEmptyStr = "http"
    # What intercepting sidecars make of a connection to it: http (also http2, grpc):
    # routed by the Route; tcp: proxied as bytes; auto: told apart by its first bytes
    # (Istio's protocol sniffing for a port that declares none).
    protocol: Literal["http", "http2", "grpc", "tcp", "auto"] = "http"


class ServiceSpec(Base, frozen=True):
    ports: Annotated[list[ServicePort], Meta(min_length=1)]
    # The addresses clients call the service by (Kubernetes' ClusterIP, Istio's
    # ServiceEntry addresses): an intercepting sidecar takes a connection to one of them
    # on a service port for the service. Its workloads' own addresses are taken too.
    addresses: list[NonEmptyStr] = []


class WorkloadSpec(Base, frozen=True):
    service: Name
    address: NonEmptyStr
    port: Port
    labels: Labels = {}
    service_account: Name = "default"
    weight: Annotated[int, Meta(ge=1, le=128)] = 1
    locality: str = ""
    # The SPIFFE ID of the mesh proxy in front of it: callers then speak mTLS to it and
    # verify that identity (Istio's tlsMode=istio). The registry sets it for sidecars that
    # joined with a token; "" (a plain workload): callers speak plaintext.
    identity: str = ""


# ---------------------------------------------------------------- Route

class Destination(Base, frozen=True):
    service: Name
    subset: Name | None = None
    port: Port | None = None


class WeightedDestination(Base, frozen=True):
    destination: Destination
    weight: Annotated[int, Meta(ge=0, le=1_000_000)] = 1


class RouteRule(Base, frozen=True):
    """Matches are OR'd (any one matches; none: every request), tried in the order of the
    rules; the first rule that matches routes the request."""

    destinations: Annotated[list[WeightedDestination], Meta(min_length=1)]
    name: str = ""
    match: list[schema.RouteMatch] = []
    prefix_rewrite: str | None = None
    host_rewrite: str | None = None
    timeout: Duration = "15s"
    retries: schema.RetryPolicy | None = None
    request_headers_to_add: list[schema.HeaderValue] = []
    request_headers_to_remove: list[HeaderName] = []
    response_headers_to_add: list[schema.HeaderValue] = []
    response_headers_to_remove: list[HeaderName] = []
    # Istio's HTTPRoute fault: a delay and/or an abort for a share of the rule's requests
    # (the data plane's Fault, Envoy's fault filter).
    fault: schema.Fault | None = None
    # Istio's HTTPRoute corsPolicy (the data plane's Cors, Envoy's CORS filter).
    cors: schema.Cors | None = None
    # Istio's mirror and mirrorPercentage: a copy of the rule's requests to this
    # destination (the data plane's request_mirror_policies); with
    # mirror_response_diff, its responses compared with the primary's (the rule needs a
    # name: mirror.<name>.*).
    mirror: Destination | None = None
    mirror_percentage: schema.Percent = 100
    mirror_response_diff: schema.ResponseDiff | None = None
    # Python filters (the data plane's route `filters`): classes installed beside the
    # sidecars, named here; a sidecar that cannot import one NACKs the push.
    filters: list[schema.PythonFilter] = []


class RouteSpec(Base, frozen=True):
    # Services (by name) or host names the rules apply to, as a client addresses them.
    hosts: Annotated[list[NonEmptyStr], Meta(min_length=1)]
    rules: Annotated[list[RouteRule], Meta(min_length=1)]


# ---------------------------------------------------------------- DestinationPolicy

class Subset(Base, frozen=True):
    name: Name
    labels: Labels


class ClientTLSSettings(Base, frozen=True):
    """Istio's DestinationRule trafficPolicy.tls, for mesh traffic: without it mTLS is
    automatic (used when every endpoint has a mesh identity); DISABLE sends plaintext;
    ISTIO_MUTUAL always sends mTLS with the proxy's identity."""

    mode: Literal["DISABLE", "ISTIO_MUTUAL"]


class DestinationPolicySpec(Base, frozen=True):
    service: Name
    subsets: list[Subset] = []
    lb_policy: Literal["round_robin", "least_request", "random", "ring_hash", "maglev",
                       "peak_ewma"] = "round_robin"
    hash_policy: list[schema.HashPolicy] = []
    connect_timeout: Duration = "5s"
    circuit_breakers: schema.CircuitBreakers = schema.CircuitBreakers()
    outlier_detection: schema.OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    # Istio's connectionPool.tcp.maxConnectionDuration: an upstream connection older than
    # this is not reused (0: no limit).
    max_connection_duration: Duration = 0


# ---------------------------------------------------------------- policies

class WorkloadSelector(Base, frozen=True):
    """The workloads whose inbound traffic a policy applies to; empty: every workload of
    the namespace (Istio's)."""

    match_labels: Labels = {}


class AuthorizationPolicySpec(Base, frozen=True):
    selector: WorkloadSelector = WorkloadSelector()
    action: Literal["ALLOW", "DENY", "AUDIT"] = "ALLOW"
    rules: list[schema.AuthzRule] = []


class RateLimitSpec(Base, frozen=True):
    service: Name
    limit: schema.LocalRateLimit
    # One of the service's Route rules by name, or (none) all its inbound traffic.
    route_rule: str | None = None


# Istio's root namespace (istio-system there): a PeerAuthentication without a selector in
# it applies to the whole mesh.
ROOT_NAMESPACE = "mesh-system"
MTLSMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class MutualTLS(Base, frozen=True):
    mode: MTLSMode = "UNSET"  # UNSET: inherit from the less specific policy


class PeerAuthenticationSpec(Base, frozen=True):
    """Istio's PeerAuthentication. Without any, a workload is PERMISSIVE (Istio's)."""

    # Empty: every workload of the namespace (of the mesh, in the root namespace).
    selector: WorkloadSelector = WorkloadSelector()
    mtls: MutualTLS = MutualTLS()
    # Per workload port (Istio's portLevelMtls), with a selector only; keys are port
    # numbers written as strings (JSON's keys are strings).
    port_level_mtls: dict[Annotated[str, Meta(pattern=r"^[1-9][0-9]{0,4}$")], MutualTLS] = {}


SPECS: dict[str, type[Base]] = {
    "Service": ServiceSpec,
    "Workload": WorkloadSpec,
    "Route": RouteSpec,
    "DestinationPolicy": DestinationPolicySpec,
    "AuthorizationPolicy": AuthorizationPolicySpec,
    "RateLimit": RateLimitSpec,
    "PeerAuthentication": PeerAuthenticationSpec,
}
Kind = Literal["Service", "Workload", "Route", "DestinationPolicy", "AuthorizationPolicy",
               "RateLimit", "PeerAuthentication"]


class Envelope(Base, frozen=True):
    api_version: Literal["mesh/v1"] = msgspec.field(name="apiVersion")
    kind: Kind
    metadata: Metadata
    spec: dict[str, Any] = {}


class Resource(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    metadata: Metadata
    spec: Any  # the kind's Spec Struct

    @property
    def key(self) -> str:
        """Where the store keeps it: /mesh/v1/<kind>/<namespace>/<name>."""
        return resource_key(self.kind, self.metadata.namespace, self.metadata.name)

    def to_builtins(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": self.kind,
                "metadata": msgspec.to_builtins(self.metadata),
                "spec": msgspec.to_builtins(self.spec)}


def resource_key(kind: str, namespace: str, name: str) -> str:
    return f"/mesh/v1/{kind}/{namespace}/{name}"


# ---------------------------------------------------------------- decoding

def decode(doc: Any, source: str = "") -> Resource:
    """One document (dicts and lists) -> Resource, or ConfigError listing every problem
    with the path of its field."""
    errors: list[str] = []
    walk(doc, Envelope, "", errors)
    cls = SPECS.get(str(doc.get("kind"))) if isinstance(doc, dict) else None
    if cls is not None and isinstance(doc.get("spec", {}), dict):
        walk(doc.get("spec", {}), cls, "spec", errors)  # every error at once, spec's too
    if errors:
        raise ConfigError(errors, source)
    env = msgspec.convert(doc, Envelope)
    cls = SPECS[env.kind]
    spec = msgspec.convert(env.spec, cls)
    _check(env.kind, env.metadata, spec, errors)
    if errors:
        raise ConfigError(errors, source)
    return Resource(kind=env.kind, metadata=env.metadata, spec=spec)


def load_documents(text: str, source: str = "") -> list[Any]:
    """The documents of a YAML (or JSON) text, `---`-separated; empty ones skipped. A list
    document is taken as a list of resources."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError([f"(document): invalid YAML: {exc}"], source) from None
    out: list[Any] = []
    for d in docs:
        out.extend(d if isinstance(d, list) else [d])
    return out


def _check(kind: str, meta: Metadata, spec: Any, errors: list[str]) -> None:
    """The rules a single field's type cannot express."""
    if kind == "Workload":
        try:
            ipaddress.ip_address(spec.address)
        except ValueError:
            errors.append(f"spec.address: not an IP address: {spec.address!r}")
    elif kind == "Service":
        for i, a in enumerate(spec.addresses):
            try:
                ipaddress.ip_address(a)
            except ValueError:
                errors.append(f"spec.addresses[{i}]: not an IP address: {a!r}")
        ports = [p.port for p in spec.ports]
        for dup in sorted({p for p in ports if ports.count(p) > 1}):
            errors.append(f"spec.ports: duplicate port {dup}")
    elif kind == "Route":
        for i, rule in enumerate(spec.rules):
            rp = f"spec.rules[{i}]"
            for k, m in enumerate(rule.match):
                check_match(m, f"{rp}.match[{k}]", errors)
            if sum(d.weight for d in rule.destinations) <= 0:
                errors.append(f"{rp}.destinations: weights must not all be 0")
            check_duration(rule.timeout, f"{rp}.timeout", errors)
            check_retry_policy(rule.retries, f"{rp}.retries", errors)
            check_fault(rule.fault, f"{rp}.fault", errors)
            check_cors(rule.cors, f"{rp}.cors", errors)
            if rule.mirror_response_diff is not None and (rule.mirror is None or not rule.name):
                errors.append(f"{rp}.mirror_response_diff: needs a mirror and a rule name")
            if rule.prefix_rewrite is not None and any(m.prefix is None for m in rule.match):
                errors.append(f"{rp}.prefix_rewrite: every match needs a prefix")
        names = [r.name for r in spec.rules if r.name]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            errors.append(f"spec.rules: duplicate rule name {dup!r}")
    elif kind == "DestinationPolicy":
        seen: set[str] = set()
        for i, sub in enumerate(spec.subsets):
            if sub.name in seen:
                errors.append(f"spec.subsets[{i}].name: duplicate subset {sub.name!r}")
            seen.add(sub.name)
        check_duration(spec.connect_timeout, "spec.connect_timeout", errors)
        check_duration(spec.max_connection_duration, "spec.max_connection_duration", errors)
        check_outlier(spec.outlier_detection, "spec.outlier_detection", errors)
        for k, hp in enumerate(spec.hash_policy):
            if [hp.header is not None, hp.cookie is not None, hp.source_ip].count(True) != 1:
                errors.append(f"spec.hash_policy[{k}]: exactly one of header, cookie, "
                              "source_ip is required")
    elif kind == "AuthorizationPolicy":
        policy = schema.AuthorizationPolicy(name=meta.name, action=spec.action,
                                            rules=spec.rules)
        found: list[str] = []
        check_policies([policy], "spec", found)
        # check_policies names the list item; here the policy is the spec itself.
        errors.extend(e.replace("spec[0].", "spec.", 1) for e in found)
    elif kind == "RateLimit":
        check_rate_limit(spec.limit, "spec.limit", errors)
    elif kind == "PeerAuthentication":
        for port in spec.port_level_mtls:
            if int(port) > 65535:
                errors.append(f"spec.port_level_mtls[{port}]: not a port")
        if spec.port_level_mtls and not spec.selector.match_labels:
            errors.append("spec.port_level_mtls: needs a selector (Istio's rule: ports are "
                          "a workload's)")
