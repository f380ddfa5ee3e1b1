"""Upstream TLS and mTLS per cluster against real TLS origins (Python's ssl server): the
proxy's client certificate, verification against a trust bundle, expected SANs; failures
are 503 UF with the reason in the access log."""

from __future__ import annotations

import json
import os
import ssl
import time
from pathlib import Path

import pytest

from tests.helpers import Origin, Proxy, config, raw_exchange, wait_for
from tests.integration.test_supervisor import _admin_port, stat
from tools.mesh_certs import MeshCA, spiffe

ORIGIN_ID = spiffe("cluster.local", "backend", "api")
PROXY_ID = spiffe("cluster.local", "mesh", "gateway")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d: Path = tmp_path_factory.mktemp("upstream-tls")
    ca = MeshCA()
    ca.write(d / "ca.pem")
    return {"dir": d, "ca": d / "ca.pem", "authority": ca,
            "origin": ca.issue(d, "api", dns=["api.backend"], uris=[ORIGIN_ID]),
            "proxy": ca.issue(d, "gateway", uris=[PROXY_ID]),
            "impostor": MeshCA("another CA").issue(d / "other", "api", uris=[ORIGIN_ID])}


def tls_origin(pki, cert: str = "origin", require_client: bool = True) -> Origin:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki[cert].chain, pki[cert].key)
    if require_client:
        ctx.load_verify_locations(pki["ca"])
        ctx.verify_mode = ssl.CERT_REQUIRED  # the proxy must present its certificate
    return Origin(tls=ctx).start()


def upstream_proxy(tmp_path: Path, origin: Origin, pki, health_check: dict | None = None,
                   pool: dict | None = None, **tls: object) -> Proxy:
    spec = {"sni": "api.backend", "trusted_ca": str(pki["ca"]),
            "certificate_chain": str(pki["proxy"].chain), "private_key": str(pki["proxy"].key)}
    spec.update(tls)
    clusters = [{"name": "web", "connect_timeout": "2s", "tls": spec,
                 "endpoints": [{"address": "127.0.0.1", "port": origin.port}]}]
    if health_check is not None:
        clusters[0]["health_check"] = health_check
    clusters[0].update(pool or {})
    cfg = config(clusters=clusters, access_log={"path": str(tmp_path / "access.log"),
                                                "format": "json", "flush_interval": "50ms"})
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path)
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def get(p: Proxy, path: str) -> tuple[int, bytes]:
    data = raw_exchange(p.port, b"GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
                        % path.encode())
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def log_entries(tmp_path: Path, n: int) -> list[dict]:
    log = tmp_path / "access.log"
    return wait_for(lambda: [json.loads(x) for x in log.read_text().splitlines()]
                    if log.exists() and len(log.read_text().splitlines()) >= n else None)


def test_upstream_mtls_verified_and_pooled(tmp_path, pki) -> None:
    origin = tls_origin(pki)
    try:
        p = upstream_proxy(tmp_path, origin, pki, match_subject_alt_names=[ORIGIN_ID])
        for path in ("/a", "/b"):
            status, body = get(p, path)
            assert status == 200, body
            assert json.loads(body)["target"] == path
        assert origin.tls_errors == []
        assert origin.connections == 1  # the TLS connection is kept alive and reused
        assert stat(p, "cluster.web.ssl.handshake") == 1
    finally:
        origin.stop()


def test_upstream_tls_wrong_san_is_503_uf(tmp_path, pki) -> None:
    origin = tls_origin(pki)
    try:
        p = upstream_proxy(tmp_path, origin, pki,
                           match_subject_alt_names=[spiffe("cluster.local", "x", "other")])
        status, _ = get(p, "/a")
        assert status == 503
        assert origin.requests == []
        entry = log_entries(tmp_path, 1)[0]
        assert entry["response_flags"] == "UF"
        assert "match none of" in entry["response_code_details"]
        assert stat(p, "cluster.web.ssl.fail_verify_san") == 1
    finally:
        origin.stop()


def test_upstream_tls_untrusted_origin_is_503_uf(tmp_path, pki) -> None:
    origin = tls_origin(pki, cert="impostor", require_client=False)
    try:
        p = upstream_proxy(tmp_path, origin, pki)
        status, _ = get(p, "/a")
        assert status == 503
        assert origin.requests == []
        entry = log_entries(tmp_path, 1)[0]
        assert entry["response_flags"] == "UF"
        assert "certificate verify failed: unable to get local issuer certificate" in \
            entry["response_code_details"]
        assert stat(p, "cluster.web.ssl.connection_error") == 1
    finally:
        origin.stop()


def test_upstream_tls_without_client_cert_is_refused_by_origin(tmp_path, pki) -> None:
    origin = tls_origin(pki)
    try:
        p = upstream_proxy(tmp_path, origin, pki, certificate_chain=None, private_key=None)
        status, _ = get(p, "/a")
        assert status == 503  # the origin demands a client certificate the proxy lacks
        assert origin.requests == [] and origin.tls_errors
    finally:
        origin.stop()


