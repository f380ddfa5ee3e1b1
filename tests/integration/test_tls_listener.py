"""TLS termination on a listener, end to end: curl over HTTPS through the proxy to a plain
HTTP origin; SNI; refusals counted without disturbing service; bad certificates refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import Proxy, config, make_pki, wait_for
from tests.integration.test_supervisor import _admin_port, admin, stat


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("tls")
    _, pairs = make_pki(d, [["a.example"], ["*.b.example"]])
    return d, [{"certificate_chain": c, "private_key": k} for c, k in pairs]


def tls_proxy(tmp_path, origin, certs_list) -> Proxy:
    cfg = config(origin.port, listener={"tls": {"certificates": certs_list,
                                                "handshake_timeout": "2s"}})
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path)
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def curl(d: Path, p: Proxy, name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "10", "--cacert", str(d / "ca.pem"),
                           "--resolve", f"{name}:{p.port}:127.0.0.1", *args],
                          capture_output=True, timeout=20)


def test_tls_listener_https_to_plain_origin(origin, tmp_path, certs) -> None:
    d, cl = certs
    p = tls_proxy(tmp_path, origin, cl)
    url = f"https://a.example:{p.port}"
    r = curl(d, p, "a.example", f"{url}/one", f"{url}/two", "-d", "payload")
    assert r.returncode == 0, r.stderr
    seen = [json.loads(x + "}") if not x.endswith("}") else json.loads(x)
            for x in r.stdout.decode().replace("}{", "}\n{").splitlines()]
    assert [s["target"] for s in seen] == ["/one", "/two"]
    assert seen[0]["body_len"] == 7
    headers = dict(seen[0]["headers"])
    assert headers["x-forwarded-proto"] == "https"
    assert len({s["conn"] for s in seen}) == 1  # one keep-alive TLS connection, pooled upstream
    assert stat(p, "listener.ingress.ssl.handshake") >= 1
    p.stop()


def test_tls_listener_sni_and_refusals(origin, tmp_path, certs) -> None:
    d, cl = certs
    p = tls_proxy(tmp_path, origin, cl)
    assert curl(d, p, "api.b.example", f"https://api.b.example:{p.port}/").returncode == 0
    bad = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{p.port}", "-tls1_1"],
                         input=b"Q\n", capture_output=True, timeout=20)
    assert bad.returncode != 0
    # an unknown name gets the default certificate, which curl rejects: verification works
    assert curl(d, p, "c.example", f"https://c.example:{p.port}/").returncode == 60
    # The TLS 1.1 attempt failed the server's handshake; the unknown name failed the
    # client's verification after the server's TLS 1.3 flight, so only one is counted.
    assert stat(p, "listener.ingress.ssl.connection_error") == 1
    assert curl(d, p, "a.example", f"https://a.example:{p.port}/").returncode == 0
    p.stop()


def test_tls_listener_bad_certificates_refused(origin, tmp_path, certs) -> None:
    d, cl = certs
    mismatched = [{"certificate_chain": cl[0]["certificate_chain"],
                   "private_key": cl[1]["private_key"]}]
    cfg = config(origin.port, listener={"tls": {"certificates": mismatched}})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "meshproxy", "run", "--config", str(path),
                        "--workers", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "listeners[0].tls:" in r.stderr and "key1.pem" in r.stderr
    cfg["listeners"][0]["tls"]["certificates"] = [
        dict(mismatched[0], private_key=str(d / "missing.pem"))]
    path.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "meshproxy", "validate", "--config", str(path)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "listeners[0].tls.certificates[0].private_key: no such file" in r.stderr
    # a reload to a broken certificate is refused and the old one keeps serving
    p = tls_proxy(tmp_path, origin, cl)
    good = json.loads(p.config_path.read_text())
    good["listeners"][0]["tls"]["certificates"] = mismatched
    good["listeners"][0]["port"] = p.port
    p.config_path.write_text(json.dumps(good))
    status, body = admin(p, "/reload", "POST")
    assert status == 400 and b"key1.pem" in body
    assert curl(d, p, "a.example", f"https://a.example:{p.port}/").returncode == 0
    p.stop()


def test_tls_listener_key_update_mid_connection(origin, tmp_path, certs) -> None:
    """TLS 1.3 KeyUpdate (RFC 8446 section 4.6.3) between two requests on one connection,
    with an update of ours requested: both requests are served."""
    _d, cl = certs
    p = tls_proxy(tmp_path, origin, cl)
    feed = ("(printf 'GET /one HTTP/1.1\\r\\nhost: a.example\\r\\n\\r\\n'; sleep 0.7; "
            "printf 'K\\n'; sleep 0.7; "
            "printf 'GET /two HTTP/1.1\\r\\nhost: a.example\\r\\n\\r\\n'; sleep 0.7)")
    # Without -ign_eof, so that s_client takes the line "K" as its key-update command.
    r = subprocess.run(f"{feed} | openssl s_client -connect 127.0.0.1:{p.port} -tls1_3 "
                       "-servername a.example", shell=True, capture_output=True, timeout=30)
    assert b"KEYUPDATE" in r.stdout + r.stderr
    assert r.stdout.count(b"HTTP/1.1 200") == 2
    assert [q.target for q in origin.requests] == [b"/one", b"/two"]
    p.stop()


def test_tls_listener_connection_parks_and_serves_again(origin, tmp_path, certs) -> None:
    """A TLS keep-alive connection idle past downstream.PARK_AFTER parks with no task and
    serves its next request through the same TLS session when the client speaks again."""
    import socket
    import ssl

    from tests.helpers import read_response

    d, cl = certs
    p = tls_proxy(tmp_path, origin, cl)
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    with socket.create_connection(("127.0.0.1", p.port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="a.example") as s:
        for path in (b"/one", b"/two"):
            s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
            assert read_response(s)[0] == 200
            wait_for(lambda: stat(p, "listener.ingress.downstream_cx_parked") == 1, 5)
    assert [q.target for q in origin.requests[-2:]] == [b"/one", b"/two"]
    assert stat(p, "listener.ingress.ssl.handshake") == 1
    p.stop()


def test_tls_listener_stalled_broken_and_abandoned_handshakes(origin, tmp_path, certs) -> None:
    """A client that never sends its hello is closed at the handshake timeout, one that
    sends bytes that are no TLS gets an alert, one that leaves halfway costs nothing; each
    failure is counted once and the next client is served."""
    import socket
    import time

    d, cl = certs
    cfg = config(origin.port, listener={"tls": {"certificates": cl,
                                                "handshake_timeout": "500ms"}})
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path)
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    try:
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            t0 = time.monotonic()
            assert s.recv(100) == b""  # closed by the proxy, not by this timeout
            assert time.monotonic() - t0 < 4
        assert stat(p, "listener.ingress.ssl.connection_error") == 1
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            s.sendall(b"\x16\x03\x01\x00\x05hello")  # a handshake record that is none
            alert = s.recv(100)
            assert alert[:1] == b"\x15", alert  # content type 21: an alert (RFC 8446 5.1)
        assert stat(p, "listener.ingress.ssl.connection_error") == 2
        hello = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{p.port}", "-msg"],
            input=b"", capture_output=True, timeout=20)
        assert b"ClientHello" in hello.stdout
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            s.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then gone
        assert curl(d, p, "a.example", f"https://a.example:{p.port}/after").returncode == 0
        assert origin.requests[-1].target == b"/after"
        assert stat(p, "listener.ingress.ssl.connection_error") == 2
        wait_for(lambda: stat(p, "listener.ingress.downstream_cx_active") == 0)
    finally:
        p.stop()


def test_tls_listener_certificate_flight_larger_than_the_socket_takes(origin, tmp_path) -> None:
    """A server flight larger than the connection's socket buffer (a certificate with
    4,000 names; the worker's listener given an 8 KiB send buffer, which its accepted
    sockets inherit): the rest of the flight is sent by a task, the handshake finishes
    there, and the connection then serves keep-alive requests. In process, to reach the
    listener's socket."""
    import socket
    import ssl

    import trio

    from meshproxy.config.compile import compile_config
    from meshproxy.config.load import decode, tls_files
    from meshproxy.process.worker import Worker
    from tests.helpers import read_response

    d = tmp_path / "big"
    d.mkdir()
    names = ["a.example"] + [f"n{i}.padding.example" for i in range(4000)]
    _, pairs = make_pki(d, [names])
    assert Path(pairs[0][0]).stat().st_size > 100_000
    cfg = decode(config(origin.port, listener={"port": 0, "tls": {"certificates": [
        {"certificate_chain": c, "private_key": k} for c, k in pairs]}}))
    material = {path: Path(path).read_bytes() for _, path in tls_files(cfg)}
    snapshot = compile_config(cfg, material=material)
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))

    def client(port: int) -> list[int]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="a.example") as s:
            out = []
            for path in (b"/one", b"/two"):
                s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
                out.append(read_response(s)[0])
            return out

    async def main() -> list[int]:
        worker = Worker(snapshot)
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(worker.run)
            for lst in worker.listeners.values():
                lst.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            statuses = await trio.to_thread.run_sync(client, bound[0][2])
            nursery.cancel_scope.cancel()
        return statuses

    assert trio.run(main) == [200, 200]
    assert [q.target for q in origin.requests[-2:]] == [b"/one", b"/two"]
