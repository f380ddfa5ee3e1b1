"""Failures say what happened: status, Envoy response flag in the access log, and never a
truncated body passed on as complete."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from tests.helpers import Close, Origin, Proxy, Reset, config, ok_response, raw_exchange, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def errenv(tmp_path_factory):
    o = Origin().start()
    dead = _free_port()
    routes = [
        {"match": {"prefix": "/uf"}, "route": {"cluster": "dead"}},
        {"match": {"prefix": "/ut"}, "route": {"cluster": "web", "timeout": "500ms"}},
        {"match": {"prefix": "/uh"}, "route": {"cluster": "empty"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "web"}},
    ]
    clusters = [
        {"name": "web", "endpoints": [{"address": "127.0.0.1", "port": o.port}],
         "connect_timeout": "1s"},
        {"name": "dead", "endpoints": [{"address": "127.0.0.1", "port": dead}],
         "connect_timeout": "1s"},
        {"name": "empty", "endpoints": []},
    ]
    vhosts_only_api = {"virtual_hosts": [
        {"name": "api", "domains": ["api.example.com"], "routes": routes}]}
    log = tmp_path_factory.mktemp("log") / "access.log"
    p = Proxy(config(routes=routes, clusters=clusters, listener=vhosts_only_api,
                     access_log={"path": str(log), "format": "json", "flush_interval": "50ms"}),
              tmp_path_factory.mktemp("p"))
    p.access_log = log
    yield o, p
    p.stop()
    o.stop()


def last_log(p, n: int = 1) -> list[dict]:
    def lines():
        if not p.access_log.exists():
            return None
        got = [json.loads(x) for x in p.access_log.read_text().splitlines() if x.strip()]
        return got if len(got) >= n else None

    return wait_for(lines)


def log_count(p) -> int:
    return len(p.access_log.read_text().splitlines()) if p.access_log.exists() else 0


def exchange(p, path: str, extra: bytes = b"") -> tuple[bytes, dict]:
    before = log_count(p)
    out = raw_exchange(p.port, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: api.example.com\r\n"
                       + extra + b"Connection: close\r\n\r\n", timeout=5)
    entry = last_log(p, before + 1)[before]
    return out, entry


def test_proxy_errors_no_route_404_nr(errenv) -> None:
    o, p = errenv
    before = log_count(p)
    out = raw_exchange(p.port, b"GET / HTTP/1.1\r\nHost: other.example.com\r\n"
                               b"Connection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404 ")
    assert last_log(p, before + 1)[before]["response_flags"] == "NR"


def test_proxy_errors_connect_failure_503_uf(errenv) -> None:
    o, p = errenv
    out, entry = exchange(p, "/uf")
    assert out.startswith(b"HTTP/1.1 503 ")
    assert entry["response_flags"] == "UF" and entry["response_code"] == 503


def test_proxy_errors_no_healthy_upstream_503_uh(errenv) -> None:
    o, p = errenv
    out, entry = exchange(p, "/uh")
    assert out.startswith(b"HTTP/1.1 503 ") and b"no healthy upstream" in out
    assert entry["response_flags"] == "UH"


@pytest.mark.parametrize("action", [Close, Reset])
def test_proxy_errors_reset_before_response_503_uc(errenv, action) -> None:
    o, p = errenv

    def handler(req, s):
        raise action()

    o.handler = handler
    out, entry = exchange(p, "/uc")
    assert out.startswith(b"HTTP/1.1 503 ")
    assert entry["response_flags"] == "UC"


def test_proxy_errors_route_timeout_504_ut(errenv) -> None:
    o, p = errenv

    def hang(req, s):
        time.sleep(2)
        return ok_response()

    o.handler = hang
    t0 = time.monotonic()
    out, entry = exchange(p, "/ut")
    assert out.startswith(b"HTTP/1.1 504 ")
    assert time.monotonic() - t0 < 1.8
    assert entry["response_flags"] == "UT" and entry["response_code"] == 504


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\n\r\n",
])
def test_proxy_errors_broken_response_framing_502_upe(errenv, response: bytes) -> None:
    o, p = errenv
    o.handler = lambda req, s: response
    out, entry = exchange(p, "/upe")
    assert out.startswith(b"HTTP/1.1 502 "), out[:80]
    assert entry["response_flags"] == "UPE"


def test_proxy_errors_truncated_body_never_complete(errenv) -> None:
    o, p = errenv

    def die(req, s):
        s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        raise Close()

    o.handler = die
    before = log_count(p)
    r = subprocess.run(["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w",
                        "%{http_code}", "-H", "Host: api.example.com",
                        f"http://127.0.0.1:{p.port}/die"], capture_output=True)
    assert r.returncode in (18, 56), r  # partial file / receive failure: never success
    assert r.stdout == b"200"
    assert last_log(p, before + 1)[before]["response_flags"] == "UC"


def test_proxy_errors_truncated_chunked_body_never_complete(errenv) -> None:
    o, p = errenv

    def die(req, s):
        s.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        raise Close()

    o.handler = die
    r = subprocess.run(["curl", "-sS", "--max-time", "5", "-H", "Host: api.example.com",
                        f"http://127.0.0.1:{p.port}/die"], capture_output=True)
    assert r.returncode != 0  # the last chunk was never sent


def test_proxy_errors_stale_pooled_connection_is_retried(errenv) -> None:
    """The origin closes an idle keep-alive connection; the next request still succeeds."""
    o, p = errenv
    state = {"n": 0}

    def close_after_answer(req, s):
        state["n"] += 1
        s.sendall(ok_response(b"r%d" % state["n"]))
        raise Close()  # no `Connection: close`: the proxy pools a connection that is gone

    o.handler = close_after_answer
    for i in range(1, 4):
        out, entry = exchange(p, "/stale")
        assert out.endswith(b"r%d" % i), out
        time.sleep(0.1)
