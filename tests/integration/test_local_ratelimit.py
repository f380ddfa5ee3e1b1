"""Local rate limits end to end: 429 RL with x-ratelimit-* headers, buckets per descriptor,
a virtual host's limit shared by its routes, and one rate for the whole worker pool."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.request

from tests.helpers import Proxy, config, wait_for
from tests.integration.test_supervisor import _admin_port, stat


def rl_proxy(tmp_path, origin, *, routes: list, vh_limit: dict | None = None,
             workers: int = 1) -> Proxy:
    cfg = config(origin.port, routes=routes,
                 access_log={"path": str(tmp_path / "access.log"), "format": "json",
                             "flush_interval": "50ms"})
    if vh_limit is not None:
        cfg["listeners"][0]["virtual_hosts"][0]["local_rate_limit"] = vh_limit
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path, ("--workers", str(workers)))
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def get(p: Proxy, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", p.port, timeout=5)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def test_local_ratelimit_keyed_buckets_and_headers(origin, tmp_path) -> None:
    limit = {"token_bucket": {"max_tokens": 3, "tokens_per_fill": 1, "fill_interval": "60s"},
             "key": {"header": "x-user"}}
    routes = [{"match": {"prefix": "/a"}, "route": {"cluster": "web"}},
              {"match": {"prefix": "/b"}, "direct_response": {"status": 200, "body": "b"}}]
    p = rl_proxy(tmp_path, origin, routes=routes, vh_limit=limit)
    seen = [get(p, "/a", {"x-user": "alice"}) for _ in range(3)]
    assert [s for s, _, _ in seen] == [200, 200, 200]
    assert [h["x-ratelimit-remaining"] for _, h, _ in seen] == ["2", "1", "0"]
    assert {h["x-ratelimit-limit"] for _, h, _ in seen} == {"3, 3;w=60"}
    assert [h["x-ratelimit-reset"] for _, h, _ in seen] == ["60", "120", "180"]
    status, headers, body = get(p, "/b", {"x-user": "alice"})  # the same virtual host bucket
    assert (status, body) == (429, b"local_rate_limited")
    assert headers["x-envoy-ratelimited"] == "true" and headers["x-ratelimit-remaining"] == "0"
    assert int(headers["x-ratelimit-reset"]) == 60  # the next token
    assert get(p, "/a", {"x-user": "bob"})[0] == 200  # another key, another bucket
    assert len(origin.requests) == 4  # the refused request never went upstream
    assert stat(p, "http.ingress.http_local_rate_limit.rate_limited") == 1
    assert stat(p, "http.ingress.http_local_rate_limit.ok") == 4
    log = tmp_path / "access.log"
    entries = wait_for(lambda: [json.loads(x) for x in log.read_text().splitlines()]
                       if log.exists() and len(log.read_text().splitlines()) >= 5 else None)
    assert [e["response_flags"] for e in entries if e["response_code"] == 429] == ["RL"]


def _hammer(port: int, stop: threading.Event, counts: dict[int, int],
            lock: threading.Lock) -> None:
    request = b"GET /limited HTTP/1.1\r\nhost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        buf = b""
        while not stop.is_set():
            s.sendall(request)
            while b"\r\n\r\n" not in buf:
                buf += s.recv(65536)
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(rest) < length:
                rest += s.recv(65536)
            buf = rest[length:]
            status = int(head.split()[1])
            with lock:
                counts[status] = counts.get(status, 0) + 1


def test_local_ratelimit_rate_holds_for_the_worker_pool(origin, tmp_path) -> None:
    """Two workers, 16 connections spread over them by SO_REUSEPORT: the pool grants
    the configured 10 tokens of burst plus 20 per second, not twice that."""
    routes = [{"match": {"prefix": "/limited"},
               "direct_response": {"status": 200, "body": "ok"},
               "local_rate_limit": {"token_bucket": {"max_tokens": 10, "tokens_per_fill": 20,
                                                     "fill_interval": "1s"}}}]
    p = rl_proxy(tmp_path, origin, routes=routes, workers=2)
    counts: dict[int, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    threads = [threading.Thread(target=_hammer, args=(p.port, stop, counts, lock))
               for _ in range(16)]
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - start
    expected = 10 + 20 * elapsed
    assert counts.get(429, 0) > counts.get(200, 0)  # the load was well over the limit
    assert abs(counts[200] - expected) <= 0.1 * expected, (counts, elapsed)
    # Both workers took traffic over the limit: buckets per worker would have granted
    # about twice as much.
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/workers", timeout=5) as r:
        workers = json.loads(r.read())["workers"]
    assert all(w["requests"] > 100 for w in workers), workers
