"""TLS over a reactor channel, driven through pyOpenSSL memory BIOs.

The same design trio uses for the standard library's ssl: the SSL object never touches
the socket. Ciphertext read from the socket is written into its incoming BIO; what it
wants to send is read from its outgoing BIO and written to the socket with the same
`send_all` (and so the same backpressure) as plain connections. This keeps TLS on the
reactor: readiness comes from the worker's epoll like every other socket.

Errors become TLSError (the handshake failed: protocol version, cipher, certificate) or
PeerClosed (the connection went away); a clean close_notify reads as end of stream.
Renegotiation is refused by the context (tls_context), so a client's attempt ends the
connection with an alert.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from OpenSSL import SSL

from meshproxy.transport.reactor import Channel
from meshproxy.transport.sockio import RECV_SIZE, PeerClosed, recv_after_wait, recv_now, send_all

# Ciphertext taken from the outgoing BIO per socket write.
FLUSH_SIZE = 65536

# How many bytes wait in a memory BIO (BIO_get_mem_data returns the length). pyOpenSSL has
# no public call for it, and without one every read or flush that finds nothing costs a
# raised and caught WantReadError (an OpenSSL error-queue walk in Python): two or three per
# request on a keep-alive connection. With it, the stream looks before it calls. The
# fallback (None) is the exception-driven path, correct but slower.
_bio_pending: Any = None
try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib

    _get_mem_data = _lib.BIO_get_mem_data
    _scratch = _ffi.new("char **")  # the data pointer, unused; one per process is enough

    def _mem_pending(bio: Any) -> int:
        return int(_get_mem_data(bio, _scratch))

    _bio_pending = _mem_pending
except (ImportError, AttributeError):  # pragma: no cover - depends on pyOpenSSL's insides
    pass


def session_reused(ssl: SSL.Connection) -> bool:
    """Whether the handshake resumed a session (SSL_session_reused; pyOpenSSL has no call
    for it). False when it cannot be told."""
    try:
        return bool(_lib.SSL_session_reused(ssl._ssl))
    except (NameError, AttributeError):  # pragma: no cover - depends on pyOpenSSL's insides
        return False


def verify_error(ssl: SSL.Connection) -> str:
    """Why certificate verification failed (OpenSSL's X509_V_ERR text: "certificate has
    expired", "certificate revoked", ...), or "" when it cannot be told."""
    try:
        code = _lib.SSL_get_verify_result(ssl._ssl)
        if not code:
            return ""
        return str(_ffi.string(_lib.X509_verify_cert_error_string(code)).decode())
    except (NameError, AttributeError):  # pragma: no cover - depends on pyOpenSSL's insides
        return ""


class TLSError(Exception):
    """The TLS handshake or record layer failed; `str()` says how."""


RawSend = Callable[[bytes], Awaitable[None]]
RawRecv = Callable[[int, float], Awaitable[bytes]]


class TLSStream:
    """TLS over any byte transport given as three coroutines: send ciphertext, receive
    ciphertext now, and receive after waiting (the data path's reactor channels through
    `over_channel`; the supervisor's health checks over trio streams)."""

    __slots__ = ("ssl", "_eof", "_in", "_out", "_raw_send", "_raw_recv", "_raw_recv_wait")

    def __init__(self, ssl: SSL.Connection, send: RawSend, recv: RawRecv,
                 recv_wait: RawRecv | None = None) -> None:
        self.ssl = ssl
        self._eof = False
        self._raw_send = send
        self._raw_recv = recv
        self._raw_recv_wait = recv_wait or recv
        # The memory BIOs (ciphertext in, ciphertext out), for _bio_pending.
        self._in = getattr(ssl, "_into_ssl", None)
        self._out = getattr(ssl, "_from_ssl", None)

    @classmethod
    def over_channel(cls, ch: Channel, ssl: SSL.Connection) -> TLSStream:
        """On a reactor channel: sockio's calls, so the same backpressure and readiness
        as plain connections."""
        return cls(ssl, partial(send_all, ch.sock), partial(recv_now, ch),
                   partial(recv_after_wait, ch))

    async def _flush(self) -> None:
        while True:
            if _bio_pending is not None and self._out is not None:
                n = _bio_pending(self._out)
                if not n:
                    return
            try:
                data = self.ssl.bio_read(FLUSH_SIZE)
            except SSL.WantReadError:
                return
            await self._raw_send(data)

    async def _fill(self, deadline: float = 0.0, wait_first: bool = False) -> bool:
        """More ciphertext from the socket into the SSL object; False at EOF.
        wait_first: nothing is expected yet (keep-alive), so wait before the recv."""
        data = await (self._raw_recv_wait if wait_first else self._raw_recv)(RECV_SIZE, deadline)
        if not data:
            self.ssl.bio_shutdown()
            return False
        self.ssl.bio_write(data)
        return True

    async def handshake(self, deadline: float = 0.0) -> None:
        """Complete the handshake (server or client side, as the SSL object was set up);
        `deadline` (reactor time, 0: none) bounds it, raising trio.TooSlowError (a client
        that connects and never finishes its hello)."""
        while True:
            try:
                self.ssl.do_handshake()
                break
            except SSL.WantReadError:
                await self._flush()
                if not await self._fill(deadline):
                    raise PeerClosed("client closed during the TLS handshake") from None
            except SSL.Error as exc:
                await self._send_alert()
                reason = _reason(exc)
                if "certificate verify failed" in reason:
                    detail = verify_error(self.ssl)
                    if detail:
                        reason = f"{reason}: {detail}"
                raise TLSError(reason) from None
        await self._flush()

    async def _send_alert(self) -> None:
        try:
            await self._flush()
        except PeerClosed:
            pass

    def buffered(self) -> bool:
        """Whether bytes wait in the SSL object (plaintext not read, or ciphertext not
        decrypted): a read would find them without a socket edge."""
        if self.ssl.pending():
            return True
        if _bio_pending is None or self._in is None:
            return True  # cannot tell: assume so
        return bool(_bio_pending(self._in))

    async def recv(self, size: int = RECV_SIZE, deadline: float = 0.0) -> bytes:
        """Plaintext; b"" at close_notify or EOF."""
        return await self._recv(size, deadline, False)

    async def recv_wait(self, size: int = RECV_SIZE, deadline: float = 0.0) -> bytes:
        """recv() when the peer has just been answered: nothing is expected yet, so the
        socket is waited on before it is read (as sockio.recv_after_wait)."""
        return await self._recv(size, deadline, True)

    async def _recv(self, size: int, deadline: float, wait_first: bool) -> bytes:
        ssl = self.ssl
        while True:
            if self._eof:
                return b""
            if (_bio_pending is not None and self._in is not None
                    and not _bio_pending(self._in) and not ssl.pending()):
                # Nothing to decrypt: read ciphertext first (SSL_read would only fail).
                if self._out is not None and _bio_pending(self._out):
                    await self._flush()
                if not await self._fill(deadline, wait_first):
                    self._eof = True
                    return b""
                wait_first = False
            try:
                return ssl.recv(size)
            except SSL.WantReadError:
                await self._flush()  # TLS 1.3 may have post-handshake messages to send
                if not await self._fill(deadline):
                    self._eof = True
            except SSL.ZeroReturnError:
                self._eof = True
            except SSL.Error as exc:
                await self._send_alert()
                raise PeerClosed(f"TLS error: {_reason(exc)}") from None

    async def send_all(self, data: bytes) -> None:
        try:
            self.ssl.sendall(data)  # into the memory BIO: never blocks
        except SSL.Error as exc:
            raise PeerClosed(f"TLS error: {_reason(exc)}") from None
        await self._flush()

    def close_notify_record(self) -> bytes:
        """The close_notify alert as ciphertext, for a caller that sends it without
        waiting (b"" when the SSL object cannot make one)."""
        try:
            self.ssl.shutdown()
            return self.ssl.bio_read(FLUSH_SIZE)
        except SSL.Error:
            return b""

    def close_notify_nowait(self, sock: socket.socket) -> None:
        """close_notify (RFC 8446 section 6.1), best effort: one non-blocking send of a
        record that fits any socket buffer; a clean close is not worth a wait."""
        alert = self.close_notify_record()
        if alert:
            try:
                sock.send(alert)
            except OSError:
                pass

    async def close_notify(self) -> None:
        """Send close_notify (RFC 8446 section 6.1) before the socket is closed."""
        try:
            self.ssl.shutdown()
        except SSL.Error:
            return
        try:
            await self._flush()
        except PeerClosed:
            pass


def _reason(exc: SSL.Error) -> str:
    args = exc.args[0] if exc.args else None
    if isinstance(args, list) and args and isinstance(args[0], tuple) and len(args[0]) >= 3:
        return "; ".join(str(a[2]) for a in args)
    return str(exc) or type(exc).__name__
