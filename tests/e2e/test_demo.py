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
