"""Upstream HTTP/2 end to end: a real proxy to an HTTP/2 origin (tests.h2origin, on the
h2 library), with curl and an h2-library client downstream. Clusters choose the protocol
(`protocol: http1 | http2 | downstream`); one multiplexed connection per endpoint per
worker; GOAWAY and REFUSED_STREAM retried; translation both ways (RFC 9113 8.2.2, 8.3.1)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from pathlib import Path

import pytest
from hpack import NeverIndexedHeaderTuple

from tests.h2client import Client
from tests.h2origin import H2Origin
from tests.helpers import FAST_PATH, config, curl, read_response, wait_for
from tests.integration.test_supervisor import start, stat
from tools.mesh_certs import MeshCA


@pytest.fixture
def h2origin():
    made: list[H2Origin] = []

    def make(**kw) -> H2Origin:
        o = H2Origin(**kw).start()
        made.append(o)
        return o

    yield make
    for o in made:
        o.stop()


class _Port:
    def __init__(self, port: int) -> None:
        self.port = port


def h2_proxy(tmp_path: Path, port: int, protocol: str = "http2", cluster: dict | None = None,
             listener: dict | None = None, route: dict | None = None):
    cfg = config(port, listener=listener,
                 access_log={"path": str(tmp_path / "access.log"), "format": "json",
                             "flush_interval": "50ms"})
    cfg["clusters"][0]["protocol"] = protocol
    cfg["clusters"][0].update(cluster or {})
    if route:
        cfg["listeners"][0]["virtual_hosts"][0]["routes"][0]["route"].update(route)
    p = start(tmp_path, _Port(port), 1, cfg=cfg)
    p.access_log = tmp_path / "access.log"
    return p


def hold(p, n: int) -> tuple[list[int], list[threading.Thread]]:
    """n concurrent curl requests to the origin's /hold: (statuses so far, threads)."""
    results: list[int] = []

    def one() -> None:
        r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://127.0.0.1:{p.port}/hold", timeout=20)
        results.append(int(r.stdout or 0))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    return results, threads


def log_lines(p) -> list[dict]:
    text = p.access_log.read_text() if p.access_log.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_http2_upstream_translates_an_http1_request(tmp_path, h2origin) -> None:
    """HTTP/1.1 client -> HTTP/2 origin: Host becomes :authority (RFC 9113 8.3.1), the
    connection-specific fields go (8.2.2), TE goes on only as "trailers", the body
    (Content-Length and chunked with trailers) arrives whole."""
    o = h2origin()
    p = h2_proxy(tmp_path, o.port)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"POST /echo?q=1 HTTP/1.1\r\nHost: api.example\r\nConnection: keep-alive, "
                  b"x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
                  b"Content-Length: 5\r\n\r\nhello")
        status, headers, body = read_response(s)
        assert status == 200
        got = json.loads(body)
        assert got["method"] == "POST" and got["path"] == "/echo?q=1"
        assert got["authority"] == "api.example" and got["scheme"] == "http"
        assert got["body"] == "hello"
        h = got["headers"]
        assert h["te"] == "trailers" and h["content-length"] == "5"
        for hop in ("connection", "keep-alive", "x-hop", "host", "transfer-encoding"):
            assert hop not in h, hop
        assert h["x-forwarded-proto"] == "http" and "x-request-id" in h
        # chunked with trailers: DATA, then the trailers as the stream's last HEADERS
        s.sendall(b"PUT /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 42\r\n\r\n")
        status, _h, body = read_response(s)
        got = json.loads(body)
        assert status == 200 and got["body"] == "abcde"
        assert got["trailers"] == {"x-sum": "42"}
        assert "content-length" not in got["headers"]
    assert o.connections == 1  # both requests on one connection
    assert stat(p, "cluster.web.upstream_cx_http2_total") == 1
    assert stat(p, "cluster.web.upstream_rq_2xx") == 2


def test_http2_upstream_response_framing_for_http1_clients(tmp_path, h2origin) -> None:
    """An HTTP/2 response without content-length: chunked for an HTTP/1.1 client,
    close-delimited for HTTP/1.0; trailers relayed in the chunked coding; HEAD and 204
    carry no body; an origin status passes through."""
    o = h2origin()
    p = h2_proxy(tmp_path, o.port)
    r = curl("-si", f"http://127.0.0.1:{p.port}/nolength?n=7")
    head, body = r.stdout.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head.lower() and body == b"yyyyyyy"
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET /nolength?n=4 HTTP/1.0\r\nHost: a\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head.lower() and body == b"yyyy"
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET /trailers HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
        data = b""
        while not data.endswith(b"\r\n\r\n") or b"grpc-status" not in data:
            data += s.recv(65536)
    assert b"4\r\nbody\r\n0\r\n" in data and b"x-checksum: abc\r\n" in data
    r = curl("-sI", f"http://127.0.0.1:{p.port}/big?n=100")
    assert r.stdout.startswith(b"HTTP/1.1 200") and b"content-length: 100" in r.stdout.lower()
    r = curl("-si", f"http://127.0.0.1:{p.port}/status/204")
    assert r.stdout.startswith(b"HTTP/1.1 204")
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
             f"http://127.0.0.1:{p.port}/status/503")
    assert r.stdout == b"503 11"
    assert o.connections == 1


