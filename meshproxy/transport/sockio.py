"""Non-blocking socket I/O over reactor channels (DESIGN.md section 6).

Why not trio.SocketStream: per I/O step it costs about 27 us here; a raw non-blocking
socket whose readiness comes from the worker's reactor (transport.reactor) costs a task
switch. These helpers keep the awaits and syscalls per request to the minimum:
- `recv_after_wait` waits first: used where the peer has certainly not answered yet (an
  upstream right after the request was sent, a keep-alive client just answered), saving a
  recv that would fail with EAGAIN; but only when the channel knows that nothing unread is
  queued (reactor.py's edge-triggered rules: the last read was short and no FIN was seen),
  else it reads first;
- `recv_now` tries the syscall first: used where data is likely already queued;
- `send_all` tries the send first and waits only when the kernel buffer is full, which is
  also how backpressure reaches the other side: nothing more is read until it returns.
"""

from __future__ import annotations

import errno
import socket

import trio
from trio.lowlevel import notify_closing, wait_writable

from meshproxy.transport.reactor import Channel, Reactor

RECV_SIZE = 65536
# The fds trio itself has waited on (wait_writable: a full send buffer, a connect in
# progress): only those need trio.lowlevel.notify_closing at close, which otherwise costs
# an epoll_ctl that fails and an exception per closed socket. Waits are rare (backpressure),
# so the set stays small; an fd leaves it at its close.
_trio_waited: set[int] = set()
_LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}


class PeerClosed(Exception):
    """The peer reset the connection or it failed (`errno` says how)."""


async def recv_now(ch: Channel, size: int = RECV_SIZE, deadline: float = 0.0) -> bytes:
    """Bytes from the channel; b"" at EOF. Raises PeerClosed on reset, and
    trio.TooSlowError past `deadline` (reactor time; 0: none)."""
    sock = ch.sock
    while True:
        try:
            data = sock.recv(size)
        except BlockingIOError:
            await ch.wait_readable(deadline)
            continue
        except (ConnectionResetError, ConnectionAbortedError, TimeoutError) as exc:
            raise PeerClosed(str(exc)) from None
        # A short read emptied the receive queue; a full one may have left bytes behind.
        ch.drained = len(data) < size
        return data


async def recv_after_wait(ch: Channel, size: int = RECV_SIZE, deadline: float = 0.0) -> bytes:
    if ch.drained and not ch.hup:
        await ch.wait_readable(deadline)
    return await recv_now(ch, size, deadline)


async def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """Write all of data; waits for writability when the kernel buffer is full."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
        raise PeerClosed(str(exc)) from None
    if sent == len(data):
        return
    view = memoryview(data)[sent:]
    _trio_waited.add(sock.fileno())
    while view:
        await wait_writable(sock)
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            raise PeerClosed(str(exc)) from None
        view = view[sent:]


async def connect(reactor: Reactor, host: str, port: int) -> Channel:
    """A connected non-blocking TCP socket, registered with the reactor."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(addr)
            if err == errno.EINPROGRESS:
                _trio_waited.add(sock.fileno())
                await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
            return reactor.register(sock)
        except BaseException as exc:
            _closing(sock)
            sock.close()
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise last or OSError(f"connect to {host}:{port}: no address")


def close(ch: Channel) -> None:
    sock = ch.sock
    if sock.fileno() < 0:
        return
    ch.forget()
    _closing(sock)
    sock.close()


def _closing(sock: socket.socket) -> None:
    """Before a close: a task in trio's wait_writable on it is woken, not left hanging."""
    fd = sock.fileno()
    if fd in _trio_waited:
        _trio_waited.discard(fd)
        notify_closing(sock)


def abort(ch: Channel) -> None:
    """Close with RST (SO_LINGER 0): tells the peer the exchange failed, never that it ended
    cleanly. Used when a response body cannot be completed."""
    if ch.sock.fileno() < 0:
        return
    try:
        ch.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    close(ch)
