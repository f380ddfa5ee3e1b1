"""Response diffing (filters.mirror_diff): paths, captures of HTTP/1.1 bytes and HTTP/2
frames, and what counts as a difference; the shadow authority (proxy.mirror)."""

from __future__ import annotations

import pytest

from meshproxy.filters.mirror_diff import ANY, Capture, DiffSpec, compare, json_path
from meshproxy.proxy.mirror import shadow_host


@pytest.mark.parametrize("text,path", [
    ("a", ("a",)), ("$.a.b", ("a", "b")), ("items[*].id", ("items", ANY, "id")),
    ("items[0]", ("items", 0)), ("*.x", (ANY, "x")), ("$", None), ("a..b", None),
    ("a.", None), ("a[x]", None), (".a", None),
])
def test_mirror_diff_json_paths(text, path) -> None:
    assert json_path(text) == path


def wire(data: bytes, pieces: int = 1, head_request: bool = False) -> Capture:
    c = Capture(1 << 20, head_request)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        c.wire(data[i:i + step])
    c.closed()
    return c


def test_mirror_diff_capture_http1_framings() -> None:
    cl = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello"
    ch = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n"
          b"x-a: 1\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n")
    close = b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nhel" + b"lo"
    for data in (cl, ch, close):
        for pieces in (1, 3, len(data)):
            c = wire(data, pieces)
            assert (c.status, c.complete, bytes(c.body)) == (200, True, b"hello"), data
            assert c.fields[b"x-a"] == b"1"
    c = wire(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", head_request=True)
    assert c.complete and c.size == 0
    c = wire(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel")
    assert not c.complete  # cut short: never compared


def h2(status: bytes, body: bytes, ctype: bytes = b"application/json") -> Capture:
    c = Capture(1 << 20)
    c.h2_fields([(b":status", b"103")], False)
    c.h2_fields([(b":status", status), (b"content-type", ctype)], False)
    c.h2_data(body, True)
    return c


def test_mirror_diff_compare() -> None:
    spec = DiffSpec((b"content-type",), (json_path("ts"), json_path("items[*].id")), 1 << 20)
    a = h2(b"200", b'{"ts": 1, "n": 1, "items": [{"id": 1, "v": "x"}]}')
    assert compare(spec, a, h2(b"200", b'{"n": 1.0, "ts": 2, "items": [{"id": 9, "v": "x"}]}'
                               )) == []
    assert compare(spec, a, h2(b"201", b'{"ts": 1, "n": 1, "items": [{"id": 1, "v": "x"}]}'
                               )) == ["status: 200 against 201"]
    assert compare(spec, a, h2(b"200", b'{"n": 2, "items": [{"v": "x"}, {"v": "y"}]}')) == [
        "body $.items: 1 items against 2", "body $.n: 1 against 2"]
    assert compare(spec, a, h2(b"200", b'{"n": true, "items": [{"v": "x"}]}')) == [
        "body $.n: 1 against true"]
    assert compare(spec, a, h2(b"200", b'{"n": 1, "x": 0, "items": [{"v": "x"}]}')) == [
        "body $.x: only in the shadow's"]
    text = DiffSpec((), (), 1 << 20)
    t = h2(b"200", b"abc", b"text/plain")
    assert compare(text, t, h2(b"200", b"abc", b"text/plain")) == []
    assert compare(text, t, h2(b"200", b"abd", b"text/plain"))[0].startswith("body: 3 bytes")
    assert compare(spec, t, h2(b"200", b"abc", b"text/html")) == [
        "header content-type: 'text/plain' against 'text/html'"]
    # A body past max_body is compared by digest only, never kept.
    small = DiffSpec((), (json_path("ts"),), 10)
    big_a, big_b = Capture(10), Capture(10)
    for c, ts in ((big_a, b"1"), (big_b, b"2")):
        c.h2_fields([(b":status", b"200"), (b"content-type", b"application/json")], False)
        c.h2_data(b'{"ts": ' + ts + b', "pad": "' + b"p" * 40 + b'"}', True)
        assert not c.kept_whole and c.body == bytearray()
    assert compare(small, big_a, big_b)[0].startswith("body:")


@pytest.mark.parametrize("host,shadow", [
    (b"svc", b"svc-shadow"), (b"svc:8080", b"svc-shadow:8080"),
    (b"[::1]:8080", b"[::1]-shadow:8080"), (b"a.b.c", b"a.b.c-shadow"),
])
def test_mirror_shadow_host(host, shadow) -> None:
    assert shadow_host(host) == shadow


@pytest.mark.parametrize("policy,name,message", [
    ({"cluster": "nope"}, "r", "request_mirror_policies[0].cluster: unknown cluster 'nope'"),
    ({"cluster": "c", "response_diff": {}}, "", "response_diff: the route needs a name"),
    ({"cluster": "c", "response_diff": {"ignore_json_paths": ["a..b"]}}, "r",
     "ignore_json_paths[0]: not a path"),
    ({"cluster": "c", "percentage": 120}, "r", "percentage"),
])
def test_mirror_config_errors_name_the_field(policy, name, message) -> None:
    from meshproxy.config.load import ConfigError, decode
    from tests.unit.test_fault import config_with

    cfg = config_with({"abort": {"http_status": 503}})
    route = cfg["listeners"][0]["virtual_hosts"][0]["routes"][0]
    del route["fault"]
    route["name"] = name
    route["route"]["request_mirror_policies"] = [policy]
    with pytest.raises(ConfigError) as err:
        decode(cfg, "test")
    assert message in str(err.value)
