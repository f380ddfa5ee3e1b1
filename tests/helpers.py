"""Test fixtures' machinery: a scripted origin on real sockets and a real proxy process.

The origin parses requests with h11 (an independent parser: an oracle, not our own code)
and answers with whatever raw bytes a test's handler returns, so a test controls every
byte on the wire, broken framing included.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

from meshproxy.transport.tls_material import KeyPair

ROOT = Path(__file__).resolve().parent.parent
# Whether proxies under test serve plain keep-alive requests on the compiled fast path
# (proxy.fast_path); the suite runs once each way (tools/test.sh).
FAST_PATH = os.environ.get("MESHPROXY_FAST_PATH", "on") != "off"


@dataclass
class Req:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: bytes
    conn_id: int

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name.lower()]


class Reset(Exception):
    """Raised by a handler: the origin resets the connection (RST) without answering."""


class Close(Exception):
    """Raised by a handler: the origin closes the connection (FIN) without answering."""


def ok_response(body: bytes = b"hello", status: int = 200, headers: tuple = ()) -> bytes:
    lines = [b"HTTP/1.1 %d OK" % status, b"content-length: %d" % len(body),
             b"content-type: text/plain"] + [k + b": " + v for k, v in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def echo_handler(req: Req, sock: socket.socket) -> bytes:
    body = json.dumps({
        "method": req.method.decode(), "target": req.target.decode(),
        "headers": [[k.decode(), v.decode("latin-1")] for k, v in req.headers],
        "body_len": len(req.body), "conn": req.conn_id,
    }).encode()
    return ok_response(body, headers=((b"content-type", b"application/json"),))


Handler = Callable[[Req, socket.socket], "bytes | None"]


def listen_socket(port: int = 0) -> socket.socket:
    """A listening socket on 127.0.0.1 (`port` 0: any free one), for the test origins."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


class ThreadedServer:
    """A listening socket on 127.0.0.1 served by a thread per connection: the test origins'
    shared accept loop. A subclass defines `_serve(sock, conn_id)`."""

    port: int
    connections: int

    def start(self):  # -> Self
        self._lsock = listen_socket(self.port)
        self.port = self._lsock.getsockname()[1]
        self._stop = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop = True
        try:
            self._lsock.close()
        except OSError:
            pass

    def _accept(self) -> None:
        while not self._stop:
            try:
                sock, _ = self._lsock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                conn_id = self.connections
            self._accepted(sock)
            threading.Thread(target=self._serve, args=(sock, conn_id), daemon=True).start()

    def _accepted(self, sock: socket.socket) -> None:
        """Called in the accept thread, before the connection's thread starts."""


@dataclass
class Origin(ThreadedServer):
    handler: Handler = echo_handler
    port: int = 0
    requests: list[Req] = field(default_factory=list)
    connections: int = 0
    raw_bytes: int = 0
    # Serve HTTPS: the handshake happens in the connection's thread; failures are kept.
    tls: ssl.SSLContext | None = None
    tls_errors: list[str] = field(default_factory=list)
    tls_resumed: list[bool] = field(default_factory=list)  # per TLS connection
    tls_clean_closes: int = 0  # connections the client ended with close_notify
    # Every byte received, per connection id, exactly as it arrived (what the proxy sent).
    raw: dict[int, bytearray] = field(default_factory=dict)

    def _serve(self, sock: socket.socket, conn_id: int) -> None:
        leftover = b""
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True,
                                            suppress_ragged_eofs=False)
                self.tls_resumed.append(sock.session_reused)
            except (OSError, ssl.SSLError) as exc:
                self.tls_errors.append(str(exc))
                sock.close()
                return
        try:
            while True:
                conn = h11.Connection(h11.SERVER)
                if leftover:
                    conn.receive_data(leftover)
                req = None
                body = []
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = sock.recv(65536)
                        self.raw_bytes += len(data)
                        self.raw.setdefault(conn_id, bytearray()).extend(data)
                        conn.receive_data(data)
                        if not data:
                            if self.tls is not None:  # ragged EOFs raise: this was clean
                                self.tls_clean_closes += 1
                            return
                        continue
                    if isinstance(ev, h11.Request):
                        req = ev
                    elif isinstance(ev, h11.Data):
                        body.append(bytes(ev.data))
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                leftover = conn.trailing_data[0]
                assert req is not None
                r = Req(req.method, req.target, list(req.headers), b"".join(body),
                        req.http_version, conn_id)
                self.requests.append(r)
                try:
                    out = self.handler(r, sock)
                except Reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                except Close:
                    return
                if out is not None:
                    sock.sendall(out)
        except (OSError, h11.RemoteProtocolError):
            return
        finally:
            sock.close()


