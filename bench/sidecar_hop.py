"""What two intercepting sidecars cost a call: latency per hop and CPU per request.

    python -m bench.sidecar_hop [--duration 5] [--rounds 2] [--connections 16]

Run as root (network namespaces). Setup, all in namespaces of its own (tests/netns.py),
deleted after: pod A (the client: wrk), pod B (the app: nginx, a 100-byte body, on B's
address), a control plane; veth pairs between them. Both pods run `meshproxy iptables` and
a `meshproxy run --sidecar` (one worker each, pinned to core 0 with the proxy's GID); wrk
and nginx run on core 1. wrk calls `http://B:8080/` with `Host: service-b`:
- direct: the rules removed from both pods (`--cleanup`), so the call goes straight to
  nginx, as it would without a mesh;
- mesh: the rules installed, so the call crosses A's sidecar, mTLS, and B's sidecar.
The two alternate within each round, the sidecars staying up. Latency is wrk's p50 and p99
with one connection (one request in flight: the added time per hop is half the
difference); throughput and CPU with `--connections`. CPU per request is both sidecars'
utime + stime (supervisor and worker) over the requests wrk completed, the figure that
does not depend on how busy the machine is. The reference, in the same rounds: the same
two hops through two HAProxy instances, explicit rather than intercepted (A's on loopback,
B's on B's address), with the same mTLS between them (certificates from the mesh's CA,
both sides verified, TLS 1.3) and the rules removed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.load import LOAD_CORE, PROXY_CORE, cpu_split, nginx_conf
from tests.netns import Net, NetControlPlane, NetSidecar

BODY = b"x" * 100
MESHPROXY = [sys.executable, "-m", "meshproxy"]


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(net: Net, ns: str, url: str, connections: int, duration: float) -> Run:
    out = net.run(ns, ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}",
                       f"-d{max(1, round(duration))}s", "--latency", "-H",
                       "Host: service-b:8080", url], timeout=duration + 30).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise RuntimeError(f"wrk: {bad.group(0)}")
    return Run(rps, _ms(p50.group(1), p50.group(2)) if p50 else 0.0,
               _ms(p99.group(1), p99.group(2)) if p99 else 0.0, requests)


def _nginx(net: Net, ns: str, tmp: Path) -> None:
    # Every address: B's own (the direct call) and loopback (where its sidecar forwards).
    conf = nginx_conf(tmp, "8080", len(BODY))
    net.start(ns, ["taskset", "-c", LOAD_CORE, "nginx", "-c", str(conf), "-p", str(tmp)],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)


def _cpu(procs: list[subprocess.Popen]) -> tuple[float, float]:
    """(user, system) CPU seconds of the proxies, their workers included."""
    splits = [cpu_split(p.pid) for p in procs]
    return sum(u for u, _ in splits), sum(s for _, s in splits)


def _certs(tmp: Path) -> Path:
    """Two workload certificates from a mesh CA, in HAProxy's form (chain and key in one
    file); the CA bundle's path."""
    import datetime

    from meshproxy.control.ca import Authority, pem
    from meshproxy.process.identity import new_request

    authority = Authority(tmp / "haproxy-ca")
    for name in ("a", "b"):
        key_pem, csr = new_request()
        chain = authority.sign(csr, "default", f"{name}-sa", 0,
                               datetime.datetime.now(datetime.UTC))
        (tmp / f"haproxy-{name}.pem").write_bytes(pem(chain) + key_pem)
    (tmp / "haproxy-ca.pem").write_bytes(authority.bundle())
    return tmp / "haproxy-ca.pem"


def _haproxy(net: Net, ns: str, tmp: Path, name: str, bind: str, server: str) -> \
        subprocess.Popen:
    conf = tmp / f"haproxy-{name}.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn 4000
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend fe
    bind {bind}
    default_backend be
backend be
    server s {server}
