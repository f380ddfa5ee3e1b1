"""`meshproxy demo`: the bundled example, end to end, on one machine.

Starts a small origin (the standard library's threaded HTTP/1.1 server) on the origin port,
serves meshproxy/examples/demo.yaml in front of it, sends one request through the proxy and
prints the response, then keeps serving so you can try curl. With --check it exits after
that first response (exit 0 when it was a 200 from the origin).
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
from importlib import resources

import trio

from meshproxy.config.compile import compile_config
from meshproxy.config.load import decode, parse_text
from meshproxy.process.errors import leaves
from meshproxy.process.worker import serve


class JSONOrigin(http.server.BaseHTTPRequestHandler):
    """The demos' origins: keep-alive HTTP/1.1, JSON answers, quiet."""

    protocol_version = "HTTP/1.1"
    # One write per response (head and body), no Nagle: otherwise every keep-alive
    # response waits out the peer's delayed ACK (40 ms).
    wbufsize = 65536
    disable_nagle_algorithm = True

    def send_json(self, status: int, doc: object) -> None:
        body = json.dumps(doc, indent=2).encode() + b"\n"
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _OriginHandler(JSONOrigin):
    def do_GET(self) -> None:
        self.send_json(200, {
            "origin": "meshproxy demo origin",
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        })


def _start_origin(port: int) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _OriginHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _fetch(port: int, path: str) -> tuple[str, bytes]:
    """The demo's first request: with curl when it is installed, else a plain socket."""
    url = f"http://127.0.0.1:{port}{path}"
    curl = shutil.which("curl")
    if curl is not None:
        done = subprocess.run([curl, "-si", "--max-time", "5", url], capture_output=True)
        if done.returncode == 0:
            return f"$ curl -i {url}", done.stdout
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: demo.local\r\n"
                  b"Connection: close\r\n\r\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return f"GET {url} (curl not found: sent from a socket)", b"".join(chunks)


def run_demo(port: int, origin_port: int, check: bool = False) -> int:
    text = resources.files("meshproxy.examples").joinpath("demo.yaml").read_text()
    raw = parse_text(text, "demo.yaml")
    raw["listeners"][0]["port"] = port
    raw["clusters"][0]["endpoints"][0]["port"] = origin_port
    snapshot = compile_config(decode(raw, "demo.yaml"))
    origin = _start_origin(origin_port)

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, snapshot)
            command, response = await trio.to_thread.run_sync(_fetch, port, "/hello")
            print(command)
            print(response.decode("utf-8", "replace"), flush=True)
            ok = response.startswith(b"HTTP/1.1 200 ")
            if check:
                nursery.cancel_scope.cancel()
                return 0 if ok else 1
            print(f"meshproxy is serving on 127.0.0.1:{port} in front of the origin on "
                  f"127.0.0.1:{origin_port}. Try:\n"
                  f"  curl -i http://127.0.0.1:{port}/hello\n"
                  f"  curl -i http://127.0.0.1:{port}/old/page     (a redirect)\n"
                  f"  curl -i http://127.0.0.1:{port}/healthz      (a direct response)\n"
                  "Ctrl-C stops it.", flush=True)
        return 0

    try:
        return trio.run(main)
    except BaseException as exc:
        if leaves(exc, KeyboardInterrupt) is not None:
            return 0
        errors = leaves(exc, OSError)
        if errors is None:
            raise
        for err in errors:
            print(f"meshproxy demo: {err}", file=sys.stderr)
        return 1
    finally:
        origin.shutdown()