def wait_for(pred: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


class Proxy:
    """`python -m meshproxy run` in a subprocess; ports read from its log. Every proxy is
    recorded in `started`, and the suite stops them all after each test, passed or not."""

    LISTEN = re.compile(r"listener (\S+) on [^ ]+:(\d+)")
    started: list[Proxy] = []

    def __init__(self, config: dict, tmp: Path, args: tuple[str, ...] = ()) -> None:
        Proxy.started.append(self)
        self.config_path = tmp / f"config-{time.monotonic_ns()}.json"
        self.config_path.write_text(json.dumps(config))
        self.stderr_path = tmp / f"stderr-{time.monotonic_ns()}.log"
        self._err = open(self.stderr_path, "w+b")  # noqa: SIM115
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if "--workers" not in args:
            # One worker unless a test asks for more: pools and balancers are per worker,
            # so a test that reasons about them needs to know which worker served it.
            args = ("--workers", "1", *args)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshproxy", "run", "--config", str(self.config_path),
             *args], stdout=subprocess.PIPE, stderr=self._err, env=env, cwd=str(ROOT))
        self.ports: dict[str, int] = {}
        want = len(config["listeners"])
        deadline = time.monotonic() + 15
        while len(self.ports) < want:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"proxy did not start: {self.stderr()}")
            for m in self.LISTEN.finditer(self.stderr()):
                self.ports[m.group(1)] = int(m.group(2))
            time.sleep(0.02)
        self.port = next(iter(self.ports.values()))

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if not hasattr(self, "proc"):
            return
        stop_process(self.proc)
        if not self._err.closed:
            self._err.close()


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL after 5 s: a process of a test never outlives it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def config(origin_port: int | None = None, *, routes: list | None = None,
           clusters: list | None = None, listener: dict | None = None,
           access_log: dict | None = None) -> dict:
    if routes is None:
        routes = [{"match": {"prefix": "/"}, "route": {"cluster": "web"}}]
    if clusters is None:
        clusters = [{"name": "web", "connect_timeout": "1s",
                     "endpoints": [{"address": "127.0.0.1", "port": origin_port}]}]
    lst = {"name": "ingress", "address": "127.0.0.1", "port": 0,
           "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}
    lst.update(listener or {})
    cfg: dict = {"listeners": [lst], "clusters": clusters}
    if access_log is not None:
        cfg["access_log"] = access_log
    return cfg


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, shutdown: bool = False) -> bytes:
    """Send raw bytes, read until the proxy closes or `timeout` of silence."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            r, _, _ = select.select([s], [], [], timeout)
            if not r:
                break
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            chunks.append(d)
        return b"".join(chunks)


# Bytes received after a response on a client socket belong to the next response; kept
# here between read_response() calls (several responses can arrive in one recv).
_LEFTOVER: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, head_only: bool = False) -> tuple[int, dict, bytes]:
    """Read one response with h11 as the client-side oracle (Content-Length or chunked)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="HEAD" if head_only else "GET", target="/",
                          headers=[("host", "x")]))
    pending = _LEFTOVER.pop(sock, b"")
    if pending:
        conn.receive_data(pending)
    status, headers, body = 0, {}, []
    while True:
        ev = conn.next_event()
        if ev is h11.NEED_DATA:
            conn.receive_data(sock.recv(65536))
            continue
        if isinstance(ev, h11.InformationalResponse):
            continue
        if isinstance(ev, h11.Response):
            status = ev.status_code
            headers = {k.decode(): v.decode("latin-1") for k, v in ev.headers}
        elif isinstance(ev, h11.Data):
            body.append(bytes(ev.data))
        elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
            if isinstance(ev, h11.EndOfMessage) and conn.trailing_data[0]:
                _LEFTOVER[sock] = bytes(conn.trailing_data[0])
            return status, headers, b"".join(body)


def curl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", str(timeout), *args],
                          capture_output=True, timeout=timeout + 5)


def key_pair(chain: str, key: str) -> KeyPair:
    """A certificate and key as the supervisor hands them to the TLS contexts."""
    return KeyPair(chain, Path(chain).read_bytes(), key, Path(key).read_bytes())


def make_pki(directory: Path, name_sets: list[list[str]]) -> tuple[Path, list[tuple[str, str]]]:
    """A test CA (trustme) and one certificate per set of names: (CA file, [(chain, key)])."""
    import trustme

    ca = trustme.CA()
    ca_path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    out = []
    for i, names in enumerate(name_sets):
        cert = ca.issue_cert(*names)
        chain, key = directory / f"chain{i}.pem", directory / f"key{i}.pem"
        cert.cert_chain_pems[0].write_to_path(str(chain))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(chain), append=True)
        cert.private_key_pem.write_to_path(str(key))
        out.append((str(chain), str(key)))
    return ca_path, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """A real single-member etcd (Debian's etcd-server) on free loopback ports, its data in
    `directory`. Fast Raft timers (10 ms heartbeat, 100 ms election) so it elects itself
    at once and grants 1 s leases (etcd's minimum TTL follows the election timeout)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.client, self.peer = free_port(), free_port()
        self.url = f"etcd://127.0.0.1:{self.client}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Etcd:
        self.dir.mkdir(parents=True, exist_ok=True)
        client, peer = f"http://127.0.0.1:{self.client}", f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "test", "--data-dir", str(self.dir / "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}", "--heartbeat-interval", "10",
             "--election-timeout", "100"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "etcd.log", "ab"))  # noqa: SIM115
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.client), timeout=1) as s:
                    body = b'{"key":"AA=="}'
                    s.sendall(b"POST /v3/kv/range HTTP/1.1\r\nHost: x\r\nContent-Length: %d"
                              b"\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {(self.dir / 'etcd.log').read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def down(self, seconds: float) -> None:
        """Stopped for `seconds`, then started again on the same data and ports."""
        self.stop()
        time.sleep(seconds)
        self.start()