""")
    return net.start(ns, ["taskset", "-c", PROXY_CORE, "haproxy", "-db", "-f", str(conf)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--connections", type=int, default=16)
    args = ap.parse_args(argv)
    for tool in ("nginx", "wrk", "taskset", "iptables", "haproxy"):
        if shutil.which(tool) is None:
            print(f"bench.sidecar_hop needs {tool}", file=sys.stderr)
            return 2
    net = Net()
    results: dict[str, list[tuple[Run, Run, float, float]]] = {
        "direct": [], "mesh": [], "haproxy": []}
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            a, b, cpns = net.host("a"), net.host("b"), net.host("cp")
            (_a4, _a6), (b_ip, _b6) = net.link(a, b)
            (_x, _y), (cp_a, _z) = net.link(a, cpns)
            (_x, _y), (cp_b, _z) = net.link(b, cpns)
            _nginx(net, b, tmp)
            cp = NetControlPlane(net, cpns, tmp, [cp_a, cp_b])
            cp.apply({"apiVersion": "mesh/v1", "kind": "Service",
                      "metadata": {"name": "service-b"}, "spec": {"ports": [{"port": 8080}]}})
            for pod in (a, b):
                net.run(pod, [*MESHPROXY, "iptables"])
            pin = ["taskset", "-c", PROXY_CORE]
            sb = NetSidecar(net, b, cp, cp_b, "b-1", "b-sa", "--service", "service-b",
                            "--workload-port", "8080", "--workload-address", b_ip,
                            "--access-log", "off", prefix=pin)
            sa = NetSidecar(net, a, cp, cp_a, "a-1", "a-sa", "--access-log", "off",
                            prefix=pin)
            ca = _certs(tmp)
            ha_b = _haproxy(net, b, tmp, "b", f"{b_ip}:25006 ssl crt {tmp / 'haproxy-b.pem'} "
                            f"ca-file {ca} verify required alpn http/1.1",
                            "127.0.0.1:8080 maxconn 1000")
            ha_a = _haproxy(net, a, tmp, "a", "127.0.0.1:25001",
                            f"{b_ip}:25006 maxconn 1000 ssl verify required ca-file {ca} "
                            f"crt {tmp / 'haproxy-a.pem'} alpn http/1.1")
            url = f"http://{b_ip}:8080/"
            deadline = time.monotonic() + 20
            while net.run(a, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                              "Host: service-b:8080", url], check=False).stdout != "200":
                if time.monotonic() > deadline:
                    raise RuntimeError("the mesh path never answered 200")
                time.sleep(0.2)
            for _ in range(args.rounds):
                for name in ("direct", "mesh", "haproxy"):
                    for pod in (a, b):
                        net.run(pod, [*MESHPROXY, "iptables"] +
                                ([] if name == "mesh" else ["--cleanup"]))
                    target = "http://127.0.0.1:25001/" if name == "haproxy" else url
                    procs = ([ha_a, ha_b] if name == "haproxy" else [sa.proc, sb.proc])
                    wrk(net, a, target, args.connections, 1)  # warm-up
                    one = wrk(net, a, target, 1, args.duration)
                    u0, s0 = _cpu(procs)
                    many = wrk(net, a, target, args.connections, args.duration)
                    u1, s1 = _cpu(procs)
                    per = 1e6 / max(many.requests, 1)
                    cpu, user = (u1 - u0 + s1 - s0) * per, (u1 - u0) * per
                    results[name].append((one, many, cpu, user))
                    print(f"  {name}: p50 {one.p50_ms:.3f} ms, p99 {one.p99_ms:.3f} ms "
                          f"(1 connection); {many.rps:,.0f} req/s with {args.connections}; "
                          f"proxies' CPU {cpu:.1f} us/req (user {user:.1f})", file=sys.stderr)
            for s in (sa, sb):
                s.kill()
    finally:
        net.close()

    def best(name: str) -> tuple[Run, Run, float, float]:
        return min(results[name], key=lambda r: r[0].p50_ms)

    d1, dn, _, _ = best("direct")
    m1, mn, mcpu, muser = best("mesh")
    h1, hn, hcpu, huser = best("haproxy")
    print(f"\nGET, 100-byte responses, keep-alive; latency with wrk -c1, throughput and CPU "
          f"with -c{args.connections}, {args.duration:g} s each; best of {args.rounds} rounds "
          "(by p50)\n")
    print("| path | p50 | p99 | added per hop (p50 / p99) | requests/s | proxies' CPU per "
          "request (both; user) | vs HAProxy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| direct (no rules, no proxy in the path) | {d1.p50_ms:.3f} ms | "
          f"{d1.p99_ms:.3f} ms | - | {dn.rps:,.0f} | - | - |")
    for label, one, many, cpu, user in (
            ("meshproxy: A's sidecar -> mTLS -> B's sidecar, intercepted", m1, mn, mcpu,
             muser),
            ("HAProxy: the same two hops with mTLS, explicit", h1, hn, hcpu, huser)):
        print(f"| {label} | {one.p50_ms:.3f} ms | {one.p99_ms:.3f} ms | "
              f"{(one.p50_ms - d1.p50_ms) / 2:.3f} / {(one.p99_ms - d1.p99_ms) / 2:.3f} ms | "
              f"{many.rps:,.0f} | {cpu:.1f} us ({user:.1f}) | {cpu / hcpu:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
