"""The push protocol's messages: the one module of the control plane the data plane
imports (DESIGN.md section 3).

Transport: the proxy opens an HTTP/1.1 connection to the control plane's API port and asks
to switch protocols:

    GET /v1/discovery HTTP/1.1
    Authorization: Bearer <proxy token>
    Connection: Upgrade
    Upgrade: meshproxy-discovery/1

After `101 Switching Protocols` both sides send frames, each a 4-byte big-endian length and
one msgpack-encoded message below, for as long as the connection lives. One long-lived,
full-duplex stream per proxy (xDS's ADS shape): pushes go down, ACK/NACK and heartbeats go
up, and the stream closing is the first sign that either side is gone.

Exchange (xDS semantics, our own messages):
- the proxy opens with Hello: who it is, the workload it fronts (registered with a lease
  of `lease_ttl`), what it calls (`prefetch`), and the version it already serves (its
  last good config, perhaps persisted): a replica that computes the same version sends
  nothing, so a reconnect resends nothing unchanged;
- the control plane sends Push: a whole config for this proxy, its `version` (a hash of
  its content) and a fresh `nonce`;
- the proxy answers Ack once *every worker* serves that version, or Nack with the errors
  (field paths) and keeps serving its last good config; an answer whose nonce is not the
  latest push's is stale and ignored;
- the proxy sends Heartbeat every lease_ttl / 3 (its lease's renewal), Subscribe when it
  needs more services, and Deregister on a graceful shutdown (its workload drains at once).

Identity (control/ca.py, process/identity.py), on the TLS discovery port only, and only for
a proxy that joined with a join token (control/tokens.py): the proxy sends
CertificateRequest with a CSR (its key never leaves it); the control plane answers
Certificate (the chain and the trust bundle) or CertificateRefused; once every worker
serves the new certificate the proxy says IdentityStatus. Push carries the trust bundle
with the config, both covered by its version, so an ACK says the bundle is in service too
(root rotation waits for those). Renew asks the proxy for a new certificate now (a root
rotation's second phase).
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec

from meshproxy.config import schema
from meshproxy.protocol.frames import FrameReader as Frames
from meshproxy.protocol.frames import frame

PATH = "/v1/discovery"
# The secrets a pushed config names for the mesh identity (Envoy's SDS names: "default" is
# the workload certificate, "ROOTCA" the trust bundle): the proxy's supervisor resolves
# them from the identity its CA issued (process/identity.py), never from files.
WORKLOAD_CHAIN = "sds:default/cert-chain"
WORKLOAD_KEY = "sds:default/key"
ROOT_CA = "sds:ROOTCA"
UPGRADE = "meshproxy-discovery/1"
# A proxy's whole config is tens of KiB for tens of services; 64 MiB is a mistake.
MAX_FRAME = 64 * 1024 * 1024


class Hello(msgspec.Struct, tag="hello", frozen=True, forbid_unknown_fields=True):
    node: str
    namespace: str = "default"
    # The workload this sidecar fronts; None: a proxy that registers nothing (edge, client).
    service: str | None = None
    address: str = "127.0.0.1"
    port: int | None = None
    labels: dict[str, str] = {}
    service_account: str = "default"
    lease_ttl: float = 10.0
    # The sidecar's inbound listener for the workload's callers (registered instead of
    # `port`, so that the mesh reaches the workload through it); None: none.
    inbound_port: int | None = None
    # Where the proxy's outbound listener listens (the config is built for it).
    outbound_address: str = "127.0.0.1"
    outbound_port: int = 15001
    # Services ("name" or "name.namespace") to have before any request asks for them;
    # None: every service in the mesh.
    prefetch: list[str] | None = None
    # Ask for the other services when a request names them (Subscribe), holding the
    # request meanwhile; False: a service outside `prefetch` is 404 NR.
    on_demand: bool = False
    version: str = ""  # the config version the proxy serves now ("" for none)
    workers: int = 1
    # The root (ca.fingerprint) of the certificate the proxy serves now, "" for none.
    identity_root: str = ""
    # Sidecar mode (`run --sidecar`): the listeners take intercepted connections by their
    # original destination; `inbound_port` is then the inbound listener's (15006) and
    # `port` the workload's own, which is what gets registered. Connections to no mesh
    # service: ALLOW_ANY (passed through) or REGISTRY_ONLY (refused).
    intercept: bool = False
    outbound_traffic_policy: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"
    # False: the proxy serves nothing yet (no config applied); the workload is registered
    # "starting", out of every caller's endpoints, until the proxy ACKs its first push.
    ready: bool = True


class Push(msgspec.Struct, tag="push", frozen=True):
    nonce: str
    version: str
    # A schema.Config in msgpack (deterministic order), kept as bytes so that a config the
    # proxy cannot decode is NACKed with field paths, not lost with its nonce.
    config: msgspec.Raw
    warnings: list[str] = []
    # PEM roots workloads trust (the mesh's trust bundle), b"" without identities.
    trust_bundle: bytes = b""


class Current(msgspec.Struct, tag="current", frozen=True):
    """The version the proxy said it serves is the one it would be pushed: it is in sync
    (and no longer stale) without a push."""

    version: str


class Ack(msgspec.Struct, tag="ack", frozen=True):
    nonce: str
    version: str


class Nack(msgspec.Struct, tag="nack", frozen=True):
    nonce: str
    version: str
    errors: list[str]


class Heartbeat(msgspec.Struct, tag="heartbeat", frozen=True):
    pass


class Subscribe(msgspec.Struct, tag="subscribe", frozen=True):
    services: list[str]


class Deregister(msgspec.Struct, tag="deregister", frozen=True):
    pass


class CertificateRequest(msgspec.Struct, tag="csr", frozen=True):
    id: str
    csr: bytes  # PEM PKCS#10; the SAN it may carry must be the token's identity
    ttl: float = 0.0  # seconds asked for; 0: the control plane's default (capped by it)


class Certificate(msgspec.Struct, tag="certificate", frozen=True):
    id: str
    chain: bytes  # PEM: the leaf, then the signing CA's chain to the root
    trust_bundle: bytes  # PEM roots
    spiffe_id: str


class CertificateRefused(msgspec.Struct, tag="csr_refused", frozen=True):
    id: str
    reason: str


class IdentityStatus(msgspec.Struct, tag="identity", frozen=True):
    """Every worker serves this certificate now (what `meshctl describe workload` shows)."""

    spiffe_id: str
    serial: str  # hex
    not_after: float  # wall clock
    renew_at: float
    root: str  # ca.fingerprint of the root it chains to


class Renew(msgspec.Struct, tag="renew", frozen=True):
    reason: str


Up = (Hello | Ack | Nack | Heartbeat | Subscribe | Deregister | CertificateRequest
      | IdentityStatus)
Down = Push | Current | Certificate | CertificateRefused | Renew

_config_encoder = msgspec.msgpack.Encoder(order="deterministic")


def encode(msg: Up | Down) -> bytes:
    return frame(msg)


def encode_config(config: schema.Config) -> bytes:
    return _config_encoder.encode(config)


def config_version(raw: bytes, trust_bundle: bytes = b"") -> str:
    """The version of a config (its encode_config bytes) and the trust bundle pushed with
    it: a hash of their content, so equal configs have equal versions whichever replica
    computed them."""
    h = hashlib.sha256(raw)
    if trust_bundle:
        h.update(b"\0bundle\0" + trust_bundle)
    return h.hexdigest()[:16]


class FrameReader(Frames):
    """Sans-IO: feed bytes, take whole messages of the given union (Up or Down)."""

    def __init__(self, kind: Any) -> None:
        super().__init__(kind, MAX_FRAME, "discovery")
