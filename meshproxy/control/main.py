"""The control-plane process (`meshproxy control`): the store, one replica's view of it with
the registry and the push server, the operator API (which also carries the proxies'
discovery streams) and the admin port with the metrics."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

import trio

from meshproxy.control.admin import ControlAdmin
from meshproxy.control.api import OperatorAPI
from meshproxy.control.metrics import Metrics
from meshproxy.control.registry import SELF_PRESERVATION_THRESHOLD
from meshproxy.control.replica import Replica
from meshproxy.control.store import open_store

log = logging.getLogger("meshproxy.control")


@dataclass
class ControlOptions:
    store_url: str
    api: tuple[str, int]
    token: str
    proxy_token: str | None = None
    admin: tuple[str, int] | None = ("127.0.0.1", 15014)
    self_preservation: float = SELF_PRESERVATION_THRESHOLD


async def run_control(opts: ControlOptions) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_store(opts.store_url) as store, trio.open_nursery() as nursery:
            metrics = Metrics()
            admin = ControlAdmin(metrics)
            if opts.admin is not None:
                host, port = await nursery.start(admin.serve, *opts.admin)
                log.info("admin (metrics) on %s:%d", host, port)
            replica = Replica(store, metrics, threshold=opts.self_preservation)
            await nursery.start(replica.run)
            api = OperatorAPI(store, opts.token, replica, opts.proxy_token)
            host, port = await nursery.start(api.serve, *opts.api)
            admin.ready = True
            log.info("store %s at revision %d", opts.store_url, await store.revision())
            log.info("operator API on %s:%d", host, port)
            async for signum in signals:
                log.info("received %s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