def test_http2_upstream_multiplexes_and_opens_more_only_at_the_stream_limit(
        tmp_path, h2origin) -> None:
    """Concurrent requests share one connection; past the origin's
    SETTINGS_MAX_CONCURRENT_STREAMS another connection opens."""
    o = h2origin(max_concurrent_streams=4)
    p = h2_proxy(tmp_path, o.port)
    results, threads = hold(p, 10)
    wait_for(lambda: stat(p, "cluster.web.upstream_rq_active") == 10, timeout=10)
    o.release.set()
    for t in threads:
        t.join(20)
    assert results == [200] * 10
    assert o.peak_streams <= 4
    assert o.connections == 3  # 10 streams at 4 per connection
    # Afterwards one connection serves everything again.
    before = o.connections
    for _ in range(3):
        assert curl("-s", f"http://127.0.0.1:{p.port}/echo").returncode == 0
    assert o.connections == before


def test_http2_upstream_goaway_drains_and_retries_unprocessed_streams(
        tmp_path, h2origin) -> None:
    """The origin's GOAWAY (NO_ERROR) after each request: the streams above its
    last_stream_id never ran and are sent again on a new connection, without a retry
    policy; the stream it names finishes on the old one."""
    o = h2origin(goaway_after=1)
    p = h2_proxy(tmp_path, o.port)
    for i in range(3):
        r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://127.0.0.1:{p.port}/echo?i={i}")
        assert r.stdout == b"200"
    assert o.connections >= 3  # each connection answered one request, then went away
    assert stat(p, "cluster.web.upstream_cx_close_notify") >= 2
    # Concurrent: one stream per connection is processed, the others come back refused
    # and are resent (each time on a fresh connection).
    o2 = h2origin(goaway_after=2)
    (tmp_path / "b").mkdir()
    p2 = h2_proxy(tmp_path / "b", o2.port)
    results: list[int] = []

    def one(i: int) -> None:
        r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}",
                 f"http://127.0.0.1:{p2.port}/echo?i={i}", timeout=20)
        results.append(int(r.stdout or 0))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [200] * 6
    assert len(o2.requests) == 6  # every request ran once at the origin


def test_http2_upstream_refused_stream_is_resent(tmp_path, h2origin) -> None:
    """RST_STREAM REFUSED_STREAM means the origin did not process it (RFC 9113 8.7): sent
    again up to 3 times; past that the client's 503 UC, unless retry_on has
    refused-stream."""
    o = h2origin(refuse_first=1)
    p = h2_proxy(tmp_path, o.port)
    r = curl("-s", "-w", " %{http_code}", f"http://127.0.0.1:{p.port}/echo")
    assert r.stdout.endswith(b" 200")
    assert stat(p, "cluster.web.upstream_rq_rx_reset") == 1
    o.refuse_first = 4
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{p.port}/echo")
    assert r.stdout == b"503"
    wait_for(lambda: len(log_lines(p)) >= 2)
    assert log_lines(p)[-1]["response_flags"] == "UC"
    o2 = h2origin(refuse_first=5)
    (tmp_path / "r").mkdir()
    p2 = h2_proxy(tmp_path / "r", o2.port,
                  route={"retry_policy": {"retry_on": "refused-stream", "num_retries": 2}})
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{p2.port}/echo")
    assert r.stdout == b"200"


def test_http2_upstream_protocol_downstream_follows_the_client(tmp_path, h2origin,
                                                               origin) -> None:
    """protocol: downstream (Envoy's use_downstream_protocol): an HTTP/2 client's request
    goes as HTTP/2, an HTTP/1.1 client's as HTTP/1.1; h2c to an h2c origin end to end with
    trailers (what gRPC needs)."""
    o = h2origin()
    p = h2_proxy(tmp_path, o.port, "downstream")
    c = Client(p.port)
    sid = c.request("/trailers", method="POST", headers=[(b"te", b"trailers"),
                                                          (b"content-type", b"application/grpc")],
                    body=b"\x00\x00\x00\x00\x00")
    resp = c.wait(sid)[0]
    assert resp.status == 200 and resp.body == b"body"
    assert (b"grpc-status", b"0") in resp.trailers and (b"x-checksum", b"abc") in resp.trailers
    sid = c.request("/echo", method="POST", body=b"abc",
                    trailers=[(b"x-t", b"1")])
    got = json.loads(c.wait(sid)[0].body)
    assert got["body"] == "abc" and got["trailers"] == {"x-t": "1"}
    c.close()
    # An HTTP/1.1 client on the same cluster speaks HTTP/1.1 to the endpoint: the h2-only
    # origin cannot answer it (what a mixed cluster must not do), so this uses an h1 one.
    (tmp_path / "h1").mkdir()
    p1 = h2_proxy(tmp_path / "h1", origin.port, "downstream")
    r = curl("-s", f"http://127.0.0.1:{p1.port}/x")
    assert r.returncode == 0 and origin.requests[-1].http_version == b"1.1"
    assert stat(p1, "cluster.web.upstream_cx_http2_total") == 0


