"""The exchange's decisions (meshproxy/_core/http1_conn.pyx) against h11, the oracle: the
framing of every request and response RFC 9112 6.3 allows, and what the proxy writes to its
client about framing and persistence, which h11 (as the client's server) must accept and
frame the same way. Hypothesis draws the heads; h11's own choices are compared, not
re-implemented here."""

from __future__ import annotations

import h11
from h11._connection import _body_framing
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy._core import http1_conn as c
from meshproxy._core.http1_parser import HeadParser

P = HeadParser()
FRAMING = {b"content-length", b"transfer-encoding", b"connection"}

methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE"])
versions = st.sampled_from([b"1.0", b"1.1"])
conn_fields = st.sampled_from([None, b"close", b"keep-alive"])
statuses = st.sampled_from([200, 201, 204, 301, 304, 404, 500, 503])
bodies = st.one_of(st.none(), st.integers(0, 10_000).map(lambda n: ("length", n)),
                   st.just(("chunked", 0)))


def _head(first: bytes, extra: list[bytes], conn: bytes | None, body) -> bytes:
    lines = [first, *extra]
    if conn is not None:
        lines.append(b"connection: " + conn)
    if body is not None:
        kind, n = body
        lines.append(b"content-length: %d" % n if kind == "length"
                     else b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _request(method: bytes, version: bytes, conn: bytes | None, body) -> bytes:
    return _head(method + b" / HTTP/" + version, [b"host: a"], conn, body)


def _response(status: int, version: bytes, conn: bytes | None, body) -> bytes:
    return _head(b"HTTP/" + version + b" %d X" % status, [], conn, body)


H11_KIND = {"chunked": c.FRAMING_CHUNKED, "http/1.0": c.FRAMING_CLOSE}


def _h11_kind(framing: tuple) -> tuple[int, int]:
    kind, args = framing
    if kind == "content-length":
        return (c.FRAMING_LENGTH, args[0])
    return (H11_KIND[kind], -1)


def _ours(kind: int, head) -> tuple[int, int]:
    if kind == c.FRAMING_NONE:
        return (c.FRAMING_LENGTH, 0)  # h11 says content-length 0 for "no body"
    if kind == c.FRAMING_LENGTH:
        return (kind, head.content_length)
    return (kind, -1)


@settings(max_examples=400, deadline=None)
@given(methods, versions, conn_fields, bodies)
def test_http1_conn_request_framing_is_h11s(method, version, conn, body) -> None:
    raw = _request(method, version, conn, body)
    if version == b"1.0" and body is not None and body[0] == "chunked":
        # Refused by the parser (400: Transfer-Encoding in an HTTP/1.0 request, RFC 9112
        # 6.1's advice against trusting it, a smuggling vector); h11 accepts it.
        return
    head = P.parse_request(raw)
    ev = h11.Request(method=method, target=b"/", headers=_fields(raw),
                     http_version=version)
    assert _ours(c.request_framing(head), head) == _h11_kind(_body_framing(method, ev))


@settings(max_examples=400, deadline=None)
@given(methods, statuses, versions, conn_fields, bodies)
def test_http1_conn_response_framing_is_h11s(method, status, version, conn, body) -> None:
    raw = _response(status, version, conn, body)
    resp = P.parse_response(raw)
    ev = h11.Response(status_code=status, headers=_fields(raw), http_version=version)
    assert _ours(c.response_framing(method, resp), resp) == \
        _h11_kind(_body_framing(method, ev))


@settings(max_examples=600, deadline=None)
@given(methods, versions, conn_fields, statuses, versions, conn_fields, bodies,
       st.booleans())
def test_http1_conn_plan_is_what_h11_would_frame_and_keep(
        method, req_version, req_conn, status, resp_version, resp_conn, body,
        may_keep) -> None:
    """The proxy's response to its client, as an h11 server sends it: h11 accepts our
    framing fields, frames the body as we planned, and agrees on whether the connection
    lives on (where h11 has an answer: it never keeps an HTTP/1.0 connection alive, which
    RFC 9112 9.3 allows with `Connection: keep-alive`; that case is checked apart)."""
    req_raw = _request(method, req_version, req_conn, None)
    req = P.parse_request(req_raw)
    resp = P.parse_response(_response(status, resp_version, resp_conn, body))
    plan = c.plan_response(req, resp, True, may_keep)
    server = h11.Connection(h11.SERVER)
    server.receive_data(req_raw)
    assert isinstance(server.next_event(), h11.Request)
    assert isinstance(server.next_event(), h11.EndOfMessage)
    headers = [(k, v) for k, v in resp.headers if k not in FRAMING] + list(plan.extra)
    server.send(h11.Response(status_code=status, headers=headers))
    writer_framing = server._writer  # what h11 decided for the body it writes
    if plan.down_chunked:
        assert type(writer_framing).__name__ == "ChunkedWriter"
    elif plan.framing == c.FRAMING_LENGTH:
        assert type(writer_framing).__name__ == "ContentLengthWriter"
    elif plan.framing == c.FRAMING_CLOSE:  # an HTTP/1.0 client: until the close
        assert type(writer_framing).__name__ == "Http10Writer"
    payload = b"x" * (resp.content_length if plan.framing == c.FRAMING_LENGTH
                      and method != b"HEAD" else 0)
    if payload:
        server.send(h11.Data(data=payload))
    server.send(h11.EndOfMessage())
    h11_keeps = server.our_state is h11.DONE
    if req.version == 11:
        assert plan.keep == h11_keeps, (plan.keep, server.our_state, plan.extra)
    else:
        assert not h11_keeps  # h11's rule for HTTP/1.0
        assert plan.keep == (req.keep_alive and may_keep
                             and plan.framing not in (c.FRAMING_CHUNKED, c.FRAMING_CLOSE))
        assert ((b"connection", b"keep-alive") in plan.extra) == plan.keep


def _fields(raw: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in raw.split(b"\r\n")[1:]:
        if line:
            k, _, v = line.partition(b":")
            out.append((k.strip(), v.strip()))
    return out


def test_http1_conn_state_table_keeps_alive_behind_one_predicate() -> None:
    s = c.ConnState()
    assert s.event(0, c.EV_REQUEST) == c.SEND_BODY
    assert s.event(0, c.EV_END) == c.DONE
    assert s.event(1, c.EV_INFORMATIONAL) == c.IDLE
    assert s.event(1, c.EV_RESPONSE) == c.SEND_BODY
    assert not s.next_cycle()  # the response is not done yet
    assert s.event(1, c.EV_END) == c.DONE
    assert s.next_cycle() and (s.client, s.server) == (c.IDLE, c.IDLE)
    s.event(0, c.EV_REQUEST)
    s.no_keep_alive()  # Connection: close on the request
    s.event(0, c.EV_END)
    s.event(1, c.EV_RESPONSE)
    assert s.event(1, c.EV_END) == c.MUST_CLOSE
    assert not s.next_cycle()
    t = c.ConnState()
    assert t.event(1, c.EV_RESPONSE) == c.ERROR  # a response before any request
    u = c.ConnState()
    u.event(0, c.EV_REQUEST)
    assert u.event(1, c.EV_SWITCH) == c.SWITCHED and u.client == c.SWITCHED


def test_http1_conn_informational_only_to_http11() -> None:
    r11 = P.parse_request(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    r10 = P.parse_request(b"GET / HTTP/1.0\r\n\r\n")
    assert c.relay_informational(r11, 103) and c.relay_informational(r11, 100)
    assert not c.relay_informational(r10, 103)
    assert not c.relay_informational(r11, 101) and not c.relay_informational(r11, 200)
