"""A new TLS connection's handshake without a task: the fast path's first phase on a TLS
listener.

A task per handshake cost more than the handshake's own Python: the spawn, a trio wait
and reschedule per flight, and pyOpenSSL raising WantReadError through its error
machinery at every step (three SSL_do_handshake calls for two flights). Here the
connection's channel calls `Handshake.step` from the reactor's batch when ciphertext
arrives; each step is one recv, one compiled SSL_do_handshake over the memory BIOs
(transport.tls_records) and one send of what OpenSSL answers. pyOpenSSL still owns the SSL
object, its context and callbacks (SNI, ALPN, the SAN check run inside SSL_do_handshake).

  PERMISSIVE listener, first edge: the first byte, peeked, decides (RFC 8446 5.1:
    content type 22 opens a handshake); a plaintext client goes to the fast path as a
    plain connection would.
  done: the connection is established (`DownstreamConnection.established`: its TLS
    stream, identity and stats, as on the task path) and the fast path takes the
    plaintext that came along with the client's Finished, if any.
  failed: the alert goes out, the failure is counted and logged as on the task path
    (`handshake_failed`), the connection closes.
  the handshake timeout (the connection's deadline): counted as a failed handshake.
  a flight the socket does not take at once: a task sends the rest and finishes the
    handshake over the TLS stream on the same SSL object (the task path's own code).

Invariant: until `established` or a close, the connection's only callback is `step`; no
task exists for it (a hand-off clears the callback before the task starts).
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from meshproxy.transport.sockio import RECV_SIZE, send_all
from meshproxy.transport.tls_records import RecordError, Records
from meshproxy.transport.tls_stream import TLSStream

if TYPE_CHECKING:
    from meshproxy.proxy.context import ListenerTLS

log = logging.getLogger("meshproxy.tls_accept")

# Errors of a recv or send that mean the client is gone.
_GONE = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError)
TLS_HANDSHAKE_RECORD = 0x16


class Handshake:
    """The server side of one TLS handshake, stepped from the reactor's batch."""

    __slots__ = ("dc", "ssl", "records", "decided")

    def __init__(self, dc: Any, tls: ListenerTLS) -> None:
        self.dc = dc  # the DownstreamConnection (not imported: it imports this module)
        self.ssl = tls.server.connection()
        self.records = Records(self.ssl)
        self.decided = not tls.accept_plaintext  # whether TLS is known to come
        dc.deadline = dc.reactor.now + tls.handshake_timeout

    def wait(self) -> None:
        """Until the next edge on the socket (one already queued is reported too). The
        bound method is made per wait (twice a handshake) rather than kept, which would
        make a cycle for the garbage collector."""
        self.dc.ch.parked = self.step

    def stream(self) -> TLSStream:
        """The TLS stream a task uses on the same SSL object."""
        return TLSStream.over_channel(self.dc.ch, self.ssl)

    def step(self) -> None:
        try:
            self._advance()
        except Exception:
            log.exception("internal error in the TLS handshake of %s", self.dc.peer)
            self.dc.close_taskless()

    def expire(self) -> None:
        """The connection's deadline passed (a client that never finishes its hello), or
        the worker drains or stops: close; only the first is a failed handshake."""
        dc = self.dc
        if dc.reactor.now >= dc.deadline:
            dc.handshake_failed(self.ssl, "TLS handshake timeout")
        dc.close_taskless()

    def _advance(self) -> None:
        dc = self.dc
        ch, sock = dc.ch, dc.sock
        if not self.decided:
            try:
                first = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                self.wait()
                return
            except _GONE:
                first = b""
            if not first:
                dc.close_taskless()  # closed before its first byte
                return
            if first[0] != TLS_HANDSHAKE_RECORD:
                dc.plaintext_start()
                return
            self.decided = True
        records = self.records
        while True:
            ch.ready = False
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                self.wait()
                return
            except _GONE:
                data = b""
            if not data:
                dc.close_taskless()  # the client closed during the handshake
                return
            ch.drained = len(data) < RECV_SIZE
            try:
                done = records.handshake(data)
            except RecordError as exc:
                self._send_alert()
                dc.handshake_failed(self.ssl, str(exc))
                dc.close_taskless()
                return
            out = records.outgoing()
            if out:
                try:
                    sent = sock.send(out)
                except BlockingIOError:
                    sent = 0
                except _GONE:
                    dc.close_taskless()
                    return
                if sent < len(out):
                    self._finish_in_task(out[sent:], done)
                    return
            if done:
                dc.established(self.stream(), records)
                dc.flight.after_handshake()
                return
            if ch.drained and not ch.ready:
                self.wait()
                return

    def _send_alert(self) -> None:
        """The alert OpenSSL made for a failed handshake, best effort (it fits any socket
        buffer; a client that is not reading does not get it)."""
        alert = self.records.outgoing()
        if alert:
            try:
                self.dc.sock.send(alert)
            except OSError:
                pass

    def _finish_in_task(self, rest: bytes, done: bool) -> None:
        dc, stream = self.dc, self.stream()
        dc.handshake = None  # the task's own deadline handling takes over

        async def go_on() -> bool:
            await send_all(dc.sock, rest)
            if done:
                dc.established(stream, self.records)
                return True
            return bool(await dc.complete_handshake(stream))

        dc.hand_off(go_on)
