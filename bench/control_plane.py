"""Control-plane scale: change-to-applied latency, CPU, memory and push bytes.

    python -m bench.control_plane [--services 1000] [--endpoints 10] [--proxies 500]
                                  [--scope 20] [--sidecars 5] [--changes 200] [--rate 10]

Setup: one `meshproxy control` (SQLite) holding `services` Services of `endpoints`
Workloads each (written through its API); `proxies` simulated proxies in this process
(trio, the real push protocol: Hello with `scope` random services to prefetch, every push
decoded and ACKed at once) and `sidecars` real `meshproxy run --control-plane` sidecars
(one worker each, `--calls` with `scope` random services). Then `changes` endpoint changes
at `rate` a second: each moves one random workload to a new port through the API.

Change-to-applied is measured from the API's answer to the write (the change committed)
to: a simulated proxy receiving the push that has the new port; a real sidecar's
/config_dump showing it (applied by every worker: the sidecar ACKs only then). Reported:
p50 / p99 / max of both, the control plane's CPU seconds per change and RSS (from /proc),
and the bytes pushed per change and per push. Istio's published figure for comparison:
istiod at 1 vCPU and 1.5 GB for 1,000 services and 2,000 sidecars.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from meshproxy.control import messages as m

CLK_TCK = os.sysconf("SC_CLK_TCK")
TOKEN = "bench-token"
BASE_PORT = 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class API:
    def __init__(self, port: int) -> None:
        self.port = port
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        c = getattr(self.local, "conn", None)
        if c is None:
            c = self.local.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                             timeout=30)
        return c

    def request(self, method: str, path: str, body: Any = None) -> Any:
        c = self._conn()
        c.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                  headers={"Authorization": f"Bearer {TOKEN}"})
        r = c.getresponse()
        data = r.read()
        if r.status >= 400:
            raise RuntimeError(f"{method} {path}: {r.status} {data[:200]!r}")
        return json.loads(data)


def workload(svc: int, j: int, port: int) -> dict[str, Any]:
    return {"apiVersion": "mesh/v1", "kind": "Workload",
            "metadata": {"name": f"s{svc}-w{j}", "namespace": "default"},
            "spec": {"service": f"s{svc}", "address": f"10.{svc // 250}.{svc % 250}.{j + 1}",
                     "port": port}}


def populate(api: API, services: int, endpoints: int, threads: int = 4) -> float:
    started = time.monotonic()
    jobs = [("services", f"s{i}", {"apiVersion": "mesh/v1", "kind": "Service",
                                   "metadata": {"name": f"s{i}", "namespace": "default"},
                                   "spec": {"ports": [{"port": 8080}]}})
            for i in range(services)]
    jobs += [("workloads", f"s{i}-w{j}", workload(i, j, 8080))
             for i in range(services) for j in range(endpoints)]

    def run(part: list[tuple[str, str, dict[str, Any]]]) -> None:
        for plural, name, doc in part:
            api.request("PUT", f"/apis/mesh/v1/namespaces/default/{plural}/{name}", doc)

    # Services first (all of them), then the workloads in parallel.
    run(jobs[:services])
    rest = jobs[services:]
    ts = [threading.Thread(target=run, args=(rest[k::threads],)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.monotonic() - started


@dataclass
class Change:
    svc: int
    port: int
    committed: float = 0.0  # time.monotonic() of the API's answer
    seen: dict[str, float] = field(default_factory=dict)  # receiver -> monotonic


@dataclass
class Sim:
    node: str
    scope: list[int]
    pushes: int = 0
    bytes: int = 0
    synced: bool = False


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.changes_by_port: dict[int, Change] = {}
        self.lock = threading.Lock()

    def _note(self, receiver: str, ports: set[int]) -> None:
        now = time.monotonic()
        with self.lock:
            for p in ports:
                ch = self.changes_by_port.get(p)
                if ch is not None and receiver not in ch.seen:
                    ch.seen[receiver] = now

    async def sim_proxy(self, port: int, sim: Sim, ready: trio.Event) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            f"GET {m.PATH} HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Connection: upgrade\r\nUpgrade: {m.UPGRADE}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        head, rest = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        await stream.send_all(m.encode(m.Hello(
            node=sim.node, outbound_port=15001,
            prefetch=[f"s{k}" for k in sim.scope], lease_ttl=30.0)))
        reader = m.FrameReader(m.Down)
        pending = reader.feed(rest)
        decoder = msgspec.msgpack.Decoder()
        while True:
            for msg in pending:
                if isinstance(msg, m.Push):
                    sim.pushes += 1
                    sim.bytes += len(msg.config)
                    config = decoder.decode(msg.config)
                    ports = {e["port"] for c in config["clusters"] for e in c["endpoints"]}
                    self._note(sim.node, ports)
                    await stream.send_all(m.encode(m.Ack(msg.nonce, msg.version)))
                    if not sim.synced:
                        sim.synced = True
                        ready.set()
            data = await stream.receive_some(1 << 20)
            if not data:
                return
            pending = reader.feed(data)

    def watch_sidecar(self, name: str, admin: int, svc_scope: set[int],
                      stop: threading.Event) -> None:
        """Poll a real sidecar's /config_dump while a change in its scope is unseen."""
        conn: http.client.HTTPConnection | None = None
        while not stop.is_set():
            with self.lock:
                waiting = [c for c in self.changes_by_port.values()
                           if c.svc in svc_scope and name not in c.seen]
            if not waiting:
                time.sleep(0.005)
                continue
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
                conn.request("GET", "/config_dump")
                dump = json.loads(conn.getresponse().read())
            except (OSError, http.client.HTTPException):
                conn = None  # the admin server closed an idle connection: again
                continue
            ports = {e["port"] for c in dump["config"]["clusters"] for e in c["endpoints"]}
            self._note(name, ports)
            time.sleep(0.005)


