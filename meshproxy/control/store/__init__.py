"""Where the control plane keeps its state: one Store interface (base.py), chosen by URL.

    sqlite:///var/lib/meshproxy/cp.db   embedded, one control-plane replica (the default)
    etcd://127.0.0.1:2379               etcd v3, for several replicas
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from meshproxy.control.store.base import Compacted, Conflict, Entry, Event, LeaseExpired, Store

__all__ = ["Compacted", "Conflict", "Entry", "Event", "LeaseExpired", "Store", "open_store",
           "store_path"]


def store_path(url: str) -> Path:
    """The SQLite file of a `sqlite:///abs/path` or `sqlite://rel/path` URL, or a bare path."""
    if url.startswith("sqlite:///"):
        return Path("/" + url[len("sqlite:///"):])
    if url.startswith("sqlite://"):
        return Path(url[len("sqlite://"):])
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ValueError(f"--store {url}: unknown scheme {scheme!r} (known: sqlite)")
    return Path(url)


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[Store]:
    """The store a `--store` URL names, open for the duration of the block."""
    if url.startswith("etcd://"):
        from meshproxy.control.store.etcd import EtcdStore

        async with EtcdStore.open(url) as etcd:
            yield etcd
        return
    from meshproxy.control.store.sqlite import SQLiteStore

    async with SQLiteStore.open(store_path(url)) as sqlite:
        yield sqlite
