"""Fault injection end to end (Envoy's fault filter, Istio's fault): aborts and delays for a
share of requests, Envoy's header controls, max_active_faults, DI and FI in the access log,
the http.<listener>.fault.* stats; a delay never outlasts the route timeout, and a client
that goes away during a delay costs nothing upstream."""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import pytest

from tests.helpers import Proxy, config, read_response, wait_for
from tests.integration.test_local_ratelimit import get
from tests.integration.test_supervisor import _admin_port, stat


def fault_proxy(tmp_path, origin, fault: dict, *, timeout: str | None = None,
                workers: int = 1) -> Proxy:
    tmp_path.mkdir(parents=True, exist_ok=True)
    route: dict = {"cluster": "web"}
    if timeout is not None:
        route["timeout"] = timeout
    routes = [{"match": {"prefix": "/f"}, "route": route, "fault": fault},
              {"match": {"prefix": "/"}, "route": {"cluster": "web"}}]
    cfg = config(origin.port, routes=routes,
                 access_log={"path": str(tmp_path / "access.log"), "format": "json",
                             "flush_interval": "50ms"})
    cfg["admin"] = {"address": "127.0.0.1", "port": 0}
    p = Proxy(cfg, tmp_path, ("--workers", str(workers)))
    p.admin_port = int(wait_for(lambda: _admin_port(p)))
    return p


def log_entries(tmp_path, n: int) -> list[dict]:
    log = tmp_path / "access.log"
    return wait_for(lambda: [json.loads(x) for x in log.read_text().splitlines()]
                    if log.exists() and len(log.read_text().splitlines()) >= n else None)


def test_fault_abort_share_within_two_points(origin, tmp_path) -> None:
    """A 10% abort over 2,000 requests lands within 2 points; the aborted requests never
    reach the origin; FI in the log, aborts_injected counted."""
    p = fault_proxy(tmp_path, origin, {"abort": {"http_status": 503, "percentage": 10}})
    statuses = []
    bodies = set()
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        for _ in range(2000):
            s.sendall(b"GET /f HTTP/1.1\r\nhost: a\r\n\r\n")
            status, _, body = read_response(s)
            statuses.append(status)
            if status == 503:
                bodies.add(body)
    aborted = statuses.count(503)
    assert set(statuses) == {200, 503}
    assert 160 <= aborted <= 240, aborted  # 10% +- 2 points
    assert len(origin.requests) == 2000 - aborted
    assert stat(p, "http.ingress.fault.aborts_injected") == aborted
    assert stat(p, "http.ingress.fault.delays_injected") == 0
    entries = log_entries(tmp_path, 2000)
    assert sum(1 for e in entries if e["response_flags"] == "FI") == aborted
    assert bodies == {b"fault filter abort"}


def test_fault_delay_and_abort_together(origin, tmp_path) -> None:
    """Envoy's order: the delay, then the abort (DI,FI); a delayed request that is not
    aborted goes upstream after its delay (DI)."""
    p = fault_proxy(tmp_path, origin, {"delay": {"fixed_delay": "300ms", "percentage": 100},
                                       "abort": {"http_status": 418, "percentage": 100}})
    t0 = time.monotonic()
    status, _, _ = get(p, "/f")
    assert status == 418 and time.monotonic() - t0 >= 0.29
    assert len(origin.requests) == 0
    assert log_entries(tmp_path, 1)[0]["response_flags"] == "DI,FI"
    assert stat(p, "http.ingress.fault.delays_injected") == 1
    assert stat(p, "http.ingress.fault.active_faults") == 0


def test_fault_delay_goes_upstream_after_it(origin, tmp_path) -> None:
    p = fault_proxy(tmp_path, origin, {"delay": {"fixed_delay": "200ms", "percentage": 100}})
    t0 = time.monotonic()
    assert get(p, "/f")[0] == 200
    assert time.monotonic() - t0 >= 0.19
    assert len(origin.requests) == 1
    assert log_entries(tmp_path, 1)[0]["response_flags"] == "DI"
    t0 = time.monotonic()
    assert get(p, "/other")[0] == 200  # other routes: no fault
    assert time.monotonic() - t0 < 5


