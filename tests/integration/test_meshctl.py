"""meshctl, the console script, against a real `meshproxy control` with a real sidecar:
apply (created, then configured), get (table, yaml, json), describe (endpoints static and
registered), delete, proxy-status, registry list; an invalid file is refused before
anything is sent, every error with its file, document and field path."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.helpers import wait_for
from tests.mesh import TOKEN, ControlPlane, Sidecar
from tests.unit.test_control_resources import EXAMPLES


def _meshctl(cp: ControlPlane, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    token = tmp / "operator-token"
    token.write_text(TOKEN)
    exe = shutil.which("meshctl")
    assert exe, "meshctl is installed as a console script with the project"
    return subprocess.run([exe, "--server", cp.url, "--token-file", str(token), *args],
                          capture_output=True, text=True, timeout=30)


def test_meshctl_apply_get_describe_delete(tmp_path: Path, origin_factory) -> None:
    cp = ControlPlane(tmp_path / "cp")
    d = tmp_path / "mesh"
    d.mkdir()
    docs = list(yaml.safe_load_all(EXAMPLES))
    for i, doc in enumerate(docs):
        (d / f"{i:02d}-{doc['kind'].lower()}.yaml").write_text(yaml.safe_dump(doc))
    r = _meshctl(cp, tmp_path, "apply", "-f", str(d))
    assert r.returncode == 0, r.stderr
    assert "service/reviews (shop) created" in r.stdout
    assert len(r.stdout.splitlines()) == len(docs)
    r = _meshctl(cp, tmp_path, "apply", "-f", str(d / "00-service.yaml"))
    assert r.stdout.strip() == "service/reviews (shop) configured", r.stdout

    r = _meshctl(cp, tmp_path, "get", "services", "-n", "shop")
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "VERSION", "SPEC"]
    assert lines[1].split()[:2] == ["shop", "reviews"] and "9080/http" in lines[1]
    r = _meshctl(cp, tmp_path, "get", "route", "reviews", "-n", "shop", "-o", "yaml")
    got = yaml.safe_load(r.stdout)
    assert got["kind"] == "Route" and got["spec"]["hosts"] == docs[2]["spec"]["hosts"]
    r = _meshctl(cp, tmp_path, "get", "svc", "-A", "-o", "json")
    assert [i["metadata"]["name"] for i in json.loads(r.stdout)["items"]] == ["reviews"]

    o = origin_factory()
    Sidecar(cp, tmp_path / "sc", "reviews-live-1", "--namespace", "shop", "--label",
            "version=v1", service="reviews", workload_port=o.port)
    wait_for(lambda: "reviews-live-1" in _meshctl(cp, tmp_path, "registry", "list").stdout)
    r = _meshctl(cp, tmp_path, "describe", "service", "reviews", "-n", "shop")
    assert r.returncode == 0, r.stderr
    endpoints = r.stdout.split("Endpoints:")[1]
    assert "Workload      reviews-v2-0" in endpoints and "STATIC" in endpoints
    assert f"Registration  reviews-live-1  127.0.0.1:{o.port}  UP" in endpoints
    assert "Route: reviews" in endpoints and "Policy: reviews" in endpoints

    r = _meshctl(cp, tmp_path, "registry", "list")
    row = next(line for line in r.stdout.splitlines() if "reviews-live-1" in line)
    assert row.split()[:5] == ["shop", "reviews", "reviews-live-1", f"127.0.0.1:{o.port}",
                               "UP"] and "version=v1" in row
    wait_for(lambda: "SYNCED" in _meshctl(cp, tmp_path, "proxy-status").stdout, 5)
    r = _meshctl(cp, tmp_path, "proxy-status")
    assert r.stdout.splitlines()[0].split()[:4] == ["NAME", "SERVICE", "STATUS", "VERSION"]
    assert r.stdout.splitlines()[1].split()[:3] == ["reviews-live-1", "reviews", "SYNCED"]

    r = _meshctl(cp, tmp_path, "delete", "route", "reviews", "-n", "shop")
    assert r.stdout.strip() == "route/reviews (shop) deleted"
    r = _meshctl(cp, tmp_path, "get", "route", "reviews", "-n", "shop")
    assert r.returncode == 1 and "404" in r.stderr and "not found" in r.stderr
    r = _meshctl(cp, tmp_path, "delete", "-f", str(d))
    assert r.returncode == 1  # the route is gone already: said, with the API's answer


def test_meshctl_refuses_an_invalid_file_before_sending_anything(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path / "cp")
    f = tmp_path / "bad.yaml"
    f.write_text(EXAMPLES.replace("port: 9080, protocol: http", "port: 99999, protocol: http"))
    r = _meshctl(cp, tmp_path, "apply", "-f", str(f))
    assert r.returncode == 2
    assert f"{f}[0]: spec.ports[0].port" in r.stderr, r.stderr
    assert cp.call("GET", "/apis/mesh/v1/services")[1]["items"] == []  # nothing sent
    r = _meshctl(cp, tmp_path, "get", "gateways")
    assert r.returncode == 2 and "no such kind 'gateways'" in r.stderr
    token = tmp_path / "wrong"
    token.write_text("guess")
    r = subprocess.run([shutil.which("meshctl") or "meshctl", "--server", cp.url,
                        "--token-file", str(token), "get", "services"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "401" in r.stderr


def test_meshctl_tokens_ca_and_a_workloads_identity(tmp_path: Path, origin_factory) -> None:
    cp = ControlPlane(tmp_path / "cp")
    o = origin_factory()
    tok = tmp_path / "web.token"
    r = _meshctl(cp, tmp_path, "token", "create", "-n", "shop", "--service-account", "web",
                 "--ttl", "1h", "-o", str(tok))
    assert r.returncode == 0, r.stderr
    assert (tok.stat().st_mode & 0o777) == 0o600
    assert "spiffe://cluster.local/ns/shop/sa/web" in r.stderr
    r = _meshctl(cp, tmp_path, "ca", "bundle")
    assert r.returncode == 0 and r.stdout.startswith("-----BEGIN CERTIFICATE-----")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(r.stdout)
    # The sidecar takes its namespace and service account from the token.
    web = Sidecar(cp.secure_url, tmp_path / "web", "web-0", "--ca-bundle", str(bundle),
                  service="web", workload_port=o.port)
    web.token_file.write_text(tok.read_text())
    web.stop()
    web.start()
    wait_for(lambda: web.admin("/config_dump")["control_plane"].get("identity"), 15)

    def described() -> subprocess.CompletedProcess | None:
        # The proxy's status record reaches the control plane after its certificate does.
        got = _meshctl(cp, tmp_path, "describe", "workload", "web-0", "-n", "shop")
        assert got.returncode == 0, got.stderr
        return got if "SPIFFE ID:     " in got.stdout else None

    r = wait_for(described, 15)
    assert "SPIFFE ID:     spiffe://cluster.local/ns/shop/sa/web" in r.stdout
    serial = web.admin("/config_dump")["control_plane"]["identity"]["serial_number"]
    assert f"Serial:        {serial}" in r.stdout
    # Half of 24 h, moved by up to 1% (14 min) either way.
    assert re.search(r"Next renewal:  \S+ \(in 1[12]h\d\dm\)", r.stdout), r.stdout
    r = _meshctl(cp, tmp_path, "ca", "status")
    assert "Trust domain:  cluster.local" in r.stdout and "self-signed" in r.stdout
    old = r.stdout.split("Roots in the trust bundle:\n  ")[1].split()[0]
    r = _meshctl(cp, tmp_path, "ca", "rotate-root", "--wait", "--timeout", "60")
    assert r.returncode == 0, r.stdout + r.stderr
    # The phases it saw (polled: a quick one may pass unseen), in order, ending done.
    seen = [line.strip() for line in r.stdout.splitlines()[1:]]
    order = ["phase trust-both", "phase issue-new", "phase drop-old", "phase done"]
    assert seen[-1] == "phase done" and seen == sorted(seen, key=order.index), seen
    r = _meshctl(cp, tmp_path, "ca", "status")
    assert old not in r.stdout
    assert web.admin("/config_dump")["control_plane"]["identity"]["root"] in r.stdout