def test_upstream_tls_health_checks_run_over_mtls(tmp_path, pki) -> None:
    good, impostor = tls_origin(pki), tls_origin(pki, cert="impostor", require_client=False)
    hc = {"path": "/healthz", "interval": "100ms", "timeout": "1s", "unhealthy_threshold": 1}
    (tmp_path / "good").mkdir()
    (tmp_path / "bad").mkdir()
    try:
        p = upstream_proxy(tmp_path / "good", good, pki, health_check=hc,
                           match_subject_alt_names=[ORIGIN_ID])
        assert wait_for(lambda: stat(p, "cluster.web.health_check.success") >= 3)
        assert stat(p, "cluster.web.health_check.failure") == 0
        assert good.tls_errors == []  # the checks presented the proxy's certificate
        assert any(r.target == b"/healthz" for r in good.requests)
        q = upstream_proxy(tmp_path / "bad", impostor, pki, health_check=hc)
        assert wait_for(lambda: stat(q, "cluster.web.health_check.failure") >= 2)
        assert stat(q, "cluster.web.health_check.success") == 0
        assert not any(r.target == b"/healthz" for r in impostor.requests)
    finally:
        good.stop()
        impostor.stop()


def test_upstream_tls_resumes_sessions_and_closes_cleanly(tmp_path, pki) -> None:
    origin = tls_origin(pki)
    try:
        # No idle connections kept: every request opens a new TLS connection.
        p = upstream_proxy(tmp_path, origin, pki, pool={"max_idle_connections": 0},
                           match_subject_alt_names=[ORIGIN_ID])
        for path in ("/1", "/2", "/3"):
            assert get(p, path)[0] == 200
        assert origin.connections == 3
        assert origin.tls_resumed == [False, True, True]
        assert stat(p, "cluster.web.ssl.session_reused") == 2
        assert origin.tls_errors == []
        # Each connection was closed by the proxy with a close_notify, not a bare FIN.
        assert wait_for(lambda: origin.tls_clean_closes == 3)
    finally:
        origin.stop()


def test_upstream_tls_revoked_endpoint_is_503_uf(tmp_path, pki) -> None:
    origin = tls_origin(pki)
    crl = pki["authority"].crl([pki["origin"].cert], tmp_path / "revoked.pem")
    try:
        p = upstream_proxy(tmp_path, origin, pki, crl=str(crl))
        assert get(p, "/a")[0] == 503
        assert origin.requests == []
        entry = log_entries(tmp_path, 1)[0]
        assert entry["response_flags"] == "UF"
        assert entry["response_code_details"].endswith(
            "certificate verify failed: certificate revoked")
    finally:
        origin.stop()


def test_upstream_tls_keep_alive_on_the_fast_path(tmp_path, pki) -> None:
    """Requests over a pooled mTLS upstream connection are served by the fast path, its
    records written and read by the compiled record layer: bodies of many records both
    ways, a connection the origin closes while it is pooled (found stale, the request
    sent again on a new one), and every answer right."""
    import socket

    from tests.helpers import Close, echo_handler, ok_response, read_response

    def handler(req, sock):
        if req.target == b"/then-close":
            sock.sendall(ok_response(b"bye"))
            raise Close  # the connection was offered for reuse, then closed
        if req.target.startswith(b"/big"):
            return ok_response(b"z" * 40000)  # some three records
        return echo_handler(req, sock)

    origin = tls_origin(pki)
    origin.handler = handler
    fast = os.environ.get("MESHPROXY_FAST_PATH", "on") != "off"
    try:
        p = upstream_proxy(tmp_path, origin, pki, match_subject_alt_names=[ORIGIN_ID])
        with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
            for i in range(20):
                body = b"y" * (i * 1500)  # up to 28 KB: requests of several records
                s.sendall(b"POST /t%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                          % (i, len(body)) + body)
                status, _, got = read_response(s)
                seen = json.loads(got)
                assert (status, seen["target"], seen["body_len"]) == (200, f"/t{i}", len(body))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, got = read_response(s)
            assert (status, got) == (200, b"z" * 40000)
            s.sendall(b"GET /then-close HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s)[2] == b"bye"
            time.sleep(0.2)  # the origin's FIN reaches the pooled connection
            s.sendall(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, got = read_response(s)
            assert (status, json.loads(got)["target"]) == (200, "/after")
        assert origin.tls_errors == []
        assert origin.connections == 2
        assert stat(p, "cluster.web.upstream_rq_retry") == 1  # the stale connection
        if fast:
            # The first request connects in a task; the others go the fast way (/big's
            # response spans reads, so a task relays it).
            assert stat(p, "http.ingress.fast_path.rq_total") >= 21
    finally:
        origin.stop()
