"""`meshproxy demo --mesh`: a whole mesh on loopback, as real processes.

Starts a control plane (`meshproxy control`, SQLite and its CA in a temporary directory),
two versions of a `reviews` service (small origins in this process, v2 failing one call in
four) each with its sidecar (`meshproxy run --control-plane ... --service reviews
--inbound-port N`), a client sidecar (service account productpage) and a ratings sidecar;
every sidecar joins with a join token and gets a SPIFFE identity from the CA. Applies
meshproxy/examples/mesh.yaml (a 90/10 Route with retries, STRICT mTLS, and a policy that
denies the ratings identity); sends calls through the client sidecar and shows the split,
the failed calls that retries saved, the identities, the ratings call refused by principal,
and `meshctl proxy-status`; then keeps serving until Ctrl-C (with --check it exits: 0 when
every call succeeded, both versions answered and ratings was refused).
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

from meshproxy.control.resources import load_documents
from meshproxy.ctl.client import Client
from meshproxy.demo import JSONOrigin

CALLS = 1000
STARTUP = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Origin:
    """reviews vN: answers its version; with `fail_every`, every Nth request is a 503."""

    def __init__(self, version: str, fail_every: int = 0) -> None:
        self.version, self.fail_every = version, fail_every
        self.served = self.failed = 0
        self._lock = threading.Lock()
        origin = self

        class Handler(JSONOrigin):
            def do_GET(self) -> None:
                with origin._lock:
                    origin.served += 1
                    fail = origin.fail_every and origin.served % origin.fail_every == 0
                    origin.failed += int(bool(fail))
                self.send_json(503 if fail else 200, {
                    "service": "reviews", "version": origin.version, "path": self.path})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _wait_log(path: Path, text: str, proc: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + STARTUP
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start:\n{path.read_text(errors='replace')}")
        time.sleep(0.05)


def run_mesh_demo(api_port: int, client_port: int, check: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="meshproxy-demo-"))
    token = secrets.token_hex(16)
    (work / "token").write_text(token + "\n")
    os.chmod(work / "token", 0o600)
    procs: list[subprocess.Popen[bytes]] = []
    py = [sys.executable, "-m", "meshproxy"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def start(name: str, args: list[str], ready: str) -> subprocess.Popen[bytes]:
        log = work / f"{name}.log"
        proc = subprocess.Popen([*py, *args], stdout=subprocess.DEVNULL,
                                stderr=open(log, "wb"), env=env)  # noqa: SIM115
        procs.append(proc)
        _wait_log(log, ready, proc, name)
        return proc

    v1, v2 = _Origin("v1"), _Origin("v2", fail_every=4)
    try:
        cp_url = f"http://127.0.0.1:{api_port}"
        tls_port = _free_port()
        start("control", ["control", "--store", f"sqlite:///{work / 'cp.db'}",
                          "--api-address", f"127.0.0.1:{api_port}", "--admin-address",
                          "127.0.0.1:0", "--token-file", str(work / "token"),
                          "--ca-dir", str(work / "ca"),
                          "--discovery-address", f"127.0.0.1:{tls_port}"],
              "operator API on")
        print(f"control plane: {cp_url}, TLS discovery port {tls_port} (store, CA and logs "
              f"in {work})")
        api = Client(cp_url, token)
        bundle = work / "ca-bundle.pem"
        bundle.write_text(api.request("GET", "/v1/ca")["bundle_pem"])

        def join(account: str) -> list[str]:
            """A join token for the service account, in a file the sidecar reads."""
            path = work / f"{account}.token"
            path.write_text(api.request("POST", "/v1/tokens", {
                "namespace": "default", "service_account": account, "ttl": 3600})["token"])
            os.chmod(path, 0o600)
            return ["--token-file", str(path)]
        common = ["run", "--control-plane", f"https://127.0.0.1:{tls_port}", "--ca-bundle",
                  str(bundle), "--workers", "1", "--state-dir", str(work / "state"),
                  "--drain-timeout", "2"]
        admins: dict[str, int] = {}
        for origin in (v1, v2):
            node = f"reviews-{origin.version}"
            admins[node] = _free_port()
            start(node, [*common, *join("reviews"), "--node", node, "--service", "reviews",
                         "--workload-port", str(origin.port), "--inbound-port",
                         str(_free_port()), "--label", f"version={origin.version}",
                         "--label", "app=reviews", "--outbound-port", str(_free_port()),
                         "--admin-address", f"127.0.0.1:{admins[node]}"],
                  "serving config version")
            print(f"sidecar {node}: registered reviews {origin.version} on "
                  f"127.0.0.1:{origin.port}, behind its inbound listener")
        client_admin = admins["client"] = _free_port()
        start("client", [*common, *join("productpage"), "--node", "client", "--calls",
                         "reviews", "--outbound-port", str(client_port),
                         "--admin-address", f"127.0.0.1:{client_admin}"],
              "serving config version")
        print(f"sidecar client: outbound listener on 127.0.0.1:{client_port}, admin on "
              f"127.0.0.1:{client_admin}")
        ratings_port = _free_port()
        admins["ratings"] = _free_port()
        start("ratings", [*common, *join("ratings"), "--node", "ratings", "--calls",
                          "reviews", "--outbound-port", str(ratings_port),
                          "--admin-address", f"127.0.0.1:{admins['ratings']}"],
              "serving config version")

        text = resources.files("meshproxy.examples").joinpath("mesh.yaml").read_text()
        from meshproxy.control.api import PLURALS

        for doc in load_documents(text, "mesh.yaml"):
            plural = next(p for p, k in PLURALS.items() if k == doc["kind"])
            meta = doc["metadata"]
            api.request("PUT", f"/apis/mesh/v1/namespaces/{meta['namespace']}/{plural}/"
                               f"{meta['name']}", doc)
            print(f"applied {doc['kind']} {meta['namespace']}/{meta['name']}")
        _wait_synced(api, 4, client_admin)
        print("\nidentities (issued by the control plane's CA, renewed at half-life):")
        for node, port in admins.items():
            ident = _admin(port, "/config_dump")["control_plane"]["identity"]
            print(f"  {node:10} {ident['spiffe_id']}  serial {ident['serial_number'][:12]}..."
                  f"  expires {ident['expiration_time']}")

        counts: dict[str, int] = {}
        failures = 0
        conn = http.client.HTTPConnection("127.0.0.1", client_port, timeout=5)
        for _ in range(CALLS):
            conn.request("GET", "/reviews/1", headers={"Host": "reviews"})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                failures += 1
                continue
            version = json.loads(body)["version"]
            counts[version] = counts.get(version, 0) + 1
        conn.close()
        print(f"\n{CALLS} calls to http://reviews/ through the client sidecar "
              f"(Route: 90% v1, 10% v2):")
        for version in sorted(counts):
            print(f"  {version}: {counts[version]} ({counts[version] / CALLS:.1%})")
        print(f"  reviews v2 failed {v2.failed} calls with 503; the route's retries saved "
              f"{v2.failed - failures} of them; the client saw {failures} failures")
        conn = http.client.HTTPConnection("127.0.0.1", ratings_port, timeout=5)
        conn.request("GET", "/reviews/1", headers={"Host": "reviews"})
        r = conn.getresponse()
        r.read()
        conn.close()
        denied = r.status == 403
        print(f"\nratings -> reviews (mTLS, principal cluster.local/ns/default/sa/ratings): "
              f"{r.status} {'denied by the AuthorizationPolicy' if denied else ''}")
        print("\n$ meshctl proxy-status")
        from meshproxy.ctl.main import main as meshctl

        os.environ["MESHCTL_TOKEN"] = token
        meshctl(["--server", cp_url, "proxy-status"])
        ok = failures == 0 and set(counts) == {"v1", "v2"} and denied
        if check:
            return 0 if ok else 1
        print(f"\nThe mesh keeps serving. Try:\n"
              f"  curl -s -H 'Host: reviews' http://127.0.0.1:{client_port}/\n"
              f"  MESHCTL_TOKEN={token} meshctl --server {cp_url} proxy-status\n"
              f"  MESHCTL_TOKEN={token} meshctl --server {cp_url} registry list\n"
              f"  MESHCTL_TOKEN={token} meshctl --server {cp_url} get routes -o yaml\n"
              "Ctrl-C stops it.", flush=True)
        signal.signal(signal.SIGTERM, _interrupt)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, OSError) as exc:
        print(f"meshproxy demo --mesh: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        v1.server.shutdown()
        v2.server.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _admin(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    data = json.loads(conn.getresponse().read())
    conn.close()
    return dict(data)


def _wait_synced(api: Client, proxies: int, client_admin: int) -> None:
    """Every sidecar SYNCED, and the client serving the route (both subsets' clusters)."""
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        status = api.request("GET", "/v1/proxy-status")["proxies"]
        dump = _admin(client_admin, "/config_dump")
        clusters = {c["name"] for c in dump["config"]["clusters"]}
        if (len(status) == proxies and all(p["status"] == "SYNCED" and p["identity"]
                                           for p in status)
                and {"outbound|9080|v1|reviews.default",
                     "outbound|9080|v2|reviews.default"} <= clusters):
            return
        time.sleep(0.1)
    raise RuntimeError("the sidecars did not all reach SYNCED")
