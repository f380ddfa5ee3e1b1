"""h11 over a trio stream, for the proxy's own small HTTP exchanges (admin API, span
export): never on the data path, which has its own compiled parser."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
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


async def respond(conn: h11.Connection, stream: trio.abc.Stream, status: int,
                  headers: list[tuple[str, str]], payload: bytes) -> bool:
    """Send one whole response (head, body, end) in one write; True when the connection
    can take another request (then h11 is ready for it)."""
    data = conn.send(h11.Response(status_code=status, headers=headers))
    data += conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
        return False
    conn.start_next_cycle()
    return True


async def serve_tcp(handler: Callable[[trio.SocketStream], Awaitable[None]], host: str,
                    port: int, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
    """Serve `handler` per connection on host:port; started() with the bound address (a
    port of 0 gets a free one)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]
    task_status.started((bound[0], bound[1]))
    await trio.serve_listeners(handler, listeners)
