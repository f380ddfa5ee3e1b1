"""config.destinations (which destination an original address and port match) and
protocol.http_inspector (whether first bytes are HTTP), sans-IO."""

from __future__ import annotations

import pytest

from meshproxy.config import schema
from meshproxy.config.destinations import (
    AUTO,
    BLACKHOLE,
    HTTP,
    TCP,
    DestinationSpec,
    DestinationTable,
)
from meshproxy.protocol.http_inspector import (
    HTTP2,
    HTTP10,
    HTTP11,
    MAX_LINE,
    NEED_MORE,
    NOT_HTTP,
    inspect,
)

UNMATCHED = DestinationSpec("BlackHoleCluster", BLACKHOLE, "BlackHoleCluster")


def _table(*matches: schema.DestinationMatch) -> DestinationTable:
    return DestinationTable(list(matches), UNMATCHED, None, 0.1, frozenset())


def test_destinations_most_specific_match_wins() -> None:
    t = _table(
        schema.DestinationMatch(port=8080, name="any-8080"),
        schema.DestinationMatch(addresses=["10.0.0.0/8"], protocol="tcp", cluster="wide"),
        schema.DestinationMatch(addresses=["10.1.0.0/16"], port=9000, protocol="tcp",
                                cluster="narrow-9000"),
        schema.DestinationMatch(addresses=["10.1.2.3"], protocol="auto", cluster="host"),
        schema.DestinationMatch(addresses=["10.1.2.3"], port=8080, name="host-8080"),
        schema.DestinationMatch(addresses=["fd00::1"], port=53, protocol="tcp", cluster="v6"))
    assert t.match("10.1.2.3", 8080).name == "host-8080"
    assert t.match("10.1.2.3", 1).name == "host" and t.match("10.1.2.3", 1).kind == AUTO
    assert t.match("10.1.9.9", 9000).name == "narrow-9000"
    assert t.match("10.1.9.9", 9001).name == "wide"  # the longer prefix needs its port
    assert t.match("10.200.0.1", 9000).name == "wide"
    assert t.match("192.0.2.1", 8080).kind == HTTP  # any address on the port
    assert t.match("fd00::1", 53).kind == TCP
    assert t.match("192.0.2.1", 1) is UNMATCHED


@pytest.mark.parametrize(("data", "found"), [
    (b"", NEED_MORE), (b"G", NEED_MORE), (b"GET /x HTT", NEED_MORE),
    (b"GET /x HTTP/1.1\r", NEED_MORE), (b"GET /x HTTP/1.1\r\nHost: a\r\n", HTTP11),
    (b"POST / HTTP/1.0\n", HTTP10), (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00", HTTP2),
    (b"PRI * HTTP/2", NEED_MORE),
    (b"\x16\x03\x01\x02\x00", NOT_HTTP),  # a TLS ClientHello
    (b"SSH-2.0-OpenSSH_9.2\r\n", NOT_HTTP), (b"ping\n", NOT_HTTP),
    (b"GET  / HTTP/1.1\r\n", NOT_HTTP), (b"GET / HTTP/2.0\r\n", NOT_HTTP),
    (b"G" * (MAX_LINE + 1), NOT_HTTP),
])
def test_destinations_http_inspector_decides_as_soon_as_it_can(data: bytes,
                                                                 found: int) -> None:
    assert inspect(data) == found
