"""Downstream HTTP/2 end to end: real clients (curl, nghttp, h2load, and an h2-library
client for what they cannot script) through a real proxy to an HTTP/1.1 origin. Each
stream is a request through the same routing, filters and router as HTTP/1.1."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.h2client import Client
from tests.helpers import Origin, config, curl, make_pki, ok_response, wait_for
from tests.integration.test_supervisor import start, stat


def seen(body: bytes) -> dict:
    return json.loads(body)


def h2_proxy(tmp_path, origin: Origin, listener: dict | None = None, **kw):
    log = tmp_path / "access.log"
    cfg = config(origin.port, listener=listener,
                 access_log={"path": str(log), "format": "json", "flush_interval": "50ms"},
                 **kw)
    p = start(tmp_path, origin, 1, cfg=cfg)
    p.access_log = log
    return p


def log_lines(p) -> list[dict]:
    text = p.access_log.read_text() if p.access_log.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_http2_downstream_prior_knowledge_and_http1_on_one_port(tmp_path, origin) -> None:
    """codec auto (the default): the RFC 9113 3.4 preface picks HTTP/2, a request line
    HTTP/1.1, on the same listener."""
    p = h2_proxy(tmp_path, origin)
    r = curl("-i", "--http2-prior-knowledge", f"http://127.0.0.1:{p.port}/two?x=1",
             "-H", "x-custom: yes")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"HTTP/2 200")
    got = seen(r.stdout.split(b"\r\n\r\n", 1)[1])
    headers = dict((k, v) for k, v in got["headers"])
    # The origin got an HTTP/1.1 request: Host from :authority (RFC 9113 8.3.1), no
    # pseudo-header, the proxy's own fields.
    assert got["target"] == "/two?x=1" and got["method"] == "GET"
    assert headers["host"] == f"127.0.0.1:{p.port}"
    assert headers["x-custom"] == "yes" and "x-request-id" in headers
    assert not any(k.startswith(":") for k in headers)
    assert origin.requests[-1].http_version == b"1.1"
    r = curl("-i", f"http://127.0.0.1:{p.port}/one")
    assert r.stdout.startswith(b"HTTP/1.1 200")
    wait_for(lambda: len(log_lines(p)) >= 2)
    protocols = [line["protocol"] for line in log_lines(p)]
    assert protocols == ["HTTP/2", "HTTP/1.1"]
    assert stat(p, "http.ingress.downstream_cx_http2_total") == 1
    assert stat(p, "http.ingress.downstream_rq_total") == 2


def test_http2_downstream_many_streams_on_one_connection(tmp_path, origin) -> None:
    p = h2_proxy(tmp_path, origin)
    c = Client(p.port)
    sids = [c.request(f"/s{i}") for i in range(60)]
    rs = c.wait(*sids)
    assert [r.status for r in rs] == [200] * 60
    assert sorted(seen(r.body)["target"] for r in rs) == sorted(f"/s{i}" for i in range(60))
    c.close()
    assert stat(p, "http.ingress.downstream_cx_http2_total") == 1
    assert stat(p, "http.ingress.downstream_rq_2xx") == 60


def test_http2_downstream_nghttp_and_h2load(tmp_path, origin) -> None:
    p = h2_proxy(tmp_path, origin)
    r = subprocess.run(["nghttp", "-ns", "-m", "20", f"http://127.0.0.1:{p.port}/ng"],
                       capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert sum(1 for r in origin.requests if r.target == b"/ng") == 20
    r = subprocess.run(["h2load", "-n", "400", "-c", "4", "-m", "10",
                        f"http://127.0.0.1:{p.port}/load"], capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert "400 succeeded" in out and "400 2xx" in out, out


def test_http2_downstream_tls_alpn(tmp_path, origin) -> None:
    """ALPN h2 on a TLS listener (offered first by default), http/1.1 for a client that
    asks for it (RFC 7301)."""
    ca, pairs = make_pki(tmp_path, [["localhost"]])
    chain, key = pairs[0]
    p = h2_proxy(tmp_path, origin, listener={"tls": {"certificates": [
        {"certificate_chain": chain, "private_key": key}]}})
    url = f"https://localhost:{p.port}/tls"
    r = curl("-i", "--http2", "--cacert", str(ca), url)
    assert r.stdout.startswith(b"HTTP/2 200"), r.stderr
    r = curl("-i", "--http1.1", "--cacert", str(ca), url)
    assert r.stdout.startswith(b"HTTP/1.1 200"), r.stderr
    c = Client(p.port, tls_ca=str(ca))
    assert c.get("/lib").status == 200
    c.close()
    assert stat(p, "http.ingress.downstream_cx_http2_total") == 2
    # A listener that speaks only HTTP/1.1 does not offer h2.
    p1 = h2_proxy(tmp_path, origin, listener={"codec": "http1", "tls": {"certificates": [
        {"certificate_chain": chain, "private_key": key}]}})
    r = curl("-i", "--http2", "--cacert", str(ca), f"https://localhost:{p1.port}/")
    assert r.stdout.startswith(b"HTTP/1.1 200"), r.stderr


def test_http2_downstream_codec_http1_refuses_the_preface(tmp_path, origin) -> None:
    p = h2_proxy(tmp_path, origin, listener={"codec": "http1"})
    r = curl("-i", "--http2-prior-knowledge", f"http://127.0.0.1:{p.port}/")
    assert not r.stdout.startswith(b"HTTP/2")
    assert origin.requests == []


def test_http2_downstream_request_bodies(tmp_path, origin) -> None:
    """A body with content-length goes as is; one without is chunked to the origin, with
    its trailers (RFC 9113 8.1, RFC 9112 7.1.2)."""
    p = h2_proxy(tmp_path, origin)
    c = Client(p.port)
    body = bytes(range(256)) * 1200  # 300 KiB: beyond the 64 KiB stream window
    r = c.get("/cl", method="POST", headers=[(b"content-length", b"%d" % len(body))],
              body=body)
    assert r.status == 200 and seen(r.body)["body_len"] == len(body)
    assert origin.requests[-1].body == body
    assert origin.requests[-1].header(b"content-length") == b"%d" % len(body)
    r = c.get("/chunked", method="POST", body=body,
              trailers=[(b"x-checksum", b"abc")])
    assert r.status == 200
    req = origin.requests[-1]
    assert req.body == body and req.header(b"transfer-encoding") == b"chunked"
    raw = bytes(origin.raw[req.conn_id])
    assert b"\r\n0\r\nx-checksum: abc\r\n\r\n" in raw
    c.close()


def test_http2_downstream_response_framings_and_trailers(tmp_path, origin_factory) -> None:
    def handler(req, sock):
        if req.target == b"/chunked":
            return (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
                    b"connection: keep-alive\r\nx-a: 1\r\n\r\n"
                    b"5\r\nhello\r\n6\r\n world\r\n0\r\ngrpc-status: 0\r\n\r\n")
        if req.target == b"/close":
            sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + b"z" * 100_000)
            from tests.helpers import Close
            raise Close()
        if req.target == b"/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if req.target == b"/early":
            return (b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n"
                    + ok_response(b"final"))
        return ok_response(b"x" * 200_000)

    origin = origin_factory(handler)
    p = h2_proxy(tmp_path, origin)
    c = Client(p.port)
    r = c.get("/chunked")
    # No connection-specific field crosses into HTTP/2 (RFC 9113 8.2.2); trailers follow
    # the DATA in a HEADERS frame that ends the stream (8.1).
    names = [k for k, _v in r.headers]
    assert r.body == b"hello world" and r.header(b"x-a") == b"1"
    assert b"transfer-encoding" not in names and b"connection" not in names
    assert r.trailers == [(b"grpc-status", b"0")]
    r = c.get("/close")
    assert r.body == b"z" * 100_000 and r.ended
    r = c.get("/204")
    assert r.status == 204 and r.body == b""
    r = c.get("/big")
    assert r.body == b"x" * 200_000 and r.header(b"content-length") == b"200000"
    r = c.get("/early")
    assert r.informational == [[(b":status", b"103"), (b"link", b"</s.css>")]]
    assert r.status == 200 and r.body == b"final"
    r = c.get("/big", method="HEAD")
    assert r.status == 200 and r.body == b"" and r.header(b"content-length") == b"200000"
    c.close()


def test_http2_downstream_local_replies_and_errors(tmp_path, origin) -> None:
    routes = [{"match": {"path": "/direct"}, "direct_response": {"status": 201,
                                                                   "body": "made\n"}},
              {"match": {"prefix": "/dead"}, "route": {"cluster": "dead"}},
              {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]
    clusters = [{"name": "web", "endpoints": [{"address": "127.0.0.1",
                                                "port": origin.port}]},
                {"name": "dead", "connect_timeout": "200ms",
                 "endpoints": [{"address": "127.0.0.1", "port": 1}]}]
    lst = {"virtual_hosts": [{"name": "a", "domains": ["example.com"], "routes": routes}]}
    p = h2_proxy(tmp_path, origin, listener=lst, clusters=clusters)
    c = Client(p.port)
    r = c.get("/direct")
    assert (r.status, r.body) == (201, b"made\n")
    r = c.get("/x", authority="nowhere.test")
    assert r.status == 404
    r = c.get("/dead")
    assert r.status == 503 and b"upstream connect error" in r.body
    # The connection still serves after them.
    assert c.get("/ok").status == 200
    c.close()
    wait_for(lambda: len(log_lines(p)) >= 4)
    flags = [(line["response_code"], line["response_flags"]) for line in log_lines(p)]
    assert flags == [(201, "-"), (404, "NR"), (503, "UF"), (200, "-")]


def test_http2_downstream_client_reset_aborts_the_upstream(tmp_path, origin_factory) -> None:
    """RST_STREAM from the client abandons that stream only: the upstream request is
    aborted, logged DC, and the connection's other streams go on."""
    def handler(req, sock):
        if req.target == b"/slow":
            time.sleep(3)
        return ok_response(b"done")

    origin = origin_factory(handler)
    p = h2_proxy(tmp_path, origin)
    c = Client(p.port)
    slow = c.request("/slow")
    wait_for(lambda: any(r.target == b"/slow" for r in origin.requests))
    c.conn.reset_stream(slow)
    c.flush()
    assert c.get("/fast").status == 200
    wait_for(lambda: any(line["response_flags"] == "DC" for line in log_lines(p)))
    assert stat(p, "http.ingress.http2.rx_reset") == 1
    c.close()


