"""Routing actions on the wire: weighted clusters, redirects, direct responses, rewrites,
header mutations and header/method/query matching, using curl as the client."""

from __future__ import annotations

import json
import socket
from collections import Counter

import pytest

from tests.helpers import Origin, Proxy, curl, read_response


@pytest.fixture(scope="module")
def renv(tmp_path_factory):
    a = Origin(lambda req, s: _tag(b"a", req)).start()
    b = Origin(lambda req, s: _tag(b"b", req)).start()
    routes = [
        {"match": {"prefix": "/split"},
         "route": {"weighted_clusters": [{"name": "a", "weight": 3}, {"name": "b", "weight": 1}]}},
        {"match": {"prefix": "/old/"}, "redirect": {"prefix_rewrite": "/new/", "response_code": 308}},
        {"match": {"path": "/secure"},
         "redirect": {"scheme_redirect": "https", "host_redirect": "secure.example.com",
                      "port_redirect": 8443}},
        {"match": {"path": "/teapot"},
         "direct_response": {"status": 418, "body": "short and stout\n"}},
        {"match": {"prefix": "/api/v1/"},
         "route": {"cluster": "a", "prefix_rewrite": "/v1/", "host_rewrite": "internal.svc"},
         "request_headers_to_add": [{"name": "x-route", "value": "api"},
                                    {"name": "x-env", "value": "prod", "append": False}],
         "request_headers_to_remove": ["x-secret"],
         "response_headers_to_add": [{"name": "x-frontend", "value": "meshproxy"}],
         "response_headers_to_remove": ["x-internal"]},
        {"match": {"prefix": "/", "headers": [{"name": "x-canary", "exact": "1"}]},
         "route": {"cluster": "b"}},
        {"match": {"prefix": "/", "methods": ["DELETE"]}, "route": {"cluster": "b"}},
        {"match": {"prefix": "/", "query_parameters": [{"name": "v", "exact": "b"}]},
         "route": {"cluster": "b"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "a"}},
    ]
    clusters = [
        {"name": "a", "endpoints": [{"address": "127.0.0.1", "port": a.port}]},
        {"name": "b", "endpoints": [{"address": "127.0.0.1", "port": b.port}]},
    ]
    cfg = {"listeners": [{"name": "ingress", "address": "127.0.0.1", "port": 0,
                          "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes,
                                             "request_headers_to_add": [
                                                 {"name": "x-vhost", "value": "all"}]}]}],
           "clusters": clusters}
    p = Proxy(cfg, tmp_path_factory.mktemp("p"))
    yield a, b, p
    p.stop()
    a.stop()
    b.stop()


def _tag(name: bytes, req) -> bytes:
    body = json.dumps({"origin": name.decode(), "target": req.target.decode(),
                       "headers": [[k.decode(), v.decode()] for k, v in req.headers]}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Internal: yes\r\n\r\n" % len(body)) + body


def get(p, path: str, *args: str) -> dict:
    r = curl(f"http://127.0.0.1:{p.port}{path}", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_routing_weighted_clusters_split(renv) -> None:
    a, b, p = renv
    origins: Counter[str] = Counter()
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for _ in range(400):
            s.sendall(b"GET /split HTTP/1.1\r\nHost: a\r\n\r\n")
            origins[json.loads(read_response(s)[2])["origin"]] += 1
    assert sum(origins.values()) == 400
    assert 0.65 < origins["a"] / 400 < 0.85, origins  # 3:1 within sampling noise


def test_routing_redirect_prefix_rewrite(renv) -> None:
    a, b, p = renv
    r = curl("-i", f"http://127.0.0.1:{p.port}/old/page?q=1", "-H", "Host: shop.example.com")
    head = r.stdout.decode().lower()
    assert head.startswith("http/1.1 308")
    assert "location: http://shop.example.com/new/page?q=1" in head


def test_routing_redirect_scheme_host_port(renv) -> None:
    a, b, p = renv
    r = curl("-i", f"http://127.0.0.1:{p.port}/secure")
    assert r.stdout.startswith(b"HTTP/1.1 301")
    assert b"location: https://secure.example.com:8443/secure" in r.stdout


def test_routing_direct_response(renv) -> None:
    a, b, p = renv
    before = len(a.requests) + len(b.requests)
    r = curl("-i", f"http://127.0.0.1:{p.port}/teapot")
    assert r.stdout.startswith(b"HTTP/1.1 418")
    assert r.stdout.endswith(b"short and stout\n")
    assert len(a.requests) + len(b.requests) == before  # answered by the proxy itself


def test_routing_rewrites_and_header_mutations(renv) -> None:
    a, b, p = renv
    r = curl("-i", f"http://127.0.0.1:{p.port}/api/v1/users?id=3", "-H", "X-Secret: s",
             "-H", "X-Env: dev")
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    seen = json.loads(body)
    headers = seen["headers"]
    assert seen["target"] == "/v1/users?id=3"
    assert ["host", "internal.svc"] in headers
    assert ["x-route", "api"] in headers and ["x-vhost", "all"] in headers
    assert ["x-env", "prod"] in headers and ["x-env", "dev"] not in headers
    assert not any(k == "x-secret" for k, _ in headers)
    assert b"x-frontend: meshproxy" in head.lower()
    assert b"x-internal" not in head.lower()


def test_routing_header_method_query_matching(renv) -> None:
    a, b, p = renv
    assert get(p, "/x")["origin"] == "a"
    assert get(p, "/x", "-H", "X-Canary: 1")["origin"] == "b"
    assert get(p, "/x", "-X", "DELETE")["origin"] == "b"
    assert get(p, "/x?v=b")["origin"] == "b"
    assert get(p, "/x?v=a")["origin"] == "a"
