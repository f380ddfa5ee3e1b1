"""HTTP/2 and gRPC load comparison: meshproxy vs HAProxy, same origin, same core, same run.

    python -m bench.h2_load [--duration 10] [--rounds 2] [--scenarios h2c,h1-to-h2,grpc]

Scenarios (each proxy pinned to core 0 with one worker, HAProxy nbthread 1; the load
generator and the origin on core 1; after a warm-up the proxy's CPU time, utime + stime
from /proc, is divided by the requests completed, as in bench.load):
- `h2c`: h2load -c16 -m10 (16 HTTP/2 connections, 10 streams each) to the proxy, which
  forwards to nginx over HTTP/1.1 keep-alive (100-byte responses): the downstream HTTP/2
  codec.
- `h1-to-h2`: wrk -c64 over HTTP/1.1 to the proxy, which forwards to nginx over HTTP/2
  (h2c, `protocol: http2`; HAProxy `proto h2`): the upstream HTTP/2 codec.
- `grpc`: h2load -c16 -m10 sending gRPC unary calls (POST, application/grpc, one framed
  message) to the proxy, which forwards over HTTP/2 to a grpcio server; reported as calls
  per CPU-second of the proxy. One call through each proxy with grpcio's own client
  checks the answer is a gRPC OK before the load.

Needs haproxy, nginx, wrk, h2load (Debian: haproxy nginx-light wrk nghttp2-client) and
grpcio (pip, the test extras).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.load import (
    LOAD_CORE,
    cpu_split,
    free_port,
    run_wrk,
    start_haproxy,
    start_meshproxy,
    start_nginx,
    stop,
    wait_port,
)

GRPC_SERVICE = "bench.Echo"
GRPC_PATH = f"/{GRPC_SERVICE}/Unary"
GRPC_PAYLOAD = b"x" * 100


@dataclass
class Result:
    scenario: str
    name: str
    rps: float
    requests: int
    cpu_us_per_req: float
    user_us_per_req: float
    sys_us_per_req: float


def serve_grpc(port: int) -> None:
    """The gRPC origin (a subprocess): Unary answers the request's bytes."""
    from concurrent import futures

    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(GRPC_SERVICE, {"Unary": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def start_grpc_origin(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["taskset", "-c", LOAD_CORE, sys.executable, "-m",
                             "bench.h2_load", "--grpc-origin", str(port)])
    wait_port(port)
    return proc


def check_grpc(port: int) -> None:
    """One real call through the proxy: the answer must be gRPC OK with our bytes."""
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(GRPC_PATH)
        got = call(GRPC_PAYLOAD, timeout=5)
    if got != GRPC_PAYLOAD:
        raise RuntimeError("the gRPC check call came back wrong")


def run_h2load(port: int, duration: float, path: str = "/",
               body: Path | None = None) -> tuple[int, float]:
    cmd = ["taskset", "-c", LOAD_CORE, "h2load", "-c16", "-m10", "-t1",
           f"-D{max(1, round(duration))}", f"http://127.0.0.1:{port}{path}"]
    if body is not None:
        cmd += ["-d", str(body), "-H", "content-type: application/grpc",
                "-H", "te: trailers"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed",
                  out)
    if m is None:
        raise RuntimeError(f"h2load output not understood:\n{out}")
    ok, failed = int(m.group(1)), int(m.group(2))
    if failed:
        print(f"  h2load reported {failed} failed", file=sys.stderr)
    rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    return ok, rps


def measure(scenario: str, name: str, proc: subprocess.Popen, port: int,
            duration: float, grpc_body: Path | None) -> Result:
    def load(d: float) -> tuple[int, float]:
        if scenario == "h1-to-h2":
            n, rps, _p99 = run_wrk(port, d, 64)
            return n, rps
        return run_h2load(port, d, GRPC_PATH if scenario == "grpc" else "/", grpc_body)

    load(2)  # warm-up: connections open, code paths hot
    u0, s0 = cpu_split(proc.pid)
    n, rps = load(duration)
    u1, s1 = cpu_split(proc.pid)
    per = 1e6 / max(n, 1)
    return Result(scenario, name, rps, n, (u1 - u0 + s1 - s0) * per, (u1 - u0) * per,
                  (s1 - s0) * per)


def start_proxy(scenario: str, name: str, tmp: Path, port: int, origin: int
                ) -> subprocess.Popen:
    h2_origin = scenario in ("h1-to-h2", "grpc")
    if name == "haproxy":
        return start_haproxy(tmp, port, origin,
                             bind_options="" if scenario == "h1-to-h2" else "proto h2",
                             server_options="proto h2" if h2_origin else "")
    if scenario == "h2c":
        # codec http2: prior knowledge only, as HAProxy's `proto h2` bind.
        return start_meshproxy(tmp, port, origin, listener_options={"codec": "http2"})
    listener = {} if scenario == "h1-to-h2" else {"codec": "http2"}
    return start_meshproxy(tmp, port, origin, cluster_options={"protocol": "http2"},
                           listener_options=listener)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--scenarios", default="h2c,h1-to-h2,grpc")
    ap.add_argument("--grpc-origin", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.grpc_origin:
        serve_grpc(args.grpc_origin)
        return 0
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - {"h2c", "h1-to-h2", "grpc"}
    if unknown:
        ap.error(f"unknown scenarios: {sorted(unknown)}")
    for tool in ("haproxy", "nginx", "wrk", "h2load", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench.h2_load needs {tool} (apt-get install haproxy nginx-light wrk "
                  "nghttp2-client)", file=sys.stderr)
            return 2
    names = ["haproxy", "meshproxy"]
    results: dict[tuple[str, str], list[Result]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.chmod(tmp, 0o755)  # nginx's workers (nobody) reach the origins' directories
        body = tmp / "grpc-message.bin"
        # One gRPC message: uncompressed flag, 4-byte length, the payload (PROTOCOL-HTTP2).
        body.write_bytes(b"\x00" + len(GRPC_PAYLOAD).to_bytes(4, "big") + GRPC_PAYLOAD)
        for scenario in scenarios:
            origin_port = free_port()
            if scenario == "grpc":
                origin = start_grpc_origin(origin_port)
            else:
                root = tmp / scenario  # each nginx its own directory (pid, config)
                root.mkdir()
                origin = start_nginx(root, origin_port, http2=scenario == "h1-to-h2")
            try:
                for _ in range(args.rounds):
                    for name in names:
                        port = free_port()
                        proc = start_proxy(scenario, name, tmp, port, origin_port)
                        try:
                            if scenario == "grpc":
                                check_grpc(port)
                            r = measure(scenario, name, proc, port, args.duration,
                                        body if scenario == "grpc" else None)
                        finally:
                            stop(proc)
                        results.setdefault((scenario, name), []).append(r)
                        print(f"  {scenario} {name}: {r.rps:,.0f} req/s, "
                              f"{r.cpu_us_per_req:.1f} us CPU/req (user "
                              f"{r.user_us_per_req:.1f}, system {r.sys_us_per_req:.1f})",
                              file=sys.stderr)
                        time.sleep(0.2)
            finally:
                stop(origin)

    def best(scenario: str, name: str) -> Result:
        return min(results[(scenario, name)], key=lambda r: r.cpu_us_per_req)

    print(f"\nOne core per proxy, best of {args.rounds} rounds of {args.duration} s; "
          "CPU per request is the proxy's own\n")
    print("| scenario | proxy | requests/s | CPU per request | user | system "
          "| per CPU-second | CPU vs HAProxy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for scenario in scenarios:
        h = best(scenario, "haproxy")
        for name in names:
            r = best(scenario, name)
            print(f"| {scenario} | {name} | {r.rps:,.0f} | {r.cpu_us_per_req:.1f} us | "
                  f"{r.user_us_per_req:.1f} us | {r.sys_us_per_req:.1f} us | "
                  f"{1e6 / max(r.cpu_us_per_req, 1e-9):,.0f} | "
                  f"{r.cpu_us_per_req / h.cpu_us_per_req:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
