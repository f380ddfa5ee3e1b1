"""Where the control plane keeps its state: one Store interface (base.py), chosen by URL.

    sqlite:///var/lib/meshproxy/cp.db   embedded, one control-plane replica (the default)
"""

from __future__ import annotations

from pathlib import Path

from meshproxy.control.store.base import Compacted, Conflict, Entry, Event, LeaseExpired, Store

__all__ = ["Compacted", "Conflict", "Entry", "Event", "LeaseExpired", "Store", "store_path"]


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