def _quantiles(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    xs = sorted(xs)
    p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1000  # noqa: E731
    return f"{p(0.5):.0f} / {p(0.99):.0f} / {xs[-1] * 1000:.0f} ms"


def metric(port: int, name: str) -> float:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--proxies", type=int, default=500)
    ap.add_argument("--scope", type=int, default=20)
    ap.add_argument("--sidecars", type=int, default=5)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rnd = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="meshproxy-cp-bench-"))
    (work / "token").write_text(TOKEN)
    api_port, admin_port = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs: list[subprocess.Popen[bytes]] = []
    cp = subprocess.Popen(
        [sys.executable, "-m", "meshproxy", "control", "--store", f"sqlite:///{work}/cp.db",
         "--api-address", f"127.0.0.1:{api_port}", "--admin-address",
         f"127.0.0.1:{admin_port}", "--token-file", str(work / "token"),
         "--log-level", "warning"], stderr=open(work / "cp.log", "wb"), env=env)  # noqa: SIM115
    procs.append(cp)
    try:
        api = API(api_port)
        deadline = time.monotonic() + 30
        while True:
            try:
                api.request("GET", "/apis/mesh/v1/services")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                api.local.conn = None
                time.sleep(0.1)
        took = populate(api, args.services, args.endpoints)
        print(f"populated {args.services} services x {args.endpoints} endpoints in "
              f"{took:.1f} s", flush=True)
        bench = Bench(args)
        sims = [Sim(f"sim-{i}", rnd.sample(range(args.services), args.scope))
                for i in range(args.proxies)]
        sidecars = []
        for i in range(args.sidecars):
            scope = rnd.sample(range(args.services), args.scope)
            admin = free_port()
            (work / f"sc{i}").mkdir()
            proc = subprocess.Popen(
                [sys.executable, "-m", "meshproxy", "run", "--control-plane",
                 f"http://127.0.0.1:{api_port}", "--token-file", str(work / "token"),
                 "--node", f"sidecar-{i}", "--workers", "1", "--outbound-port",
                 str(free_port()), "--admin-address", f"127.0.0.1:{admin}", "--calls",
                 ",".join(f"s{k}" for k in scope), "--state-dir", str(work / f"sc{i}"),
                 "--log-level", "warning"],
                stderr=open(work / f"sc{i}.log", "wb"), env=env)  # noqa: SIM115
            procs.append(proc)
            sidecars.append((f"sidecar-{i}", admin, set(scope)))
        result: dict[str, Any] = {}
        trio.run(_run, bench, api, api_port, admin_port, cp.pid, sims, sidecars, args, rnd,
                 result)
        report(args, result, sims)
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


