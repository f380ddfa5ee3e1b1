"""Listening sockets and the accept loop.

Every listener is bound with SO_REUSEPORT so that each worker process of the pool (issue 3)
binds its own socket to the same address and the kernel spreads connections among them.
Accepting is batched: one readiness wait, then accept() until EAGAIN (at most ACCEPT_BATCH,
so one busy listener cannot starve the connections already open).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable

import trio

log = logging.getLogger("meshproxy.listener")

# The kernel's queue of connections not yet accepted; Linux caps it at net.core.somaxconn.
BACKLOG = 1024
ACCEPT_BATCH = 64


def bind_listener(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Admission:
    """--max-connections: at the limit the worker stops calling accept(), so further
    connections wait in the kernel's backlog (or go to another worker) instead of being
    accepted and dropped. 0 means no limit."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.active = 0
        self._room: trio.Event | None = None

    def has_room(self) -> bool:
        return not self.limit or self.active < self.limit

    async def wait_room(self) -> None:
        while not self.has_room():
            self._room = trio.Event()
            await self._room.wait()

    def enter(self) -> None:
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if self._room is not None:
            self._room.set()
            self._room = None


async def accept_loop(lsock: socket.socket, handler: Callable[[socket.socket, tuple], None],
                      admission: Admission) -> None:
    """Accept until cancelled; `handler` takes each connection at once (it starts a task
    for it, or hands it to the reactor)."""
    # socket.accept() looks up the listener's family and type (enum conversions) per
    # connection; they are taken once here, and the accepted fd wrapped directly.
    family, type_, proto = lsock.family, lsock.type, lsock.proto
    accept = lsock._accept  # type: ignore[attr-defined]  # CPython socket.py uses it too
    wrap = socket.socket
    while True:
        await admission.wait_room()
        await trio.lowlevel.wait_readable(lsock)
        for _ in range(ACCEPT_BATCH):
            if not admission.has_room():
                break
            try:
                fd, peer = accept()
                sock = wrap(family, type_, proto, fileno=fd)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: leave connections in the backlog and retry shortly
                    # instead of spinning on a listener that stays readable.
                    log.error("accept failed: %s; pausing accepts for 100 ms", exc)
                    await trio.sleep(0.1)
                    break
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            admission.enter()  # counted now, so the batch cannot overshoot the limit
            handler(sock, peer)