def test_http2_downstream_route_timeout_is_per_stream(tmp_path, origin_factory) -> None:
    def handler(req, sock):
        if req.target == b"/slow":
            time.sleep(2)
        return ok_response(b"ok")

    origin = origin_factory(handler)
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "web", "timeout": "300ms"}}]
    p = h2_proxy(tmp_path, origin, routes=routes)
    c = Client(p.port)
    slow, fast = c.request("/slow"), c.request("/fast")
    rs = c.wait(slow, fast)
    assert (rs[0].status, rs[1].status) == (504, 200)
    c.close()


def worker_rss_kb(p) -> int:
    """Resident memory of the proxy's worker processes (kB)."""
    pid = p.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for child in children:
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


@pytest.mark.parametrize("origin_protocol", ["http1", "http2"])
def test_http2_downstream_slow_reader_keeps_rss_flat(tmp_path, origin_factory,
                                                     origin_protocol) -> None:
    """A client that stops reading a 100 MiB response (its stream window shut): the origin,
    HTTP/1.1 or HTTP/2, is paused by backpressure and the worker's memory does not grow
    with the body (issue 13, item 5)."""
    from tests.h2origin import H2Origin

    size = 100 * 1024 * 1024
    progress = {"sent": 0}

    def handler(req, sock):
        if not req.target.startswith(b"/big"):
            return ok_response()
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
        chunk = b"y" * 65536
        try:
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
                progress["sent"] += len(chunk)
        except OSError:
            return None
        return None

    h2o = H2Origin().start() if origin_protocol == "http2" else None
    port = h2o.port if h2o is not None else origin_factory(handler).port
    cfg = config(port)
    cfg["clusters"][0]["protocol"] = origin_protocol
    p = start(tmp_path, type("O", (), {"port": port}), 1, cfg=cfg)

    def sent() -> int:
        return h2o.data_sent if h2o is not None else progress["sent"]

    try:
        c = Client(p.port)
        assert c.get("/warm").status == 200  # the worker's steady state first
        before = worker_rss_kb(p)
        c.auto_ack = False
        sid = c.request(f"/big?n={size}")
        for _ in range(20):
            c.pump(0.1)
        time.sleep(1.0)
        stalled_at = sent()
        time.sleep(1.0)
        assert sent() == stalled_at < 32 * 1024 * 1024  # paused, far from the end
        assert len(c.responses[sid].body) <= 65_535
        grown = worker_rss_kb(p) - before
        assert grown < 16 * 1024, f"worker RSS grew {grown} kB"
        c.close()
    finally:
        if h2o is not None:
            h2o.stop()


