"""Differential test: for hypothesis-generated valid requests, our parser and h11 (the
oracle) must agree on method, target, headers and body, however the bytes are split."""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy._core.http1_parser import ChunkedDecoder, HeadParser

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
RESERVED = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade",
            "te", "trailer", "keep-alive"}

token = st.text(alphabet=TCHARS, min_size=1, max_size=12)
method = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]) | token.map(str.upper)
target = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/?=&%", max_size=40).map(
    lambda s: "/" + s)
value = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F)] + [" ", "\t"],
                max_size=30).map(str.strip)
header = st.tuples(token.filter(lambda n: n.lower() not in RESERVED), value)


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, dict]:
    m = draw(method)
    t = draw(target)
    headers = [("Host", draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz.", min_size=1,
                                     max_size=20)))]
    headers += draw(st.lists(header, max_size=8))
    body = draw(st.binary(max_size=300))
    chunked = draw(st.booleans())
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces, prev = [], 0
        for c in [*cuts, len(body)]:
            if c > prev:
                pieces.append(body[prev:c])
                prev = c
        wire_body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    else:
        if body or draw(st.booleans()):
            headers.append(("Content-Length", str(len(body))))
        else:
            body = b""
        wire_body = body
    head = f"{m} {t} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode() + wire_body, {"body": body}


def oracle(data: bytes) -> tuple:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    req, body = None, []
    while True:
        ev = conn.next_event()
        if isinstance(ev, h11.Request):
            req = ev
        elif isinstance(ev, h11.Data):
            body.append(bytes(ev.data))
        elif isinstance(ev, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"h11 did not finish: {ev!r}")
    assert req is not None
    return req.method, req.target, [(k, v) for k, v in req.headers], b"".join(body)


def ours(data: bytes, splits: list[int]) -> tuple:
    parser = HeadParser()
    buf = b""
    head = None
    pieces = []
    prev = 0
    for cut in [*sorted(splits), len(data)]:
        if cut > prev:
            pieces.append(data[prev:cut])
            prev = cut
    it = iter(pieces)
    for piece in it:
        buf += piece
        head = parser.parse_request(buf)
        if head is not None:
            break
    assert head is not None
    rest = buf[head.end:] + b"".join(it)
    if head.chunked:
        dec = ChunkedDecoder()
        parts, _ = dec.feed(rest)
        assert dec.done
        body = b"".join(parts)
    else:
        body = rest[:max(head.content_length, 0)]
    return head.method, head.target, head.headers, body


@settings(max_examples=400, deadline=None)
@given(requests(), st.lists(st.integers(0, 400), max_size=5))
def test_differential_parser_agrees_with_h11(req: tuple[bytes, dict], splits: list[int]) -> None:
    data, meta = req
    splits = [s for s in splits if s < len(data)]
    expected = oracle(data)
    got = ours(data, splits)
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert got[2] == expected[2]
    assert got[3] == expected[3] == meta["body"]