async def _run(bench: Bench, api: API, api_port: int, admin_port: int, cp_pid: int,
               sims: list[Sim], sidecars: list[tuple[str, int, set[int]]],
               args: argparse.Namespace, rnd: random.Random, result: dict[str, Any]) -> None:
    async with trio.open_nursery() as nursery:
        started = time.monotonic()
        events = []
        for sim in sims:
            ev = trio.Event()
            events.append(ev)
            nursery.start_soon(bench.sim_proxy, api_port, sim, ev)
            await trio.sleep(0.002)
        for ev in events:
            await ev.wait()
        result["sync"] = time.monotonic() - started
        # The real sidecars too, SYNCED.
        while True:
            status = await trio.to_thread.run_sync(api.request, "GET", "/v1/proxy-status")
            if sum(1 for p in status["proxies"] if p["node"].startswith("sidecar-")
                   and p["status"] == "SYNCED") == len(sidecars):
                break
            await trio.sleep(0.2)
        print(f"{len(sims)} simulated proxies synced in {result['sync']:.1f} s; "
              f"{len(sidecars)} sidecars synced", flush=True)
        stop = threading.Event()
        for name, admin, scope in sidecars:
            threading.Thread(target=bench.watch_sidecar, args=(name, admin, scope, stop),
                             daemon=True).start()
        cpu0 = cpu_seconds(cp_pid)
        bytes0 = await trio.to_thread.run_sync(metric, admin_port, "pilot_xds_push_bytes")
        pushes0 = await trio.to_thread.run_sync(metric, admin_port, "pilot_xds_pushes")
        changes = []
        period = 1.0 / args.rate
        t_next = time.monotonic()
        for i in range(args.changes):
            svc, j = rnd.randrange(args.services), rnd.randrange(args.endpoints)
            ch = Change(svc, BASE_PORT + i)
            with bench.lock:
                bench.changes_by_port[ch.port] = ch
            await trio.to_thread.run_sync(
                api.request, "PUT", f"/apis/mesh/v1/namespaces/default/workloads/s{svc}-w{j}",
                workload(svc, j, ch.port))
            ch.committed = time.monotonic()
            changes.append(ch)
            t_next += period
            await trio.sleep(max(0.0, t_next - time.monotonic()))
        await trio.sleep(5)
        result["cpu"] = cpu_seconds(cp_pid) - cpu0
        result["rss"] = rss_mb(cp_pid)
        result["bytes"] = await trio.to_thread.run_sync(metric, admin_port,
                                                        "pilot_xds_push_bytes") - bytes0
        result["pushes"] = await trio.to_thread.run_sync(metric, admin_port,
                                                         "pilot_xds_pushes") - pushes0
        stop.set()
        nursery.cancel_scope.cancel()
    sim_lat, real_lat, missed = [], [], 0
    sim_scope = {s.node: set(s.scope) for s in sims}
    for ch in changes:
        for node, scope in sim_scope.items():
            if ch.svc in scope:
                if node in ch.seen:
                    sim_lat.append(ch.seen[node] - ch.committed)
                else:
                    missed += 1
        for name, _, scope in sidecars:
            if ch.svc in scope:
                if name in ch.seen:
                    real_lat.append(ch.seen[name] - ch.committed)
                else:
                    missed += 1
    result.update(sim=sim_lat, real=real_lat, missed=missed, changes=len(changes))


def report(args: argparse.Namespace, r: dict[str, Any], sims: list[Sim]) -> None:
    print()
    print(f"| {args.services} services x {args.endpoints} endpoints, {args.proxies} simulated "
          f"proxies + {args.sidecars} sidecars, {args.scope} services each, "
          f"{r['changes']} changes at {args.rate:g}/s | |")
    print("|---|---:|")
    print(f"| initial sync of the simulated proxies | {r['sync']:.1f} s |")
    print(f"| change to pushed, simulated proxies (p50 / p99 / max, {len(r['sim'])} "
          f"deliveries) | {_quantiles(r['sim'])} |")
    print(f"| change to applied by every worker, real sidecars (p50 / p99 / max, "
          f"{len(r['real'])}) | {_quantiles(r['real'])} |")
    print(f"| deliveries missed (not seen within 5 s of the last change) | {r['missed']} |")
    print(f"| control-plane CPU per change | {r['cpu'] / max(1, r['changes']) * 1000:.1f} ms |")
    print(f"| control-plane RSS | {r['rss']:.0f} MB |")
    print(f"| pushes per change | {r['pushes'] / max(1, r['changes']):.1f} |")
    print(f"| bytes pushed per change / per push | "
          f"{r['bytes'] / max(1, r['changes']) / 1024:.0f} KiB / "
          f"{r['bytes'] / max(1, r['pushes']) / 1024:.1f} KiB |")
    if r["sim"]:
        print(f"\nmean change-to-pushed {statistics.mean(r['sim']) * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
