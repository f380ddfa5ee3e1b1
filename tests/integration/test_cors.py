"""CORS end to end (Envoy's CORS filter, Istio's corsPolicy): preflights from allowed
origins answered by the proxy without touching the upstream, from refused ones forwarded
(or answered bare), the response fields of an allowed origin's requests, origins matched
exactly, by prefix, suffix and regex, the cors.* stats; through HTTP/1.1, HTTP/2, and a
real control plane's Route."""

from __future__ import annotations

from tests.h2client import Client as H2Client
from tests.helpers import Proxy, config, wait_for
from tests.integration.test_local_ratelimit import get
from tests.integration.test_supervisor import _admin_port, stat

CORS = {"allow_origins": [{"exact": "https://app.example"}, {"suffix": ".trusted.example"},
                          {"regex": r"https://[a-z]+\.dev\.example"},
                          {"prefix": "HTTP://LOCALHOST", "ignore_case": True}],
        "allow_methods": ["GET", "POST", "PUT"], "allow_headers": ["content-type", "x-user"],
        "expose_headers": ["x-trace"], "max_age": "24h", "allow_credentials": True}


def cors_proxy(tmp_path, origin, cors: dict, extra_route: dict | None = None) -> Proxy:
    tmp_path.mkdir(parents=True, exist_ok=True)
    route = {"match": {"prefix": "/"}, "route": {"cluster": "web"}, "cors": cors}
    if extra_route:
        route.update(extra_route)
    cfg = config(origin.port, routes=[route])
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path, ("--workers", "1"))
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def preflight(p: Proxy, origin: str, method: str = "PUT") -> tuple[int, dict[str, str], bytes]:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=5)
    try:
        c.request("OPTIONS", "/api", headers={"origin": origin,
                                              "access-control-request-method": method,
                                              "access-control-request-headers": "x-user"})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def test_cors_preflight_from_allowed_origins_is_answered_here(origin, tmp_path) -> None:
    p = cors_proxy(tmp_path, origin, CORS)
    for o in ("https://app.example", "https://a.trusted.example", "https://abc.dev.example",
              "http://localhost:3000"):
        status, h, body = preflight(p, o)
        assert status == 200 and body == b""
        assert h["access-control-allow-origin"] == o
        assert h["access-control-allow-methods"] == "GET, POST, PUT"
        assert h["access-control-allow-headers"] == "content-type, x-user"
        assert h["access-control-max-age"] == "86400"
        assert h["access-control-allow-credentials"] == "true"
        assert h["vary"] == "origin"
    assert origin.requests == []  # no preflight touched the upstream
    assert stat(p, "http.ingress.cors.origin_valid") == 4


def test_cors_preflight_from_refused_origins(origin, tmp_path) -> None:
    """Not allowed: forwarded upstream by default (Envoy's forward_not_matching_preflights),
    or answered 200 with no CORS field; never with an Allow-Origin."""
    p = cors_proxy(tmp_path, origin, CORS)
    for o in ("https://evil.example", "https://app.example.evil", "https://ABC.dev.example",
              "https://x.dev.example.evil", "null"):
        status, h, _ = preflight(p, o)
        assert status == 200 and "access-control-allow-origin" not in h
    assert len(origin.requests) == 5 and {r.method for r in origin.requests} == {b"OPTIONS"}
    assert stat(p, "http.ingress.cors.origin_invalid") == 5
    q = cors_proxy(tmp_path / "bare", origin, {**CORS, "forward_not_matching_preflights": False})
    status, h, body = preflight(q, "https://evil.example")
    assert (status, body) == (200, b"") and not any(k.startswith("access-control") for k in h)
    assert len(origin.requests) == 5


def test_cors_actual_requests_carry_the_response_fields(origin, tmp_path) -> None:
    p = cors_proxy(tmp_path, origin, CORS)
    status, h, _ = get(p, "/api", {"origin": "https://app.example"})
    assert status == 200 and h["access-control-allow-origin"] == "https://app.example"
    assert h["access-control-expose-headers"] == "x-trace"
    assert h["access-control-allow-credentials"] == "true"
    assert "access-control-allow-methods" not in h  # a preflight's alone
    status, h, _ = get(p, "/api", {"origin": "https://evil.example"})
    assert status == 200 and "access-control-allow-origin" not in h
    status, h, _ = get(p, "/api")  # no Origin: not a CORS request
    assert status == 200 and not any(k.startswith("access-control") for k in h)
    # An OPTIONS without Access-Control-Request-Method is not a preflight: it goes upstream.
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=5)
    c.request("OPTIONS", "/api", headers={"origin": "https://app.example"})
    r = c.getresponse()
    r.read()
    c.close()
    assert r.status == 200 and origin.requests[-1].method == b"OPTIONS"


def test_cors_fields_on_a_local_reply(origin, tmp_path) -> None:
    """A request an authorization policy denies still says its CORS fields, so that the
    page can read the 403; its preflight is answered before authorization."""
    deny = {"authorization_policies": [{"name": "nobody", "action": "DENY", "rules": [{}]}]}
    p = cors_proxy(tmp_path, origin, CORS, deny)
    status, h, _ = get(p, "/api", {"origin": "https://app.example"})
    assert status == 403 and h["access-control-allow-origin"] == "https://app.example"
    assert preflight(p, "https://app.example")[0] == 200
    assert origin.requests == []


def test_cors_over_http2(origin, tmp_path) -> None:
    p = cors_proxy(tmp_path, origin, CORS)
    c = H2Client(p.port)
    try:
        sid = c.request("/api", method="OPTIONS", headers=[
            (b"origin", b"https://app.example"), (b"access-control-request-method", b"GET")])
        r = c.wait(sid)[0]
        assert r.status == 200 and r.header(b"access-control-allow-origin") == \
            b"https://app.example"
        sid = c.request("/api", headers=[(b"origin", b"https://a.trusted.example")])
        r = c.wait(sid)[0]
        assert r.status == 200 and r.header(b"access-control-expose-headers") == b"x-trace"
    finally:
        c.close()
    assert [r.method for r in origin.requests] == [b"GET"]


def test_cors_through_the_control_planes_route(tmp_path, origin_factory) -> None:
    from tests.mesh import ControlPlane, Sidecar, service, workload

    web = origin_factory()
    cp = ControlPlane(tmp_path / "cp")
    cp.apply(service("web", 8080))
    cp.apply(workload("web-1", "web", web.port))
    cp.apply({"apiVersion": "mesh/v1", "kind": "Route",
              "metadata": {"name": "web", "namespace": "default"},
              "spec": {"hosts": ["web"], "rules": [{
                  "destinations": [{"destination": {"service": "web"}}],
                  "cors": {"allow_origins": [{"exact": "https://app.example"}],
                           "allow_methods": ["GET"]}}]}})
    client = Sidecar(cp, tmp_path / "client", "client-0", "--calls", "web")
    import urllib.request

    def allow_origin() -> str | None:
        req = urllib.request.Request(f"http://127.0.0.1:{client.port}/", headers={
            "host": "web", "origin": "https://app.example"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.headers.get("access-control-allow-origin")
        except OSError:
            return None
    assert wait_for(allow_origin, 10) == "https://app.example"
