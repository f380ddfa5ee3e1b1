"""The fast path of HTTP/2 streams (proxy.fast_path_h2) against a real origin, with an
h2-library client: a request without a body is served with no task, and each way it
leaves the fast path answers as the task path does (the suite also runs with
MESHPROXY_FAST_PATH=off, where the fast path's counts stay zero and the answers are the
same)."""

from __future__ import annotations

import json
import time

import h2.errors

from tests.h2client import Client
from tests.helpers import FAST_PATH, Origin, config, ok_response, wait_for
from tests.integration.test_supervisor import start, stat

BEGUN = "http.ingress.fast_path.rq_total"
HANDED = "http.ingress.fast_path.handed_off"

CHUNKED = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n"
           b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n")


def _proxy(tmp_path, handler, routes: list | None = None, **kw):
    o = Origin(handler).start()
    log = tmp_path / "access.log"
    cfg = config(o.port, routes=routes, listener={"codec": "http2"},
                 access_log={"path": str(log), "format": "json", "flush_interval": "50ms"},
                 **kw)
    p = start(tmp_path, o, 1, cfg=cfg)
    p.access_log = log
    return o, p


def _log(p) -> list[dict]:
    text = p.access_log.read_text() if p.access_log.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_http2_fast_path_serves_streams_with_their_framing(tmp_path) -> None:
    """Content-length, a chunked body with trailers (a trailing HEADERS frame, RFC 9113
    8.1), HEAD and 204: each as the relay writes it, served with no task once a pooled
    connection is idle."""
    answers = {b"/c": CHUNKED,
               b"/none": b"HTTP/1.1 204 No Content\r\n\r\n"}

    def handler(req, sock):
        if req.method == b"HEAD":
            return ok_response(b"b" * 100)[:-100]  # the head alone, as RFC 9110 9.3.2 has it
        return answers.get(req.target) or ok_response(b"b" * 100)

    o, p = _proxy(tmp_path, handler)
    try:
        c = Client(p.port)
        try:
            assert c.get("/warm").status == 200  # connects: a task's
            for _ in range(3):
                r = c.get("/")
                assert (r.status, r.body, r.header(b"content-length")) == (200, b"b" * 100,
                                                                          b"100")
                assert r.header(b"connection") is None
            r = c.get("/c")
            assert (r.status, r.body) == (200, b"hello world")
            assert r.trailers == [(b"x-sum", b"11")]
            # Framing fields go (RFC 9113 8.2.2), Trailer with them (RESPONSE_SKIP).
            assert r.header(b"transfer-encoding") is None and r.header(b"trailer") is None
            r = c.get("/", method="HEAD")
            assert (r.status, r.body, r.header(b"content-length")) == (200, b"", b"100")
            r = c.get("/none")
            assert (r.status, r.body, r.header(b"content-length")) == (204, b"", None)
            assert all(resp.ended and resp.reset is None for resp in c.responses.values())
        finally:
            c.close()
        if FAST_PATH:
            assert (stat(p, BEGUN), stat(p, HANDED)) == (7, 1)
        else:
            assert (stat(p, BEGUN), stat(p, HANDED)) == (0, 0)
        assert stat(p, "http.ingress.downstream_rq_2xx") == 7
        wait_for(lambda: len(_log(p)) == 7)
        assert {line["protocol"] for line in _log(p)} == {"HTTP/2"}
        assert stat(p, "cluster.web.upstream_rq_active") == 0
    finally:
        p.stop()
        o.stop()


def test_http2_fast_path_route_timeout_is_504_on_the_stream(tmp_path) -> None:
    """The route timeout while the fast path waits on the origin: 504 UT on that stream,
    the connection and its other streams unharmed."""
    def handler(req, sock):
        if req.target == b"/slow":
            time.sleep(1.5)
        return ok_response(b"ok")

    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "web", "timeout": "300ms"}}]
    o, p = _proxy(tmp_path, handler, routes)
    try:
        c = Client(p.port)
        try:
            assert c.get("/warm").status == 200
            r = c.get("/slow")
            assert (r.status, r.body) == (504, b"upstream request timeout\n")
            assert c.get("/after").body == b"ok"  # the same connection goes on
        finally:
            c.close()
        assert stat(p, "cluster.web.upstream_rq_timeout") == 1
        wait_for(lambda: stat(p, "cluster.web.upstream_rq_active") == 0)
        wait_for(lambda: len(_log(p)) == 3)
        assert [line["response_flags"] for line in _log(p)] == ["-", "UT", "-"]
    finally:
        p.stop()
        o.stop()


def test_http2_fast_path_client_reset_while_the_origin_works(tmp_path) -> None:
    """RST_STREAM from the client while the fast path waits: the attempt is closed, the
    exchange logged DC, the upstream connection not reused, the connection goes on."""
    def handler(req, sock):
        if req.target == b"/slow":
            time.sleep(0.6)
        return ok_response(b"ok")

    o, p = _proxy(tmp_path, handler)
    try:
        c = Client(p.port)
        try:
            assert c.get("/warm").status == 200
            sid = c.request("/slow")
            time.sleep(0.2)
            c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            c.flush()
            assert c.get("/after").body == b"ok"
        finally:
            c.close()
        wait_for(lambda: len(_log(p)) == 3)
        lines = {line["path"]: line for line in _log(p)}
        assert lines["/slow"]["response_flags"] == "DC"
        assert stat(p, "http.ingress.http2.rx_reset") == 1
        wait_for(lambda: stat(p, "cluster.web.upstream_rq_active") == 0)
        # The abandoned connection is closed, not pooled: /after needed another.
        assert o.connections == 2
    finally:
        p.stop()
        o.stop()


def test_http2_fast_path_leaves_a_response_beyond_the_window_to_the_relay(tmp_path) -> None:
    """A client whose stream window cannot take the response at once: the relay writes it
    as the window opens (RFC 9113 6.9), the fast path hands the stream over."""
    body = b"w" * 5000
    o, p = _proxy(tmp_path, lambda req, sock: ok_response(body))
    try:
        c = Client(p.port, window=1000)
        try:
            assert c.get("/warm").body == body
            assert c.get("/").body == body
        finally:
            c.close()
        if FAST_PATH:
            assert (stat(p, BEGUN), stat(p, HANDED)) == (2, 2)
        assert stat(p, "http.ingress.downstream_rq_2xx") == 2
    finally:
        p.stop()
        o.stop()
