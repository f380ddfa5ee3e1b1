"""An HTTP/2 request's fields as the HTTP/1.1 head the compiled parser reads
(meshproxy._core.h2_fields.request_head): each case names the rule it holds."""

from __future__ import annotations

from hpack import NeverIndexedHeaderTuple

from meshproxy._core.h2_fields import BODY_AS_IS, BODY_CHUNKED, BODY_TUNNEL, request_head
from meshproxy._core.http1_parser import HeadParser

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/a?b"),
       (b":authority", b"svc.example")]


def test_h2_request_head_authority_becomes_host() -> None:
    """RFC 9113 8.3.1: :authority as Host, the other fields in order."""
    head, body, never = request_head(GET + [(b"accept", b"*/*")], True)
    assert head == (b"GET /a?b HTTP/1.1\r\naccept: */*\r\nhost: svc.example\r\n\r\n")
    assert body == BODY_AS_IS and never is None
    parsed = HeadParser().parse_request(head)
    assert parsed.host == b"svc.example" and parsed.target == b"/a?b"


def test_h2_request_head_host_kept_when_sent() -> None:
    head, _, _ = request_head(GET + [(b"host", b"svc.example")], True)
    assert head.count(b"host:") == 1


def test_h2_request_head_body_without_length_is_chunked() -> None:
    """A body to come without content-length is re-framed chunked for the origin."""
    post = [(b":method", b"POST")] + GET[1:]
    head, body, _ = request_head(post, False)
    assert body == BODY_CHUNKED and b"transfer-encoding: chunked\r\n" in head
    head, body, _ = request_head(post + [(b"content-length", b"3")], False)
    assert body == BODY_AS_IS and b"transfer-encoding" not in head
    head, body, _ = request_head(post, True)  # no body at all
    assert body == BODY_AS_IS and b"transfer-encoding" not in head


def test_h2_request_head_connect() -> None:
    """RFC 9113 8.5: a plain CONNECT's target is its authority."""
    head, body, _ = request_head([(b":method", b"CONNECT"), (b":authority", b"h:443")], False)
    assert head.startswith(b"CONNECT h:443 HTTP/1.1\r\n") and body == BODY_CHUNKED


def test_h2_request_head_extended_connect_is_an_upgrade() -> None:
    """RFC 8441 4/5: CONNECT with :protocol is the HTTP/1.1 upgrade, with a made-up
    Sec-WebSocket-Key (RFC 6455 4.1), its DATA a tunnel's bytes."""
    fields = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
              (b":path", b"/ws"), (b":authority", b"a")]
    head, body, _ = request_head(fields, False)
    parsed = HeadParser().parse_request(head)
    assert body == BODY_TUNNEL and parsed.method == b"GET" and parsed.upgrade == b"websocket"
    assert len(parsed.get(b"sec-websocket-key")) == 24
    head, _, _ = request_head(fields + [(b"sec-websocket-key", b"k")], False)
    assert head.count(b"sec-websocket-key") == 1


def test_h2_request_head_never_indexed_fields() -> None:
    """RFC 7541 7.1.3: the fields sent never-indexed are returned, to stay so upstream."""
    fields = GET + [NeverIndexedHeaderTuple(b"authorization", b"secret"), (b"x-a", b"1")]
    _, _, never = request_head(fields, True)
    assert never == frozenset({(b"authorization", b"secret")})
