"""Python filters end to end (filters.python): the header phases changing requests and
responses, local replies, async filters, body and log phases, re-routing on a changed
field, a raising and a sleeping filter (500 FE, counted, never a dead worker), listener
filters, reload with the snapshot, and the two shipped examples."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from tests.helpers import Proxy, config, read_response, wait_for
from tests.integration.test_fault import log_entries
from tests.integration.test_local_ratelimit import get
from tests.integration.test_supervisor import _admin_port, stat, workers


def filter_proxy(tmp_path, origin, filters: list[dict], *, listener: list[dict] | None = None,
                 routes: list[dict] | None = None) -> Proxy:
    tmp_path.mkdir(parents=True, exist_ok=True)
    routes = routes or [{"match": {"prefix": "/"}, "route": {"cluster": "web"},
                         "filters": filters}]
    cfg = config(origin.port, routes=routes,
                 listener={"filters": listener} if listener else None,
                 access_log={"path": str(tmp_path / "access.log"), "format": "json",
                             "flush_interval": "50ms"})
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path, ("--workers", "1"))
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def test_python_filter_header_phases(origin_factory, tmp_path) -> None:
    from tests.helpers import ok_response

    def handler(req, sock) -> bytes:
        return ok_response(b"ok", headers=((b"x-origin-secret", b"s"),
                                           (b"x-got", req.header(b"x-filtered") or b"-")))
    origin = origin_factory(handler)
    p = filter_proxy(tmp_path, origin, [{"python": "tests.pyfilters:Headers",
                                         "config": {"tag": "t1"}}])
    status, headers, body = get(p, "/a", {"x-drop": "1"})
    assert status == 200 and headers["x-got"] == "t1" and headers["x-filter-saw"] == "GET"
    assert "x-origin-secret" not in headers
    assert origin.requests[-1].header(b"x-drop") is None
    assert get(p, "/teapot")[0] == 418
    status, headers, body = get(p, "/local")
    assert (status, body, headers["x-by"]) == (299, b"answered by a filter\n", "t1")
    assert len(origin.requests) == 2  # the local reply never went upstream


def test_python_filter_that_raises_or_sleeps(origin, tmp_path) -> None:
    """500 with flag FE, the filter's name in the log's details, counted; the worker
    lives on and serves the next request."""
    p = filter_proxy(tmp_path, origin, [
        {"python": "tests.pyfilters:Raising", "name": "boomer"}])
    pid = workers(p)[0]["pid"]
    for _ in range(3):
        status, _, body = get(p, "/")
        assert status == 500 and b"boomer" in body
    assert stat(p, "http.ingress.python_filter.errors") == 3
    entries = log_entries(tmp_path, 3)
    assert {(e["response_flags"], e["response_code_details"]) for e in entries} == {
        ("FE", "python_filter_error[boomer]")}
    assert workers(p)[0]["pid"] == pid and origin.requests == []
    q = filter_proxy(tmp_path / "resp", origin, [
        {"python": "tests.pyfilters:Raising", "config": {"where": "response"}}])
    assert get(q, "/")[0] == 500
    assert stat(q, "http.ingress.python_filter.errors") == 1
    s = filter_proxy(tmp_path / "sleep", origin, [
        {"python": "tests.pyfilters:Sleeping", "timeout": "200ms", "name": "sleepy"}])
    t0 = time.monotonic()
    status, _, body = get(s, "/")
    assert status == 500 and b"timeout: sleepy" in body and time.monotonic() - t0 < 3
    assert stat(s, "http.ingress.python_filter.timeouts") == 1
    assert log_entries(tmp_path / "sleep", 1)[0]["response_code_details"] == \
        "python_filter_timeout[sleepy]"


def test_python_filter_body_and_log_phases(origin, tmp_path) -> None:
    record = tmp_path / "record.jsonl"
    p = filter_proxy(tmp_path, origin, [{"python": "tests.pyfilters:Recorder",
                                         "config": {"path": str(record)}}])
    body = b"x" * 50_000
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n" % len(body)
                  + body)
        status, _, resp = read_response(s)
        s.sendall(b"POST /ch HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        read_response(s)
    lines = wait_for(lambda: [json.loads(x) for x in record.read_text().splitlines()]
                     if record.exists() and len(record.read_text().splitlines()) == 2 else None)
    up, ch = lines
    assert up["request_bytes"] == 50_000 and up["request_end"] and up["status"] == 200
    assert up["response_bytes"] == len(resp) and up["response_end"]
    assert ch["request_bytes"] == 5 and ch["request_end"]


def test_python_filter_changed_fields_route_again(origin_factory, tmp_path) -> None:
    """A/B by cookie (the shipped example): new clients are assigned and told with a
    cookie, known ones keep their group, and the changed field routes the request."""
    from tests.helpers import ok_response

    a = origin_factory(lambda req, sock: ok_response(b"A"))
    b = origin_factory(lambda req, sock: ok_response(b"B"))
    routes = [{"match": {"prefix": "/", "headers": [{"name": "x-ab-group", "exact": "b"}]},
               "route": {"cluster": "b"}},
              {"match": {"prefix": "/"}, "route": {"cluster": "a"}}]
    cfg = config(routes=routes, clusters=[
        {"name": "a", "endpoints": [{"address": "127.0.0.1", "port": a.port}]},
        {"name": "b", "endpoints": [{"address": "127.0.0.1", "port": b.port}]}],
        listener={"filters": [{"python": "meshproxy.examples.ab_cookie:ABCookie",
                               "config": {"b_percent": 30}}]})
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path, ("--workers", "1"))
    got = {"A": 0, "B": 0}
    for _ in range(300):
        status, headers, body = get(p, "/")
        group = headers["set-cookie"].split(";")[0].split("=")[1]
        assert body.decode() == group.upper()
        got[body.decode()] += 1
    assert 50 <= got["B"] <= 130, got  # 30% of 300
    for group in ("a", "b"):
        status, headers, body = get(p, "/", {"cookie": f"x=1; ab={group}"})
        assert body == group.upper().encode() and "set-cookie" not in headers


def test_python_filter_api_key_example(origin, tmp_path) -> None:
    keys = tmp_path / "keys"
    tmp_path.mkdir(parents=True, exist_ok=True)
    keys.write_text("# keys\nk-123 alice\nk-456\n")
    p = filter_proxy(tmp_path, origin, [], listener=[
        {"python": "meshproxy.examples.api_key:ApiKeyCheck",
         "config": {"keys_file": str(keys)}}])
    status, headers, _ = get(p, "/")
    assert status == 401 and headers["www-authenticate"] == 'ApiKey header="x-api-key"'
    assert get(p, "/", {"x-api-key": "nope"})[0] == 401
    assert origin.requests == []
    assert get(p, "/", {"x-api-key": "k-123"})[0] == 200
    seen = origin.requests[-1]
    assert seen.header(b"x-api-key") is None and seen.header(b"x-api-client") == b"alice"
    assert get(p, "/", {"x-api-key": "k-456"})[0] == 200
    # A reload reads the file again.
    keys.write_text("k-789 bob\n")
    os.kill(p.proc.pid, signal.SIGHUP)
    wait_for(lambda: get(p, "/", {"x-api-key": "k-789"})[0] == 200, 10)
    assert get(p, "/", {"x-api-key": "k-123"})[0] == 401


def test_python_filter_reloaded_with_the_snapshot(origin, tmp_path, monkeypatch) -> None:
    """A filter's module is imported again when its file changed, at the next snapshot;
    one that cannot be imported refuses the reload (the field named) and the last good
    filters keep serving."""
    mods = tmp_path / "mods"
    mods.mkdir(parents=True)
    monkeypatch.setenv("PYTHONPATH", str(mods))
    src = ("from meshproxy.filters.python import Reply\n"
           "class F:\n    def __init__(self, config):\n        pass\n"
           "    def on_request_headers(self, req):\n        return Reply(200, '{v}\\n')\n")
    (mods / "reloadme.py").write_text(src.format(v="one"))
    p = filter_proxy(tmp_path, origin, [{"python": "reloadme:F"}])
    assert get(p, "/")[2] == b"one\n"
    time.sleep(0.05)
    (mods / "reloadme.py").write_text(src.format(v="two"))
    os.utime(mods / "reloadme.py", (time.time() + 5, time.time() + 5))
    os.kill(p.proc.pid, signal.SIGHUP)
    wait_for(lambda: get(p, "/")[2] == b"two\n", 10)
    cfg = json.loads(p.config_path.read_text())
    cfg["listeners"][0]["virtual_hosts"][0]["routes"][0]["filters"] = [
        {"python": "reloadme:Missing"}]
    p.config_path.write_text(json.dumps(cfg))
    os.kill(p.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in p.stderr(), 10)
    assert "filters[0].python: cannot import reloadme:Missing" in p.stderr()
    assert get(p, "/")[2] == b"two\n"


def test_python_filter_through_the_control_planes_route(tmp_path, origin_factory) -> None:
    """A Route rule's `filters` reach a real sidecar; a class the sidecar cannot import is
    NACKed with its field, and the last good config keeps serving."""
    from tests.mesh import ControlPlane, Sidecar, service, workload

    web = origin_factory()
    cp = ControlPlane(tmp_path / "cp")
    cp.apply(service("web", 8080))
    cp.apply(workload("web-1", "web", web.port))

    def route(target: str) -> dict:
        return {"apiVersion": "mesh/v1", "kind": "Route",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"hosts": ["web"], "rules": [{
                    "destinations": [{"destination": {"service": "web"}}],
                    "filters": [{"python": target, "config": {"tag": "cp"}}]}]}}

    cp.apply(route("tests.pyfilters:Headers"))
    client = Sidecar(cp, tmp_path / "client", "client-0", "--calls", "web")
    wait_for(lambda: client.get("web")[0] == 200 and web.requests
             and web.requests[-1].header(b"x-filtered") == b"cp", 10)
    cp.apply(route("tests.pyfilters:NoSuchFilter"))
    wait_for(lambda: cp.proxy_status()["client-0"]["status"] == "NACKED", 10)
    errors = cp.proxy_status()["client-0"]["nack_errors"]
    assert any("filters[0].python: cannot import tests.pyfilters:NoSuchFilter" in e
               for e in errors), errors
    assert client.get("web")[0] == 200
    assert web.requests[-1].header(b"x-filtered") == b"cp"
