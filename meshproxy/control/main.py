"""The control-plane process (`meshproxy control`): the store, one replica's view of it with
the registry and the push server, the operator API (which also carries the proxies'
discovery streams), the CA with the TLS discovery port, and the admin port with the
metrics."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

import trio

from meshproxy.control.admin import ControlAdmin
from meshproxy.control.api import OperatorAPI
from meshproxy.control.ca import DEFAULT_LEAF_TTL, DEFAULT_TRUST_DOMAIN, Authority
from meshproxy.control.metrics import Metrics
from meshproxy.control.registry import SELF_PRESERVATION_THRESHOLD
from meshproxy.control.replica import Replica
from meshproxy.control.serving import ServingIdentity
from meshproxy.control.store import open_store
from meshproxy.control.tokens import TokenKey

log = logging.getLogger("meshproxy.control")


@dataclass
class ControlOptions:
    store_url: str
    api: tuple[str, int]
    token: str
    proxy_token: str | None = None
    admin: tuple[str, int] | None = ("127.0.0.1", 15014)
    self_preservation: float = SELF_PRESERVATION_THRESHOLD
    # The CA (control/ca.py): its directory (None: no CA, no identities, no TLS port).
    ca_dir: Path | None = None
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    leaf_ttl: float = DEFAULT_LEAF_TTL
    discovery: tuple[str, int] | None = ("127.0.0.1", 15012)
    # Names and addresses in the serving certificate, besides the discovery address.
    serving_names: list[str] = field(default_factory=lambda: ["localhost"])


async def run_control(opts: ControlOptions) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_store(opts.store_url) as store, trio.open_nursery() as nursery:
            metrics = Metrics()
            admin = ControlAdmin(metrics)
            if opts.admin is not None:
                host, port = await nursery.start(admin.serve, *opts.admin)
                log.info("admin (metrics) on %s:%d", host, port)
            authority = tokens = None
            if opts.ca_dir is not None:
                authority = Authority(opts.ca_dir, opts.trust_domain, opts.leaf_ttl)
                tokens = TokenKey.open(opts.ca_dir / "token-key.pem")
                log.info("CA for trust domain %s from %s (%s), root %s", opts.trust_domain,
                         opts.ca_dir, "made now, self-signed" if authority.created else
                         "self-signed" if authority.current.cert == authority.current.root
                         else "plugged-in intermediate", authority.current.root_fingerprint)
            replica = Replica(store, metrics, threshold=opts.self_preservation,
                              authority=authority)
            await nursery.start(replica.run)
            api = OperatorAPI(store, opts.token, replica, opts.proxy_token, tokens)
            host, port = await nursery.start(api.serve, *opts.api)
            if authority is not None and opts.discovery is not None:
                names = [opts.discovery[0], *opts.serving_names]
                serving = ServingIdentity(authority, list(dict.fromkeys(names)))
                replica.issuer.on_signer_change = serving.signer_changed
                nursery.start_soon(serving.renew)
                dhost, dport = await nursery.start(api.serve_tls, *opts.discovery,
                                                   serving.context)
                log.info("TLS discovery port on %s:%d", dhost, dport)
            admin.ready = True
            log.info("store %s at revision %d", opts.store_url, await store.revision())
            log.info("operator API on %s:%d", host, port)
            async for signum in signals:
                log.info("received %s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
