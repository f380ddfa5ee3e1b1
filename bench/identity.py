"""Issuance rate of the mesh CA: CSRs signed per second.

    python -m bench.identity [--csrs 2000] [--sidecars 500]

Two figures:
- the CA alone (control/ca.py, in this process): `--csrs` CSRs made beforehand as sidecars
  make them (P-256), signed one after another: signatures per second and CPU per CSR;
- end to end: a real `meshproxy control` and `--sidecars` discovery clients (the sidecar's
  own code, process/discovery_client.py, without its worker pool), all joining at once
  with a join token over the TLS discovery port, each sending a CSR and checking the chain
  it gets: certificates per second until the last one is issued, and the control plane's
  CPU time per issuance (TLS handshake, token check, CSR check, signature, push included).
CPU time comes from /proc (utime + stime), so it holds on a busy machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import trio

from bench.load import cpu_seconds, free_port, wait_port
from meshproxy.control.messages import Hello
from meshproxy.process.discovery_client import DiscoveryClient
from meshproxy.process.identity import Identity


def ca_alone(n: int, tmp: Path) -> tuple[float, float]:
    from meshproxy.control.ca import Authority
    from meshproxy.process.identity import new_request

    authority = Authority(tmp / "ca-alone")
    csrs = [new_request()[1] for _ in range(n)]
    now = datetime.datetime.now(datetime.UTC)
    c0, t0 = time.process_time(), time.perf_counter()
    for csr in csrs:
        authority.sign(csr, "bench", "web", 0, now)
    return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1e6


async def join_all(url: str, token: str, bundle: bytes, n: int, namespace: str = "default",
                   service_account: str = "web", timeout: float = 300.0
                   ) -> tuple[dict[str, Identity], float]:
    """`n` sidecars' discovery clients (their own code, without the worker pool: config
    adoption is a no-op) joining `url` at once with one join token: each one's issued
    identity, and the seconds until the last was issued."""
    issued: dict[str, Identity] = {}

    async def adopt(config: object, trust: bytes = b"") -> list[str]:
        return []

    async def applied() -> None:
        return None

    async with trio.open_nursery() as nursery:
        clients = []
        for i in range(n):
            c = DiscoveryClient(url, token, Hello(
                node=f"{service_account}-{i}", namespace=namespace,
                service_account=service_account, lease_ttl=60.0), None, ca_bundle=bundle)

            async def install(ident: Identity, node: str = f"{service_account}-{i}"
                              ) -> list[str]:
                issued[node] = ident
                return []
            c.adopt, c.applied, c.install = adopt, applied, install  # type: ignore[assignment]
            clients.append(c)
        started = time.perf_counter()
        for c in clients:
            nursery.start_soon(c.run)
        with trio.fail_after(timeout):
            while len(issued) < n:
                await trio.sleep(0.01)
        took = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return issued, took


def end_to_end(n: int, tmp: Path) -> tuple[float, float]:
    token = "bench-operator-token"
    (tmp / "token").write_text(token)
    api, tls = free_port(), free_port()
    cp = subprocess.Popen([sys.executable, "-m", "meshproxy", "control", "--store",
                           f"sqlite:///{tmp / 'cp.db'}", "--api-address", f"127.0.0.1:{api}",
                           "--discovery-address", f"127.0.0.1:{tls}", "--admin-address",
                           "off", "--token-file", str(tmp / "token"), "--ca-dir",
                           str(tmp / "ca"), "--log-level", "warning"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(tls)

        def call(path: str, body: object | None = None) -> dict:
            req = urllib.request.Request(f"http://127.0.0.1:{api}{path}",
                                         data=json.dumps(body).encode() if body else None,
                                         headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=10) as r:
                return dict(json.loads(r.read()))
        join = call("/v1/tokens", {"namespace": "bench", "service_account": "web"})["token"]
        bundle = call("/v1/ca")["bundle_pem"].encode()
        c0 = cpu_seconds(cp.pid)
        _, took = trio.run(join_all, f"https://127.0.0.1:{tls}", join, bundle, n, "bench")
        cpu = cpu_seconds(cp.pid) - c0
        return n / took, cpu / n * 1e6
    finally:
        cp.terminate()
        cp.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csrs", type=int, default=2000)
    ap.add_argument("--sidecars", type=int, default=500)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rate, cpu = ca_alone(args.csrs, tmp)
        print(f"CA alone: {rate:,.0f} CSRs signed/s, {cpu:.0f} us CPU per CSR "
              f"({args.csrs} P-256 CSRs)")
        os.makedirs(tmp / "e2e", exist_ok=True)
        rate2, cpu2 = end_to_end(args.sidecars, tmp / "e2e")
        print(f"end to end: {args.sidecars} sidecars joined at once, {rate2:,.0f} "
              f"certificates/s, control plane {cpu2:.0f} us CPU per issuance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
