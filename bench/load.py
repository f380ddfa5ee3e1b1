"""End-to-end load comparison: meshproxy vs HAProxy, same origin, same core, same run.

    python -m bench.load [--duration 10] [--connections 64] [--rounds 2] [--body-size 100]

Setup (2-core machine): each proxy runs pinned to core 0 with one worker (HAProxy:
nbthread 1); nginx (the origin: a static body, 100 bytes unless --body-size says otherwise,
keep-alive) and wrk run on core 1.
Both proxies keep upstream connections alive. For each proxy, after a warm-up, wrk runs
for `--duration` seconds and the proxy's CPU time (utime + stime from /proc/PID/stat) is
divided by the requests wrk completed: CPU microseconds per request, the figure that does
not depend on how busy the shared machine is. Rounds alternate the proxies so that drift
in machine load hits both. Prints a Markdown table with the ratios to HAProxy.

Needs haproxy, nginx and wrk (Debian packages: haproxy nginx-light wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROXY_CORE = "0"
LOAD_CORE = "1"
BODY_SIZE = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and, recursively, its children (the
    supervisor and its workers): fields 14 and 15 of /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            u, s = cpu_split(int(child))
            user, system = user + u, system + s
    return user, system


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its children (cpu_split)."""
    return sum(cpu_split(pid))


@dataclass
class Result:
    name: str
    rps: float
    p99_ms: float
    requests: int
    cpu_us_per_req: float
    user_us_per_req: float = 0.0
    sys_us_per_req: float = 0.0


def start_nginx(tmp: Path, port: int, body_size: int = BODY_SIZE,
                tls: tuple[Path, Path] | None = None, http2: bool = False) -> subprocess.Popen:
    """The origin; with `tls` (chain, key) it serves HTTPS (TLS 1.3) on the port; with
    `http2`, HTTP/2 (h2c with prior knowledge on plaintext)."""
    conf = nginx_conf(tmp, f"127.0.0.1:{port} reuseport", body_size, tls, http2)
    proc = subprocess.Popen(["taskset", "-c", LOAD_CORE, "nginx", "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def nginx_conf(tmp: Path, listen: str, body_size: int = BODY_SIZE,
               tls: tuple[Path, Path] | None = None, http2: bool = False) -> Path:
    """The origin's config (a static body of `body_size` bytes, keep-alive) listening on
    `listen` (nginx's syntax: "127.0.0.1:8080 reuseport", "8080")."""
    (tmp / "body.txt").write_bytes(b"x" * body_size)
    # nginx's workers drop root for nobody: the directory must be readable to them.
    os.chmod(tmp, 0o755)
    os.chmod(tmp / "body.txt", 0o644)
    conf = tmp / "nginx.conf"
    listen_extra = (" ssl" if tls else "") + (" http2" if http2 else "")
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen {listen} backlog=4096{listen_extra};
        {f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""}
        root {tmp};
        location / {{ default_type text/plain; try_files /body.txt =404; }}
    }}
}}
""")
    return conf


def start_haproxy(tmp: Path, port: int, origin: int, bind_options: str = "",
                  global_options: str = "", defaults_options: str = "",
                  maxconn: int = 4000, server_options: str = "") -> subprocess.Popen:
    conf = tmp / "haproxy.cfg"
    conf.write_text(f"""
global
    nbthread 1
    maxconn {maxconn}
    {global_options}
defaults
    mode http
    maxconn {maxconn}
    {defaults_options}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:{port} {bind_options}
    default_backend be
backend be
    server origin 127.0.0.1:{origin} maxconn 1000 {server_options}
