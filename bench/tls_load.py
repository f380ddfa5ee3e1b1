"""TLS comparison: meshproxy vs HAProxy terminating TLS with the same certificate, same run.

    python -m bench.tls_load [--duration 8] [--rounds 2] [--upstream-tls]

Two figures per proxy (each pinned to core 0, one worker / nbthread 1; the clients and the
nginx origin on core 1):
- handshakes: `openssl s_time -new` clients (two at once) open a new TLS connection for every
  exchange: full handshakes per second and the proxy's CPU time per handshake;
- keep-alive: `wrk -c64` over HTTPS (one handshake per connection, then requests): requests
  per second and the proxy's CPU time per request.
The certificate is one meshproxy's own CA issued (control/ca.py over a CSR made as a
sidecar makes it, process/identity.py: ECDSA P-256, a SPIFFE URI SAN, the chain to the
root), served by both proxies; TLS 1.3 is negotiated by both. With `--upstream-tls` the
nginx origin serves HTTPS with it too and both proxies verify it against the CA, so every
hop is TLS, as from one sidecar to the next (the keep-alive figure then includes the
upstream records).
CPU time comes from /proc (utime + stime), so the figures hold on a busy machine; the ratio
to HAProxy is the figure to quote.

Needs haproxy, nginx, wrk and openssl (Debian packages: haproxy nginx-light wrk openssl).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import (
    LOAD_CORE,
    PROXY_CORE,
    cpu_seconds,
    free_port,
    start_haproxy,
    start_nginx,
    stop,
    wait_port,
)


def make_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A workload certificate from the mesh CA, as a sidecar gets it."""
    import datetime

    from meshproxy.control.ca import Authority, pem
    from meshproxy.process.identity import new_request

    authority = Authority(tmp / "mesh-ca")
    key_pem, csr = new_request()
    chain = authority.sign(csr, "mesh", "gateway", 0, datetime.datetime.now(datetime.UTC))
    ca_path, chain_path, key_path = tmp / "ca.pem", tmp / "gateway.pem", tmp / "gateway-key.pem"
    ca_path.write_bytes(authority.bundle())
    chain_path.write_bytes(pem(chain))
    key_path.write_bytes(key_pem)
    combined = tmp / "haproxy.pem"  # HAProxy wants the chain and the key in one file
    combined.write_bytes(pem(chain) + key_pem)
    return ca_path, chain_path, key_path


def start_haproxy_tls(tmp: Path, port: int, origin: int,
                      upstream_tls: bool = False) -> subprocess.Popen:
    return start_haproxy(tmp, port, origin,
                         bind_options=f"ssl crt {tmp / 'haproxy.pem'} alpn http/1.1",
                         global_options="ssl-default-bind-options ssl-min-ver TLSv1.2",
                         server_options=f"ssl verify required ca-file {tmp / 'ca.pem'}"
                         if upstream_tls else "")


def start_meshproxy_tls(tmp: Path, port: int, origin: int,
                        upstream_tls: bool = False) -> subprocess.Popen:
    cluster: dict = {"name": "origin", "max_idle_connections": 1024,
                     "endpoints": [{"address": "127.0.0.1", "port": origin}]}
    if upstream_tls:
        cluster["tls"] = {"trusted_ca": str(tmp / "ca.pem")}
    conf = tmp / "meshproxy-tls.json"
    conf.write_text(json.dumps({
        "listeners": [{"name": "bench", "address": "127.0.0.1", "port": port,
                       "tls": {"certificates": [
                           {"certificate_chain": str(tmp / "gateway.pem"),
                            "private_key": str(tmp / "gateway-key.pem")}]},
                       "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                           {"match": {"prefix": "/"}, "route": {"cluster": "origin"}}]}]}],
        "clusters": [cluster],
    }))
    proc = subprocess.Popen(["taskset", "-c", PROXY_CORE, sys.executable, "-m", "meshproxy",
                             "run", "--config", str(conf), "--log-level", "warning",
                             "--admin-address", "off", "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    time.sleep(0.5)
    return proc


def handshakes(port: int, duration: int, ca: Path) -> int:
    """Full handshakes completed by two `openssl s_time -new` clients in `duration`."""
    cmd = ["taskset", "-c", LOAD_CORE, "openssl", "s_time", "-connect", f"127.0.0.1:{port}",
           "-new", "-time", str(duration), "-CAfile", str(ca)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for _ in range(2)]
    total = 0
    for p in procs:
        out, _ = p.communicate(timeout=duration + 30)
        m = re.search(r"(\d+) connections in [\d.]+s", out)
        total += int(m.group(1)) if m else 0
    return total


def wrk_https(port: int, duration: int) -> int:
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", "-c64", f"-d{duration}s",
                          f"https://127.0.0.1:{port}/"], capture_output=True, text=True,
                         check=True).stdout
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--upstream-tls", action="store_true",
                    help="the origin serves HTTPS too and both proxies verify it: every "
                         "hop TLS, as between two sidecars")
    args = ap.parse_args(argv)
    for tool in ("haproxy", "nginx", "wrk", "openssl", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench.tls_load needs {tool}", file=sys.stderr)
            return 2
    starters = {"haproxy": start_haproxy_tls, "meshproxy": start_meshproxy_tls}
    rows: dict[str, list[tuple[float, float, float, float]]] = {n: [] for n in starters}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ca, chain, key = make_cert(tmp)
        origin = free_port()
        nginx = start_nginx(tmp, origin, tls=(chain, key) if args.upstream_tls else None)
        try:
            for _ in range(args.rounds):
                for name, start in starters.items():
                    port = free_port()
                    proc = start(tmp, port, origin, args.upstream_tls)
                    try:
                        handshakes(port, 1, ca)  # warm-up
                        c0 = cpu_seconds(proc.pid)
                        n = handshakes(port, args.duration, ca)
                        c1 = cpu_seconds(proc.pid)
                        wrk_https(port, 2)  # warm-up: pools filled
                        c2 = cpu_seconds(proc.pid)
                        reqs = wrk_https(port, args.duration)
                        c3 = cpu_seconds(proc.pid)
                    finally:
                        stop(proc)
                    row = (n / args.duration, (c1 - c0) / max(n, 1) * 1e6,
                           reqs / args.duration, (c3 - c2) / max(reqs, 1) * 1e6)
                    rows[name].append(row)
                    print(f"  {name}: {row[0]:,.0f} handshakes/s, {row[1]:.0f} us CPU each; "
                          f"{row[2]:,.0f} req/s keep-alive, {row[3]:.1f} us CPU/req",
                          file=sys.stderr)
        finally:
            stop(nginx)
    best = {n: (max(r[0] for r in rs), min(r[1] for r in rs), max(r[2] for r in rs),
                min(r[3] for r in rs)) for n, rs in rows.items()}
    h = best["haproxy"]
    hops = "client and origin" if args.upstream_tls else "client"
    print(f"\nTLS 1.3 to the {hops}, ECDSA P-256, proxy pinned to one core; best of "
          f"{args.rounds} rounds of {args.duration} s\n")
    print("| proxy | handshakes/s | CPU per handshake | vs HAProxy | keep-alive req/s "
          "| CPU per request | vs HAProxy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b in best.items():
        print(f"| {name} | {b[0]:,.0f} | {b[1]:.0f} us | {b[1] / h[1]:.2f}x | {b[2]:,.0f} | "
              f"{b[3]:.1f} us | {b[3] / h[3]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
