"""HTTP/2 conformance and defences as raw frames against a real proxy: each case names the
RFC 9113 / RFC 7541 section (or the CVE) it enforces. A malformed request is a connection
error here (GOAWAY, RFC 9113 5.4.1 allows it for any stream error) and never reaches the
origin."""

from __future__ import annotations

import time

import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.h2client import RawConnection, headers_frame, request_block
from tests.helpers import config
from tests.integration.test_supervisor import start, stat


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    from tests.helpers import Origin

    o = Origin().start()
    p = start(tmp_path_factory.mktemp("h2c"), o, 1, cfg=config(o.port))
    p.module_scoped = True
    p.origin = o
    yield p
    p.stop()
    o.stop()


def goaway_of(p, data: bytes, settings: bool = True) -> GoAwayFrame | None:
    c = RawConnection(p.port, settings=settings)
    c.send(data)
    try:
        return c.goaway()
    finally:
        c.close()


def assert_connection_error(p, data: bytes, code: int = ErrorCodes.PROTOCOL_ERROR) -> None:
    before = len(p.origin.requests)
    g = goaway_of(p, data)
    assert g is not None and g.error_code == code, g
    assert len(p.origin.requests) == before  # the origin saw nothing of it


def test_http2_conformance_a_valid_request_is_answered(proxy) -> None:
    c = RawConnection(proxy.port)
    c.send(headers_frame(1, request_block(b"/ok")))
    frames = c.frames(until_close=False, wait=2)
    c.close()
    assert any(isinstance(f, HeadersFrame) and f.stream_id == 1 for f in frames)
    assert any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in frames)


def test_http2_conformance_bad_preface(proxy) -> None:
    """3.4: a preface that is not PRI * HTTP/2.0 ... is a connection error (on a listener
    with codec auto it is not HTTP/2 at all: an HTTP/1.1 answer, 505/400)."""
    c = RawConnection(proxy.port, settings=False)
    c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
    frames = c.frames()
    c.close()
    assert not any(isinstance(f, HeadersFrame) for f in frames)


@pytest.mark.parametrize("name,fields", [
    ("8.2.1 uppercase field name", [(b"X-Upper", b"1")]),
    ("8.2.2 connection-specific field", [(b"connection", b"keep-alive")]),
    ("8.2.2 transfer-encoding", [(b"transfer-encoding", b"chunked")]),
    ("8.2.2 te other than trailers", [(b"te", b"gzip")]),
    ("8.2.1 CR in a value", [(b"x-a", b"a\r\nx-b: smuggled")]),
    ("8.2.1 leading whitespace in a value", [(b"x-a", b" padded")]),
])
def test_http2_conformance_invalid_fields(proxy, name, fields) -> None:
    assert_connection_error(proxy, headers_frame(1, request_block(extra=fields)))


