"""The worker pool and its lifecycle, on real processes: stats summed over workers, crash
repair, drain on SIGTERM, reload without dropped connections, the admin API."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import h11
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Origin, Proxy, config, ok_response, read_response, wait_for


def admin(p: Proxy, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{p.admin_port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stat(p: Proxy, name: str) -> int:
    body = json.loads(admin(p, "/stats?format=json")[1])
    for s in body["stats"]:
        if s["name"] == name:
            return s["value"]
    raise KeyError(name)


def workers(p: Proxy) -> list[dict]:
    return json.loads(admin(p, "/workers")[1])["workers"]


def start(tmp_path, origin: Origin, n: int = 2, *args: str, cfg: dict | None = None) -> Proxy:
    cfg = cfg or config(origin.port)
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path, ("--workers", str(n), *args))
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def _admin_port(p: Proxy) -> str | None:
    import re

    m = re.search(r"admin on [^ ]+:(\d+)", p.stderr())
    return m.group(1) if m else None


def get(port: int, path: str = "/", keep: socket.socket | None = None) -> int:
    if keep is not None:
        keep.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        return read_response(keep)[0]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
        return read_response(s)[0]


@pytest.fixture
def pool(origin, tmp_path):
    p = start(tmp_path, origin)
    yield origin, p
    p.stop()


def test_supervisor_requests_over_two_workers_sum_exactly(pool) -> None:
    origin, p = pool
    n = 0
    for _ in range(40):  # fresh connections: the kernel spreads them over both workers
        assert get(p.port) == 200
        n += 1
    with socket.create_connection(("127.0.0.1", p.port)) as s:
        for _ in range(60):
            assert get(p.port, keep=s) == 200
            n += 1
    ws = workers(p)
    assert len(ws) == 2 and all(w["state"] == "serving" for w in ws)
    assert all(w["requests"] > 0 for w in ws), ws  # both workers served
    assert sum(w["requests"] for w in ws) == n
    assert stat(p, "http.ingress.downstream_rq_total") == n
    assert stat(p, "http.ingress.downstream_rq_2xx") == n
    assert stat(p, "cluster.web.upstream_rq_total") == n
    assert stat(p, "cluster.web.upstream_rq_2xx") == n
    status, text = admin(p, "/stats/prometheus")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    rq = families["meshproxy_http_downstream_rq"]  # the parser strips _total from counters
    assert [s.value for s in rq.samples if s.name.endswith("_total")] == [n]
    hist = families["meshproxy_cluster_upstream_rq_time"]
    count = [s.value for s in hist.samples if s.name.endswith("_count")]
    inf = [s.value for s in hist.samples if s.labels.get("le") == "+Inf"]
    assert count == [n] and inf == [n]


def test_supervisor_kill9_worker_is_replaced_and_the_other_keeps_serving(pool) -> None:
    origin, p = pool
    conns = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(12)]
    for c in conns:
        assert get(p.port, keep=c) == 200
    before = workers(p)
    victim = before[0]
    total_before = stat(p, "http.ingress.downstream_rq_total")
    victims_conns = victim["connections"]
    assert 0 < victims_conns < len(conns), before  # both workers hold some connections
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    ok = failed = 0
    for c in conns:  # the survivor's connections all still work; the victim's are gone
        try:
            status = get(p.port, keep=c)
            ok += status == 200
        except (OSError, h11.RemoteProtocolError):
            failed += 1
    assert failed == victims_conns and ok == len(conns) - victims_conns
    replaced = wait_for(lambda: [w for w in workers(p) if w["index"] == victim["index"]
                                 and w["pid"] not in (None, victim["pid"])
                                 and w["state"] == "serving"], timeout=5)
    assert time.monotonic() - t0 < 2.0
    assert replaced[0]["restarts"] == 1
    for _ in range(30):
        assert get(p.port) == 200
    # the dead worker's counts were kept: totals never go backwards
    assert stat(p, "http.ingress.downstream_rq_total") >= total_before + ok + 30
    assert admin(p, "/ready")[0] == 200
    for c in conns:
        c.close()


def test_supervisor_crash_loop_is_backed_off_and_reported(pool) -> None:
    origin, p = pool
    for _ in range(3):
        w = wait_for(lambda: [w for w in workers(p) if w["index"] == 1 and w["pid"]
                              and w["state"] == "serving"], timeout=10)[0]
        os.kill(w["pid"], signal.SIGKILL)
        wait_for(lambda pid=w["pid"]: all(x["pid"] != pid for x in workers(p)))
    w1 = next(w for w in workers(p) if w["index"] == 1)
    assert w1["crash_loop"] and w1["state"] in ("backoff", "starting", "serving")
    assert "crash loop" in p.stderr()
    assert get(p.port) == 200  # the other worker serves meanwhile


def test_supervisor_sigterm_lets_slow_requests_finish(origin, tmp_path) -> None:
    origin.handler = lambda req, s: (time.sleep(1.0), ok_response(b"slow"))[1]
    p = start(tmp_path, origin)
    results: list[int] = []

    def client() -> None:
        results.append(get(p.port, "/slow"))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    wait_for(lambda: len(origin.requests) == 8)
    p.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(10)
    assert results == [200] * 8
    assert p.proc.wait(10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", p.port), timeout=1)
    p.stop()


def test_supervisor_reload_under_load_drops_nothing(origin, tmp_path) -> None:
    cfg = config(origin.port)
    cfg["listeners"][0]["virtual_hosts"][0]["routes"].insert(
        0, {"match": {"path": "/v"}, "direct_response": {"status": 200, "body": "one"}})
    p = start(tmp_path, origin, cfg=cfg)
    stop = threading.Event()
    seen: list[bytes] = []
    errors: list[BaseException] = []

    def load() -> None:
        try:
            with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
                while not stop.is_set():
                    s.sendall(b"GET /v HTTP/1.1\r\nHost: a\r\n\r\n")
                    status, _, body = read_response(s)
                    assert status == 200
                    seen.append(body)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    cfg["listeners"][0]["virtual_hosts"][0]["routes"][0]["direct_response"]["body"] = "two"
    cfg["listeners"][0]["port"] = p.port
    p.config_path.write_text(json.dumps(cfg))
    status, body = admin(p, "/reload", "POST")
    assert status == 200 and json.loads(body)["version"] == 2
    wait_for(lambda: seen and seen[-1] == b"two")
    p.proc.send_signal(signal.SIGHUP)  # the signal does the same
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert b"one" in seen and seen[-1] == b"two"
    assert stat(p, "server.config_version") == 3
    p.stop()


def test_supervisor_invalid_reload_keeps_old_config(pool) -> None:
    origin, p = pool
    good = p.config_path.read_text()
    p.config_path.write_text(good.replace('"prefix": "/"', '"prefix": 7'))
    status, body = admin(p, "/reload", "POST")
    assert status == 400
    errors = json.loads(body)["errors"]
    assert any("match.prefix: expected str, got int" in e for e in errors)
    assert "reload refused" in p.stderr()
    assert get(p.port) == 200
    assert stat(p, "server.config_version") == 1


def test_supervisor_reload_adds_cluster_with_stats(origin_factory, tmp_path) -> None:
    a, b = origin_factory(), origin_factory()
    p = start(tmp_path, a)
    cfg = json.loads(p.config_path.read_text())
    cfg["clusters"].append({"name": "b", "endpoints": [{"address": "127.0.0.1",
                                                        "port": b.port}]})
    cfg["listeners"][0]["virtual_hosts"][0]["routes"].insert(
        0, {"match": {"prefix": "/b"}, "route": {"cluster": "b"}})
    p.config_path.write_text(json.dumps(cfg))
    assert admin(p, "/reload", "POST")[0] == 200
    wait_for(lambda: all(w["config_version"] == 2 for w in workers(p)))
    for _ in range(5):
        assert get(p.port, "/b/x") == 200
    assert len(b.requests) == 5
    assert stat(p, "cluster.b.upstream_rq_total") == 5
    clusters = json.loads(admin(p, "/clusters?format=json")[1])["clusters"]
    assert [c["name"] for c in clusters] == ["web", "b"]
    p.stop()


def test_supervisor_admin_endpoints(pool) -> None:
    origin, p = pool
    assert admin(p, "/ready") == (200, b"LIVE\n")
    assert admin(p, "/healthz") == (200, b"ok\n")
    assert admin(p, "/nothing")[0] == 404
    assert admin(p, "/stats", "POST")[0] == 405
    assert admin(p, "/reload", "GET")[0] == 405
    dump = json.loads(admin(p, "/config_dump")[1])
    assert dump["version"] == 1
    lst = dump["config"]["listeners"][0]
    assert lst["port"] == p.port and lst["request_headers_timeout"] == "10s"  # defaults shown
    text = admin(p, "/clusters")[1].decode()
    assert f"web::127.0.0.1:{origin.port}::health::healthy" in text
    assert "server.live: 1" in admin(p, "/stats")[1].decode()
    assert admin(p, "/stats?filter=^cluster%5C.")[1].decode().startswith("cluster.web.")
    assert admin(p, "/drain", "POST")[0] == 200
    wait_for(lambda: admin(p, "/ready")[0] == 503)
    assert admin(p, "/healthz")[0] == 200  # still up, just not taking traffic
    wait_for(lambda: all(w["state"] == "drained" for w in workers(p)))
    assert admin(p, "/quitquitquit", "POST")[0] == 200
    assert p.proc.wait(10) == 0


def test_supervisor_max_connections_leaves_extra_in_backlog(origin, tmp_path) -> None:
    p = start(tmp_path, origin, 1, "--max-connections", "2")
    a = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    b = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    assert get(p.port, keep=a) == 200 and get(p.port, keep=b) == 200
    c = socket.create_connection(("127.0.0.1", p.port), timeout=5)  # completes in the kernel
    c.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    c.settimeout(0.5)
    with pytest.raises(TimeoutError):
        c.recv(1)  # not accepted: nobody reads it
    a.close()  # room again: c is accepted and answered
    c.settimeout(5)
    assert read_response(c)[0] == 200
    b.close()
    c.close()
    p.stop()


def test_supervisor_cpu_affinity_pins_workers(origin, tmp_path) -> None:
    p = start(tmp_path, origin, 2, "--cpu-affinity")
    ncpu = os.cpu_count() or 1
    for w in workers(p):
        assert os.sched_getaffinity(w["pid"]) == {w["index"] % ncpu}
    p.stop()


def test_supervisor_kill9_under_load_only_victims_connections_fail(pool) -> None:
    origin, p = pool
    n_clients, stop = 12, threading.Event()
    conns = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(n_clients)]
    for c in conns:
        assert get(p.port, keep=c) == 200
    victim = workers(p)[0]
    on_victim = victim["connections"]
    assert 0 < on_victim < n_clients
    done = [0] * n_clients
    failed = [False] * n_clients

    def hammer(i: int) -> None:
        while not stop.is_set():
            try:
                assert get(p.port, keep=conns[i]) == 200
                done[i] += 1
            except (OSError, h11.RemoteProtocolError):
                failed[i] = True
                return

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: any(w["index"] == victim["index"] and w["pid"] not in (None, victim["pid"])
                         for w in workers(p)), timeout=5)
    assert time.monotonic() - killed_at < 1.0  # replaced within a second
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(10)
    assert sum(failed) == on_victim  # exactly the dead worker's connections broke
    assert all(done[i] > 0 for i in range(n_clients) if not failed[i])
    for c in conns:
        c.close()
    fresh = [get(p.port) for _ in range(20)]
    assert fresh == [200] * 20


def test_supervisor_killed_workers_do_not_outlive_it(origin, tmp_path) -> None:
    p = start(tmp_path, origin)
    pids = [w["pid"] for w in workers(p)]
    p.proc.kill()  # SIGKILL: no drain, no goodbye
    p.proc.wait(5)

    def gone() -> bool:
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] != "Z":
                        return False
            except FileNotFoundError:
                pass
        return True

    wait_for(gone, timeout=5)
    p.stop()


def all_stats(p: Proxy) -> dict[str, int]:
    body = json.loads(admin(p, "/stats?format=json")[1])
    return {s["name"]: s["value"] for s in body["stats"] if isinstance(s.get("value"), int)}


def test_supervisor_kill9_counters_still_balance(origin_factory, tmp_path) -> None:
    """What a worker killed with kill -9 had in progress is accounted: its connections as
    destroyed, its requests as reset (downstream_rq_tx_reset, upstream_rq_tx_reset), so
    that totals balance afterwards."""
    def slow(req, sock):
        time.sleep(0.2)
        return ok_response(b"slow")

    o = origin_factory(slow)
    p = start(tmp_path, o)
    n, stop = 12, threading.Event()
    conns = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(n)]

    def hammer(c: socket.socket) -> None:
        while not stop.is_set():
            try:
                get(p.port, keep=c)
            except (OSError, h11.RemoteProtocolError):
                return

    threads = [threading.Thread(target=hammer, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    time.sleep(0.7)
    victim = workers(p)[0]
    assert victim["connections"] > 0
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: any(w["index"] == victim["index"] and w["pid"] not in (None, victim["pid"])
                         for w in workers(p)), timeout=5)
    stop.set()
    for t in threads:
        t.join(10)
    for c in conns:
        c.close()

    def balanced() -> dict[str, int] | None:
        s = all_stats(p)
        ok = (s["listener.ingress.downstream_cx_active"] == 0
              and s["http.ingress.downstream_rq_active"] == 0
              and s["cluster.web.upstream_rq_active"] == 0)
        return s if ok else None

    s = wait_for(balanced, timeout=10)
    assert s["listener.ingress.downstream_cx_total"] == s["listener.ingress.downstream_cx_destroy"]
    assert s["http.ingress.downstream_rq_tx_reset"] >= 1  # the victim's requests in flight
    answered = sum(s[f"http.ingress.downstream_rq_{c}xx"] for c in range(1, 6))
    assert s["http.ingress.downstream_rq_total"] == (
        answered + s["http.ingress.downstream_rq_rx_reset"]
        + s["http.ingress.downstream_rq_tx_reset"])
    assert s["cluster.web.upstream_rq_tx_reset"] >= 1
    upstream = sum(s[f"cluster.web.upstream_rq_{c}xx"] for c in range(1, 6))
    assert s["cluster.web.upstream_rq_total"] == upstream + s["cluster.web.upstream_rq_tx_reset"]
    assert s["cluster.web.upstream_cx_total"] == (s["cluster.web.upstream_cx_destroy"]
                                                  + s["cluster.web.upstream_cx_active"])
    p.stop()


def test_supervisor_log_of_start_kill9_and_drain_holds_no_traceback(origin, tmp_path) -> None:
    p = start(tmp_path, origin)
    assert get(p.port) == 200
    victim = workers(p)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for(lambda: any(w["index"] == victim["index"] and w["pid"] not in (None, victim["pid"])
                         and w["state"] == "serving" for w in workers(p)), timeout=5)
    assert [get(p.port) for _ in range(4)] == [200] * 4
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(15) == 0
    log = p.stderr()
    assert "worker 0 exited with signal 9" in log or "worker 1 exited with signal 9" in log
    for bad in ("Traceback", "Exception ignored", "Bad file descriptor", "Error"):
        assert bad not in log, log
