"""The fault filter's decisions (filters.fault) and its configuration's checks: Envoy's
percentages, header controls capped by the configured share, the delay before the abort."""

from __future__ import annotations

import pytest

from meshproxy.config.load import ConfigError, decode
from meshproxy.filters.fault import NONE, FaultPolicy, FaultSpec


class Head:
    def __init__(self, **fields: str) -> None:
        self.fields = {k.replace("_", "-").encode(): v.encode() for k, v in fields.items()}

    def get(self, name: bytes) -> bytes | None:
        return self.fields.get(name)


def policy(**kw) -> FaultPolicy:
    spec = dict(delay=None, delay_fraction=0.0, header_delay=False, abort_status=0,
                abort_grpc=-1, abort_fraction=0.0, header_abort=False, max_active=-1)
    spec.update(kw)
    return FaultPolicy(FaultSpec(**spec))


def test_fault_fixed_delay_and_abort_by_draw() -> None:
    p = policy(delay=0.5, delay_fraction=0.25, abort_status=503, abort_fraction=0.1)
    assert p.decide(Head(), 0.2, 0.05).delay == 0.5
    assert p.decide(Head(), 0.2, 0.05).status == 503
    assert p.decide(Head(), 0.3, 0.05).delay == 0.0
    assert p.decide(Head(), 0.3, 0.2) is NONE


def test_fault_grpc_abort() -> None:
    d = policy(abort_grpc=14, abort_fraction=1.0).decide(Head(), 0.0, 0.0)
    assert (d.status, d.grpc_status, d.aborts) == (0, 14, True)


def test_fault_header_controls_capped_by_the_configured_share() -> None:
    p = policy(header_abort=True, abort_fraction=0.5, header_delay=True, delay_fraction=1.0)
    h = Head(x_envoy_fault_abort_request="429")
    assert p.decide(h, 0.0, 0.4).status == 429
    assert p.decide(h, 0.0, 0.6) is NONE  # past the configured 50%
    h = Head(x_envoy_fault_abort_request="429", x_envoy_fault_abort_request_percentage="100")
    assert p.decide(h, 0.0, 0.6) is NONE  # the header cannot ask for more than 50%
    h = Head(x_envoy_fault_abort_request="429", x_envoy_fault_abort_request_percentage="10")
    assert p.decide(h, 0.0, 0.2) is NONE and p.decide(h, 0.0, 0.05).status == 429
    for bad in ("99", "600", "abc", "-1", ""):
        assert p.decide(Head(x_envoy_fault_abort_request=bad), 0.0, 0.0) is NONE
    assert p.decide(Head(x_envoy_fault_abort_grpc_request="8"), 0.0, 0.0).grpc_status == 8
    assert p.decide(Head(x_envoy_fault_abort_grpc_request="17"), 0.0, 0.0) is NONE
    assert p.decide(Head(x_envoy_fault_delay_request="250"), 0.0, 0.9).delay == 0.25
    assert p.decide(Head(x_envoy_fault_delay_request="x"), 0.0, 0.9) is NONE
    # Without header_abort, the headers are nobody's business.
    assert policy().decide(Head(x_envoy_fault_abort_request="429"), 0.0, 0.0) is NONE


def config_with(fault: dict) -> dict:
    return {"listeners": [{"name": "l", "address": "127.0.0.1", "port": 1, "virtual_hosts": [
        {"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "c"}, "fault": fault}]}]}],
            "clusters": [{"name": "c", "endpoints": [{"address": "127.0.0.1", "port": 2}]}]}


@pytest.mark.parametrize("fault,message", [
    ({}, "at least one of delay, abort"),
    ({"delay": {"percentage": 10}}, "exactly one of fixed_delay, header_delay"),
    ({"delay": {"fixed_delay": "2h"}}, "at most 1h"),
    ({"abort": {"percentage": 10}}, "exactly one of http_status, grpc_status, header_abort"),
    ({"abort": {"http_status": 503, "grpc_status": 0}}, "exactly one of http_status"),
    ({"abort": {"http_status": 700}}, "fault.abort.http_status"),
    ({"abort": {"http_status": 503, "percentage": 101}}, "fault.abort.percentage"),
])
def test_fault_config_errors_name_the_field(fault, message) -> None:
    with pytest.raises(ConfigError) as err:
        decode(config_with(fault), "test")
    assert message in str(err.value)


def test_fault_config_valid() -> None:
    decode(config_with({"abort": {"grpc_status": 0}, "max_active_faults": 0}), "test")
