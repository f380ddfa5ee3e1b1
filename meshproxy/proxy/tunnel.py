"""An upgraded connection (WebSocket, RFC 6455 over HTTP/1.1's 101) relayed as bytes.

After the origin's 101 the proxy stops speaking HTTP on both connections: bytes go both
ways until both sides are done. A half-close is passed on (a FIN becomes a shutdown of
the other side's write half, RFC 9293); a reset on either side ends the tunnel. The
listener's idle_timeout, renewed by traffic either way, bounds a silent tunnel.

A client on an HTTP/2 stream asked with an extended CONNECT (RFC 8441; protocol.http2
translated it to the HTTP/1.1 upgrade): the 101 is answered 200 on the stream, the bytes
go as DATA both ways, a FIN is END_STREAM and a reset is RST_STREAM CANCEL (RFC 8441 5).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

import trio

from meshproxy._core.http1_parser import MessageHead, serialize_head
from meshproxy.config.snapshot import RESPONSE_SKIP
from meshproxy.protocol.http2 import tunnel_fields
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.head_rewrite import CONN_UPGRADE
from meshproxy.proxy.phases import PH_TUNNEL
from meshproxy.transport.sockio import PeerClosed
from meshproxy.upstream.conn_pool import UpstreamConn


class _Stream(Protocol):
    """proxy.h2_stream.H2Stream, as the tunnel writes it."""

    async def send_head(self, fields: list[tuple[bytes, bytes]], end: bool) -> None: ...
    async def send_body(self, data: bytes, end: bool) -> None: ...
    def cancel(self) -> None: ...


def _stream_writers(stream: _Stream) -> tuple[Callable[[bytes], Awaitable[None]],
                                              Callable[[], Awaitable[None]]]:
    async def send(data: bytes) -> None:
        await stream.send_body(data, False)

    async def end() -> None:
        await stream.send_body(b"", True)  # END_STREAM: the origin's FIN
    return send, end


def shutdown_writer(sock: socket.socket) -> Callable[[], Awaitable[None]]:
    """A FIN to pass on: the socket's write half shut (RFC 9293)."""
    async def end() -> None:
        try:
            sock.shutdown(socket.SHUT_WR)  # pass the half-close on (RFC 9293 FIN)
        except OSError:
            pass
    return end


async def splice(side: ClientSide, up_recv: Callable[[], Awaitable[bytes]],
                 up_send: Callable[[bytes], Awaitable[None]],
                 up_end: Callable[[], Awaitable[None]],
                 down_send: Callable[[bytes], Awaitable[None]],
                 down_end: Callable[[], Awaitable[None]],
                 counted: Callable[[bool, int], None]) -> bool:
    """Bytes both ways between the client and an upstream until both sides are done (a
    tunnel, or a TCP-proxied connection, proxy.tcp_proxy): a FIN is passed on as the
    other side's half-close, a reset on either side ends both (True: it broke). Every
    piece renews the connection's idle deadline and is counted, `counted(upstream_bound,
    n)`, after it was written."""
    idle = side.ctx.spec.idle_timeout
    broken = False

    async def pump(recv: Callable[[], Awaitable[bytes]],
                   send: Callable[[bytes], Awaitable[None]],
                   end: Callable[[], Awaitable[None]],
                   upstream_bound: bool, nursery: trio.Nursery) -> None:
        nonlocal broken
        try:
            while True:
                data = await recv()
                if not data:
                    break
                side.deadline = side.reactor.now + idle
                await send(data)
                counted(upstream_bound, len(data))
            await end()
        except PeerClosed:
            broken = True
            nursery.cancel_scope.cancel()  # a reset on one side ends the tunnel

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, side.recv, up_send, up_end, True, nursery)
        nursery.start_soon(pump, up_recv, down_send, down_end, False, nursery)
    return broken


async def tunnel(side: ClientSide, ex: Exchange, conn: UpstreamConn, resp: MessageHead,
                 ubuf: bytes) -> None:
    rest = ubuf[resp.end:]
    ex.upstream_status = 101
    ex.response_started = True
    side.phase = PH_TUNNEL
    side.deadline = side.reactor.now + side.ctx.spec.idle_timeout
    stream: _Stream | None = None
    if side.multiplexed:
        stream = cast(_Stream, side)
        ex.status = 200
        await stream.send_head(tunnel_fields(resp), False)
        if rest:
            await stream.send_body(rest, False)
        down_send, down_end = _stream_writers(stream)
    else:
        extra = [CONN_UPGRADE, (b"upgrade", resp.upgrade or b"websocket")]
        out = serialize_head(b"HTTP/1.1 101 %s" % (resp.reason or b"Switching Protocols"),
                             resp.headers, RESPONSE_SKIP, extra)
        ex.status = 101
        await side.send(out + rest)
        down_send, down_end = side.send, shutdown_writer(side.sock)
    ex.bytes_out += len(rest)
    if side.pos < len(side.buf):
        await conn.send(side.buf[side.pos:])
        ex.bytes_in += len(side.buf) - side.pos
        side.pos = len(side.buf)

    def counted(upstream_bound: bool, n: int) -> None:
        if upstream_bound:
            ex.bytes_in += n
        else:
            ex.bytes_out += n

    broken = await splice(side, conn.recv, conn.send, shutdown_writer(conn.sock), down_send,
                          down_end, counted)
    side.upstream = None
    conn.close()
    if broken and stream is not None:
        stream.cancel()
