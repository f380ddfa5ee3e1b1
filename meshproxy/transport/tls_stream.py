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

from OpenSSL import SSL

from meshproxy.transport.reactor import Channel
from meshproxy.transport.sockio import RECV_SIZE, PeerClosed, recv_now, send_all

# Ciphertext taken from the outgoing BIO per socket write.
FLUSH_SIZE = 65536


class TLSError(Exception):
    """The TLS handshake or record layer failed; `str()` says how."""


class TLSStream:
    __slots__ = ("ch", "sock", "ssl", "_eof")

    def __init__(self, ch: Channel, ssl: SSL.Connection) -> None:
        self.ch = ch
        self.sock = ch.sock
        self.ssl = ssl
        self._eof = False

    async def _flush(self) -> None:
        while True:
            try:
                data = self.ssl.bio_read(FLUSH_SIZE)
            except SSL.WantReadError:
                return
            await send_all(self.sock, data)

    async def _fill(self, deadline: float = 0.0) -> bool:
        """More ciphertext from the socket into the SSL object; False at EOF."""
        data = await recv_now(self.ch, RECV_SIZE, deadline)
        if not data:
            self.ssl.bio_shutdown()
            return False
        self.ssl.bio_write(data)
        return True

    async def handshake(self, deadline: float = 0.0) -> None:
        """Complete the server handshake; `deadline` (reactor time) bounds it, raising
        trio.TooSlowError (a client that connects and never finishes its hello)."""
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
                raise TLSError(_reason(exc)) from None
        await self._flush()

    async def _send_alert(self) -> None:
        try:
            await self._flush()
        except PeerClosed:
            pass

    async def recv(self, size: int = RECV_SIZE, deadline: float = 0.0) -> bytes:
        """Plaintext; b"" at close_notify or EOF."""
        while True:
            if self._eof:
                return b""
            try:
                return self.ssl.recv(size)
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
