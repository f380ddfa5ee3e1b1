"""Unit tests of the compiled route table: virtual host precedence and route predicates."""

from __future__ import annotations

from meshproxy._core.route_table import HeaderMatcher, Route, RouteTable, VirtualHost


def vh(name: str, *routes: Route) -> VirtualHost:
    return VirtualHost(name, list(routes) or [Route("prefix", b"/", None, [], [], name)])


def table(*pairs: tuple[str, list[str]]) -> RouteTable:
    return RouteTable([(vh(name), domains) for name, domains in pairs])


def host(t: RouteTable, h: bytes) -> str | None:
    v = t.find_virtual_host(h)
    return v.name if v is not None else None


def test_route_table_domain_precedence() -> None:
    t = table(("exact", ["api.example.com"]), ("suffix", ["*.example.com"]),
              ("longsuffix", ["*.eu.example.com"]), ("prefix", ["api.*"]),
              ("default", ["*"]))
    assert host(t, b"api.example.com") == "exact"
    assert host(t, b"API.Example.COM:8080") == "exact"  # case and port ignored
    assert host(t, b"www.example.com") == "suffix"
    assert host(t, b"x.eu.example.com") == "longsuffix"  # the longest wildcard wins
    assert host(t, b"api.other.org") == "prefix"        # suffix beats prefix; prefix beats *
    assert host(t, b"unknown.org") == "default"
    assert host(t, b"example.com") == "default"         # a wildcard matches one char or more


def test_route_table_no_default_is_none() -> None:
    t = table(("a", ["a.com"]))
    assert host(t, b"b.com") is None
    assert t.route(b"b.com", b"GET", b"/", []) == (None, None)


def test_route_table_ipv6_host_and_empty_host() -> None:
    t = table(("v6", ["[::1]"]), ("default", ["*"]))
    assert host(t, b"[::1]:10000") == "v6"
    assert host(t, b"") == "default"


def test_route_table_suffix_with_dash_and_prefix_with_dash() -> None:
    t = table(("s", ["*-bar.foo.com"]), ("p", ["foo-*"]))
    assert host(t, b"baz-bar.foo.com") == "s"
    assert host(t, b"foo-1") == "p"
    assert host(t, b"foo") is None


def route_names(v: VirtualHost, method: bytes, target: bytes, headers: list) -> str | None:
    path, _, query = target.partition(b"?")
    r = v.find_route(method, path, query, headers)
    return r.action if r is not None else None


def test_route_table_route_predicates_first_match_wins() -> None:
    routes = [
        Route("path", b"/exact", None, [], [], "exact"),
        Route("regex", rb"/users/\d+", None, [], [], "regex"),
        Route("prefix", b"/api", [b"POST"], [], [], "post-api"),
        Route("prefix", b"/api", None, [HeaderMatcher(b"X-Env", "exact", b"canary")], [], "canary"),
        Route("prefix", b"/api", None, [HeaderMatcher(b"x-ver", "regex", rb"v[23]")], [], "v23"),
        Route("prefix", b"/api", None, [HeaderMatcher(b"x-debug", "present")], [], "debug"),
        Route("prefix", b"/api", None, [HeaderMatcher(b"authorization", "absent")], [], "anon"),
        Route("prefix", b"/q", None, [], [HeaderMatcher(b"flag", "exact", b"on", lower_name=False)],
              "query"),
        Route("prefix", b"/CI", None, [], [], "ci", case_sensitive=False),
        Route("prefix", b"/", None, [], [], "fallback"),
    ]
    v = VirtualHost("v", routes)
    auth = [(b"authorization", b"x")]
    assert route_names(v, b"GET", b"/exact", []) == "exact"
    assert route_names(v, b"GET", b"/exact?x=1", []) == "exact"   # query is not the path
    assert route_names(v, b"GET", b"/exact/more", []) == "fallback"
    assert route_names(v, b"GET", b"/users/42", []) == "regex"
    assert route_names(v, b"GET", b"/users/42x", []) == "fallback"  # regex matches in full
    assert route_names(v, b"POST", b"/api/x", auth) == "post-api"
    assert route_names(v, b"GET", b"/api/x", [(b"x-env", b"canary")] + auth) == "canary"
    assert route_names(v, b"GET", b"/api/x", [(b"x-ver", b"v3")] + auth) == "v23"
    assert route_names(v, b"GET", b"/api/x", [(b"x-ver", b"v4")] + auth) == "fallback"
    assert route_names(v, b"GET", b"/api/x", [(b"x-debug", b"")] + auth) == "debug"
    assert route_names(v, b"GET", b"/api/x", []) == "anon"
    assert route_names(v, b"GET", b"/q?a=1&flag=on", []) == "query"
    assert route_names(v, b"GET", b"/q?flag=o%6E", []) == "query"  # values are percent-decoded
    assert route_names(v, b"GET", b"/q?FLAG=on", []) == "fallback"  # names are case-sensitive
    assert route_names(v, b"GET", b"/ci/x", []) == "ci"


def test_route_table_header_matcher_joins_repeated_values_and_inverts() -> None:
    m = Route("prefix", b"/", None, [HeaderMatcher(b"x", "exact", b"a,b")], [], "joined")
    inv = Route("prefix", b"/", None, [HeaderMatcher(b"x", "exact", b"a", invert=True)], [], "inv")
    v = VirtualHost("v", [m, inv])
    assert route_names(v, b"GET", b"/", [(b"x", b"a"), (b"x", b"b")]) == "joined"
    assert route_names(v, b"GET", b"/", [(b"x", b"c")]) == "inv"
    assert route_names(v, b"GET", b"/", [(b"x", b"a")]) is None


def test_route_table_many_virtual_hosts_lookup_by_hash() -> None:
    pairs = [(f"h{i}", [f"svc{i}.example.com", f"*.svc{i}.internal"]) for i in range(1000)]
    t = table(*pairs)
    assert host(t, b"svc999.example.com") == "h999"
    assert host(t, b"x.svc500.internal") == "h500"
    assert len(t.exact) == 1000
    # wildcards are grouped by length: a handful of dict probes, not 1000 comparisons
    assert len(t.suffixes) <= 4