def test_http2_upstream_tls_offers_h2_by_alpn(tmp_path, h2origin) -> None:
    """Over TLS the cluster's connections offer ALPN h2 (RFC 9113 3.2) and :scheme https."""
    d = tmp_path / "pki"
    d.mkdir()
    ca = MeshCA()
    ca.write(d / "ca.pem")
    cert = ca.issue(d, "api", dns=["api.backend"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.chain, cert.key)
    ctx.set_alpn_protocols(["h2"])
    o = h2origin(tls=ctx)
    p = h2_proxy(tmp_path, o.port, cluster={"tls": {"sni": "api.backend",
                                                     "trusted_ca": str(d / "ca.pem")}})
    r = curl("-s", f"http://127.0.0.1:{p.port}/echo")
    got = json.loads(r.stdout)
    assert got["scheme"] == "https"
    assert o.alpn == ["h2"]


def test_http2_upstream_breakers_count_requests(tmp_path, h2origin) -> None:
    """On an HTTP/2 cluster max_requests bounds streams (one connection carries them
    all): past it a request is 503 UO."""
    o = h2origin()
    p = h2_proxy(tmp_path, o.port,
                 cluster={"circuit_breakers": {"max_requests": 2, "max_connections": 1}})
    results, threads = hold(p, 2)
    wait_for(lambda: stat(p, "cluster.web.upstream_rq_active") == 2, timeout=10)
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{p.port}/echo")
    assert r.stdout == b"503"
    o.release.set()
    for t in threads:
        t.join(20)
    assert results == [200, 200]
    assert o.connections == 1
    assert stat(p, "cluster.web.upstream_rq_pending_overflow") == 1


def test_http2_upstream_reset_mid_body_resets_the_client(tmp_path, h2origin) -> None:
    """The origin going away in the middle of a response body: the HTTP/1.1 client's
    connection is reset (a truncated body never looks complete), logged UC."""
    o = h2origin()
    p = h2_proxy(tmp_path, o.port)

    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET /big?n=50000000 HTTP/1.1\r\nHost: a\r\n\r\n")
        first = s.recv(1024)
        assert first.startswith(b"HTTP/1.1 200")
        got = len(first)
        killed = False
        try:
            while chunk := s.recv(65536):
                got += len(chunk)
                if not killed and got > 100_000:
                    o.abort_all()  # mid-body, whatever the machine's speed
                    killed = True
        except ConnectionResetError:
            pass
    assert killed, got
    assert got < 50_000_000
    wait_for(lambda: len(log_lines(p)) >= 1)
    assert log_lines(p)[-1]["response_flags"] == "UC"


def test_http2_upstream_keeps_never_indexed_fields_never_indexed(tmp_path, h2origin) -> None:
    """RFC 7541 7.1.3: a field an HTTP/2 peer sent as a never-indexed literal is sent on
    as one by the proxy (an intermediary's MUST): request fields and trailers to the
    origin, response fields to the client; the others stay indexable."""
    o = h2origin()
    p = h2_proxy(tmp_path, o.port)
    c = Client(p.port)
    try:
        r = c.get("/echo", headers=[NeverIndexedHeaderTuple(b"x-secret", b"s3cret"),
                                    (b"x-open", b"w")])
        assert r.status == 200
        assert json.loads(r.body)["headers"]["x-secret"] == "s3cret"
        r = c.get("/never")
        assert (r.status, r.body) == (200, b"ok")
        sent = {h[0]: h for h in r.headers}
        assert sent[b"x-token"] == (b"x-token", b"t0k3n") and not sent[b"x-token"].indexable
        assert sent[b"x-plain"].indexable
        sid = c.request("/echo", method="POST", body=b"abc",
                        trailers=[NeverIndexedHeaderTuple(b"x-sig", b"1"), (b"x-sum", b"2")])
        assert c.wait(sid)[0].status == 200
    finally:
        c.close()
    first, _never, third = o.requests
    assert "x-secret" in first.never_indexed and "x-open" not in first.never_indexed
    assert third.trailers == {"x-sig": "1", "x-sum": "2"}
    assert "x-sig" in third.never_indexed and "x-sum" not in third.never_indexed
    p.stop()


def test_http2_upstream_http1_connection_keeps_its_task(tmp_path, h2origin) -> None:
    """An HTTP/1.1 client's requests to an HTTP/2 cluster are a task's (the fast path
    relays HTTP/1.1 origins only): after the first, the connection keeps its task for the
    next request instead of parking on the fast path to be declined and woken each time."""
    o = h2origin()
    p = h2_proxy(tmp_path, o.port)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as s:
        for i in range(5):
            s.sendall(b"GET /echo/%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
            status, _headers, body = read_response(s)
            assert status == 200 and json.loads(body)["path"] == f"/echo/{i}"
    assert stat(p, "http.ingress.fast_path.declined") == (1 if FAST_PATH else 0)
    assert stat(p, "http.ingress.fast_path.rq_total") == 0
    p.stop()
