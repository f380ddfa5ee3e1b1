"""An upgraded connection (WebSocket, RFC 6455 over HTTP/1.1's 101) relayed as bytes.

After the origin's 101 the proxy stops speaking HTTP on both connections: bytes go both
ways until both sides are done. A half-close is passed on (a FIN becomes a shutdown of
the other side's write half, RFC 9293); a reset on either side ends the tunnel. The
listener's idle_timeout, renewed by traffic either way, bounds a silent tunnel.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import trio

from meshproxy._core.http1_parser import MessageHead, serialize_head
from meshproxy.config.snapshot import RESPONSE_SKIP
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.head_rewrite import CONN_UPGRADE
from meshproxy.proxy.phases import PH_TUNNEL
from meshproxy.transport.sockio import PeerClosed
from meshproxy.upstream.conn_pool import UpstreamConn


async def tunnel(side: ClientSide, ex: Exchange, conn: UpstreamConn, resp: MessageHead,
                 ubuf: bytes) -> None:
    extra = [CONN_UPGRADE, (b"upgrade", resp.upgrade or b"websocket")]
    out = serialize_head(b"HTTP/1.1 101 %s" % (resp.reason or b"Switching Protocols"),
                         resp.headers, RESPONSE_SKIP, extra)
    ex.status = ex.upstream_status = 101
    ex.response_started = True
    side.phase = PH_TUNNEL
    idle = side.ctx.spec.idle_timeout
    side.deadline = side.reactor.now + idle
    await side.send(out + ubuf[resp.end:])
    if side.pos < len(side.buf):
        await conn.send(side.buf[side.pos:])
        side.pos = len(side.buf)

    async def pump(recv: Callable[[], Awaitable[bytes]],
                   send: Callable[[bytes], Awaitable[None]], dst: socket.socket,
                   upstream_bound: bool, nursery: trio.Nursery) -> None:
        try:
            while True:
                data = await recv()
                if not data:
                    break
                side.deadline = side.reactor.now + idle
                await send(data)
                if upstream_bound:
                    ex.bytes_in += len(data)
                else:
                    ex.bytes_out += len(data)
        except PeerClosed:
            nursery.cancel_scope.cancel()  # a reset on one side ends the tunnel
            return
        try:
            dst.shutdown(socket.SHUT_WR)  # pass the half-close on (RFC 9293 FIN)
        except OSError:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, side.recv, conn.send, conn.sock, True, nursery)
        nursery.start_soon(pump, conn.recv, side.send, side.sock, False, nursery)
    side.upstream = None
    conn.close()
