"""Real mesh processes for tests: `meshproxy control` replicas and `meshproxy run
--control-plane` sidecars on loopback, their ports read from their logs; both recorded so
that the suite stops them after each test (tests/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers import ROOT, stop_process, wait_for
from tests.helpers import free_port as _free_port

TOKEN = "s3cret-operator-token"
PROXY_TOKEN = "s3cret-proxy-token"


_handed: set[int] = set()


def free_port() -> int:
    """A free port not handed out before in this session: a port is chosen here and bound
    by a process later, and the kernel may give the same free port twice meanwhile."""
    while True:
        port = _free_port()
        if port not in _handed:
            _handed.add(port)
            return port


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def call(base: str, method: str, path: str, body: Any = None,
         token: str | None = TOKEN) -> tuple[int, Any]:
    """One operator API request; (status, the JSON answer)."""
    req = urllib.request.Request(base + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class ControlPlane:
    started: list[ControlPlane] = []

    def __init__(self, tmp: Path, store: str | None = None, *args: str) -> None:
        ControlPlane.started.append(self)
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.store = store or f"sqlite:///{tmp / 'cp.db'}"
        (tmp / "token").write_text(TOKEN + "\n")
        (tmp / "proxy-token").write_text(PROXY_TOKEN + "\n")
        self.args = args
        self.api_port = free_port()
        self.tls_port = free_port()
        self.ca_dir = tmp / "ca"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> ControlPlane:
        """(Again) on the same API port, so that its proxies find it where they left it."""
        self.log = self.tmp / f"control-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "control", "--store", self.store,
             "--api-address", f"127.0.0.1:{self.api_port}", "--admin-address",
             "127.0.0.1:0", "--token-file", str(self.tmp / "token"), "--proxy-token-file",
             str(self.tmp / "proxy-token"), "--discovery-address",
             f"127.0.0.1:{self.tls_port}", "--ca-dir", str(self.ca_dir), *self.args],
            cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"),  # noqa: SIM115
            env=_env())
        deadline = time.monotonic() + 15
        while not (m := re.search(r"admin \(metrics\) on [^ ]+:(\d+)", self.text())) or \
                "operator API on" not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.05)
        self.admin_port = int(m.group(1))
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def secure_url(self) -> str:
        """The TLS discovery port, where proxies join with a join token."""
        return f"https://127.0.0.1:{self.tls_port}"

    def bundle(self) -> Path:
        """The trust bundle (what `meshctl ca bundle` prints), in a file."""
        status, body = self.call("GET", "/v1/ca")
        assert status == 200, body
        path = self.tmp / "ca-bundle.pem"
        path.write_text(body["bundle_pem"])
        return path

    def join_token(self, namespace: str = "default", service_account: str = "default",
                   ttl: float = 3600) -> str:
        status, body = self.call("POST", "/v1/tokens", {
            "namespace": namespace, "service_account": service_account, "ttl": ttl})
        assert status == 201, body
        return str(body["token"])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def call(self, method: str, path: str, body: Any = None,
             token: str | None = TOKEN) -> tuple[int, Any]:
        return call(self.url, method, path, body, token)

    def apply(self, doc: dict) -> dict:
        from meshproxy.control.api import PLURALS

        plural = next(p for p, k in PLURALS.items() if k == doc["kind"])
        meta = doc["metadata"]
        ns = meta.get("namespace", "default")
        status, body = self.call("PUT", f"/apis/mesh/v1/namespaces/{ns}/{plural}/"
                                 f"{meta['name']}", doc)
        assert status in (200, 201), body
        return body

    def proxy_status(self) -> dict[str, dict]:
        status, body = self.call("GET", "/v1/proxy-status")
        assert status == 200, body
        return {p["node"]: p for p in body["proxies"]}

    def registry(self) -> dict:
        status, body = self.call("GET", "/v1/registry")
        assert status == 200, body
        return body

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics",
                                    timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Sidecar:
    """`meshproxy run --control-plane`: outbound listener on a free port, admin too."""

    started: list[Sidecar] = []

    def __init__(self, cp: ControlPlane | str, tmp: Path, node: str, *args: str,
                 service: str | None = None, workload_port: int | None = None,
                 workers: int = 1, wait: bool = True, join: str | None = None,
                 via: str | None = None) -> None:
        """`join`: a join token; the sidecar then joins on the TLS port with the control
        plane's bundle and gets a mesh identity."""
        Sidecar.started.append(self)
        self.cp_url = cp if isinstance(cp, str) else cp.url
        tmp.mkdir(parents=True, exist_ok=True)
        self.token_file = tmp / f"token-{node}"
        self.token_file.write_text((join or PROXY_TOKEN) + "\n")
        if join is not None:
            assert isinstance(cp, ControlPlane)
            self.cp_url = via or cp.secure_url
            args = ("--ca-bundle", str(cp.bundle()), *args)
        self.tmp, self.node, self.args = tmp, node, args
        self.service, self.workload_port, self.workers = service, workload_port, workers
        self.port, self.admin_port = free_port(), free_port()
        self.state_dir = tmp / "state"
        self.start(wait)

    def start(self, wait: bool = True) -> Sidecar:
        self.log = self.tmp / f"sidecar-{self.node}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "meshproxy", "run", "--control-plane", self.cp_url,
               "--token-file", str(self.token_file), "--node", self.node,
               "--outbound-port", str(self.port), "--admin-address",
               f"127.0.0.1:{self.admin_port}", "--workers", str(self.workers),
               "--state-dir", str(self.state_dir), "--drain-timeout", "2", *self.args]
        if self.service is not None:
            cmd += ["--service", self.service, "--workload-port", str(self.workload_port)]
        self.proc = subprocess.Popen(cmd, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "wb"), env=_env())  # noqa: SIM115
        if wait:
            wait_for(lambda: self._serving(), 20)
        return self

    def _serving(self) -> bool:
        assert self.proc.poll() is None, self.text()
        return "serving config version" in self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def admin(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}",
                                    timeout=5) as r:
            data = r.read()
        return json.loads(data) if path.startswith("/config_dump") else data.decode()

    def get(self, host: str, path: str = "/", timeout: float = 5) -> tuple[int, bytes, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                     headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if hasattr(self, "proc"):
            stop_process(self.proc)


def service(name: str, port: int, ns: str = "default") -> dict:
    return {"apiVersion": "mesh/v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns}, "spec": {"ports": [{"port": port}]}}


def stop_all(before_cp: int, before_sc: int) -> None:
    for sc in Sidecar.started[before_sc:]:
        sc.stop()
    for cp in ControlPlane.started[before_cp:]:
        cp.stop()


def workload(name: str, svc: str, port: int, ns: str = "default", **labels: str) -> dict:
    return {"apiVersion": "mesh/v1", "kind": "Workload",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"service": svc, "address": "127.0.0.1", "port": port,
                     "labels": labels}}


class Load:
    """Requests one after another on keep-alive connections to a sidecar's outbound
    listener, in a thread, until stopped; every status (and failure) is kept."""

    def __init__(self, port: int, host: str, path: str = "/") -> None:
        import threading

        self.port, self.host, self.path = port, host, path
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self.bodies: dict[bytes, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import http.client

        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", self.path, headers={"Host": self.host})
                r = conn.getresponse()
                body = r.read()
                self.statuses.append(r.status)
                if r.status != 200:
                    self.failures.append(f"{r.status} {r.getheader('x-response-flags')} "
                                         f"{body[:100]!r}")
                else:
                    self.bodies[body] = self.bodies.get(body, 0) + 1
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)

    def stop(self) -> Load:
        self._stop.set()
        self._thread.join(10)
        return self
