"""Non-blocking socket I/O driven by trio's readiness waits (DESIGN.md section 6).

Why not trio.SocketStream: per I/O step it costs about 27 us here against about 9 us for a
`wait_readable` on a raw non-blocking socket. These helpers keep the awaits and syscalls per
request to the minimum:
- `recv_after_wait` waits first: used where the peer has certainly not answered yet (an
  upstream right after the request was sent), saving a recv that would fail with EAGAIN.
- `recv_now` tries the syscall first: used where data is likely already queued.
- `send_all` tries the send first and waits only when the kernel buffer is full, which is
  also how backpressure reaches the other side: nothing more is read until this returns.

Closing: `close` tells trio first (notify_closing) so a task parked on the fd is woken with
ClosedResourceError rather than left waiting on a reused descriptor.
"""

from __future__ import annotations

import errno
import socket

import trio
from trio.lowlevel import notify_closing, wait_readable, wait_writable

RECV_SIZE = 65536


class PeerClosed(Exception):
    """The peer reset the connection or it failed (`errno` says how)."""


async def recv_now(sock: socket.socket, size: int = RECV_SIZE) -> bytes:
    """Bytes from sock; b"" at EOF. Raises PeerClosed on reset."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await wait_readable(sock)
        except (ConnectionResetError, ConnectionAbortedError, TimeoutError) as exc:
            raise PeerClosed(str(exc)) from None


async def recv_after_wait(sock: socket.socket, size: int = RECV_SIZE) -> bytes:
    await wait_readable(sock)
    return await recv_now(sock, size)


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
    while view:
        await wait_writable(sock)
        try:
            sent = sock.send(view)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            raise PeerClosed(str(exc)) from None
        view = view[sent:]


async def connect(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (numeric addresses or names resolved by trio)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, type_, proto, _, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(addr)
            if err == errno.EINPROGRESS:
                await wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {host}:{port}: {errno.errorcode.get(err, err)}")
            return sock
        except BaseException as exc:
            close(sock)
            if not isinstance(exc, OSError):
                raise
            last = exc
    raise last or OSError(f"connect to {host}:{port}: no address")


def close(sock: socket.socket) -> None:
    if sock.fileno() < 0:
        return
    notify_closing(sock)
    sock.close()


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): tells the peer the exchange failed, never that it ended
    cleanly. Used when a response body cannot be completed."""
    if sock.fileno() < 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    close(sock)
