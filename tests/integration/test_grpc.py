"""gRPC through the proxy with grpcio on both ends: a grpcio client (h2c, and TLS with ALPN
h2) to a grpcio server behind an HTTP/2 cluster. The four call kinds; grpc-timeout as the
deadline; the proxy's own failures as trailers-only answers with Envoy's gRPC status; an
origin's non-gRPC error mapped; retry_on gRPC conditions; per-call stats by status.

The service is defined with grpcio's generic handlers over raw bytes (no generated code):
/test.Echo/Unary, ServerStream, ClientStream, Bidi."""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from tests.helpers import config, make_pki, ok_response, wait_for
from tests.integration.test_supervisor import start, stat

SERVICE = "test.Echo"


class EchoService:
    """Answers with what it got; `fail_next` calls fail with RESOURCE_EXHAUSTED first."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_next = 0
        self.deadlines: list[float | None] = []
        self.metadata: list[dict] = []
        self.lock = threading.Lock()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.calls += 1
            fail = self.fail_next > 0
            if fail:
                self.fail_next -= 1
        self.deadlines.append(context.time_remaining())
        self.metadata.append(dict(context.invocation_metadata()))
        if fail:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy, try again")
        if request.startswith(b"sleep:"):
            time.sleep(float(request[6:]))
        if request == b"not-found":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        context.set_trailing_metadata((("x-trailer", "t"),))
        return request.upper()

    def server_stream(self, request: bytes, context: grpc.ServicerContext):
        n = int(request)
        for i in range(n):
            yield b"%d:" % i + b"x" * 1000

    def client_stream(self, requests, context: grpc.ServicerContext) -> bytes:
        total = 0
        count = 0
        for r in requests:
            total += len(r)
            count += 1
        return b"%d/%d" % (count, total)

    def bidi(self, requests, context: grpc.ServicerContext):
        for r in requests:
            yield r[::-1]


@pytest.fixture
def grpc_server():
    servers = []

    def make(tls: tuple[str, str] | None = None) -> tuple[int, EchoService]:
        svc = EchoService()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(svc.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(svc.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(svc.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(svc.bidi),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if tls is not None:
            chain, key = tls
            creds = grpc.ssl_server_credentials(
                [(Path(key).read_bytes(), Path(chain).read_bytes())])
            port = server.add_secure_port("127.0.0.1:0", creds)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return port, svc

    yield make
    for s in servers:
        s.stop(0)


class _Port:
    def __init__(self, port: int) -> None:
        self.port = port


def grpc_proxy(tmp_path: Path, port: int, route: dict | None = None,
               cluster: dict | None = None, listener: dict | None = None,
               routes: list | None = None):
    r = {"match": {"prefix": f"/{SERVICE}/"}, "route": {"cluster": "web", **(route or {})}}
    cfg = config(port, routes=routes or [r], listener=listener,
                 access_log={"path": str(tmp_path / "access.log"), "format": "json",
                             "flush_interval": "50ms"})
    cfg["clusters"][0].update({"protocol": "http2", **(cluster or {})})
    p = start(tmp_path, _Port(port), 1, cfg=cfg)
    p.access_log = tmp_path / "access.log"
    return p


def log_lines(p) -> list[dict]:
    text = p.access_log.read_text() if p.access_log.exists() else ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def stubs(channel: grpc.Channel):
    return (channel.unary_unary(f"/{SERVICE}/Unary"),
            channel.unary_stream(f"/{SERVICE}/ServerStream"),
            channel.stream_unary(f"/{SERVICE}/ClientStream"),
            channel.stream_stream(f"/{SERVICE}/Bidi"))


def test_grpc_all_four_call_kinds_over_h2c(tmp_path, grpc_server) -> None:
    port, svc = grpc_server()
    p = grpc_proxy(tmp_path, port)
    with grpc.insecure_channel(f"127.0.0.1:{p.port}") as ch:
        unary, server_stream, client_stream, bidi = stubs(ch)
        resp, call = unary.with_call(b"hello", metadata=(("x-meta", "m"),), timeout=10)
        assert resp == b"HELLO"
        assert ("x-trailer", "t") in call.trailing_metadata()
        got = list(server_stream(b"200", timeout=10))  # 200 KB: several windows' worth
        assert len(got) == 200 and got[199].startswith(b"199:")
        assert client_stream(iter([b"a" * 5000] * 50), timeout=10) == b"50/250000"
        assert list(bidi(iter([b"abc", b"xyz", b"12345"]), timeout=10)) == [
            b"cba", b"zyx", b"54321"]
    assert svc.metadata[0]["x-meta"] == "m"
    assert "x-request-id" in svc.metadata[0] and "x-forwarded-for" in svc.metadata[0]
    wait_for(lambda: len(log_lines(p)) >= 4)
    assert {line["protocol"] for line in log_lines(p)} == {"HTTP/2"}
    assert {line["grpc_status"] for line in log_lines(p)} == {"OK"}  # %GRPC_STATUS%
    assert stat(p, "http.ingress.grpc.total") == 4
    assert stat(p, "http.ingress.grpc.0") == 4
    assert stat(p, "cluster.web.grpc.success") == 4
    assert stat(p, "cluster.web.upstream_cx_http2_total") == 1


def test_grpc_over_tls_with_alpn(tmp_path, grpc_server) -> None:
    """TLS on both sides: the client's ALPN h2 at the listener, the cluster's to a TLS
    grpcio server (which requires h2 by ALPN)."""
    ca, pairs = make_pki(tmp_path, [["localhost"], ["grpc.backend"]])
    port, _svc = grpc_server(tls=pairs[1])
    chain, key = pairs[0]
    p = grpc_proxy(tmp_path, port,
                   listener={"tls": {"certificates": [
                       {"certificate_chain": chain, "private_key": key}]}},
                   cluster={"tls": {"sni": "grpc.backend", "trusted_ca": str(ca)}})
    creds = grpc.ssl_channel_credentials(root_certificates=Path(ca).read_bytes())
    with grpc.secure_channel(f"localhost:{p.port}", creds) as ch:
        unary, server_stream, _cs, bidi = stubs(ch)
        assert unary(b"secure", timeout=10) == b"SECURE"
        assert len(list(server_stream(b"5", timeout=10))) == 5
        assert list(bidi(iter([b"ab"]), timeout=10)) == [b"ba"]


def test_grpc_timeout_is_the_deadline(tmp_path, grpc_server) -> None:
    """grpc-timeout bounds the call at the proxy and goes on shrunk; the route timeout's
    expiry is a trailers-only DEADLINE_EXCEEDED (Envoy's answer), logged UT."""
    port, svc = grpc_server()
    p = grpc_proxy(tmp_path, port, route={"timeout": "300ms"})
    with grpc.insecure_channel(f"127.0.0.1:{p.port}") as ch:
        unary = stubs(ch)[0]
        assert unary(b"quick", timeout=0.25) == b"QUICK"
        # The origin saw the client's budget, less what the proxy took (never more).
        assert svc.deadlines[-1] is not None and 0 < svc.deadlines[-1] <= 0.25
        with pytest.raises(grpc.RpcError) as info:
            unary(b"sleep:2")  # no client deadline: the route timeout answers
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "upstream request timeout" in info.value.details()
    wait_for(lambda: len(log_lines(p)) >= 2)
    last = log_lines(p)[-1]
    assert last["response_flags"] == "UT" and last["response_code"] == 200
    assert last["grpc_status"] == "DEADLINE_EXCEEDED"
    assert stat(p, "http.ingress.grpc.4") == 1


def test_grpc_local_replies_are_trailers_only_with_envoys_status(tmp_path, grpc_server,
                                                                 origin_factory) -> None:
    """The proxy's own failures: no route (404) is UNIMPLEMENTED, a connect failure (503
    UF) UNAVAILABLE, each with the reason as grpc-message; an origin's HTTP error without
    grpc-status (an HTTP/1.1 error page) is mapped the same way."""
    port, _svc = grpc_server()
    p = grpc_proxy(tmp_path, port)
    with grpc.insecure_channel(f"127.0.0.1:{p.port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/other.Service/Method")(b"x", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as info:
            stubs(ch)[0](b"not-found", timeout=10)  # the server's own status passes
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # Nothing listens: 503 UF.
    (tmp_path / "down").mkdir()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    p2 = grpc_proxy(tmp_path / "down", dead)
    with grpc.insecure_channel(f"127.0.0.1:{p2.port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            stubs(ch)[0](b"x", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "upstream connect error" in info.value.details()
    wait_for(lambda: len(log_lines(p2)) >= 1)
    assert log_lines(p2)[-1]["response_flags"] == "UF"
    assert log_lines(p2)[-1]["grpc_status"] == "UNAVAILABLE"
    # An HTTP/1.1 origin answering 403 and 503 with bodies, no grpc-status.
    statuses = iter([403, 503])

    def handler(req, sock):
        code = next(statuses)
        return ok_response(b"<html>denied</html>", status=code)

    h1 = origin_factory(handler)
    (tmp_path / "h1").mkdir()
    p3 = grpc_proxy(tmp_path / "h1", h1.port, cluster={"protocol": "http1"})
    with grpc.insecure_channel(f"127.0.0.1:{p3.port}") as ch:
        unary = stubs(ch)[0]
        for expected in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE):
            with pytest.raises(grpc.RpcError) as info:
                unary(b"x", timeout=10)
            assert info.value.code() == expected
    wait_for(lambda: len(log_lines(p3)) >= 2)
    assert [line["response_code"] for line in log_lines(p3)] == [200, 200]
    assert stat(p3, "cluster.web.grpc.7") == 1 and stat(p3, "cluster.web.grpc.14") == 1
    assert stat(p3, "cluster.web.upstream_rq_4xx") == 1


def test_grpc_retry_on_grpc_status(tmp_path, grpc_server) -> None:
    """retry_on resource-exhausted (Envoy's gRPC condition): a trailers-only answer with
    that status is retried; without the condition it reaches the client."""
    port, svc = grpc_server()
    p = grpc_proxy(tmp_path, port, route={"retry_policy": {
        "retry_on": "resource-exhausted,unavailable", "num_retries": 2}})
    svc.fail_next = 2
    with grpc.insecure_channel(f"127.0.0.1:{p.port}") as ch:
        assert stubs(ch)[0](b"again", timeout=10) == b"AGAIN"
    assert svc.calls == 3
    assert stat(p, "cluster.web.upstream_rq_retry") == 2
    assert stat(p, "cluster.web.upstream_rq_retry_success") == 1
    (tmp_path / "n").mkdir()
    p2 = grpc_proxy(tmp_path / "n", port, route={"retry_policy": {
        "retry_on": "unavailable", "num_retries": 2}})
    svc.fail_next = 1
    with grpc.insecure_channel(f"127.0.0.1:{p2.port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            stubs(ch)[0](b"once", timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stat(p2, "http.ingress.grpc.8") == 1 and stat(p2, "http.ingress.grpc.failure") == 1


def test_grpc_health_check(tmp_path) -> None:
    """health_check type grpc (Envoy's grpc_health_check): grpc.health.v1.Health/Check for
    the service; NOT_SERVING takes the endpoint out (503 UH, UNAVAILABLE to a call),
    SERVING again brings it back."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    svc = EchoService()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(svc.unary)}),))
    hport = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        # healthy_panic_threshold 0: one endpoint, unhealthy, must not be used anyway.
        p = grpc_proxy(tmp_path, hport, cluster={"healthy_panic_threshold": 0, "health_check": {
            "type": "grpc", "service_name": SERVICE, "interval": "100ms", "timeout": "1s",
            "healthy_threshold": 1, "unhealthy_threshold": 1}})
        wait_for(lambda: stat(p, "cluster.web.health_check.success") >= 2)
        with grpc.insecure_channel(f"127.0.0.1:{p.port}") as ch:
            assert stubs(ch)[0](b"up", timeout=10) == b"UP"
            servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
            wait_for(lambda: stat(p, "cluster.web.health_check.healthy") == 0)
            with pytest.raises(grpc.RpcError) as info:
                stubs(ch)[0](b"down", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no healthy upstream" in info.value.details()
            servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
            wait_for(lambda: stat(p, "cluster.web.health_check.healthy") == 1)
            assert stubs(ch)[0](b"back", timeout=10) == b"BACK"
        # An unknown service is NOT_FOUND from the health server: unhealthy.
        (tmp_path / "u").mkdir()
        p2 = grpc_proxy(tmp_path / "u", hport, cluster={"health_check": {
            "type": "grpc", "service_name": "no.such.Service", "interval": "100ms",
            "unhealthy_threshold": 1}})
        wait_for(lambda: stat(p2, "cluster.web.health_check.failure") >= 1)
        assert stat(p2, "cluster.web.health_check.success") == 0
    finally:
        server.stop(0)