@pytest.mark.parametrize("codec", ["http2"])
def test_http2_downstream_codec_http2_only(tmp_path, origin, codec) -> None:
    p = h2_proxy(tmp_path, origin, listener={"codec": codec})
    r = curl("-i", "--http2-prior-knowledge", f"http://127.0.0.1:{p.port}/")
    assert r.stdout.startswith(b"HTTP/2 200")
    r = curl("-i", f"http://127.0.0.1:{p.port}/")
    assert not r.stdout.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("stall", ["continuation", "partial-frame"])
def test_http2_downstream_header_block_stall_times_out(tmp_path, origin, stall) -> None:
    """A header block that does not end (HEADERS without END_HEADERS and no CONTINUATION,
    or a HEADERS frame whose bytes stop coming) holds the whole connection (RFC 9113
    6.10): request_headers_timeout closes it with GOAWAY, counted as a downstream
    timeout; no origin sees a request. A connection that finished its block is not cut."""
    from hyperframe.frame import GoAwayFrame

    from tests.h2client import RawConnection, headers_frame, request_block

    p = h2_proxy(tmp_path, origin, listener={"request_headers_timeout": "1s"})
    frame = headers_frame(1, request_block(b"/stall"), end_headers=stall != "continuation")
    c = RawConnection(p.port, timeout=8)
    c.send(frame if stall == "continuation" else frame[:12])
    began = time.monotonic()
    frames = c.frames()
    took = time.monotonic() - began
    assert any(isinstance(f, GoAwayFrame) for f in frames)
    assert 0.8 < took < 6, took
    assert stat(p, "http.ingress.downstream_rq_timeout") == 1
    assert not origin.requests
    c.close()
    # The same connection shape with the block finished: answered, and open past 1 s.
    ok = Client(p.port)
    assert ok.get("/fine").status == 200
    time.sleep(1.5)
    assert ok.pump(0.1) and ok.get("/again").status == 200
    ok.close()
