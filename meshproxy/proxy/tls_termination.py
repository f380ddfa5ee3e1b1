"""TLS termination of a client connection: the handshake and what follows it.

A new TLS connection's handshake is stepped from the reactor without a task when the
fast path is on (proxy.tls_accept, which calls `established`, `handshake_failed` and
`plaintext_start` here), or run in the connection's task otherwise (`_handshake`); both
end the same way: `established` routes the connection's reads and writes through the TLS
stream (a task) and its compiled record layer (the fast path), takes the client's
verified identity and counts the handshake. A PERMISSIVE listener takes plaintext and
TLS on one port, told apart by the first byte (RFC 8446 section 5.1: content type 22
opens a handshake).

DownstreamConnection (proxy.downstream) is this class with the request loop on top; the
fast path's per-connection state lives here because the handshake decides it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import trio
from OpenSSL import SSL

from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.context import ListenerContext, ListenerTLS
from meshproxy.proxy.fast_path import Flight
from meshproxy.proxy.tls_accept import TLS_HANDSHAKE_RECORD, Handshake
from meshproxy.transport.sockio import PeerClosed
from meshproxy.transport.tls_context import SanRefused
from meshproxy.transport.tls_records import Records
from meshproxy.transport.tls_stream import TLSError, TLSStream

log = logging.getLogger("meshproxy.downstream")


class TLSTermination(ClientSide):
    """A client connection's TLS state, and its fast-path state (parked or not)."""

    __slots__ = ("tls", "flight", "fast_hint", "handshake", "parked")

    def __init__(self, ctx: ListenerContext, sock: socket.socket, peer: tuple) -> None:
        super().__init__(ctx, sock, peer)
        self.tls: TLSStream | None = None
        # The fast path's state for this connection (proxy.fast_path), None when it is off
        # for the listener; `fast_hint`: the last request went that way, so the connection
        # parks on it as soon as it is idle.
        self.flight: Flight | None = None
        self.fast_hint = False
        # A TLS handshake stepped from the reactor without a task (proxy.tls_accept).
        self.handshake: Handshake | None = None
        self.parked = False  # idle, with no task (downstream.PARK_AFTER)

    def park(self, wake: Callable[[], None]) -> None:
        """Idle with no task: the reactor calls `wake` at the next edge."""
        self.parked = True
        self.buf, self.pos = b"", 0  # all consumed: the last request's bytes go
        self.ch.parked = wake
        ls = self.ctx.lstats
        ls.block.add(ls.downstream_cx_parked, 1)

    def unpark(self) -> None:
        self.parked = False
        ls = self.ctx.lstats
        ls.block.add(ls.downstream_cx_parked, -1)


    def plaintext_start(self) -> None:
        """PERMISSIVE, and the client's first byte opens no TLS handshake: a plaintext
        connection on the fast path, with no identity."""
        self.handshake = None
        ls = self.ctx.lstats
        ls.block.inc(ls.downstream_cx_plaintext)
        self.deadline = self.born + self.ctx.spec.request_headers_timeout
        flight = self.flight = Flight(self)
        self.fast_hint = True
        self.park(flight.client_cb)
        flight.on_client()  # its first bytes are queued already

    async def _handshake(self) -> bool:
        """TLS termination: the handshake within the listener's handshake timeout; then
        every read and write of this connection goes through the TLS stream."""
        tls = self.ctx.tls
        assert tls is not None
        try:
            plaintext = tls.accept_plaintext and not await self._starts_tls(tls)
        except trio.TooSlowError:
            return False
        if plaintext:
            ls = self.ctx.lstats
            ls.block.inc(ls.downstream_cx_plaintext)
            if self.ctx.state.fast_path:
                self.flight = Flight(self)
            return True  # PERMISSIVE, and this client speaks plaintext: no identity
        return await self.complete_handshake(
            TLSStream.over_channel(self.ch, tls.server.connection()))

    async def complete_handshake(self, stream: TLSStream) -> bool:
        """The handshake (or its rest) in a task, within the listener's handshake
        timeout."""
        tls = self.ctx.tls
        assert tls is not None
        self.tls = stream
        try:
            await stream.handshake(self.reactor.now + tls.handshake_timeout)
        except (TLSError, trio.TooSlowError) as exc:
            self.handshake_failed(stream.ssl, str(exc) or "TLS handshake timeout")
            return False
        self.established(stream, None)
        return True

    def handshake_failed(self, ssl: SSL.Connection, reason: str) -> None:
        """Count and log a failed handshake (the caller closes)."""
        ls = self.ctx.lstats
        ls.block.inc(ls.ssl_connection_error)
        refused = ssl.get_app_data()
        if isinstance(refused, SanRefused):
            # A trusted, valid certificate of an identity this listener does not take:
            # the operator's policy, worth a line in the log (the client got
            # bad_certificate).
            ls.block.inc(ls.ssl_fail_verify_san)
            log.info("refused the client certificate of %s: %s", self.peer, refused)
        else:
            log.debug("TLS handshake with %s failed: %s", self.peer, reason)

    def established(self, stream: TLSStream, records: Records | None) -> None:
        """The handshake is done: every read and write of this connection goes through
        the TLS stream (a task) or its compiled record layer (the fast path)."""
        tls = self.ctx.tls
        assert tls is not None
        self.handshake = None
        self.tls = stream
        self.deadline = self.born + self.ctx.spec.request_headers_timeout
        self.recv = stream.recv
        self.recv_wait = stream.recv_wait
        self.send = stream.send_all
        if self.ctx.state.fast_path:
            # The compiled record layer, on the same SSL object: the fast path takes the
            # connection's keep-alive requests.
            self.flight = Flight(self, records or Records(stream.ssl))
            self.fast_hint = records is not None
        self.identity = tls.server.peer(stream.ssl)
        ls = self.ctx.lstats
        ls.block.inc(ls.ssl_handshake)
        if tls.server.mtls and self.identity is None:
            ls.block.inc(ls.ssl_no_certificate)

    async def _starts_tls(self, tls: ListenerTLS) -> bool:
        """PERMISSIVE: whether the connection's first byte opens a TLS handshake record
        (content type 22, RFC 8446 5.1); peeked, so either path reads it again. A client
        that sends nothing within the handshake timeout is let go like a stalled TLS one."""
        deadline = self.reactor.now + tls.handshake_timeout
        while True:
            try:
                first = self.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                await self.ch.wait_readable(deadline)
                continue
            except (ConnectionResetError, ConnectionAbortedError, TimeoutError) as exc:
                raise PeerClosed(str(exc)) from None
            if not first:
                raise PeerClosed("closed before its first byte")
            return first[0] == TLS_HANDSHAKE_RECORD
