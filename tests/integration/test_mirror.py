"""Request mirroring end to end (Envoy's request_mirror_policies, Istio's mirror): copies
with Host -shadow and the primary's x-request-id, a share of the requests, bodies streamed
(content-length and chunked), a body past the limit not mirrored, and a shadow that is slow
or down never delaying or failing the primary response."""

from __future__ import annotations

import socket
import time

from tests.h2client import Client as H2Client
from tests.helpers import Proxy, config, ok_response, read_response, wait_for
from tests.integration.test_supervisor import _admin_port, stat


def mirror_proxy(tmp_path, primary, shadow_port: int, policy: dict | None = None,
                 timeout: str = "15s", *, name: str = "", workers: int = 1,
                 access_log: bool = False) -> Proxy:
    tmp_path.mkdir(parents=True, exist_ok=True)
    mp = {"cluster": "shadow", **(policy or {})}
    routes = [{"match": {"prefix": "/"}, "name": name, "route": {
        "cluster": "web", "timeout": timeout, "request_mirror_policies": [mp]}}]
    clusters = [{"name": "web", "connect_timeout": "1s",
                 "endpoints": [{"address": "127.0.0.1", "port": primary.port}]},
                {"name": "shadow", "connect_timeout": "1s",
                 "endpoints": [{"address": "127.0.0.1", "port": shadow_port}]}]
    log = ({"path": str(tmp_path / "access.log"), "format": "json",
            "flush_interval": "50ms"} if access_log else None)
    cfg = config(routes=routes, clusters=clusters, access_log=log)
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path, ("--workers", str(workers)))
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def free_port() -> int:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    return port


