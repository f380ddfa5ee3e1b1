"""A TLS scanner (testssl.sh, Debian's package) against a TLS listener: no protocol below
TLS 1.2, no weak cipher (NULL, anonymous, export, LOW, 3DES/IDEA, CBC), forward secrecy and
AEAD only, and no client-initiated renegotiation."""

from __future__ import annotations

import json
import subprocess

from tests.helpers import Proxy, config
from tools.mesh_certs import MeshCA, spiffe


def test_tls_scan_finds_only_modern_tls(origin, tmp_path) -> None:
    ca = MeshCA()
    cert = ca.issue(tmp_path, "edge", dns=["localhost"],
                    uris=[spiffe("cluster.local", "mesh", "edge")])
    p = Proxy(config(origin.port, listener={"tls": {"certificates": [
        {"certificate_chain": str(cert.chain), "private_key": str(cert.key)}]}}), tmp_path)
    report = tmp_path / "scan.json"
    r = subprocess.run(["testssl", "--quiet", "--warnings", "off", "--color", "0",
                        "--connect-timeout", "5", "--openssl-timeout", "5",
                        "-p", "-s", "-R", "-E", "--jsonfile", str(report),
                        f"127.0.0.1:{p.port}"], capture_output=True, text=True, timeout=240)
    findings = {e["id"]: e["finding"] for e in json.loads(report.read_text())}
    assert findings, r.stdout + r.stderr
    for proto in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert findings[proto] == "not offered", (proto, findings[proto])
    assert findings["TLS1_2"] == "offered"
    assert findings["TLS1_3"].startswith("offered")
    for weak in ("NULL", "aNULL", "EXPORT", "LOW", "3DES_IDEA", "AVERAGE"):
        assert findings[f"cipherlist_{weak}"] == "not offered", (weak, findings)
    assert findings["secure_client_renego"] == "not vulnerable"
    ciphers = [f for k, f in findings.items() if k.startswith("cipher-")]
    assert ciphers
    for c in ciphers:
        assert "ECDH" in c and ("GCM" in c or "CHACHA20" in c), c
