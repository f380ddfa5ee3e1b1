"""Certificate rotation without restart: files replaced atomically under load, new
handshakes get the new certificate, established connections keep going, broken
replacements are refused and logged, /certs tells what is in service."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import threading
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from tests.helpers import Proxy, config, wait_for
from tests.integration.test_supervisor import _admin_port
from tools.mesh_certs import MeshCA, spiffe

GATEWAY = spiffe("cluster.local", "mesh", "gateway")


def replace(src: Path, dst: Path) -> None:
    """An atomic replace, as rotation tools do: write beside, then rename over."""
    tmp = dst.with_suffix(".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def served_serial(port: int, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


def certs(p: Proxy) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/certs", timeout=5) as r:
        return json.loads(r.read())


class Load:
    """Keep-alive clients (one connection each, never reopened) and a client opening a new
    connection per request, all counting failures, while the test rotates files."""

    def __init__(self, port: int, ca: Path) -> None:
        self.port, self.ca = port, ca
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._keepalive) for _ in range(3)]
        self.threads.append(threading.Thread(target=self._fresh))
        for t in self.threads:
            t.start()

    def _ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def _one(self, conn: http.client.HTTPSConnection) -> None:
        conn.request("GET", "/load")
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise AssertionError(f"status {r.status}")
        self.ok += 1

    def _keepalive(self) -> None:
        conn = http.client.HTTPSConnection("localhost", self.port, context=self._ctx(),
                                           timeout=5)
        try:
            while not self.stop.is_set():
                self._one(conn)
        except Exception as exc:  # every failure is counted and reported
            self.failures.append(f"keep-alive: {exc!r}")
        finally:
            conn.close()

    def _fresh(self) -> None:
        while not self.stop.is_set():
            conn = http.client.HTTPSConnection("localhost", self.port, context=self._ctx(),
                                               timeout=5)
            try:
                self._one(conn)
            except Exception as exc:
                self.failures.append(f"new connection: {exc!r}")
            finally:
                conn.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


@pytest.fixture
def rotation(tmp_path, origin):
    ca = MeshCA()
    ca_path = ca.write(tmp_path / "ca.pem")
    first = ca.issue(tmp_path / "v1", "gw", dns=["localhost"], uris=[GATEWAY])
    second = ca.issue(tmp_path / "v2", "gw", dns=["localhost"], uris=[GATEWAY])
    other = ca.issue(tmp_path / "other", "gw", dns=["localhost"])
    live = tmp_path / "live"
    live.mkdir()
    chain, key = live / "gw.pem", live / "gw-key.pem"
    replace(first.chain, chain)
    replace(first.key, key)
    cfg = config(origin.port, listener={"tls": {"certificates": [
        {"certificate_chain": str(chain), "private_key": str(key)}]}})
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path, ("--workers", "2"))
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p, ca_path, chain, key, first, second, other


def test_cert_rotation_under_load_drops_nothing(rotation) -> None:
    p, ca, chain, key, first, second, _other = rotation
    assert served_serial(p.port, ca) == first.cert.serial_number
    load = Load(p.port, ca)
    try:
        wait_for(lambda: load.ok > 50)
        replace(second.key, key)      # key first: for a moment the pair does not match,
        replace(second.chain, chain)  # which is refused until the chain follows
        # Both workers: several new connections in a row all get the new certificate.
        wait_for(lambda: all(served_serial(p.port, ca) == second.cert.serial_number
                             for _ in range(6)), timeout=5)
        before = load.ok
        wait_for(lambda: load.ok > before + 50)
    finally:
        load.finish()
    assert load.failures == []
    report = certs(p)["certificates"][0]["cert_chain"][0]
    assert report["serial_number"] == format(second.cert.serial_number, "x")
    assert report["spiffe_id"] == GATEWAY
    assert 88 <= report["days_until_expiration"] <= 90


def test_cert_rotation_refuses_broken_material(rotation) -> None:
    p, ca, chain, key, first, _second, other = rotation
    garbage = chain.parent / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    replace(garbage, chain)
    wait_for(lambda: "certificate rotation refused" in p.stderr())
    assert "gw.pem" in p.stderr()
    assert served_serial(p.port, ca) == first.cert.serial_number  # the old one serves on
    replace(first.chain, chain)
    replace(other.key, key)  # a key that belongs to another certificate
    wait_for(lambda: "does not match the certificate" in p.stderr())
    assert served_serial(p.port, ca) == first.cert.serial_number
    assert certs(p)["certificates"][0]["cert_chain"][0]["serial_number"] == format(
        first.cert.serial_number, "x")
