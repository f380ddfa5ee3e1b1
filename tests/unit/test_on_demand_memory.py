"""On-demand discovery's pieces without processes: which authorities may name a service,
and the workers' rings of asked-for authorities in shared memory."""

from __future__ import annotations

from meshproxy.process.demand_memory import RING, DemandMemory
from meshproxy.protocol.authority import service_authority


def test_service_authority_takes_dns_names_without_their_port() -> None:
    assert service_authority(b"Reviews.Shop:9080") == b"reviews.shop"
    assert service_authority(b"reviews") == b"reviews"
    for bad in (b"127.0.0.1", b"127.0.0.1:80", b"[::1]:80", b"", b"a..b", b"-x", b"x y",
                b"a" * 254, b"evil/../x", b"host:99999999"):
        assert service_authority(bad) is None, bad


def test_demand_memory_carries_authorities_from_each_worker() -> None:
    sup = DemandMemory(2)
    w0, w1 = DemandMemory(2, sup.fd), DemandMemory(2, sup.fd)  # the workers' mappings
    w0.note(0, b"reviews")
    w1.note(1, b"ratings.shop")
    assert sup.read_new() == {"reviews", "ratings.shop"}
    assert sup.read_new() == set()  # read once
    for i in range(RING + 10):  # a worker far ahead: the last RING entries are read
        w0.note(0, b"s%d" % i)
    got = sup.read_new()
    assert len(got) == RING and "s10" in got and f"s{RING + 9}" in got and "s9" not in got
    sup.reset(0)  # a replaced worker starts its ring again
    DemandMemory(2, sup.fd).note(0, b"again")
    assert sup.read_new() == {"again"}
