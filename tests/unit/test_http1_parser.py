"""Unit tests of the compiled HTTP/1.1 parser: heads, framing facts, chunked, limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshproxy._core.http1_parser import (
    ChunkedDecoder,
    HeadParser,
    ParseError,
    encode_chunk,
    encode_last_chunk,
    serialize_head,
)

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
P = HeadParser()


def parse_message(data: bytes, parser: HeadParser = P) -> tuple:
    """Head plus decoded body, as the proxy would see the whole message."""
    head = parser.parse_request(data)
    if head is None:
        return None, None
    if head.chunked:
        dec = ChunkedDecoder()
        parts, _ = dec.feed(data, head.end)
        return head, b"".join(parts)
    return head, data[head.end:head.end + max(head.content_length, 0)]


def corpus_cases() -> list[Path]:
    return sorted(CORPUS.glob("*.http"))


def parse_response_message(data: bytes) -> tuple:
    head = P.parse_response(data)
    if head is None:
        return None, None
    if head.chunked:
        parts, _ = ChunkedDecoder(error_status=502).feed(data, head.end)
        return head, b"".join(parts)
    return head, data[head.end:head.end + max(head.content_length, 0)]


# The corpus names say what must happen to each file's bytes:
#   <status>_<name>.http           a request refused with that status (400, 414, 431, ...)
#   502_response_<name>.http       an origin's response refused (the proxy answers 502 UPE)
#   200_<name>.http                a request accepted: one message, and its framed body is
#                                  exactly the rest of the file (nothing left to smuggle)
@pytest.mark.parametrize("path", corpus_cases(), ids=lambda p: p.stem)
def test_http1_parser_corpus(path: Path) -> None:
    data = path.read_bytes()
    expected = int(path.stem.split("_", 1)[0])
    if expected == 200:
        head, body = parse_message(data)
        assert head is not None
        framed_end = len(data) if head.chunked else head.end + head.content_length
        assert framed_end == len(data), "the file must hold exactly one message"
        assert body == b"hello"
        return
    parse = parse_response_message if "_response_" in path.name else parse_message
    with pytest.raises(ParseError) as info:
        head, _ = parse(data)
        assert head is not None, "an incomplete parse must not hide a malformed message"
    assert info.value.status == expected, info.value.reason


def test_http1_parser_corpus_is_not_empty() -> None:
    assert len(corpus_cases()) >= 70


def test_http1_parser_request_fields_and_framing() -> None:
    data = (b"POST /a/b?x=1 HTTP/1.1\r\nHost: Example.com\r\nContent-Length: 5\r\n"
            b"X-Thing:  v  \r\nConnection: keep-alive, X-Drop\r\nUpgrade: websocket\r\n"
            b"X-Request-Id: abc\r\nX-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n"
            b"Expect: 100-continue\r\n\r\nhelloGET")
    h = P.parse_request(data)
    assert h.method == b"POST" and h.target == b"/a/b?x=1" and h.version == 11
    assert h.end == data.index(b"hello")
    assert h.content_length == 5 and not h.chunked
    assert h.host == b"Example.com"
    assert (b"x-thing", b"v") in h.headers  # names lowercased, OWS stripped
    assert h.conn_keep_alive and h.conn_extra == [b"x-drop"] and not h.conn_upgrade
    assert h.upgrade == b"websocket" and h.expect_continue
    assert h.request_id == b"abc"
    assert h.forwarded_for == b"1.1.1.1, 2.2.2.2"
    assert h.keep_alive


def test_http1_parser_incremental_head_byte_by_byte() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n"
    for i in range(1, len(data)):
        assert P.parse_request(data[:i]) is None
    assert P.parse_request(data).end == len(data)


def test_http1_parser_skips_leading_empty_lines() -> None:
    h = P.parse_request(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.method == b"GET"


def test_http1_parser_keep_alive_rules() -> None:
    assert not P.parse_request(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert P.parse_request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive
    assert not P.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive
    assert P.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").keep_alive


def test_http1_parser_identical_content_lengths_accepted() -> None:
    h = P.parse_request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n"
                        b"Content-Length: 3\r\n\r\nabc")
    assert h.content_length == 3


def test_http1_parser_obs_text_in_value_allowed() -> None:
    h = P.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: caf\xc3\xa9\r\n\r\n")
    assert h.get(b"x-a") == b"caf\xc3\xa9"


def test_http1_parser_configured_limits() -> None:
    small = HeadParser(max_request_line=64, max_header_bytes=200, max_headers=2)
    with pytest.raises(ParseError) as e:
        small.parse_request(b"GET /" + b"a" * 80 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert e.value.status == 414
    with pytest.raises(ParseError) as e:
        small.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n")
    assert e.value.status == 431
    with pytest.raises(ParseError) as e:
        small.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nA: " + b"v" * 300 + b"\r\n\r\n")
    assert e.value.status == 431


def test_http1_parser_response_heads() -> None:
    r = P.parse_response(b"HTTP/1.1 204 No Content\r\nX: 1\r\n\r\n")
    assert r.status == 204 and r.reason == b"No Content" and r.headers == [(b"x", b"1")]
    r = P.parse_response(b"HTTP/1.0 200\r\n\r\n")  # reason phrase is optional
    assert r.status == 200 and r.version == 10 and not r.keep_alive
    r = P.parse_response(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
    assert r.status == 103


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 099 OK\r\n\r\n",
    b"HTTP/1.1  200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    b"ICY 200 OK\r\n\r\n",
])
def test_http1_parser_rejects_broken_responses(data: bytes) -> None:
    with pytest.raises(ParseError):
        P.parse_response(data)


def test_chunked_decoder_byte_by_byte_with_trailers() -> None:
    data = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT"
    dec = ChunkedDecoder()
    out = []
    pos = 0
    for i in range(len(data)):
        parts, pos = dec.feed(data[i:i + 1])
        out += parts
        if dec.done:
            break
    assert b"".join(out) == b"hello0123456789"
    assert dec.trailers == [(b"x-t", b"1")]
    assert data[i + 1:] == b"NEXT"


def test_chunked_decoder_returns_position_after_message() -> None:
    data = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n"
    dec = ChunkedDecoder()
    parts, pos = dec.feed(data)
    assert dec.done and parts == [b"abc"] and data[pos:] == b"GET / HTTP/1.1\r\n"


def test_chunked_decoder_bounds_size_line() -> None:
    dec = ChunkedDecoder()
    with pytest.raises(ParseError):
        dec.feed(b"1;" + b"x" * 5000)


def test_chunked_decoder_error_status_for_responses() -> None:
    with pytest.raises(ParseError) as e:
        ChunkedDecoder(error_status=502).feed(b"zz\r\n")
    assert e.value.status == 502


def test_encode_chunk_roundtrip() -> None:
    wire = encode_chunk(b"abc") + encode_chunk(b"") + encode_last_chunk([(b"x-t", b"2")])
    assert wire == b"3\r\nabc\r\n0\r\nx-t: 2\r\n\r\n"
    dec = ChunkedDecoder()
    parts, _ = dec.feed(wire)
    assert parts == [b"abc"] and dec.done and dec.trailers == [(b"x-t", b"2")]


def test_serialize_head_skips_and_adds() -> None:
    out = serialize_head(b"GET / HTTP/1.1", [(b"a", b"1"), (b"connection", b"x"), (b"b", b"2")],
                         frozenset({b"connection"}), [(b"host", b"h")])
    assert out == b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nhost: h\r\n\r\n"


def test_http1_parser_notes_deadline_headers() -> None:
    h = P.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nGRPC-Timeout: 100m\r\n"
                        b"X-Meshproxy-Deadline-Ms: 250\r\nX-Meshproxy-Deadline-Ms: 900\r\n\r\n")
    assert h.grpc_timeout == b"100m" and h.deadline_ms == b"250"  # the first one counts
    h = P.parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.grpc_timeout is None and h.deadline_ms is None
