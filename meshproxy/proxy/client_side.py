"""The client connection as the layers below the driver see it: its I/O, its read cursor,
what it is waiting for, and the upstream connection it is using.

This is the contract between the downstream driver (proxy.downstream, which subclasses it
and alone decides and writes local replies) and the relay (proxy.relay, proxy.tunnel):
- `buf[pos:]` is what was received and not yet consumed. The driver parses heads from it;
  the relay consumes the request body from it and leaves what follows the body, the next
  pipelined request (RFC 9112 section 9.3.2), in place.
- `phase` and `deadline` say what is being waited for and until when; the reactor's ticker
  cancels the connection's scope once `deadline` has passed, and the driver answers the
  timeout by `phase` (proxy.phases).
- `upstream` is the upstream connection in use, so that a timeout or a client that goes
  away aborts it (a half-relayed upstream response is never pooled).
- `recv`, `recv_wait` and `send` are the socket's calls, or the TLS stream's once a TLS
  handshake is done.
- what is written to the client goes through the side's own methods, so that the layers
  below never frame a message themselves: `send_local` (a local reply), `informational`
  (a 1xx), `reset` (a response that broke after it began), and the response relay, which
  writes HTTP/1.1 bytes with `send` here and HEADERS and DATA frames on an HTTP/2 stream
  (proxy.h2_stream, the other ClientSide).
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from meshproxy._core.http1_parser import MessageHead, serialize_head
from meshproxy.config.snapshot import RESPONSE_SKIP, ClusterAction
from meshproxy.proxy.context import ListenerContext
from meshproxy.proxy.local_reply import local_reply, reason
from meshproxy.proxy.phases import PH_HEAD
from meshproxy.transport.sockio import abort, recv_after_wait, recv_now, send_all
from meshproxy.transport.tls_material import PeerIdentity
from meshproxy.upstream.conn_pool import UpstreamConn


class ClientSide:
    # The protocol the access log and spans name; None: the head's own (HTTP/1.0 or 1.1).
    protocol: bytes | None = None
    # An HTTP/2 stream: the response relay writes frames (proxy.h2_stream).
    multiplexed = False
    # The request fields an HTTP/2 client sent never-indexed (RFC 7541 7.1.3); a stream's.
    never_indexed: frozenset[tuple[bytes, bytes]] | None = None

    __slots__ = ("ctx", "reactor", "ch", "sock", "peer", "peer_ip", "buf", "pos", "phase",
                 "upstream", "deadline", "born", "recv", "recv_wait", "send",
                 "identity", "_remote", "original_dst")

    def __init__(self, ctx: ListenerContext, sock: socket.socket, peer: tuple) -> None:
        self.ctx = ctx
        self.reactor = ctx.reactor
        self.ch = ctx.reactor.register(sock)
        self.sock = sock
        # Plain sockets call sockio directly (partials add no frame); a TLS connection swaps
        # in its stream's methods after the handshake.
        self.recv: Callable[..., Awaitable[bytes]] = partial(recv_now, self.ch)
        self.recv_wait: Callable[..., Awaitable[bytes]] = partial(recv_after_wait, self.ch)
        self.send: Callable[[bytes], Awaitable[None]] = partial(send_all, sock)
        # The verified client certificate's identity (mTLS), the source principal.
        self.identity: PeerIdentity | None = None
        # Where an intercepted connection was going (use_original_dst listeners), or None.
        self.original_dst: tuple[str, int] | None = None
        if peer and peer[0].startswith("::ffff:"):
            # An IPv4 client of a dual-stack ("::") listener: its address as IPv4, so that
            # X-Forwarded-For, the access log and authorization's ip_blocks see 10.0.0.1,
            # not ::ffff:10.0.0.1.
            peer = (peer[0][7:], peer[1])
        self.peer = peer
        self.peer_ip = peer[0].encode("ascii") if peer else b"-"
        self._remote = b""
        self.buf = b""
        self.pos = 0
        self.phase = PH_HEAD
        self.upstream: UpstreamConn | None = None
        self.born = self.reactor.now
        self.deadline = self.born + ctx.spec.request_headers_timeout

    def remote(self) -> bytes:
        """The peer as `ip:port` (the access log's downstream address), made once."""
        if not self._remote:
            self._remote = b"%s:%d" % (self.peer_ip, self.peer[1]) if self.peer else b"-"
        return self._remote

    def too_old(self) -> bool:
        """max_connection_duration reached: the next response says Connection: close."""
        limit = self.ctx.spec.max_connection_duration
        return bool(limit) and self.reactor.now - self.born >= limit

    def body_skippable(self, head: MessageHead) -> bool:
        """Consume an unread request body when all of it is already buffered; otherwise the
        connection must close after the reply (the rest of the body is still coming)."""
        if head.chunked:
            return False
        cl = head.content_length
        if cl <= 0:
            return True
        if len(self.buf) - self.pos >= cl:
            self.pos += cl
            return True
        return False

    async def send_local(self, ex: Any, head: MessageHead | None, status: int, body: bytes,
                          flag: str, *, close: bool = False, body_done: bool = False,
                          extra: list[tuple[bytes, bytes]] | None = None,
                          content_type: bytes = b"text/plain", grpc_status: int = -1) -> bool:
        """Write a local reply in one send; whether the connection stays open for the
        next request (only when the request allows keep-alive and its unread body, if
        any, is already here to skip)."""
        keep = (head is not None and not close and head.keep_alive
                and not self.ctx.state.draining and not self.too_old()
                and (body_done or self.body_skippable(head)))
        hdrs = list(extra or ())
        if ex.resp_extra:
            hdrs += ex.resp_extra
        if keep and head is not None and head.version == 10:
            hdrs.append((b"connection", b"keep-alive"))
        head_only = head is not None and head.method == b"HEAD"
        data = local_reply(status, body, close=not keep, head_only=head_only,
                           content_type=content_type, extra=hdrs)
        ex.status = status
        ex.flags = flag
        ex.response_started = True
        ex.bytes_out = 0 if head_only else len(body)
        await self.send(data)
        return keep

    def forwarding(self, head: MessageHead, action: ClusterAction) -> None:
        """The request goes to the router (a hook for the connection's own bookkeeping)."""

    async def informational(self, status: int, headers: list[tuple[bytes, bytes]],
                            phrase: bytes = b"") -> None:
        """A 1xx response before the final one (RFC 9110 section 15.2); `phrase`: the
        origin's reason phrase, relayed as it was."""
        await self.send(serialize_head(b"HTTP/1.1 %d %s" % (status, phrase or reason(status)),
                                       headers, RESPONSE_SKIP, []))

    def reset(self) -> None:
        """A response broke after it began: the client must never take it for complete,
        so the connection is reset (an HTTP/2 stream resets only itself)."""
        abort(self.ch)
