"""An intercepting listener (use_original_dst) behind `meshproxy iptables`, in network
namespaces of the test's own: the app's connections reach the proxy without knowing it,
and each goes where its original destination says: HTTP by the virtual hosts, TCP to a
cluster, HTTP or TCP told apart by the first bytes on an `auto` port, anything else passed
through (or refused under REGISTRY_ONLY); the proxy's own connections are not looped
back; and with the proxy gone the app's calls fail rather than go around it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.netns import SYSTEM_PYTHON, Net, NetProxy

MESHPROXY = [sys.executable, "-m", "meshproxy"]


def _pod(net: Net, tmp: Path, policy: str = "ALLOW_ANY", idle: str = "60s"
         ) -> tuple[str, str, str, str, NetProxy]:
    pod, peer = net.host("pod"), net.host("peer")
    (_pod4, _pod6), (peer4, peer6) = net.link(pod, peer)
    net.serve(peer, peer4, "8080", "web", peer6, "8080", "web6", mode="http")
    net.serve(peer, peer4, "9000", "::", "9100", mode="echo")
    net.serve(peer, "::", "7000", "elsewhere")
    cfg = {
        "listeners": [{
            "name": "outbound", "address": "::", "port": 15001, "use_original_dst": True,
            "outbound_traffic_policy": policy, "idle_timeout": idle,
            "access_log": {"path": str(tmp / "access.log"), "format": "json",
                           "flush_interval": "10ms"},
            "destinations": [
                {"addresses": [peer4, peer6], "port": 8080, "protocol": "http"},
                {"addresses": [peer4], "port": 9000, "protocol": "tcp", "cluster": "echo"},
                {"addresses": [f"{peer4.rsplit('.', 1)[0]}.0/24"], "port": 9100,
                 "protocol": "auto", "cluster": "echo-auto", "name": "auto"}],
            "virtual_hosts": [{"name": "web", "domains": [peer4, f"[{peer6}]"],
                               "routes": [{"match": {"prefix": "/"},
                                           "route": {"cluster": "web"}}]}]}],
        "clusters": [
            {"name": "web", "endpoints": [{"address": peer4, "port": 8080}]},
            {"name": "echo", "endpoints": [{"address": peer4, "port": 9000}]},
            {"name": "echo-auto", "endpoints": [{"address": peer4, "port": 9100}]}]}
    net.run(pod, [*MESHPROXY, "iptables"])
    proxy = net.proxy(pod, cfg, tmp)
    return pod, peer, peer4, peer6, proxy


def _log(tmp: Path) -> list[dict]:
    path = tmp / "access.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sidecar_intercept_routes_each_connection_by_its_original_destination(
        net: Net, tmp_path: Path) -> None:
    pod, _peer, peer4, peer6, proxy = _pod(net, tmp_path)
    curl = ["curl", "-s", "--max-time", "10"]
    # HTTP to a declared destination: the virtual hosts route it (the app named an IP).
    out = net.run(pod, [*curl, f"http://{peer4}:8080/a"]).stdout
    assert out.startswith("web /a xff=10.211.1.2"), out
    out = net.run(pod, [*curl, "-g", f"http://[{peer6}]:8080/b"]).stdout
    assert out.startswith("web /b xff=fd00:211:1::2"), out  # routed to the web cluster
    # TCP to a declared destination: bytes to its cluster, counted both ways.
    assert net.tool(pod, "call", peer4, "9000", "hello tcp") == "hello tcp"
    # An auto port: a non-HTTP client's bytes go to the cluster as TCP; an HTTP one's to
    # the virtual hosts.
    assert net.tool(pod, "call", peer4, "9100", "ping\n") == "ping"
    out = net.run(pod, [*curl, f"http://{peer4}:9100/c"]).stdout
    assert out.startswith("web /c"), out
    # Anything else is passed through to where it was going; the proxy's own connection
    # to it is not looped back into the proxy (it would answer "outbound ...").
    assert net.tool(pod, "call", peer4, "7000") == "elsewhere -"
    st = proxy.stats()
    assert st["http.outbound.downstream_rq_2xx"] == 3
    assert st["listener.outbound.tcp.downstream_cx_total"] == 3
    assert st["cluster.echo.upstream_cx_tx_bytes_total"] == len("hello tcp")
    assert st["cluster.echo.upstream_cx_rx_bytes_total"] == len("hello tcp")
    assert st["cluster.echo-auto.upstream_cx_total"] == 1
    assert st["listener.outbound.http_inspector.http11_found"] == 1
    assert st["listener.outbound.http_inspector.http_not_found"] == 1
    assert st["listener.outbound.no_filter_chain_match"] == 1
    assert st["cluster.PassthroughCluster.upstream_cx_total"] == 1
    assert st["listener.outbound.tcp.downstream_cx_rx_bytes_total"] == len("hello tcp") + 5
    lines = [e for e in _log(tmp_path) if e["protocol"] == "TCP"]
    assert {(e["authority"], e["upstream_host"], e["response_flags"]) for e in lines} == {
        (f"{peer4}:9000", f"{peer4}:9000", "-"), (f"{peer4}:9100", f"{peer4}:9100", "-"),
        (f"{peer4}:7000", f"{peer4}:7000", "-")}
    assert all(e["downstream_remote_address"].startswith("10.211.1.2:") for e in lines)


def test_sidecar_intercept_registry_only_refuses_what_is_not_in_the_mesh(
        net: Net, tmp_path: Path) -> None:
    pod, _peer, peer4, _peer6, proxy = _pod(net, tmp_path, "REGISTRY_ONLY")
    assert net.tool(pod, "call", peer4, "7000") == ""  # closed, nothing passed on
    assert net.tool(pod, "call", peer4, "9000", "still") == "still"
    st = proxy.stats()
    assert st["cluster.BlackHoleCluster.upstream_cx_none_healthy"] == 1
    assert st["listener.outbound.tcp.downstream_cx_no_route"] == 1
    assert st.get("cluster.PassthroughCluster.upstream_cx_total", 0) == 0
    refused = [e for e in _log(tmp_path) if e["authority"] == f"{peer4}:7000"]
    assert [(e["response_flags"], e["response_code_details"]) for e in refused] == [
        ("UH", "blackhole")]


def test_sidecar_intercept_tcp_idle_timeout_and_a_silent_auto_client(
        net: Net, tmp_path: Path) -> None:
    pod, _peer, peer4, _peer6, proxy = _pod(net, tmp_path, idle="700ms")
    # A client that connects and says nothing: on the tcp port it is closed once the
    # listener's idle_timeout passes; on the auto port the inspector gives up after
    # protocol_detection_timeout and takes it for TCP (a server-first protocol), so it is
    # connected upstream, then closed idle too.
    script = ("import socket, sys, time; s = socket.create_connection((sys.argv[1], "
              "int(sys.argv[2])), timeout=10); t = time.monotonic(); d = s.recv(10); "
              "print(repr(d), round(time.monotonic() - t, 1))")
    for port in ("9000", "9100"):
        out = net.run(pod, [SYSTEM_PYTHON, "-c", script, peer4, port]).stdout.split()
        assert out[0] == "b''" and 0.5 <= float(out[1]) < 5, out
    st = proxy.stats()
    assert st["listener.outbound.tcp.idle_timeout"] == 2
    assert st["listener.outbound.http_inspector.http_not_found"] == 1
    assert st["cluster.echo-auto.upstream_cx_total"] == 1
    idle = [e for e in _log(tmp_path) if e["response_code_details"] == "idle_timeout"]
    assert len(idle) == 2


def test_sidecar_intercept_without_the_proxy_calls_fail_closed(
        net: Net, tmp_path: Path) -> None:
    pod, _peer, peer4, _peer6, proxy = _pod(net, tmp_path)
    assert net.tool(pod, "call", peer4, "7000") == "elsewhere -"
    proxy.kill()
    # The rules still send the app to the proxy's port, where nothing listens now: the
    # call fails, it does not go around the mesh.
    assert net.tool(pod, "call", peer4, "7000") == "refused"
    assert net.tool(pod, "call", peer4, "9000", "x") == "refused"


@pytest.mark.parametrize("bad", [
    ({"destinations": [{"port": 1, "protocol": "tcp"}]}, "destinations[0].cluster: a tcp"),
    ({"use_original_dst": False, "destinations": [{"port": 1}]},
     "destinations: need use_original_dst"),
    ({"destinations": [{"addresses": ["10.0.0.1/8"]}]}, "destinations[0].addresses[0]:"),
])
def test_sidecar_intercept_bad_destinations_are_named(bad: tuple[dict, str],
                                                      tmp_path: Path) -> None:
    import subprocess
    fields, message = bad
    cfg = {"listeners": [{"name": "o", "port": 15001, "use_original_dst": True,
                          "virtual_hosts": [], **fields}], "clusters": []}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([*MESHPROXY, "validate", "--config", str(path)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and message in r.stderr, r.stderr
