"""TLS termination building blocks against real clients (curl, openssl s_client), with
certificates made by the test (trustme): policy, SNI, ALPN, resumption, refusals."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from meshproxy.transport.listener import bind_listener
from meshproxy.transport.reactor import Reactor
from meshproxy.transport.sockio import PeerClosed, close
from meshproxy.transport.tls_context import ServerTLS, TLSConfigError, describe
from meshproxy.transport.tls_stream import TLSError, TLSStream
from tests.helpers import key_pair, make_pki


class TLSServer:
    """A tiny HTTPS server on the reactor, answering with what was negotiated."""

    def __init__(self, tls: ServerTLS, handshake_timeout: float = 2.0) -> None:
        self.tls = tls
        self.timeout = handshake_timeout
        self.errors: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._stop: trio.CancelScope | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)
        self._thread.start()
        self._ready.wait(5)

    async def _main(self) -> None:
        reactor = Reactor()
        lsock = bind_listener("127.0.0.1", 0)
        self.port = lsock.getsockname()[1]
        async with trio.open_nursery() as n:
            self._stop = n.cancel_scope
            self._token = trio.lowlevel.current_trio_token()
            await n.start(reactor.run)
            n.start_soon(reactor.run_timers)
            self._ready.set()
            while True:
                await trio.lowlevel.wait_readable(lsock)
                try:
                    sock, _ = lsock.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                n.start_soon(self._serve, reactor, sock)

    async def _serve(self, reactor: Reactor, sock: socket.socket) -> None:
        ch = reactor.register(sock)
        stream = TLSStream.over_channel(ch, self.tls.connection())
        try:
            await stream.handshake(reactor.now + self.timeout)
            while True:
                req = b""
                while b"\r\n\r\n" not in req:
                    data = await stream.recv()
                    if not data:
                        return
                    req += data
                info = describe(stream.ssl)
                info["context"] = str(self.tls.contexts.index(stream.ssl.get_context()))
                body = json.dumps(info).encode()
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                      % (len(body), body))
        except (TLSError, PeerClosed, trio.TooSlowError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            await stream.close_notify()
            close(ch)

    def stop(self) -> None:
        if self._stop is not None and self._token is not None:
            self._token.run_sync_soon(self._stop.cancel)  # from the trio thread only
        self._thread.join(5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("pki")
    _, pairs = make_pki(d, [["a.example", "localhost"], ["*.b.example"]])
    return d, [key_pair(c, k) for c, k in pairs]


@pytest.fixture(scope="module")
def server(pki):
    _, files = pki
    s = TLSServer(ServerTLS(files))
    yield s
    s.stop()


def curl(pki, server, name: str) -> dict:
    d, _ = pki
    r = subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(d / "ca.pem"),
                        "--resolve", f"{name}:{server.port}:127.0.0.1",
                        f"https://{name}:{server.port}/"], capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def s_client(server, *args: str, stdin: bytes = b"Q\n") -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}",
                           *args], input=stdin, capture_output=True, timeout=20)


def test_tls_stream_curl_verifies_and_gets_http11(pki, server) -> None:
    info = curl(pki, server, "a.example")
    assert info["version"] in ("TLSv1.2", "TLSv1.3") and info["alpn"] == "http/1.1"


def test_tls_stream_sni_picks_certificate(pki, server) -> None:
    assert curl(pki, server, "a.example")["context"] == "0"
    assert curl(pki, server, "api.b.example")["context"] == "1"  # the wildcard
    assert curl(pki, server, "localhost")["server_name"] == "localhost"


@pytest.mark.parametrize("old", ["-tls1", "-tls1_1"])
def test_tls_stream_refuses_old_protocols(server, old: str) -> None:
    r = s_client(server, old)
    assert r.returncode != 0
    assert b"Cipher is (NONE)" in r.stdout or b"alert" in r.stderr.lower()


@pytest.mark.parametrize("cipher", ["AES128-SHA", "DES-CBC3-SHA", "ECDHE-RSA-AES128-SHA"])
def test_tls_stream_refuses_weak_ciphers(server, cipher: str) -> None:
    r = s_client(server, "-tls1_2", "-cipher", cipher)
    assert r.returncode != 0 or b"Cipher is (NONE)" in r.stdout


def test_tls_stream_alpn(server) -> None:
    r = s_client(server, "-alpn", "h2,http/1.1")
    assert b"ALPN protocol: http/1.1" in r.stdout
    r = s_client(server, "-alpn", "h2")
    assert b"No ALPN negotiated" in r.stdout


def test_tls_stream_refuses_renegotiation(server) -> None:
    r = s_client(server, "-tls1_2", stdin=b"R\n")
    out = r.stdout + r.stderr
    assert b"RENEGOTIATING" in out
    assert b"no renegotiation" in out  # the server's alert


def test_tls_stream_session_resumption(server, tmp_path) -> None:
    sess = tmp_path / "sess.pem"
    first = s_client(server, "-tls1_2", "-sess_out", str(sess))
    assert first.returncode == 0 and sess.exists()
    again = s_client(server, "-tls1_2", "-sess_in", str(sess))
    assert b"Reused, TLSv1.2" in again.stdout


def test_tls_stream_handshake_timeout(pki) -> None:
    _, files = pki
    s = TLSServer(ServerTLS(files), handshake_timeout=0.3)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.settimeout(3)
            assert c.recv(10) == b""  # sent nothing: closed after the handshake timeout
        assert any("TooSlowError" in e for e in s.errors)
    finally:
        s.stop()


def test_tls_stream_bad_key_named(pki, tmp_path) -> None:
    d, files = pki
    with pytest.raises(TLSConfigError, match=r"key1\.pem"):
        ServerTLS([key_pair(files[0].chain_path, files[1].key_path)])  # key of another cert
    broken = tmp_path / "broken.pem"
    broken.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match=r"broken\.pem"):
        ServerTLS([key_pair(str(broken), files[0].key_path)])