def exchange(p: Proxy, request: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(request)
        status, _, body = read_response(s)
        return status, body


def test_mirror_copies_with_shadow_host_and_the_same_request_id(origin_factory,
                                                                tmp_path) -> None:
    primary, shadow = origin_factory(), origin_factory()
    p = mirror_proxy(tmp_path, primary, shadow.port)
    assert exchange(p, b"GET /a?x=1 HTTP/1.1\r\nhost: svc.example:8080\r\n\r\n")[0] == 200
    wait_for(lambda: shadow.requests, 5)
    copy, orig = shadow.requests[0], primary.requests[0]
    assert copy.target == b"/a?x=1"
    assert copy.header(b"host") == b"svc.example-shadow:8080"
    assert orig.header(b"host") == b"svc.example:8080"
    assert copy.header(b"x-request-id") == orig.header(b"x-request-id") is not None
    assert stat(p, "cluster.shadow.shadow_rq_total") == 1
    assert stat(p, "cluster.shadow.upstream_rq_total") == 1
    assert stat(p, "cluster.shadow.shadow_rq_failed") == 0


def test_mirror_percentage(origin_factory, tmp_path) -> None:
    primary, shadow = origin_factory(), origin_factory()
    p = mirror_proxy(tmp_path, primary, shadow.port, {"percentage": 25})
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        for _ in range(800):
            s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            assert read_response(s)[0] == 200
    n = wait_for(lambda: stat(p, "cluster.shadow.shadow_rq_total") or None, 5)
    assert 140 <= n <= 260, n  # 25% of 800 = 200
    wait_for(lambda: len(shadow.requests) == n or None, 5)


def test_mirror_streams_bodies(origin_factory, tmp_path) -> None:
    """A content-length body and a chunked one reach the copy whole, as the primary's."""
    primary, shadow = origin_factory(), origin_factory()
    p = mirror_proxy(tmp_path, primary, shadow.port)
    body = b"x" * 20_000
    assert exchange(p, b"POST /cl HTTP/1.1\r\nhost: a\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(body), body))[0] == 200
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert exchange(p, b"POST /ch HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
                    + chunked)[0] == 200
    wait_for(lambda: len(shadow.requests) == 2 or None, 5)
    copies = {r.target: r.body for r in shadow.requests}
    assert copies == {b"/cl": body, b"/ch": b"hello world"}
    assert {r.target: r.body for r in primary.requests} == copies


def test_mirror_body_past_the_limit_is_not_mirrored(origin_factory, tmp_path) -> None:
    primary, shadow = origin_factory(), origin_factory()
    p = mirror_proxy(tmp_path, primary, shadow.port, {"body_limit": 1000})
    assert exchange(p, b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 2000\r\n\r\n"
                    + b"y" * 2000)[0] == 200
    chunks = b"".join(b"100\r\n" + b"z" * 256 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n"
    assert exchange(p, b"POST /ch HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
                    + chunks)[0] == 200
    assert len(primary.requests) == 2 and len(primary.requests[1].body) == 2048
    wait_for(lambda: stat(p, "cluster.shadow.shadow_rq_body_too_large") == 2 or None, 5)
    time.sleep(0.3)
    assert shadow.requests == []  # the chunked copy was abandoned before its end


def _sleepy(seconds: float):
    def handler(req, sock) -> bytes:
        time.sleep(seconds)
        return ok_response(b"late")
    return handler


def test_mirror_slow_or_down_shadow_never_delays_the_primary(origin_factory,
                                                              tmp_path) -> None:
    """The primary's responses come at the primary's pace while every copy sleeps 2 s (or
    cannot connect at all), and none fails."""
    primary, slow = origin_factory(), origin_factory(_sleepy(2.0))
    p = mirror_proxy(tmp_path, primary, slow.port, timeout="5s")
    latencies = []
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        for _ in range(50):
            t0 = time.monotonic()
            s.sendall(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            assert read_response(s)[0] == 200
            latencies.append(time.monotonic() - t0)
    latencies.sort()
    assert latencies[-1] < 1.0, latencies[-5:]  # never the shadow's 2 s
    q = mirror_proxy(tmp_path / "down", primary, free_port())
    for _ in range(20):
        assert exchange(q, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")[0] == 200
    wait_for(lambda: stat(q, "cluster.shadow.shadow_rq_failed") == 20 or None, 5)


def test_mirror_from_an_http2_client(origin_factory, tmp_path) -> None:
    primary, shadow = origin_factory(), origin_factory()
    p = mirror_proxy(tmp_path, primary, shadow.port)
    c = H2Client(p.port)
    try:
        sid = c.request("/h2", method="POST", body=b"abc", authority="svc")
        assert c.wait(sid)[0].status == 200
    finally:
        c.close()
    wait_for(lambda: shadow.requests, 5)
    assert shadow.requests[0].body == b"abc"
    assert shadow.requests[0].header(b"host") == b"svc-shadow"


def _json_origin(shadow: bool):
    """The primary and its dark launch: the same documents, but for what each path
    changes in the shadow's."""
    import json as _json

    def handler(req, sock) -> bytes:
        path = req.target.decode()
        doc = {"a": 1, "ts": time.time(), "items": [{"id": id(req), "v": "x"}, {"v": "y"}]}
        status, version = 200, b"1"
        if shadow and path == "/diff-body":
            doc["items"][1]["v"] = "z"
        if shadow and path == "/diff-status":
            status = 500
        if shadow and path == "/diff-header":
            version = b"2"
        if path.startswith("/text"):
            body = b"plain text" + (b"!" if shadow and path == "/text-diff" else b"")
            return ok_response(body, status)
        body = _json.dumps(doc).encode()
        return ok_response(body, status, ((b"content-type", b"application/json"),
                                          (b"x-version", version)))
    return handler


def test_mirror_response_diff(origin_factory, tmp_path) -> None:
    """Dark launch: each copy's response against the primary's, counted on the route
    (mirror.<route>.same/different), the differing pairs on /mirror_diffs and in the
    access log; the ignored JSON paths and headers not listed do not count."""
    import json as _json

    from tests.integration.test_supervisor import admin

    primary, shadow = origin_factory(_json_origin(False)), origin_factory(_json_origin(True))
    diff = {"headers": ["x-version"], "ignore_json_paths": ["ts", "items[*].id"]}
    p = mirror_proxy(tmp_path, primary, shadow.port, {"response_diff": diff},
                     name="reviews", workers=2, access_log=True)
    for path in ("/same", "/same", "/text", "/diff-body", "/diff-status", "/diff-header",
                 "/text-diff"):
        assert exchange(p, b"GET %s HTTP/1.1\r\nhost: a\r\n\r\n" % path.encode())[0] == 200
    c = H2Client(p.port)
    try:
        assert c.wait(c.request("/diff-body"))[0].status == 200  # an HTTP/2 primary
        assert c.wait(c.request("/same"))[0].status == 200
    finally:
        c.close()
    wait_for(lambda: stat(p, "mirror.reviews.same") + stat(p, "mirror.reviews.different")
             == 9 or None, 5)
    assert stat(p, "mirror.reviews.same") == 4
    assert stat(p, "mirror.reviews.different") == 5
    assert stat(p, "mirror.reviews.shadow_failed") == 0
    samples = _json.loads(admin(p, "/mirror_diffs")[1])["samples"]
    by_path: dict[str, list[str]] = {}
    for sm in samples:
        by_path.setdefault(sm["path"], sm["differences"])
        assert sm["route"] == "reviews" and sm["shadow_cluster"] == "shadow"
    assert by_path["/diff-body"] == ['body $.items[1].v: "y" against "z"']
    assert by_path["/diff-status"] == ["status: 200 against 500"]
    assert by_path["/diff-header"] == ["header x-version: '1' against '2'"]
    assert by_path["/text-diff"][0].startswith("body: 10 bytes against 11")
    log = tmp_path / "access.log"

    def logged() -> list[dict] | None:
        if not log.exists():
            return None
        found = [e for e in map(_json.loads, log.read_text().splitlines()) if "mirror_diff" in e]
        return found if len(found) == 5 else None
    diffs = wait_for(logged, 5)
    assert {d["mirror_diff"]["route"] for d in diffs} == {"reviews"}


def test_mirror_response_diff_counts_a_failed_shadow(origin_factory, tmp_path) -> None:
    p = mirror_proxy(tmp_path, origin_factory(), free_port(), {"response_diff": {}}, name="r")
    for _ in range(3):
        assert exchange(p, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")[0] == 200
    wait_for(lambda: stat(p, "mirror.r.shadow_failed") == 3 or None, 5)


def test_mirror_through_the_control_planes_route(origin_factory, tmp_path) -> None:
    """Istio's mirror on a Route rule, through a real control plane to a real sidecar: the
    copies reach the mirror service (Host -shadow) and their responses are compared."""
    from tests.integration.test_supervisor import admin
    from tests.mesh import ControlPlane, Sidecar, service, workload

    web, nxt = origin_factory(), origin_factory()
    cp = ControlPlane(tmp_path / "cp")
    cp.apply(service("web", 8080))
    cp.apply(service("web-next", 8080))
    cp.apply(workload("web-1", "web", web.port))
    cp.apply(workload("next-1", "web-next", nxt.port))
    cp.apply({"apiVersion": "mesh/v1", "kind": "Route",
              "metadata": {"name": "web", "namespace": "default"},
              "spec": {"hosts": ["web"], "rules": [{
                  "name": "dark", "destinations": [{"destination": {"service": "web"}}],
                  "mirror": {"service": "web-next"}, "mirror_percentage": 100,
                  "mirror_response_diff": {"headers": ["content-type"]}}]}})
    client = Sidecar(cp, tmp_path / "client", "client-0", "--calls", "web")
    wait_for(lambda: client.get("web")[0] == 200 and nxt.requests, 10)
    assert nxt.requests[-1].header(b"host") == b"web-shadow"
    text = lambda: admin(client, "/stats")[1].decode()  # noqa: E731
    # The echo origins answer with their own connection ids: bodies differ, statuses agree.
    wait_for(lambda: "mirror.dark.different: 0" not in text() or None, 5)
    assert "mirror.dark.shadow_failed: 0" in text()
