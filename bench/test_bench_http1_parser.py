"""Parser cost for a typical 500-byte request head: ours vs h11 vs httptools, same run.

Each round parses one complete head and produces the method, target and header list the
proxy needs (httptools through its callbacks, h11 through its events).
"""

from __future__ import annotations

import h11
import httptools
import pytest

from meshproxy._core.http1_parser import ChunkedDecoder, HeadParser

HEAD = (
    b"GET /api/v1/users/12345/orders?page=2&sort=desc HTTP/1.1\r\n"
    b"Host: shop.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0\r\n"
    b"Accept: application/json, text/plain, */*\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NSJ9.abcdefghijkl\r\n"
    b"X-Request-Id: 7f1c2a4e-8d3b-4f5a-9c6e-1b2d3e4f5a6b\r\n"
    b"Cookie: session=abc123def456ghi789jkl012; theme=dark\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)
assert 480 <= len(HEAD) <= 520, len(HEAD)

pytestmark = pytest.mark.benchmark(group="http1 request head (500 B)")


def test_bench_parser_meshproxy(benchmark) -> None:
    parser = HeadParser()
    head = benchmark(parser.parse_request, HEAD)
    assert head.method == b"GET" and len(head.headers) == 9


def test_bench_parser_h11(benchmark) -> None:
    def parse() -> h11.Request:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(HEAD)
        return conn.next_event()

    ev = benchmark(parse)
    assert ev.method == b"GET" and len(ev.headers) == 9


class _Collect:
    __slots__ = ("headers", "url")

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))


def test_bench_parser_httptools(benchmark) -> None:
    def parse() -> _Collect:
        c = _Collect()
        p = httptools.HttpRequestParser(c)
        p.feed_data(HEAD)
        p.get_method()
        return c

    c = benchmark(parse)
    assert c.url.startswith(b"/api") and len(c.headers) == 9


CHUNKED = b"".join(b"%x\r\n%s\r\n" % (4096, b"x" * 4096) for _ in range(16)) + b"0\r\n\r\n"


@pytest.mark.benchmark(group="chunked body 64 KiB")
def test_bench_parser_chunked_decode(benchmark) -> None:
    def decode() -> int:
        dec = ChunkedDecoder()
        parts, _ = dec.feed(CHUNKED)
        return sum(map(len, parts))

    assert benchmark(decode) == 65536
