"""Idle connections and slow clients: what holding them costs, meshproxy against HAProxy.

    python -m bench.idle [--idle 9000] [--trickle 2000] [--duration 10]

1. Idle keep-alive connections: `--idle` clients each send one request, read the
   response and then stay connected doing nothing. The serving process's resident set
   (VmRSS of HAProxy's process, of meshproxy's one worker) is read before and after; the
   difference divided by the connections is the memory one idle connection costs in user
   space (the kernel's socket buffers are not in it, and are the same for both).
2. Slowloris: `--trickle` connections each send a request head one byte a second (and
   reconnect when the proxy gives up on them: meshproxy's request_headers_timeout and
   HAProxy's `timeout http-request`, both 10 s), while wrk (-c16, closed loop) measures
   other clients' latency. The p99 with and without the trickle is reported for each.

9,000 rather than 10,000 idle connections by default: HAProxy reserves two descriptors
per connection it may hold (client and server side), and this machine's hard limit is
20,000 descriptors a process; the figure is per connection either way.

Setup as bench.load: the proxy pinned to core 0 with one worker, nginx, wrk and this
script on core 1. Needs haproxy, nginx and wrk.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.load import (
    LOAD_CORE,
    free_port,
    run_wrk,
    start_haproxy,
    start_meshproxy,
    start_nginx,
    stop,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
# A head that never ends within a run at one byte a second.
SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 4000 + b"\r\n\r\n"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def serving_pid(name: str, proc_pid: int) -> int:
    """HAProxy serves in its own process; meshproxy in the supervisor's one worker."""
    if name == "haproxy":
        return proc_pid
    pid = proc_pid
    # taskset exec()s, so the Popen pid is the supervisor; its child is the worker.
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if not children:
        raise RuntimeError("meshproxy has no worker process")
    return int(children[0])


def _read_response(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + 100:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the proxy closed a connection during its first request")
        data += chunk


def idle_memory(name: str, pid: int, port: int, count: int) -> float:
    """KiB of the serving process's RSS per idle keep-alive connection."""
    warm = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    for s in warm:
        s.sendall(REQUEST)
        _read_response(s)
    for s in warm:
        s.close()
    time.sleep(0.5)
    before = rss_kib(pid)
    conns = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(REQUEST)
            _read_response(s)
            conns.append(s)
        # Steady state: meshproxy parks a connection idle for a second (downstream.
        # PARK_AFTER); three seconds cover the last one opened and the timer's tick.
        time.sleep(3.0)
        after = rss_kib(pid)
        # Still connected: every one of them answers a second request.
        for s in conns[:: max(1, count // 50)]:
            s.sendall(REQUEST)
            _read_response(s)
    finally:
        for s in conns:
            s.close()
    per = (after - before) / count
    print(f"  {name}: RSS {before:,} -> {after:,} KiB with {count:,} idle connections: "
          f"{per * 1024:,.0f} bytes each", file=sys.stderr)
    return per


class Trickle:
    """`count` connections sending SLOW_HEAD one byte a second, reconnecting when closed."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.stop_flag = threading.Event()
        self.reconnects = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _open(self) -> tuple[socket.socket, int]:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        return s, 0

    def _run(self) -> None:
        conns = [self._open() for _ in range(self.count)]
        while not self.stop_flag.is_set():
            started = time.monotonic()
            for i, (s, sent) in enumerate(conns):
                try:
                    try:
                        if not s.recv(4096):
                            raise ConnectionResetError  # closed: the proxy gave up on it
                        raise ConnectionResetError  # a 408 came: it is closing
                    except BlockingIOError:
                        pass  # nothing from the proxy: go on trickling
                    s.send(SLOW_HEAD[sent % len(SLOW_HEAD):][:1])
                    conns[i] = (s, sent + 1)
                except (BlockingIOError, InterruptedError):
                    pass  # still connecting
                except OSError:
                    s.close()
                    conns[i] = self._open()
                    self.reconnects += 1
            self.stop_flag.wait(max(0.0, 1.0 - (time.monotonic() - started)))
        for s, _ in conns:
            s.close()

    def close(self) -> None:
        self.stop_flag.set()
        self.thread.join(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=9000)
    ap.add_argument("--trickle", type=int, default=2000)
    ap.add_argument("--duration", type=int, default=10)
    args = ap.parse_args(argv)
    for tool in ("haproxy", "nginx", "wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"bench.idle needs {tool} (apt-get install haproxy nginx-light wrk)",
                  file=sys.stderr)
            return 2
    # Each process (this client, the proxy) holds every connection once; the proxy's
    # children inherit this limit.
    need = args.idle + args.trickle + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            print(f"bench.idle needs {need} file descriptors per process; the hard limit "
                  f"is {hard}", file=sys.stderr)
            return 2
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    starters = {
        "haproxy": lambda t, p, o: start_haproxy(
            t, p, o, defaults_options="timeout http-request 10s",
            maxconn=min(need, (hard if hard != resource.RLIM_INFINITY else 2 * need) // 2 - 50)),
        "meshproxy": start_meshproxy,
    }
    memory: dict[str, float] = {}
    latency: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        origin = free_port()
        nginx = start_nginx(tmp, origin)
        try:
            for name, start in starters.items():
                port = free_port()
                proc = start(tmp, port, origin)
                try:
                    pid = serving_pid(name, proc.pid)
                    memory[name] = idle_memory(name, pid, port, args.idle)
                    run_wrk(port, 2, 16)  # warm-up
                    _, _, quiet = run_wrk(port, args.duration, 16)
                    trickle = Trickle(port, args.trickle)
                    try:
                        time.sleep(3)  # every trickling connection open
                        _, _, slow = run_wrk(port, args.duration, 16)
                    finally:
                        trickle.close()
                    latency[name] = (quiet, slow, trickle.reconnects)
                    print(f"  {name}: p99 {quiet:.2f} ms alone, {slow:.2f} ms beside "
                          f"{args.trickle:,} trickling connections ({trickle.reconnects:,} "
                          "reconnects)", file=sys.stderr)
                finally:
                    stop(proc)
        finally:
            stop(nginx)
    h_mem, h_lat = memory["haproxy"], latency["haproxy"]
    print(f"\nIdle keep-alive connections ({args.idle:,}), and wrk -c16 p99 beside "
          f"{args.trickle:,} connections trickling a head one byte a second\n")
    print("| proxy | bytes per idle connection | vs HAProxy | p99 alone | p99 with trickle "
          "| vs HAProxy |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in starters:
        mem, (quiet, slow, _) = memory[name], latency[name]
        print(f"| {name} | {mem * 1024:,.0f} | {mem / h_mem:.2f}x | {quiet:.2f} ms | "
              f"{slow:.2f} ms | {slow / h_lat[1]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
