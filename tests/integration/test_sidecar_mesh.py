"""Two pods with their apps and `meshproxy run --sidecar` sidecars behind `meshproxy
iptables`, and a control plane, each in a network namespace of the test's own (veth pairs
between them): app A calls http://service-b:8080/ as if there were no mesh (service-b is
B's address in A's /etc/hosts) and the call crosses both sidecars with mTLS; an
authorization policy on B refuses A's identity; a plain TCP echo service, called by its
service address, goes through as TCP; the sidecars' own connections are not looped back;
with A's sidecar killed, A's calls fail rather than go around the mesh."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.netns import Net, NetControlPlane, NetSidecar

MESHPROXY = [sys.executable, "-m", "meshproxy"]
ECHO_VIP = "10.211.99.10"  # the echo service's address: routed inside pod A only


def _until(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_sidecar_mesh_two_pods_speak_mtls_through_intercepting_sidecars(
        net: Net, tmp_path: Path) -> None:
    a, b, cpns = net.host("a"), net.host("b"), net.host("cp")
    (a_ip, _a6), (b_ip, _b6) = net.link(a, b)
    (_x, _y), (cp_from_a, _z) = net.link(a, cpns)
    (b_cp, _y), (cp_from_b, _z) = net.link(b, cpns)
    # A resolves service-b to B's address, and routes the echo service's address to B's
    # side of the link (only so that the app's connect gets as far as the rules).
    hosts = Path("/etc/netns") / a / "hosts"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(f"127.0.0.1 localhost\n{b_ip} service-b\n")
    try:
        net.run(a, ["ip", "route", "add", f"{ECHO_VIP}/32", "via", b_ip])
        _two_pods(net, tmp_path, a, b, cpns, b_ip, cp_from_a, cp_from_b, b_cp)
    finally:
        hosts.unlink()
        hosts.parent.rmdir()


def _two_pods(net: Net, tmp: Path, a: str, b: str, cpns: str, b_ip: str, cp_from_a: str,
              cp_from_b: str, b_cp: str) -> None:
    cp = NetControlPlane(net, cpns, tmp, [cp_from_a, cp_from_b])
    cp.apply({"apiVersion": "mesh/v1", "kind": "Service", "metadata": {"name": "service-b"},
              "spec": {"ports": [{"port": 8080}]}})
    cp.apply({"apiVersion": "mesh/v1", "kind": "Service", "metadata": {"name": "echo"},
              "spec": {"ports": [{"port": 9000, "protocol": "tcp", "name": "tcp"}],
                       "addresses": [ECHO_VIP]}})
    # The echo server is a plain workload on B's host (no sidecar of its own): its
    # callers speak plaintext TCP to it, and B's inbound side passes it through.
    cp.apply({"apiVersion": "mesh/v1", "kind": "Workload", "metadata": {"name": "echo-1"},
              "spec": {"service": "echo", "address": b_ip, "port": 9000}})
    # B's app listens on loopback only: nothing reaches it but through its sidecar.
    net.serve(b, "127.0.0.1", "8080", "app-b", mode="http")
    net.serve(b, "127.0.0.1", "9000", mode="echo")
    for pod in (a, b):
        net.run(pod, [*MESHPROXY, "iptables"])
    sb = NetSidecar(net, b, cp, cp_from_b, "b-1", "b-sa", "--service", "service-b",
                    "--workload-port", "8080", "--workload-address", b_ip, "--label",
                    "app=b")
    sa = NetSidecar(net, a, cp, cp_from_a, "a-1", "a-sa")
    curl = ["curl", "-s", "--max-time", "10", "-w", " %{http_code}"]

    def call_b() -> str:
        return net.run(a, [*curl, "http://service-b:8080/hello"], check=False).stdout

    _until(lambda: call_b().endswith(" 200"))
    out = call_b()
    # B's app sees the caller's address (A's pod), through both sidecars.
    assert out.startswith("app-b /hello xff="), out
    # Called by B's address instead of its name: the registry maps the address to the
    # service, whose routes take it (its Host names no service).
    out = net.run(a, [*curl, f"http://{b_ip}:8080/by-address"]).stdout
    assert out.startswith("app-b /by-address") and out.endswith(" 200"), out
    # The hop between the sidecars was mTLS: B's inbound side logged A's identity.
    a_id = "spiffe://cluster.local/ns/default/sa/a-sa"
    _until(lambda: a_id in sb.access())
    # TCP by the service's address, to the plain echo workload on B's host.
    assert net.tool(a, "call", ECHO_VIP, "9000", "ping over tcp") == "ping over tcp"
    _until(lambda: f"{ECHO_VIP}:9000" in sa.access() and " TCP" in sa.access())
    # An authorization policy on B refuses A's identity: 403 from B's sidecar.
    cp.apply({"apiVersion": "mesh/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "no-a"},
              "spec": {"selector": {"match_labels": {"app": "b"}}, "action": "DENY",
                       "rules": [{"from": [{"principals": ["cluster.local/ns/default/sa/a-sa"]}]}]}})
    _until(lambda: call_b().endswith(" 403"))
    assert "rbac_access_denied_matched_policy[default/no-a]" in _wait_text(sb.access, "no-a")
    # A caller with no sidecar (from the control plane's host, straight to B's address on
    # that link) is taken in by B's rules too: plaintext while B is PERMISSIVE, refused
    # once a PeerAuthentication makes it STRICT.
    def plain() -> str:
        return net.run(cpns, ["curl", "-s", "--max-time", "3", "-o", "/dev/null", "-w",
                              "%{http_code}", f"http://{b_cp}:8080/"], check=False).stdout

    assert plain() == "200"
    cp.apply({"apiVersion": "mesh/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "strict-b"},
              "spec": {"selector": {"match_labels": {"app": "b"}}, "mtls": {"mode": "STRICT"}}})
    _until(lambda: plain() == "000")
    # A's sidecar killed: the rules still send A's app to its port, where nothing listens.
    sa.kill()
    assert net.run(a, [*curl, "http://service-b:8080/hello"], check=False).stdout == " 000"
    assert net.tool(a, "call", ECHO_VIP, "9000", "x") == "refused"
    # --cleanup takes each pod's rules out again, and only ours were there.
    for pod in (a, b):
        net.run(pod, [*MESHPROXY, "iptables", "--cleanup"])
        assert "MESH" not in net.run(pod, ["iptables-save", "-t", "nat"]).stdout


def _wait_text(read: Callable[[], str], needle: str) -> str:
    _until(lambda: needle in read())
    return read()


def test_sidecar_mesh_holds_listeners_and_registration_until_a_config_applies(
        net: Net, tmp_path: Path) -> None:
    b, cpns = net.host("b"), net.host("cp")
    (_b4, _b6), (cp_from_b, _z) = net.link(b, cpns)
    b_ip = "10.211.1.2"
    cp = NetControlPlane(net, cpns, tmp_path, [cp_from_b])
    cp.apply({"apiVersion": "mesh/v1", "kind": "Service", "metadata": {"name": "service-b"},
              "spec": {"ports": [{"port": 8080}]}})
    net.run(b, [*MESHPROXY, "iptables"])
    # Something else holds the inbound port: the sidecar's first config cannot be
    # applied (it NACKs it), so it must neither serve nor be a caller's endpoint.
    net.serve(b, "::", "15006", "squatter")
    sb = NetSidecar(net, b, cp, cp_from_b, "b-1", "b-sa", "--service", "service-b",
                    "--workload-port", "8080", "--workload-address", b_ip, wait=False)
    _until(lambda: "15006" in sb.text() and "rejected" in cp.text())

    def registration() -> dict:
        status, body = cp.call("GET", "/v1/registry")
        assert status == 200, body
        return next(r for r in body["registrations"] if r["node"] == "b-1")

    assert registration()["state"] == "STARTING"
    # No listener accepts: the app's outbound connection is refused, not let through.
    assert net.tool(b, "call", cp_from_b, "15080") == "refused"
    ready = net.run(b, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        "http://127.0.0.1:15000/ready"]).stdout
    assert ready == "503"
