"""Network namespaces for the sidecar tests: hosts of the test's own, joined by veth pairs,
with addresses only inside them (10.211.<link>.0/24, fd00:211:<link>::/64), deleted after.

Needs root (`ip netns add`), which the test machine and CI have. Names carry the test
process's pid, so that two runs on one machine never share a namespace, and a namespace
left by a killed run is removed by the next one with the same name.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mesh import TOKEN, ControlPlane

ROOT = Path(__file__).resolve().parent.parent
PROXY_UID = 1337
# The project's interpreter may live where only root can read it (a home directory): what
# runs as another user is the system's (Debian's python3, tools/system-packages.txt).
SYSTEM_PYTHON = "/usr/bin/python3"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Net:
    def __init__(self) -> None:
        self.tag = f"mp{os.getpid() % 100000}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.links = 0

    def host(self, name: str) -> str:
        ns = f"{self.tag}-{name}"
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, a: str, b: str) -> tuple[tuple[str, str], tuple[str, str]]:
        """A veth pair between namespaces a and b: ((a's IPv4, a's IPv6), (b's ...))."""
        self.links += 1
        n = self.links
        va, vb = f"{self.tag}a{n}"[-15:], f"{self.tag}b{n}"[-15:]
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", a)
        _ip("link", "set", vb, "netns", b)
        addrs = []
        for ns, dev, host in ((a, va, 2), (b, vb, 1)):
            v4, v6 = f"10.211.{n}.{host}", f"fd00:211:{n}::{host}"
            _ip("-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            # nodad: usable at once, without duplicate address detection's second.
            _ip("-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
            addrs.append((v4, v6))
        return addrs[0], addrs[1]

    def argv(self, ns: str, argv: list[str], uid: int | None = None,
             gid: int | None = None) -> list[str]:
        """`argv` in namespace `ns`, as `uid` (and its group), or as root with group `gid`
        (how a proxy that must read the project's interpreter runs as the proxy's group:
        the rules match its GID)."""
        out = ["ip", "netns", "exec", ns]
        if uid is not None:
            out += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        elif gid is not None:
            out += ["setpriv", f"--regid={gid}", "--clear-groups"]
        return out + argv

    def run(self, ns: str, argv: list[str], uid: int | None = None,
            timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(ns, argv, uid), capture_output=True, text=True,
                              timeout=timeout, check=check, cwd=ROOT)

    def start(self, ns: str, argv: list[str], uid: int | None = None,
              gid: int | None = None, **kw: object) -> subprocess.Popen:
        p = subprocess.Popen(self.argv(ns, argv, uid, gid), cwd=ROOT,  # type: ignore[call-overload]
                             **kw)
        self.procs.append(p)
        return p

    def proxy(self, ns: str, config: dict, tmp: Path, *args: str) -> NetProxy:
        """`meshproxy run --config` in `ns` with the proxy's GID, its admin on 15000, once
        every listener is bound."""
        return NetProxy(self, ns, config, tmp, args)

    def tool(self, ns: str, *args: str, uid: int | None = None) -> str:
        """tests/netns_tools.py's client in a namespace, as `uid` (the system's python3,
        which any user can run); its output."""
        return self.run(ns, [SYSTEM_PYTHON, "-m", "tests.netns_tools", *args],
                        uid=uid).stdout.strip()

    def serve(self, ns: str, *args: str, mode: str = "serve") -> subprocess.Popen:
        """A tests/netns_tools.py server (serve, echo, http), once it listens."""
        p = self.start(ns, [sys.executable, "-m", "tests.netns_tools", mode, *args],
                       stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        line = p.stdout.readline()
        assert line.startswith("listening"), line
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


class NetProxy:
    def __init__(self, net: Net, ns: str, config: dict, tmp: Path,
                 args: tuple[str, ...]) -> None:
        self.net, self.ns = net, ns
        path = tmp / f"{ns}-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        self.log = tmp / f"{ns}-{time.monotonic_ns()}.log"
        self.proc = net.start(ns, [sys.executable, "-m", "meshproxy", "run", "--config",
                                   str(path), "--workers", "1", "--admin-address",
                                   "127.0.0.1:15000", "--drain-timeout", "1", *args],
                              gid=PROXY_UID, stdout=subprocess.DEVNULL,
                              stderr=open(self.log, "wb"))  # noqa: SIM115
        want = len(config["listeners"])
        deadline = time.monotonic() + 20
        while len(re.findall(r"listener \S+ on ", self.text())) < want:
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict[str, int]:
        out = self.net.run(self.ns, ["curl", "-s", "http://127.0.0.1:15000/stats"]).stdout
        stats = {}
        for line in out.splitlines():
            name, _, value = line.partition(": ")
            if value.lstrip("-").isdigit():
                stats[name] = int(value)
        return stats

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class NetControlPlane(ControlPlane):
    """`meshproxy control` in namespace `ns`, listening on every address there; the test
    reaches its API with curl inside the namespace (ControlPlane's calls, over it)."""

    def __init__(self, net: Net, ns: str, tmp: Path, names: list[str]) -> None:
        # Not ControlPlane.__init__: the process runs in the namespace, its ports fixed.
        self.net, self.ns, self.tmp = net, ns, tmp
        (tmp / "cp-token").write_text(TOKEN + "\n")
        self.log = tmp / "control.log"
        serving = [a for n in names for a in ("--serving-name", n)]
        self.proc = net.start(ns, [
            sys.executable, "-m", "meshproxy", "control", "--store",
            f"sqlite:///{tmp / 'cp.db'}", "--api-address", "127.0.0.1:15080",
            "--admin-address", "127.0.0.1:0", "--token-file", str(tmp / "cp-token"),
            "--discovery-address", "0.0.0.0:15012", "--ca-dir", str(tmp / "ca"), *serving],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 20
        while "operator API on" not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.05)

    def call(self, method: str, path: str, body: Any = None,
             token: str | None = TOKEN) -> tuple[int, Any]:
        argv = ["curl", "-s", "-X", method, "-H", f"Authorization: Bearer {token}",
                "-w", "\n%{http_code}", f"http://127.0.0.1:15080{path}"]
        if body is not None:
            argv += ["-H", "content-type: application/json", "-d", json.dumps(body)]
        out = self.net.run(self.ns, argv).stdout
        text, _, code = out.rpartition("\n")
        return int(code), json.loads(text) if text.strip() else {}

    def token_file(self, service_account: str) -> Path:
        path = self.tmp / f"join-{service_account}"
        path.write_text(self.join_token(service_account=service_account) + "\n")
        return path


class NetSidecar:
    """`meshproxy run --sidecar` in a pod namespace (behind `meshproxy iptables`), with
    the proxy's GID, its admin on 15000, once it serves its first config."""

    def __init__(self, net: Net, ns: str, cp: NetControlPlane, cp_address: str, node: str,
                 service_account: str, *args: str, wait: bool = True,
                 prefix: tuple[str, ...] | list[str] = ()) -> None:
        """`prefix`: what the command runs under (bench.sidecar_hop pins it: taskset)."""
        self.net, self.ns = net, ns
        tmp = cp.tmp
        self.log = tmp / f"sidecar-{node}-{time.monotonic_ns()}.log"
        self.access_log = tmp / f"access-{node}.log"
        self.proc = net.start(ns, [
            *prefix, sys.executable, "-m", "meshproxy", "run", "--sidecar", "--control-plane",
            f"https://{cp_address}:15012", "--token-file", str(cp.token_file(service_account)),
            "--ca-bundle", str(cp.bundle()), "--node", node, "--admin-address",
            "127.0.0.1:15000", "--workers", "1", "--state-dir", str(tmp / f"state-{node}"),
            "--drain-timeout", "1", "--access-log", str(self.access_log), *args],
            gid=PROXY_UID, stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 30
        while wait and "serving config version" not in self.text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.text()
            time.sleep(0.05)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def access(self) -> str:
        """Its access log so far (text layout; flushed every second)."""
        return self.access_log.read_text() if self.access_log.exists() else ""

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    try:
        yield n
    finally:
        n.close()
