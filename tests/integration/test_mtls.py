"""mTLS on a listener, end to end with curl: client certificates verified (chain, time,
purpose), SPIFFE IDs as source principals (routing, access log, x-forwarded-client-cert),
required (STRICT) and optional (PERMISSIVE) modes."""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from tests.helpers import Proxy, config, wait_for
from tests.integration.test_supervisor import _admin_port, stat
from tools.mesh_certs import MeshCA, spiffe

GATEWAY = spiffe("cluster.local", "mesh", "gateway")
WEB = spiffe("cluster.local", "default", "web")
OPS = spiffe("cluster.local", "ops", "deployer")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("mtls")
    ca = MeshCA()
    ca.write(d / "ca.pem")
    now = datetime.datetime.now(datetime.UTC)
    out = {
        "dir": d,
        "ca": ca,
        "server": ca.issue(d, "gateway", dns=["localhost"], uris=[GATEWAY]),
        "web": ca.issue(d, "web", uris=[WEB]),
        "ops": ca.issue(d, "ops", uris=[OPS]),
        "expired": ca.issue(d, "expired", uris=[WEB], not_before=now - datetime.timedelta(10),
                            not_after=now - datetime.timedelta(1)),
        "server_only": ca.issue(d, "server-only", uris=[WEB], usages=("server",)),
        "untrusted": MeshCA("another CA").issue(d / "other", "web", uris=[WEB]),
    }
    return out


def mtls_proxy(tmp_path: Path, origin, pki, *, require: bool = True,
               routes: list | None = None, policies: list | None = None,
               match_sans: list[str] | None = None, crl: Path | None = None) -> Proxy:
    d = pki["dir"]
    routes = routes or [
        {"match": {"prefix": "/deploy", "source_principals": ["cluster.local/ns/ops/*"]},
         "direct_response": {"status": 200, "body": "deploy ok"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "web"}},
    ]
    cfg = config(origin.port, routes=routes, listener={"tls": {
        "certificates": [{"certificate_chain": str(pki["server"].chain),
                          "private_key": str(pki["server"].key)}],
        "trusted_ca": str(d / "ca.pem"), "require_client_certificate": require,
        "match_subject_alt_names": match_sans or [],
        **({"crl": str(crl)} if crl is not None else {})},
        "authorization_policies": policies or []},
        access_log={"path": str(tmp_path / "access.log"), "format": "json",
                    "flush_interval": "50ms"})
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path)
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def curl(pki, p: Proxy, path: str, client: str | None, *args: str) -> subprocess.CompletedProcess:
    cmd = ["curl", "-sS", "--max-time", "10", "--cacert", str(pki["dir"] / "ca.pem"),
           "--resolve", f"localhost:{p.port}:127.0.0.1"]
    if client is not None:
        cmd += ["--cert", str(pki[client].chain), "--key", str(pki[client].key)]
    return subprocess.run([*cmd, *args, f"https://localhost:{p.port}{path}"],
                          capture_output=True, timeout=20)


def xfcc_of(pki, client: str) -> str:
    cert = pki[client].cert
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return f'By={GATEWAY};Hash={digest};Subject="CN={client}";URI={cert_uri(pki, client)}'


def cert_uri(pki, client: str) -> str:
    return {"web": WEB, "ops": OPS}[client]


def test_mtls_verified_client_reaches_origin_with_xfcc(origin, tmp_path, pki) -> None:
    p = mtls_proxy(tmp_path, origin, pki)
    r = curl(pki, p, "/hello", "web", "-H", "x-forwarded-client-cert: By=forged;URI=spiffe://x")
    assert r.returncode == 0, r.stderr
    headers = json.loads(r.stdout)["headers"]
    sent = [v for k, v in headers if k == "x-forwarded-client-cert"]
    assert sent == [xfcc_of(pki, "web")]  # the client's forged one is replaced, not appended
    log = tmp_path / "access.log"
    entry = json.loads(wait_for(lambda: log.read_text().splitlines())[0])
    assert entry["downstream_peer_uri_san"] == WEB
    assert entry["response_code"] == 200


def test_mtls_refuses_missing_expired_untrusted_and_wrong_purpose(origin, tmp_path, pki) -> None:
    p = mtls_proxy(tmp_path, origin, pki)
    for client in (None, "expired", "untrusted", "server_only"):
        r = curl(pki, p, "/x", client)
        assert r.returncode != 0, (client, r.stdout)
    assert origin.requests == []  # none of them reached the upstream
    assert wait_for(lambda: stat(p, "listener.ingress.ssl.connection_error") == 4)
    assert curl(pki, p, "/x", "web").returncode == 0  # and service goes on


def test_mtls_source_principal_routes(origin, tmp_path, pki) -> None:
    p = mtls_proxy(tmp_path, origin, pki)
    r = curl(pki, p, "/deploy", "ops")
    assert r.returncode == 0 and r.stdout == b"deploy ok"
    r = curl(pki, p, "/deploy", "web")  # not an ops principal: the next route (the origin)
    assert r.returncode == 0 and json.loads(r.stdout)["target"] == "/deploy"