def test_fault_delay_never_exceeds_the_route_timeout(origin, tmp_path) -> None:
    """The route's timeout bounds what a caller waits, delay included: a 3 s delay on a
    route of 500 ms answers 504 at the timeout (DI,UT), and the origin sees nothing."""
    p = fault_proxy(tmp_path, origin, {"delay": {"fixed_delay": "3s", "percentage": 100}},
                    timeout="500ms")
    t0 = time.monotonic()
    status, _, _ = get(p, "/f")
    waited = time.monotonic() - t0
    assert status == 504 and waited < 2.5  # the route timeout (and the 50 ms tick), not 3 s
    assert len(origin.requests) == 0
    assert log_entries(tmp_path, 1)[0]["response_flags"] == "DI,UT"


def test_fault_client_gone_during_the_delay_costs_nothing_upstream(origin, tmp_path) -> None:
    """A client that closes during its delay: nothing goes upstream (DC in the log), and the
    active fault ends with it."""
    p = fault_proxy(tmp_path, origin, {"delay": {"fixed_delay": "1s", "percentage": 100}})
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        s.sendall(b"GET /f HTTP/1.1\r\nhost: a\r\n\r\n")
        time.sleep(0.1)
        s.close()
    wait_for(lambda: stat(p, "http.ingress.fault.active_faults") == 0 or None, timeout=5)
    time.sleep(1.2)  # past the delays
    assert len(origin.requests) == 0
    assert {e["response_flags"] for e in log_entries(tmp_path, 5)} == {"DI,DC"}


def test_fault_header_controls(origin, tmp_path) -> None:
    """Envoy's x-envoy-fault-* headers, when header_abort / header_delay are set; their
    percentage is capped by the configured one; without the headers, nothing."""
    p = fault_proxy(tmp_path, origin, {"abort": {"header_abort": True, "percentage": 100},
                                       "delay": {"header_delay": True, "percentage": 100}})
    assert get(p, "/f")[0] == 200
    assert get(p, "/f", {"x-envoy-fault-abort-request": "429"})[0] == 429
    assert get(p, "/f", {"x-envoy-fault-abort-request": "429",
                         "x-envoy-fault-abort-request-percentage": "0"})[0] == 200
    assert get(p, "/f", {"x-envoy-fault-abort-request": "99"})[0] == 200  # out of range
    status, headers, _ = get(p, "/f", {"x-envoy-fault-abort-grpc-request": "14"})
    assert status == 200 and headers["grpc-status"] == "14"
    t0 = time.monotonic()
    assert get(p, "/f", {"x-envoy-fault-delay-request": "300"})[0] == 200
    assert time.monotonic() - t0 >= 0.29
    p2 = fault_proxy(tmp_path / "capped", origin, {"abort": {"header_abort": True,
                                                             "percentage": 0}})
    assert get(p2, "/f", {"x-envoy-fault-abort-request": "429",
                          "x-envoy-fault-abort-request-percentage": "100"})[0] == 200
    # Without header_abort the headers are ignored.
    p3 = fault_proxy(tmp_path / "off", origin, {"delay": {"fixed_delay": "1ms",
                                                          "percentage": 0}})
    assert get(p3, "/f", {"x-envoy-fault-abort-request": "429"})[0] == 200


def test_fault_max_active_faults(origin, tmp_path) -> None:
    """Past max_active_faults at once (in the whole proxy, both workers), a request is
    served without its fault, counted in faults_overflow."""
    p = fault_proxy(tmp_path, origin, {"delay": {"fixed_delay": "1500ms", "percentage": 100},
                                       "max_active_faults": 3}, workers=2)
    results: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        t0 = time.monotonic()
        assert get(p, "/f")[0] == 200
        with lock:
            results.append(time.monotonic() - t0)

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: stat(p, "http.ingress.fault.active_faults") == 3 or None, timeout=5)
    fast = [threading.Thread(target=one) for _ in range(4)]
    for t in fast:
        t.start()
    for t in threads + fast:
        t.join()
    assert sum(1 for r in results if r < 1.0) == 4  # the overflow went through at once
    assert stat(p, "http.ingress.fault.faults_overflow") == 4
    assert stat(p, "http.ingress.fault.delays_injected") == 3


