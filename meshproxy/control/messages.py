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
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from meshproxy.config import schema
from meshproxy.protocol.frames import FrameReader as Frames
from meshproxy.protocol.frames import frame

PATH = "/v1/discovery"
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


class Push(msgspec.Struct, tag="push", frozen=True):
    nonce: str
    version: str
    # A schema.Config in msgpack (deterministic order), kept as bytes so that a config the
    # proxy cannot decode is NACKed with field paths, not lost with its nonce.
    config: msgspec.Raw
    warnings: list[str] = []


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


Up = Hello | Ack | Nack | Heartbeat | Subscribe | Deregister
Down = Push | Current

_config_encoder = msgspec.msgpack.Encoder(order="deterministic")


def encode(msg: Up | Down) -> bytes:
    return frame(msg)


def encode_config(config: schema.Config) -> bytes:
    return _config_encoder.encode(config)


def config_version(raw: bytes) -> str:
    """The version of a config (its encode_config bytes): a hash of its content, so equal
    configs have equal versions whichever replica computed them."""
    return hashlib.sha256(raw).hexdigest()[:16]


class FrameReader(Frames):
    """Sans-IO: feed bytes, take whole messages of the given union (Up or Down)."""

    def __init__(self, kind: Any) -> None:
        super().__init__(kind, MAX_FRAME, "discovery")