def test_mtls_optional_mode_serves_both(origin, tmp_path, pki) -> None:
    p = mtls_proxy(tmp_path, origin, pki, require=False)
    r = curl(pki, p, "/anon", None, "-H", "x-forwarded-client-cert: URI=spiffe://forged")
    assert r.returncode == 0, r.stderr
    assert "x-forwarded-client-cert" not in dict(json.loads(r.stdout)["headers"])
    # a principal-only route never matches an anonymous client
    assert json.loads(curl(pki, p, "/deploy", None).stdout)["target"] == "/deploy"
    r = curl(pki, p, "/id", "ops")
    assert dict(json.loads(r.stdout)["headers"])["x-forwarded-client-cert"] == xfcc_of(pki, "ops")
    assert curl(pki, p, "/x", "expired").returncode != 0  # a presented cert must still verify
    assert stat(p, "listener.ingress.ssl.no_certificate") == 2


def test_mtls_client_san_must_match_when_listed(origin, tmp_path, pki) -> None:
    p = mtls_proxy(tmp_path, origin, pki, match_sans=[WEB])
    assert curl(pki, p, "/x", "web").returncode == 0
    r = curl(pki, p, "/x", "ops")  # trusted and valid, but not an expected identity
    assert r.returncode != 0
    assert [q.target for q in origin.requests] == [b"/x"]
    assert wait_for(lambda: stat(p, "listener.ingress.ssl.connection_error") == 1)
    assert stat(p, "listener.ingress.ssl.fail_verify_san") == 1


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_mtls_wrong_san_is_refused_with_bad_certificate(origin, tmp_path, pki,
                                                        version: str) -> None:
    """RFC 8446 6.2: the alert says what happened (bad_certificate, 42), not internal_error
    (80) as OpenSSL sends when a verify callback refuses without an error; the log says
    why."""
    p = mtls_proxy(tmp_path, origin, pki, match_sans=[WEB])
    ops = pki["ops"]
    r = subprocess.run(
        ["openssl", "s_client", version, "-connect", f"127.0.0.1:{p.port}",
         "-servername", "localhost", "-CAfile", str(pki["dir"] / "ca.pem"),
         "-cert", str(ops.chain), "-key", str(ops.key), "-ign_eof"],
        input=b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", capture_output=True, timeout=15)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert "alert bad certificate" in out and "alert number 42" in out, out
    assert "internal error" not in out
    assert origin.requests == []
    line = wait_for(lambda: [x for x in p.stderr().splitlines()
                             if "refused the client certificate" in x])
    assert OPS in line[0] and WEB in line[0]


def test_mtls_client_options_need_a_trust_bundle(tmp_path) -> None:
    from meshproxy.config.load import ConfigError, decode

    cfg = config(1, listener={"tls": {"certificates": [
        {"certificate_chain": "/dev/null", "private_key": "/dev/null"}],
        "require_client_certificate": True}})
    with pytest.raises(ConfigError) as err:
        decode(cfg, "test")
    assert any("listeners[0].tls.require_client_certificate: needs trusted_ca" in e
               for e in err.value.errors)


def test_mtls_resumed_session_keeps_the_identity(origin, tmp_path, pki) -> None:
    """A client resuming its TLS session presents no certificate again: the identity comes
    from the session, so the principal and x-forwarded-client-cert are the same."""
    import socket
    import ssl

    p = mtls_proxy(tmp_path, origin, pki)
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca.pem"))
    ctx.load_cert_chain(pki["web"].chain, pki["web"].key)
    session = None
    seen = []
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            s.sendall(b"GET /who HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            seen.append((s.session_reused, data))
            session = s.session
    assert [reused for reused, _ in seen] == [False, True]
    for _, data in seen:
        headers = dict(json.loads(data.partition(b"\r\n\r\n")[2])["headers"])
        assert headers["x-forwarded-client-cert"] == xfcc_of(pki, "web")


def test_mtls_revocation_list_takes_effect_without_restart(origin, tmp_path, pki) -> None:
    crl = pki["ca"].crl([], tmp_path / "revoked.pem")  # nothing revoked yet
    p = mtls_proxy(tmp_path, origin, pki, crl=crl)
    assert curl(pki, p, "/x", "ops").returncode == 0
    # Revoke ops: a new list replaces the file atomically, the proxy picks it up.
    pki["ca"].crl([pki["ops"].cert], tmp_path / "revoked.new")
    (tmp_path / "revoked.new").replace(crl)
    wait_for(lambda: curl(pki, p, "/x", "ops").returncode != 0)
    assert curl(pki, p, "/x", "web").returncode == 0  # others are unaffected
    assert [q.target for q in origin.requests].count(b"/x") >= 2