@pytest.fixture
def grpc_origin():
    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Echo", {"Unary": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_fault_grpc_abort(grpc_origin, tmp_path) -> None:
    """An abort with grpc_status answers a gRPC call trailers-only with that status; an
    HTTP status abort is mapped as Envoy maps its local replies (503 -> UNAVAILABLE)."""
    for fault, code in (({"abort": {"grpc_status": 8, "percentage": 100}},
                         grpc.StatusCode.RESOURCE_EXHAUSTED),
                        ({"abort": {"http_status": 503, "percentage": 100}},
                         grpc.StatusCode.UNAVAILABLE)):
        cfg = config(routes=[{"match": {"prefix": "/"}, "route": {"cluster": "g"},
                              "fault": fault}],
                     clusters=[{"name": "g", "connect_timeout": "1s", "protocol": "http2",
                                "endpoints": [{"address": "127.0.0.1", "port": grpc_origin}]}])
        cfg["admin"] = {"address": "127.0.0.1", "port": 0}
        d = tmp_path / str(code.value[0])
        d.mkdir()
        p = Proxy(cfg, d, ("--workers", "1"))
        p.admin_port = int(wait_for(lambda p=p: _admin_port(p)))
        with grpc.insecure_channel(f"127.0.0.1:{p.port}") as ch:
            call = ch.unary_unary("/t.Echo/Unary")
            with pytest.raises(grpc.RpcError) as err:
                call(b"hi", timeout=5)
            assert err.value.code() == code
        p.stop()


def test_fault_http2_stream_reset_during_the_delay(origin, tmp_path) -> None:
    """An HTTP/2 client that resets its stream during the delay: nothing upstream (DI,DC),
    and its other streams are served."""
    from h2.errors import ErrorCodes
    from hyperframe.frame import HeadersFrame, RstStreamFrame

    from tests.h2client import RawConnection, headers_frame, request_block

    p = fault_proxy(tmp_path, origin, {"delay": {"fixed_delay": "1s", "percentage": 100}})
    c = RawConnection(p.port)
    c.send(headers_frame(1, request_block(b"/f")))
    time.sleep(0.2)
    c.send(RstStreamFrame(1, error_code=ErrorCodes.CANCEL).serialize())
    c.send(headers_frame(3, request_block(b"/other")))
    frames = c.frames(until_close=False, wait=2.0)
    c.close()
    assert [f.stream_id for f in frames if isinstance(f, HeadersFrame)] == [3]
    assert [r.target for r in origin.requests] == [b"/other"]
    flags = sorted(e["response_flags"] for e in log_entries(tmp_path, 2))
    assert flags == ["-", "DI,DC"]
    assert stat(p, "http.ingress.fault.active_faults") == 0


def test_fault_through_the_control_planes_route(tmp_path, origin_factory) -> None:
    """A Route rule's `fault` (Istio's HTTPRoute fault) reaches a real sidecar from a real
    control plane: an abort for every request, then a delay in its place; removing it
    restores plain forwarding."""
    from tests.mesh import ControlPlane, Sidecar, service, workload

    web = origin_factory()
    cp = ControlPlane(tmp_path / "cp")
    cp.apply(service("web", 8080))
    cp.apply(workload("web-1", "web", web.port))
    client = Sidecar(cp, tmp_path / "client", "client-0", "--calls", "web")

    def route(fault: dict | None) -> dict:
        rule: dict = {"destinations": [{"destination": {"service": "web"}}]}
        if fault is not None:
            rule["fault"] = fault
        return {"apiVersion": "mesh/v1", "kind": "Route",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {"hosts": ["web"], "rules": [rule]}}

    wait_for(lambda: client.get("web")[0] == 200, 10)
    cp.apply(route({"abort": {"http_status": 503, "percentage": 100}}))
    wait_for(lambda: client.get("web")[0] == 503, 10)
    before = len(web.requests)
    status, body, _ = client.get("web")
    assert (status, body) == (503, b"fault filter abort") and len(web.requests) == before
    cp.apply(route({"delay": {"fixed_delay": "400ms", "percentage": 100}}))
    wait_for(lambda: client.get("web")[0] == 200, 10)
    t0 = time.monotonic()
    assert client.get("web")[0] == 200 and time.monotonic() - t0 >= 0.39
    status, body = cp.call("PUT", "/apis/mesh/v1/namespaces/default/routes/web",
                           route({"abort": {"percentage": 10}}))
    assert status == 400 and "spec.rules[0].fault.abort" in json.dumps(body)
    cp.apply(route(None))
    wait_for(lambda: _quick(client), 10)  # no delay any more


def _quick(client) -> bool:
    t0 = time.monotonic()
    status = client.get("web")[0]
    return status == 200 and time.monotonic() - t0 < 0.3
