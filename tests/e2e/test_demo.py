"""The README's first Quick start command: the demo shows a proxied response."""

from __future__ import annotations

import socket
import subprocess
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_check_shows_proxied_response() -> None:
    r = subprocess.run([sys.executable, "-m", "meshproxy", "demo", "--check",
                        "--port", str(_free_port()), "--origin-port", str(_free_port())],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HTTP/1.1 200 OK" in r.stdout
    assert "x-served-by: meshproxy" in r.stdout
    assert '"origin": "meshproxy demo origin"' in r.stdout
    assert "x-request-id" in r.stdout  # added on the way through


def test_demo_console_script_installed() -> None:
    r = subprocess.run(["meshproxy", "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "run" in r.stdout and "validate" in r.stdout


def test_demo_mesh_check_shows_the_split_the_retries_and_proxy_status() -> None:
    r = subprocess.run([sys.executable, "-m", "meshproxy", "demo", "--mesh", "--check",
                        "--port", str(_free_port()), "--api-port", str(_free_port())],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "applied Route default/reviews" in out
    shares = {line.split(":")[0].strip(): float(line.split("(")[1].rstrip("%)"))
              for line in out.splitlines() if line.startswith(("  v1:", "  v2:"))}
    assert set(shares) == {"v1", "v2"} and 5.0 <= shares["v2"] <= 15.0, shares
    assert "the client saw 0 failures" in out
    saved = int(out.split("the route's retries saved ")[1].split()[0])
    assert saved > 0
    rows = out.split("$ meshctl proxy-status")[1].strip().splitlines()
    assert rows[0].split()[:3] == ["NAME", "SERVICE", "STATUS"]
    assert sorted(row.split()[0] for row in rows[1:]) == ["client", "ratings", "reviews-v1",
                                                          "reviews-v2"]
    assert all(row.split()[2] == "SYNCED" for row in rows[1:])
    # Every sidecar has its CA-issued identity; the one denied by principal got 403.
    assert "client     spiffe://cluster.local/ns/default/sa/productpage" in out
    assert out.count("spiffe://cluster.local/ns/default/sa/reviews ") == 2
    assert "sa/ratings): 403 denied by the AuthorizationPolicy" in out
