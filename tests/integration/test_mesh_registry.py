"""The registry with real processes: a `meshproxy control` and `meshproxy run
--control-plane` sidecars on loopback, real origins. A sidecar registers its workload on
start; its heartbeats hold the lease; a SIGKILLed one is evicted within TTL + 1 s and every
subscribed proxy stops sending to it; a SIGTERMed one deregisters at once (draining);
when many lapse at once nothing is evicted (self-preservation), visibly."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.helpers import wait_for
from tests.mesh import ControlPlane, Sidecar, service

TTL = 2.0


def _client_endpoints(client: Sidecar, cluster: str) -> set[int]:
    dump = client.admin("/config_dump")
    for c in dump["config"]["clusters"]:
        if c["name"] == cluster:
            return {e["port"] for e in c["endpoints"]}
    return set()


def _mesh(tmp_path: Path, origin_factory, n: int) -> tuple[ControlPlane, list, list[Sidecar],
                                                           Sidecar]:
    cp = ControlPlane(tmp_path / "cp")
    origins = [origin_factory() for _ in range(n)]
    cp.apply(service("web", 8080))
    webs = [Sidecar(cp, tmp_path / f"web{i}", f"web-{i}", "--lease-ttl", str(TTL),
                    service="web", workload_port=o.port) for i, o in enumerate(origins)]
    client = Sidecar(cp, tmp_path / "client", "client-0", "--calls", "web", workers=2)
    wait_for(lambda: _client_endpoints(client, "outbound|8080||web.default")
             == {o.port for o in origins}, 10)
    return cp, origins, webs, client


def test_registry_register_push_and_ack_after_every_worker_applied(tmp_path: Path,
                                                                    origin_factory) -> None:
    cp, origins, _webs, client = _mesh(tmp_path, origin_factory, 2)
    status, body, _ = client.get("web")
    assert status == 200 and b'"method": "GET"' in body, body
    wait_for(lambda: all(p["status"] == "SYNCED" for p in cp.proxy_status().values()), 5)
    ps = cp.proxy_status()
    assert set(ps) == {"web-0", "web-1", "client-0"}
    # SYNCED means every worker serves the version: both of the client's workers report
    # the supervisor's latest local version.
    workers = client.admin("/workers")
    import json

    local = client.admin("/config_dump")["version"]
    assert [w["config_version"] for w in json.loads(workers)["workers"]] == [local, local]
    assert ps["client-0"]["version"] == client.admin("/config_dump")["control_plane"]["version"]
    reg = cp.registry()
    assert {(r["node"], r["state"]) for r in reg["registrations"]} == {("web-0", "UP"),
                                                                      ("web-1", "UP")}
    assert reg["self_preservation"] is False


def test_registry_evicts_a_killed_workload_within_ttl_plus_one_second(
        tmp_path: Path, origin_factory) -> None:
    cp, origins, webs, client = _mesh(tmp_path, origin_factory, 3)
    webs[0].kill()
    killed = time.monotonic()
    wait_for(lambda: origins[0].port not in _client_endpoints(
        client, "outbound|8080||web.default"), TTL + 3)
    # The lease was renewed at most TTL/3 before the kill: evicted and pushed within
    # TTL + 1 s of the last heartbeat, so within TTL + 1 s of the kill.
    assert time.monotonic() - killed <= TTL + 1.0, time.monotonic() - killed
    assert time.monotonic() - killed >= TTL * 2 / 3 - 0.1  # not before the lease lapsed
    assert [r["node"] for r in cp.registry()["registrations"]] == ["web-1", "web-2"]
    assert cp.metrics()["meshproxy_registry_evictions"] == 1
    for _ in range(20):
        assert client.get("web")[0] == 200


def test_registry_graceful_shutdown_drains_at_once(tmp_path: Path, origin_factory) -> None:
    cp, origins, webs, client = _mesh(tmp_path, origin_factory, 2)
    webs[0].proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(lambda: origins[0].port not in _client_endpoints(
        client, "outbound|8080||web.default"), 3)
    assert time.monotonic() - stopped < 1.0  # not the lease: the deregistration
    webs[0].proc.wait(10)
    wait_for(lambda: [r["node"] for r in cp.registry()["registrations"]] == ["web-1"], 3)
    assert cp.metrics()["meshproxy_registry_deregistrations"] == 1
    assert cp.metrics()["meshproxy_registry_evictions"] == 0


def test_registry_self_preservation_holds_leases_that_lapse_together(
        tmp_path: Path, origin_factory) -> None:
    cp, origins, webs, client = _mesh(tmp_path, origin_factory, 3)
    webs[0].kill()
    webs[1].kill()
    wait_for(lambda: cp.registry()["self_preservation"], TTL + 3)
    time.sleep(1.0)  # past TTL + 1 s: they would have been evicted
    reg = cp.registry()
    states = {r["node"]: r["state"] for r in reg["registrations"]}
    # Their heartbeats were up to TTL/3 apart: the first to lapse may be evicted before
    # the second says it is a burst; from then on nothing is.
    held = {n for n, st in states.items() if st == "LAPSED"}
    assert states["web-2"] == "UP" and held and held <= {"web-0", "web-1"}, states
    m = cp.metrics()
    assert m["meshproxy_registry_self_preservation"] == 1
    assert m["meshproxy_registry_evictions"] == 2 - len(held)
    assert "registry self-preservation" in cp.text()
    held_ports = {origins[int(n[-1])].port for n in held}
    assert held_ports <= _client_endpoints(client, "outbound|8080||web.default")
    # They come back: the lapsed leases renew and the registry leaves self-preservation.
    for n in held:
        webs[int(n[-1])].start()
    wait_for(lambda: not cp.registry()["self_preservation"], 10)
    assert {r["state"] for r in cp.registry()["registrations"]} == {"UP"}
