"""Latency at a fixed rate: meshproxy against HAProxy, same origin, same core, same run.

    python -m bench.fixed_rate [--rate 20000] [--duration 8] [--rounds 2]

A closed-loop client (wrk) measures latency at saturation, where every proxy's queue is
full; a service mesh runs well below it. Here h2load (`--h1`, 16 connections, `--rps` per
connection) offers the same fixed rate to each proxy, by default 20,000 requests a second,
about half of what either proxy serves on one core here (bench.load), and logs every
request's latency (`--log-file`), from which p50, p99 and p99.9 are taken; the proxy's CPU
time per request comes from /proc as in bench.load. Requests h2load could not send on time
(a proxy behind the rate) show as a lower achieved rate.

Setup as bench.load: the proxy pinned to core 0 with one worker, nginx and h2load on core 1;
100-byte responses. Needs haproxy, nginx and h2load (Debian: haproxy nginx nghttp2-client).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.load import (
    LOAD_CORE,
    cpu_seconds,
    free_port,
    start_haproxy,
    start_meshproxy,
    start_nginx,
    stop,
)

CONNECTIONS = 16


def offer(port: int, rate: int, duration: int, log: Path) -> list[int]:
    """Every request's latency in microseconds, at `rate` requests a second."""
    log.unlink(missing_ok=True)
    subprocess.run(["taskset", "-c", LOAD_CORE, "h2load", "--h1", "-c", str(CONNECTIONS),
                    "-t", "1", "--rps", str(max(1, rate // CONNECTIONS)), "-D", str(duration),
                    "--log-file", str(log), f"http://127.0.0.1:{port}/"],
                   capture_output=True, text=True, check=True, timeout=duration + 60)
    out = []
    for line in log.read_text().splitlines():
        cols = line.split("\t")
        if len(cols) >= 3 and cols[1] == "200":
            out.append(int(cols[2]))
    return sorted(out)


def quantile(sorted_us: list[int], q: float) -> float:
    return sorted_us[min(len(sorted_us) - 1, int(q * len(sorted_us)))] / 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--duration", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    for tool in ("haproxy", "nginx", "h2load", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench.fixed_rate needs {tool}", file=sys.stderr)
            return 2
    starters = {"haproxy": start_haproxy, "meshproxy": start_meshproxy}
    rows: dict[str, list[tuple[float, float, float, float, float]]] = {n: [] for n in starters}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        origin = free_port()
        nginx = start_nginx(tmp, origin)
        try:
            for _ in range(args.rounds):
                for name, start in starters.items():
                    port = free_port()
                    proc = start(tmp, port, origin)
                    try:
                        offer(port, args.rate, 1, tmp / "warm.log")  # pools filled
                        c0 = cpu_seconds(proc.pid)
                        lat = offer(port, args.rate, args.duration, tmp / f"{name}.log")
                        c1 = cpu_seconds(proc.pid)
                    finally:
                        stop(proc)
                    n = max(len(lat), 1)
                    row = (len(lat) / args.duration, quantile(lat, 0.5), quantile(lat, 0.99),
                           quantile(lat, 0.999), (c1 - c0) / n * 1e6)
                    rows[name].append(row)
                    print(f"  {name}: {row[0]:,.0f} req/s, p50 {row[1]:.2f} ms, p99 "
                          f"{row[2]:.2f} ms, p99.9 {row[3]:.2f} ms, {row[4]:.1f} us CPU/req",
                          file=sys.stderr)
        finally:
            stop(nginx)
    # Per proxy, the round with the lowest p99 (the least disturbed by the shared host).
    best = {n: min(rs, key=lambda r: r[2]) for n, rs in rows.items()}
    h = best["haproxy"]
    print(f"\nGET, 100-byte responses, {args.rate:,} req/s offered over {CONNECTIONS} "
          f"keep-alive connections (h2load --h1 --rps), proxy pinned to one core; the round "
          f"with the lowest p99 of {args.rounds}\n")
    print("| proxy | achieved req/s | p50 | p99 | p99.9 | p99 vs HAProxy | CPU per request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b in best.items():
        print(f"| {name} | {b[0]:,.0f} | {b[1]:.2f} ms | {b[2]:.2f} ms | {b[3]:.2f} ms | "
              f"{b[2] / h[2]:.2f}x | {b[4]:.1f} us |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
