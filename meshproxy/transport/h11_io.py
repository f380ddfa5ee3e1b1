"""h11 over a trio stream, for the proxy's own small HTTP exchanges (admin API, span
export): never on the data path, which has its own compiled parser."""

from __future__ import annotations

from typing import Any

import h11
import trio


async def next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    """The next h11 event, reading from the stream as long as h11 needs data."""
    while True:
        ev = conn.next_event()
        if ev is not h11.NEED_DATA:
            return ev
        conn.receive_data(bytes(await stream.receive_some(65536)))
