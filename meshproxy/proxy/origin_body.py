"""An HTTP/1.1 origin's response body as it arrives, by the framing http1_conn decided:
the one reader both response relays use (proxy.relay writes it to an HTTP/1.1 client,
proxy.h2_stream to an HTTP/2 stream), so that how a body ends, and what counts as a
truncated or malformed one, is decided in one place.

- length: exactly Content-Length bytes; the origin closing before is a truncation (502 UC
  once the response has begun, the client is then reset);
- chunked: decoded (RFC 9112 7.1) into the data and the trailers that may go on
  (TRAILER_SKIP); a malformed chunk is the origin's protocol error (502 UPE);
- until close (no framing, RFC 9112 6.3 step 8): the origin's FIN ends it, a reset does
  not (a truncated body must never look complete);
- none (HEAD, 204, 304): no body.

`take()` gives what was read with the head (no I/O), `read()` the next piece; `done` once
the body has ended; `clean` says whether nothing followed it on the connection (only then
may the connection be pooled).
"""

from __future__ import annotations

from meshproxy._core.http1_conn import FRAMING_CHUNKED, FRAMING_LENGTH, FRAMING_NONE
from meshproxy._core.http1_parser import ChunkedDecoder, MessageHead, ParseError
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import PER_TRY_TIMEOUT, ProxyError
from meshproxy.proxy.head_rewrite import relayed_trailers
from meshproxy.transport.sockio import RECV_SIZE, PeerClosed
from meshproxy.upstream.conn_pool import UpstreamConn


def upstream_protocol_error(exc: ParseError) -> ProxyError:
    return ProxyError(502, flags.UPSTREAM_PROTOCOL_ERROR, "upstream",
                      f"upstream protocol error: {exc.reason}",
                      stat="upstream_cx_protocol_error")


def per_try_timeout() -> ProxyError:
    return ProxyError(504, flags.UPSTREAM_REQUEST_TIMEOUT, "upstream",
                      "upstream per-try timeout", retriable=True,
                      stat="upstream_rq_per_try_timeout", failure=PER_TRY_TIMEOUT)


def open_body(conn: UpstreamConn, resp: MessageHead, ubuf: bytes, framing: int) -> OriginBody:
    """The reader of `resp`'s body: an HTTP/2 origin's stream reads its own DATA
    (upstream.h2_origin.OriginStream, the same interface), else an OriginBody."""
    if conn.multiplexed:
        return conn.begin_body(framing)  # type: ignore[attr-defined]
    return OriginBody(conn, resp, ubuf, framing)


def truncated() -> ProxyError:
    return ProxyError(502, flags.UPSTREAM_CONNECTION_TERMINATION, "upstream",
                      "upstream closed before the response body was complete",
                      stat="upstream_cx_destroy_remote_with_active_rq")


class OriginBody:
    __slots__ = ("conn", "framing", "ubuf", "upos", "remaining", "dec", "done",
                 "trailers", "clean")

    def __init__(self, conn: UpstreamConn, resp: MessageHead, ubuf: bytes,
                 framing: int) -> None:
        self.conn = conn
        self.framing = framing
        self.ubuf = ubuf
        self.upos = resp.end
        self.remaining = resp.content_length
        self.dec: ChunkedDecoder | None = (ChunkedDecoder(error_status=502)
                                           if framing == FRAMING_CHUNKED else None)
        self.done = framing == FRAMING_NONE or (framing == FRAMING_LENGTH
                                                and self.remaining <= 0)
        self.trailers: list[tuple[bytes, bytes]] = []
        self.clean = True

    def take(self) -> bytes:
        """The part of the body read with the head."""
        framing = self.framing
        ubuf, upos = self.ubuf, self.upos
        self.ubuf = b""
        if framing == FRAMING_NONE:
            self.clean = upos >= len(ubuf)
            return b""
        if framing == FRAMING_LENGTH:
            take = min(len(ubuf) - upos, self.remaining)
            self.remaining -= take
            if self.remaining <= 0:
                self.done = True
                self.clean = upos + take >= len(ubuf)
            return ubuf[upos:upos + take] if take else b""
        if framing == FRAMING_CHUNKED:
            return self._decode(ubuf, upos)
        return ubuf[upos:]

    async def read(self) -> bytes:
        """The next piece of the body (b"" is possible before the end: a chunk's framing
        alone); raises ProxyError on a truncated or malformed body."""
        framing = self.framing
        recv_u = self.conn.recv
        if framing == FRAMING_LENGTH:
            try:
                data = await recv_u(min(self.remaining, RECV_SIZE))
            except PeerClosed:
                data = b""
            if not data:
                raise truncated()
            self.remaining -= len(data)
            if self.remaining <= 0:
                self.done = True
            return data
        if framing == FRAMING_CHUNKED:
            try:
                data = await recv_u()
            except PeerClosed:
                data = b""
            if not data:
                raise truncated()
            return self._decode(data, 0)
        try:
            data = await recv_u()
        except PeerClosed:
            raise truncated() from None  # a reset is not an end of body
        if not data:
            self.done = True
        return data

    def _decode(self, buf: bytes, pos: int) -> bytes:
        dec = self.dec
        assert dec is not None
        try:
            parts, pos = dec.feed(buf, pos)
        except ParseError as exc:
            raise upstream_protocol_error(exc) from None
        if dec.done:
            self.done = True
            self.trailers = relayed_trailers(dec.trailers)
            self.clean = pos >= len(buf)
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def finish(self, reusable: bool, now: float) -> None:
        """The body was relayed: the connection goes back to its pool when the exchange
        ended cleanly on both sides (`reusable`) and nothing followed the body; else it
        closes (a half-read or surprising connection is never pooled)."""
        conn = self.conn
        if reusable and self.clean:
            conn.endpoint.release(conn, now)
        else:
            conn.close()
