"""The control-plane process (`meshproxy control`): the store and the operator API on it.
The registry and the push to proxies join it as they are built (issue 10)."""

from __future__ import annotations

import logging
import signal

import trio

from meshproxy.control.api import OperatorAPI
from meshproxy.control.store import open_store

log = logging.getLogger("meshproxy.control")


async def run_control(store_url: str, api_host: str, api_port: int, token: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_store(store_url) as store, trio.open_nursery() as nursery:
            api = OperatorAPI(store, token)
            host, port = await nursery.start(api.serve, api_host, api_port)
            log.info("store %s at revision %d", store_url, await store.revision())
            log.info("operator API on %s:%d", host, port)
            async for signum in signals:
                log.info("received %s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