""")
    proc = subprocess.Popen(["taskset", "-c", PROXY_CORE, "haproxy", "-db", "-f", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def start_nginx_proxy(tmp: Path, port: int, origin: int) -> subprocess.Popen:
    """nginx as the proxy (a second peer): one worker pinned to the proxy's core, upstream
    keep-alive (proxy_http_version 1.1, a pool of idle connections), no access log."""
    d = tmp / f"nginx-proxy-{port}"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream origin {{ server 127.0.0.1:{origin}; keepalive 1024; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}
}}
""")
    proc = subprocess.Popen(["taskset", "-c", PROXY_CORE, "nginx", "-c", str(conf), "-p", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


def start_meshproxy(tmp: Path, port: int, origin: int, *extra: str,
                    pin: bool = True, resilience: bool = False,
                    access_log: bool = False, cluster_options: dict | None = None,
                    listener_options: dict | None = None) -> subprocess.Popen:
    conf = tmp / "meshproxy.json"
    route: dict = {"cluster": "origin"}
    cluster: dict = {"name": "origin", "max_idle_connections": 1024,
                     "endpoints": [{"address": "127.0.0.1", "port": origin}],
                     **(cluster_options or {})}
    if resilience:
        # Everything on the request path that resilience adds: a retry policy with a
        # per-try timeout, explicit breakers with a retry budget, outlier detection.
        route["retry_policy"] = {"retry_on": "5xx,reset,connect-failure", "num_retries": 2,
                                 "per_try_timeout": "2s"}
        cluster["circuit_breakers"] = {"max_connections": 1024, "max_requests": 1024,
                                       "retry_budget": {"budget_percent": 20}}
        cluster["outlier_detection"] = {"consecutive_5xx": 5}
    listener: dict = {"name": "bench", "address": "127.0.0.1", "port": port,
                      "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                          {"match": {"prefix": "/"}, "route": route}]}]}
    listener.update(listener_options or {})
    if access_log:
        # Envoy's default text format, one line per request, to a file.
        listener["access_log"] = {"path": str(tmp / f"access-{port}.log")}
    conf.write_text(json.dumps({"listeners": [listener], "clusters": [cluster]}))
    cmd = [sys.executable, "-m", "meshproxy", "run", "--config", str(conf),
           "--log-level", "warning", "--admin-address", "off", *extra]
    if "--workers" not in extra:
        cmd += ["--workers", "1"]
    if pin:
        cmd = ["taskset", "-c", PROXY_CORE, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    time.sleep(0.5)  # every worker bound, not just the first
    return proc


VARIANTS: dict[str, object] = {
    "haproxy": start_haproxy,
    "nginx": start_nginx_proxy,
    "meshproxy": start_meshproxy,
    "meshproxy --no-stats": lambda t, p, o: start_meshproxy(t, p, o, "--no-stats"),
    "meshproxy +resilience": lambda t, p, o: start_meshproxy(t, p, o, resilience=True),
    "meshproxy +access-log": lambda t, p, o: start_meshproxy(t, p, o, access_log=True),
    # Every request served from a task (the compiled fast path off): what it saves.
    "meshproxy --no-fast-path": lambda t, p, o: start_meshproxy(t, p, o, "--no-fast-path"),
    # A no-op Python filter on the listener (meshproxy.examples.noop): what the filter
    # machinery costs a request. A filtered route is served by the task path, so compare
    # it with --no-fast-path, the same path without a filter.
    "meshproxy +python-filter": lambda t, p, o: start_meshproxy(t, p, o, listener_options={
        "filters": [{"python": "meshproxy.examples.noop:NoOp"}]}),
    "meshproxy +async-python-filter": lambda t, p, o: start_meshproxy(
        t, p, o, listener_options={"filters": [{"python": "meshproxy.examples.noop:AsyncNoOp"}]}),
    # Two workers on the two cores, sharing them with wrk and the origin: shows how the
    # pool scales when the proxy is not the only thing running (CPU/request summed).
    "meshproxy --workers 2": lambda t, p, o: start_meshproxy(t, p, o, "--workers", "2",
                                                             pin=False),
}


def run_wrk(port: int, duration: float, connections: int) -> tuple[int, float, float]:
    out = subprocess.run(["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}",
                          f"-d{max(1, round(duration))}s", "--latency", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)] if m else 0.0
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: .*", out)
    if errors:
        print(f"  wrk reported: {errors.group(0)}", file=sys.stderr)
    return requests, rps, p99


def measure(name: str, proc: subprocess.Popen, port: int, duration: float,
            connections: int) -> Result:
    run_wrk(port, 2, connections)  # warm-up: pools filled, code paths hot
    u0, s0 = cpu_split(proc.pid)
    requests, rps, p99 = run_wrk(port, duration, connections)
    u1, s1 = cpu_split(proc.pid)
    per = 1e6 / max(requests, 1)
    return Result(name, rps, p99, requests, (u1 - u0 + s1 - s0) * per, (u1 - u0) * per,
                  (s1 - s0) * per)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--body-size", type=int, default=BODY_SIZE, metavar="BYTES",
                    help="the origin's response body (default 100; 16384 for the 16 KiB "
                         "figures)")
    ap.add_argument("--variants", default="haproxy,meshproxy",
                    help="comma-separated, among: " + ", ".join(VARIANTS) +
                         " (haproxy is always measured: the ratios are to it)")
    args = ap.parse_args(argv)
    names = ["haproxy", *[v.strip() for v in args.variants.split(",")
                          if v.strip() and v.strip() != "haproxy"]]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants: {unknown}")
    for tool in ("haproxy", "nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench.load needs {tool} (apt-get install haproxy nginx-light wrk)",
                  file=sys.stderr)
            return 2
    results: dict[str, list[Result]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        origin_port = free_port()
        nginx = start_nginx(tmp, origin_port, args.body_size)
        try:
            for _ in range(args.rounds):
                for name in names:
                    port = free_port()
                    proc = VARIANTS[name](tmp, port, origin_port)  # type: ignore[operator]
                    try:
                        r = measure(name, proc, port, args.duration, args.connections)
                    finally:
                        stop(proc)
                    results[name].append(r)
                    print(f"  {name}: {r.rps:,.0f} req/s, p99 {r.p99_ms:.2f} ms, "
                          f"{r.cpu_us_per_req:.1f} us CPU/req (user {r.user_us_per_req:.1f}, "
                          f"system {r.sys_us_per_req:.1f})", file=sys.stderr)
        finally:
            stop(nginx)

    def best(name: str) -> Result:
        return min(results[name], key=lambda r: r.cpu_us_per_req)

    h = best("haproxy")
    print(f"\nGET, {args.body_size:,}-byte responses, keep-alive, wrk -c{args.connections} "
          f"-d{args.duration:g}s, proxy pinned to one core unless noted; best of "
          f"{args.rounds} rounds\n")
    print("| proxy | requests/s | p99 latency | CPU per request | user | system "
          "| CPU vs HAProxy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in (best(n) for n in names):
        print(f"| {r.name} | {r.rps:,.0f} | {r.p99_ms:.2f} ms | {r.cpu_us_per_req:.1f} us | "
              f"{r.user_us_per_req:.1f} us | {r.sys_us_per_req:.1f} us | "
              f"{r.cpu_us_per_req / h.cpu_us_per_req:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