@pytest.mark.parametrize("name,pseudo", [
    ("8.3.1 no :path", [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")]),
    ("8.3.1 no :method", [(b":path", b"/"), (b":scheme", b"http"), (b":authority", b"a")]),
    ("8.3 duplicate :path", [(b":method", b"GET"), (b":path", b"/"), (b":path", b"/x"),
                             (b":scheme", b"http"), (b":authority", b"a")]),
    ("8.3 pseudo-header after a regular field", [
        (b":method", b"GET"), (b"x-a", b"1"), (b":path", b"/"), (b":scheme", b"http"),
        (b":authority", b"a")]),
    ("8.3 response pseudo-header in a request", [
        (b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
        (b":authority", b"a"), (b":status", b"200")]),
    ("8.3.1 empty :path", [(b":method", b"GET"), (b":path", b""), (b":scheme", b"http"),
                           (b":authority", b"a")]),
])
def test_http2_conformance_invalid_pseudo_headers(proxy, name, pseudo) -> None:
    assert_connection_error(proxy, headers_frame(1, request_block(pseudo=pseudo)))


def test_http2_conformance_host_differs_from_authority(proxy) -> None:
    """8.3.1: a Host that names another entity than :authority is malformed."""
    assert_connection_error(proxy, headers_frame(
        1, request_block(authority=b"a.example", extra=[(b"host", b"b.example")])))


def test_http2_conformance_content_length_mismatch(proxy) -> None:
    """8.1.1: DATA that does not add up to content-length is malformed."""
    block = request_block(method=b"POST", extra=[(b"content-length", b"10")])
    data = DataFrame(1, data=b"abc")
    data.flags.add("END_STREAM")
    g = goaway_of(proxy, headers_frame(1, block, end_stream=False) + data.serialize())
    assert g is not None and g.error_code == ErrorCodes.PROTOCOL_ERROR


def test_http2_conformance_even_stream_id(proxy) -> None:
    """5.1.1: streams a client opens have odd identifiers."""
    assert_connection_error(proxy, headers_frame(2, request_block()))


def test_http2_conformance_data_on_stream_zero(proxy) -> None:
    """6.1: DATA on stream 0 is a connection error of type PROTOCOL_ERROR."""
    # Written by hand: hyperframe refuses to build it (length 1, type DATA, stream 0).
    assert_connection_error(proxy, b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")


def test_http2_conformance_frame_larger_than_max_frame_size(proxy) -> None:
    """4.2: a frame beyond SETTINGS_MAX_FRAME_SIZE (16,384 by default) is FRAME_SIZE_ERROR."""
    block = request_block(method=b"POST")
    big = DataFrame(1, data=b"x" * 20_000).serialize()
    assert_connection_error(proxy, headers_frame(1, block, end_stream=False) + big,
                            ErrorCodes.FRAME_SIZE_ERROR)


def test_http2_conformance_window_overflow(proxy) -> None:
    """6.9.1: a WINDOW_UPDATE that takes the window past 2^31-1 is FLOW_CONTROL_ERROR."""
    assert_connection_error(proxy, WindowUpdateFrame(0, window_increment=2**31 - 1)
                            .serialize(), ErrorCodes.FLOW_CONTROL_ERROR)


@pytest.mark.parametrize("setting,value,code", [
    (SettingsFrame.ENABLE_PUSH, 2, ErrorCodes.PROTOCOL_ERROR),             # 6.5.2
    (SettingsFrame.INITIAL_WINDOW_SIZE, 2**31, ErrorCodes.FLOW_CONTROL_ERROR),  # 6.5.2
    (SettingsFrame.MAX_FRAME_SIZE, 100, ErrorCodes.PROTOCOL_ERROR),        # 6.5.2
])
def test_http2_conformance_invalid_settings(proxy, setting, value, code) -> None:
    assert_connection_error(proxy, SettingsFrame(0, settings={setting: value}).serialize(),
                            code)


def test_http2_conformance_headers_on_a_closed_stream(proxy) -> None:
    """5.1: a stream closed by END_STREAM both ways cannot carry HEADERS again."""
    c = RawConnection(proxy.port)
    c.send(headers_frame(1, request_block()))
    c.frames(until_close=False, wait=1.0)
    c.send(headers_frame(1, request_block()))
    g = next((f for f in c.frames() if isinstance(f, GoAwayFrame)), None)
    c.close()
    assert g is not None and g.error_code == ErrorCodes.STREAM_CLOSED


def test_http2_conformance_hpack_bomb(proxy) -> None:
    """RFC 7541 7.3 / 4.2: a block decoding past max_request_headers_kb (60 KiB) ends the
    connection (ENHANCE_YOUR_CALM) before anything reaches the origin."""
    enc = Encoder()
    fields = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
              (b":authority", b"a")]
    # One 4 KiB field indexed once, then referenced 40 times: a ~80-byte block that
    # decodes into 160 KiB.
    first = enc.encode(fields + [(b"x-bomb", b"b" * 4000)])
    index = enc.encode([(b"x-bomb", b"b" * 4000)])  # now an indexed reference (1-2 bytes)
    block = first + index * 40
    before = len(proxy.origin.requests)
    g = goaway_of(proxy, headers_frame(1, block))
    assert g is not None and g.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert len(proxy.origin.requests) == before
    assert stat(proxy, "http.ingress.http2.header_overflow") >= 1


def test_http2_conformance_empty_data_flood(proxy) -> None:
    """CVE-2019-9518: DATA frames with no payload and no END_STREAM in a row (Envoy's
    max_consecutive_inbound_frames_with_empty_payload, 1)."""
    block = request_block(method=b"POST")
    empties = DataFrame(1, data=b"").serialize() * 10
    g = goaway_of(proxy, headers_frame(1, block, end_stream=False) + empties)
    assert g is not None and g.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert stat(proxy, "http.ingress.http2.inbound_empty_frames_flood") >= 1


def test_http2_conformance_rapid_reset(proxy) -> None:
    """CVE-2023-44487: streams opened and reset at once. Past 500 streams, a connection
    whose streams are half premature resets is closed (Envoy's rule); the origin sees
    bounded work."""
    before = len(proxy.origin.requests)
    c = RawConnection(proxy.port)
    enc = Encoder()
    sid = 1
    closed = None
    for _batch in range(20):
        data = b""
        for _ in range(100):
            data += headers_frame(sid, enc.encode([
                (b":method", b"GET"), (b":path", b"/rr"), (b":scheme", b"http"),
                (b":authority", b"a")]))
            data += RstStreamFrame(sid, error_code=ErrorCodes.CANCEL).serialize()
            sid += 2
        c.send(data)
        frames = c.frames(until_close=False, wait=0.3)
        closed = next((f for f in frames if isinstance(f, GoAwayFrame)), None)
        if closed is not None:
            break
    c.close()
    assert closed is not None and closed.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert sid < 2 * 1200  # closed soon after the 500-stream threshold
    assert len(proxy.origin.requests) - before <= 700
    assert stat(proxy, "http.ingress.downstream_rq_too_many_premature_resets") == 1


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_http2_conformance_control_frame_flood(proxy, kind) -> None:
    """CVE-2019-9512 (PING) and CVE-2019-9515 (SETTINGS): each frame makes the server queue
    an ACK; a client that sends them without reading floods the server's output. Past
    max_outbound_control_frames (1,000) queued the connection is closed (its GOAWAY
    ENHANCE_YOUR_CALM queued behind the ACKs the client never reads), counted."""
    c = RawConnection(proxy.port, rcvbuf=4096)
    one = (PingFrame(0, opaque_data=b"12345678").serialize() if kind == "ping"
           else SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: 16384}).serialize())
    before = stat(proxy, "http.ingress.http2.outbound_control_flood")
    sent = 0
    start = time.monotonic()
    try:
        for _ in range(200):
            c.sock.sendall(one * 1000)
            sent += 1000
    except OSError:
        pass  # the proxy closed mid-flood: the end of the sendall
    frames = c.frames()  # until the proxy's close
    c.close()
    assert time.monotonic() - start < 15
    assert sent < 200_000  # the proxy stopped reading and closed well before the end
    acks = sum(1 for f in frames if isinstance(f, (PingFrame, SettingsFrame)))
    assert acks < 5_000  # what was queued before the flood showed, and socket buffers
    assert stat(proxy, "http.ingress.http2.outbound_control_flood") == before + 1
