"""Route table cost with 1,000 routes and with 1,000 virtual hosts."""

from __future__ import annotations

import pytest

from meshproxy._core.route_table import HeaderMatcher, Route, RouteTable, VirtualHost


def _routes(n: int) -> list[Route]:
    out = []
    for i in range(n):
        if i % 4 == 0:
            out.append(Route("path", b"/svc%d/exact" % i, None, [], [], i))
        elif i % 4 == 1:
            out.append(Route("prefix", b"/svc%d/" % i, [b"GET", b"POST"], [], [], i))
        elif i % 4 == 2:
            out.append(Route("prefix", b"/svc%d/" % i, None,
                             [HeaderMatcher(b"x-version", "exact", b"v%d" % i)], [], i))
        else:
            out.append(Route("regex", rb"/svc%d/items/\d+" % i, None, [], [], i))
    return out


@pytest.fixture(scope="module")
def big_table() -> RouteTable:
    return RouteTable([(VirtualHost("all", _routes(1000)), ["*"])])


HEADERS = [(b"host", b"a"), (b"user-agent", b"x"), (b"accept", b"*/*")]


@pytest.mark.benchmark(group="route table 1,000 routes")
def test_bench_route_first_of_1000(benchmark, big_table: RouteTable) -> None:
    _, r = benchmark(big_table.route, b"a", b"GET", b"/svc0/exact", HEADERS)
    assert r.action == 0


@pytest.mark.benchmark(group="route table 1,000 routes")
def test_bench_route_middle_of_1000(benchmark, big_table: RouteTable) -> None:
    _, r = benchmark(big_table.route, b"a", b"GET", b"/svc501/x", HEADERS)
    assert r.action == 501


@pytest.mark.benchmark(group="route table 1,000 routes")
def test_bench_route_last_of_1000(benchmark, big_table: RouteTable) -> None:
    _, r = benchmark(big_table.route, b"a", b"GET", b"/svc999/items/42", HEADERS)
    assert r.action == 999


@pytest.mark.benchmark(group="route table 1,000 virtual hosts")
def test_bench_route_vhost_lookup_1000(benchmark) -> None:
    pairs = [(VirtualHost(f"h{i}", [Route("prefix", b"/", None, [], [], i)]),
              [f"svc{i}.example.com", f"*.svc{i}.internal"]) for i in range(1000)]
    table = RouteTable(pairs)
    _, r = benchmark(table.route, b"x.svc777.internal:8080", b"GET", b"/", HEADERS)
    assert r.action == 777
