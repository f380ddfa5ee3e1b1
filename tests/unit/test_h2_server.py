"""The compiled HTTP/2 server connection (meshproxy._core.h2_server) frame by frame: each
case names the RFC 9113 section it holds the connection to, and checks the error (a
GOAWAY with its code, or a RST_STREAM) and what the events say."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from meshproxy._core import h2_server as hs
from meshproxy._core.h2_server import H2ServerConnection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
       (b":authority", b"a.example")]


def frames_of(data: bytes) -> list[Frame]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


class Client:
    """A connection past its preface, with an HPACK encoder of the client's side."""

    def __init__(self, **settings: int) -> None:
        self.conn = H2ServerConnection(**settings)
        self.conn.initiate_connection()
        self.enc = Encoder()
        self.events = self.conn.receive_data(PREFACE + SettingsFrame(0).serialize())
        self.sent = frames_of(self.conn.data_to_send())

    def feed(self, *frames: Frame | bytes) -> list:
        data = b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
        return self.conn.receive_data(data)

    def out(self) -> list[Frame]:
        return frames_of(self.conn.data_to_send())

    def headers(self, sid: int, fields=GET, end_stream: bool = True, **kw) -> HeadersFrame:
        f = HeadersFrame(sid, self.enc.encode(fields), **kw)
        f.flags.add("END_HEADERS")
        if end_stream:
            f.flags.add("END_STREAM")
        return f

    def connection_error(self, *frames: Frame | bytes) -> GoAwayFrame:
        with pytest.raises(ProtocolError) as exc:
            self.feed(*frames)
        goaway = [f for f in self.out() if isinstance(f, GoAwayFrame)]
        assert len(goaway) == 1
        assert goaway[0].error_code == exc.value.error_code
        assert self.feed(PingFrame(0, b"12345678")) == []  # nothing more is taken
        return goaway[0]


def data(sid: int, payload: bytes, end: bool = False, **kw) -> DataFrame:
    f = DataFrame(sid, payload, **kw)
    if end:
        f.flags.add("END_STREAM")
    return f


def test_h2_server_preface_and_settings() -> None:
    """3.4: the server's SETTINGS go first; the client's SETTINGS are acknowledged."""
    c = Client(max_concurrent_streams=7, initial_window=1 << 20)
    settings = [f for f in c.sent if isinstance(f, SettingsFrame)]
    assert settings[0].settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 7
    assert settings[0].settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 1 << 20
    assert settings[0].settings[SettingsFrame.ENABLE_PUSH] == 0
    assert any("ACK" in f.flags for f in settings)
    assert [type(e) for e in c.events] == [hs.RemoteSettingsChanged]


def test_h2_server_bad_preface() -> None:
    """3.4: anything but the preface is PROTOCOL_ERROR; a prefix of it waits."""
    conn = H2ServerConnection()
    assert conn.receive_data(PREFACE[:10]) == []
    with pytest.raises(ProtocolError):
        conn.receive_data(b"XX")


def test_h2_server_first_frame_is_settings() -> None:
    """3.4: the client's preface ends with a SETTINGS frame."""
    conn = H2ServerConnection()
    with pytest.raises(ProtocolError):
        conn.receive_data(PREFACE + PingFrame(0, b"12345678").serialize())


def test_h2_server_request_and_response() -> None:
    c = Client()
    ev = c.feed(c.headers(1))
    assert [type(e) for e in ev] == [hs.RequestReceived, hs.StreamEnded]
    assert ev[0].stream_id == 1 and ev[0].stream_ended is ev[1]
    assert list(ev[0].headers) == GET
    c.conn.send_headers(1, [(b":status", b"200")])
    c.conn.send_data(1, b"hello", end_stream=True)
    out = c.out()
    assert isinstance(out[0], HeadersFrame) and "END_HEADERS" in out[0].flags
    assert isinstance(out[1], DataFrame) and out[1].data == b"hello"
    assert "END_STREAM" in out[1].flags
    with pytest.raises(StreamClosedError):
        c.conn.send_data(1, b"more")


def test_h2_server_body_trailers_and_cookies() -> None:
    """8.1: DATA then trailers with END_STREAM; 8.2.3: cookies joined."""
    c = Client()
    fields = [(b":method", b"POST")] + GET[1:] + [(b"cookie", b"a=1"), (b"cookie", b"b=2")]
    ev = c.feed(c.headers(1, fields, end_stream=False), data(1, b"abc"))
    assert (b"cookie", b"a=1; b=2") in ev[0].headers
    assert isinstance(ev[1], hs.DataReceived) and ev[1].data == b"abc"
    assert ev[1].flow_controlled_length == 3 and ev[1].stream_ended is None
    ev = c.feed(c.headers(1, [(b"x-t", b"1")]))
    assert [type(e) for e in ev] == [hs.TrailersReceived, hs.StreamEnded]


def test_h2_server_padding_counts_against_the_window() -> None:
    """6.1: padding is flow-controlled; the data is what is left of it."""
    c = Client()
    c.feed(c.headers(1, [(b":method", b"POST")] + GET[1:], end_stream=False))
    f = data(1, b"abc", pad_length=10)
    f.flags.add("PADDED")
    ev = c.feed(f)
    assert ev[0].data == b"abc" and ev[0].flow_controlled_length == 14


def test_h2_server_trailers_without_end_stream() -> None:
    """8.1: trailers end the stream."""
    c = Client()
    c.feed(c.headers(1, [(b":method", b"POST")] + GET[1:], end_stream=False))
    c.connection_error(c.headers(1, [(b"x-t", b"1")], end_stream=False))


@pytest.mark.parametrize("cl,body,end", [(b"10", b"abc", True), (b"2", b"abc", False),
                                         (b"3", b"", True), (b"x", b"", False)])
def test_h2_server_content_length(cl, body, end) -> None:
    """8.1.1: DATA that does not add up to content-length is malformed."""
    c = Client()
    fields = [(b":method", b"POST")] + GET[1:] + [(b"content-length", cl)]
    frames: list = [c.headers(1, fields, end_stream=not body and end)]
    if body:
        frames.append(data(1, body, end))
    assert c.connection_error(*frames).error_code == ErrorCodes.PROTOCOL_ERROR


def test_h2_server_content_length_on_headers_alone() -> None:
    c = Client()
    fields = [(b":method", b"POST")] + GET[1:] + [(b"content-length", b"5")]
    c.connection_error(c.headers(1, fields))


def test_h2_server_invalid_fields_are_connection_errors() -> None:
    """8.2.1: uppercase names (h2_fields holds the rest of 8.2 and 8.3)."""
    c = Client()
    c.connection_error(c.headers(1, GET + [(b"X-Up", b"1")]))


@pytest.mark.parametrize("sid", [2, 0])
def test_h2_server_stream_ids(sid) -> None:
    """5.1.1: a client's streams are odd; 6.2: HEADERS not on stream 0."""
    c = Client()
    raw = c.headers(1).serialize()
    raw = raw[:5] + sid.to_bytes(4, "big") + raw[9:]
    c.connection_error(raw)


def test_h2_server_stream_id_below_the_last() -> None:
    """5.1.1: a new stream's identifier is above every one opened before."""
    c = Client()
    c.feed(c.headers(5))
    c.connection_error(c.headers(3))


def test_h2_server_frames_on_idle_streams() -> None:
    """5.1: only HEADERS and PRIORITY on an idle stream."""
    for frame in (data(1, b"x"), RstStreamFrame(1), WindowUpdateFrame(1, 1)):
        Client().connection_error(frame)
    assert type(Client().feed(PriorityFrame(1, depends_on=0))[0]) is hs.PriorityUpdated


def test_h2_server_half_closed_remote() -> None:
    """5.1: DATA on a stream the client ended is a stream error STREAM_CLOSED."""
    c = Client()
    c.feed(c.headers(1))
    ev = c.feed(data(1, b"late"))
    assert type(ev[0]) is hs.StreamReset and ev[0].remote_reset is False
    rst = c.out()
    assert isinstance(rst[0], RstStreamFrame) and rst[0].error_code == ErrorCodes.STREAM_CLOSED
    assert len(rst) == 1  # the 4 bytes given back wait for more (h2's WindowManager)
    # The stream is closed as one we reset: later frames are ignored.
    assert c.feed(data(1, b"later")) == []


def test_h2_server_closed_by_end_stream_both_ways() -> None:
    """5.1: a frame after END_STREAM both ways is a connection error STREAM_CLOSED."""
    c = Client()
    c.feed(c.headers(1))
    c.conn.send_headers(1, [(b":status", b"204")], end_stream=True)
    c.out()
    assert c.connection_error(c.headers(1)).error_code == ErrorCodes.STREAM_CLOSED


def test_h2_server_frames_after_our_reset_are_ignored() -> None:
    """5.1 closed: frames the client sent before it read our RST_STREAM are ignored, and
    the header block still decoded (4.3: the HPACK state is the client's)."""
    c = Client()
    c.feed(c.headers(1, [(b":method", b"POST")] + GET[1:], end_stream=False))
    c.conn.reset_stream(1, ErrorCodes.CANCEL)
    c.out()
    assert c.feed(data(1, b"x" * 100), c.headers(1, [(b"x-new", b"indexed")])) == []
    ev = c.feed(c.headers(3, GET + [(b"x-new", b"indexed")]))  # the table is in step
    assert (b"x-new", b"indexed") in ev[0].headers


def test_h2_server_frames_after_the_clients_reset() -> None:
    """5.1: any frame but PRIORITY after the client's RST_STREAM: stream error."""
    c = Client()
    c.feed(c.headers(1, [(b":method", b"POST")] + GET[1:], end_stream=False))
    ev = c.feed(RstStreamFrame(1, error_code=ErrorCodes.CANCEL))
    assert ev[0].remote_reset is True and ev[0].error_code == ErrorCodes.CANCEL
    ev = c.feed(data(1, b"x"))
    assert ev[0].remote_reset is False
    assert c.feed(PriorityFrame(1, depends_on=0), WindowUpdateFrame(1, 5),
                  RstStreamFrame(1))[0].stream_id == 1  # PRIORITY, the rest ignored


def test_h2_server_too_many_streams() -> None:
    """5.1.2: past SETTINGS_MAX_CONCURRENT_STREAMS."""
    c = Client(max_concurrent_streams=2)
    c.feed(c.headers(1), c.headers(3))
    c.connection_error(c.headers(5))


def test_h2_server_self_dependency() -> None:
    """5.3.1: a stream cannot depend on itself."""
    Client().connection_error(PriorityFrame(1, depends_on=1))
    c = Client()
    f = c.headers(3, depends_on=3, stream_weight=16)
    f.flags.add("PRIORITY")
    c.connection_error(f)


@pytest.mark.parametrize("raw,code", [
    (b"\x00\x00\x04\x02\x00\x00\x00\x00\x01" + b"\x00" * 4, ErrorCodes.FRAME_SIZE_ERROR),  # 6.3
    (b"\x00\x00\x05\x03\x00\x00\x00\x00\x01" + b"\x00" * 5, ErrorCodes.FRAME_SIZE_ERROR),  # 6.4
    (b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5, ErrorCodes.FRAME_SIZE_ERROR),  # 6.5
    (b"\x00\x00\x06\x04\x01\x00\x00\x00\x00" + b"\x00" * 6, ErrorCodes.FRAME_SIZE_ERROR),  # 6.5
    (b"\x00\x00\x06\x04\x00\x00\x00\x00\x01" + b"\x00" * 6, ErrorCodes.PROTOCOL_ERROR),    # 6.5
    (b"\x00\x00\x07\x06\x00\x00\x00\x00\x00" + b"\x00" * 7, ErrorCodes.FRAME_SIZE_ERROR),  # 6.7
    (b"\x00\x00\x08\x06\x00\x00\x00\x00\x03" + b"\x00" * 8, ErrorCodes.PROTOCOL_ERROR),    # 6.7
    (b"\x00\x00\x07\x07\x00\x00\x00\x00\x00" + b"\x00" * 7, ErrorCodes.FRAME_SIZE_ERROR),  # 6.8
    (b"\x00\x00\x03\x08\x00\x00\x00\x00\x00" + b"\x00" * 3, ErrorCodes.FRAME_SIZE_ERROR),  # 6.9
    (b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + b"\x00" * 4, ErrorCodes.PROTOCOL_ERROR),    # 6.9
    (b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x", ErrorCodes.PROTOCOL_ERROR),                 # 6.1
    (b"\x00\x00\x01\x05\x00\x00\x00\x00\x01x", ErrorCodes.PROTOCOL_ERROR),                 # 8.4
    (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01", ErrorCodes.FRAME_SIZE_ERROR),                # 4.2
])
def test_h2_server_frame_sizes_and_streams(raw, code) -> None:
    """4.2 and section 6: each type's size and stream rules."""
    assert Client().connection_error(raw).error_code == code


def test_h2_server_padding_longer_than_the_frame() -> None:
    """6.1, 6.2: padding that leaves no room is PROTOCOL_ERROR."""
    c = Client()
    c.feed(c.headers(1, [(b":method", b"POST")] + GET[1:], end_stream=False))
    c.connection_error(b"\x00\x00\x02\x00\x08\x00\x00\x00\x01\x05x")
    c = Client()
    block = c.enc.encode(GET)
    raw = (len(block) + 1).to_bytes(3, "big") + b"\x01\x0d\x00\x00\x00\x01" + bytes(
        [len(block) + 1]) + block
    c.connection_error(raw)


def test_h2_server_unknown_frame_types_are_ignored() -> None:
    """5.5: an unknown type is ignored, except inside a header block (6.10)."""
    c = Client()
    assert c.feed(b"\x00\x00\x03\xfa\x00\x00\x00\x00\x00abc") == []
    f = c.headers(1)
    f.flags.discard("END_HEADERS")
    c.connection_error(f, b"\x00\x00\x03\xfa\x00\x00\x00\x00\x00abc")


def test_h2_server_continuation() -> None:
    """6.10: a block over HEADERS and CONTINUATION frames of one stream."""
    c = Client()
    block = c.enc.encode(GET + [(b"x-long", b"v" * 100)])
    h = HeadersFrame(1, block[:10])
    h.flags.add("END_STREAM")
    cont = ContinuationFrame(1, block[10:])
    cont.flags.add("END_HEADERS")
    assert c.conn.header_block_pending() is False
    assert c.feed(h) == []
    assert c.conn.header_block_pending() is True
    ev = c.feed(cont)
    assert [type(e) for e in ev] == [hs.RequestReceived, hs.StreamEnded]
    assert c.conn.header_block_pending() is False
    Client().connection_error(cont)  # 6.10: outside a block
    c = Client()
    c.feed(h)
    other = ContinuationFrame(3, b"")
    c.connection_error(other)  # of another stream


def test_h2_server_continuation_flood() -> None:
    """CVE-2024-27316: a block of endless CONTINUATION frames is bounded (64)."""
    c = Client()
    h = HeadersFrame(1, c.enc.encode(GET))
    c.feed(h)
    with pytest.raises(ProtocolError):
        for _ in range(100):
            c.feed(ContinuationFrame(1, b"\x40\x01a\x01b"))


def test_h2_server_partial_frames() -> None:
    """4.1: frames split anywhere are read whole."""
    c = Client()
    raw = c.headers(1).serialize() + data(3, b"").serialize()
    events = []
    with pytest.raises(ProtocolError):  # the DATA is on an idle stream
        for i in range(len(raw)):
            events += c.conn.receive_data(raw[i:i + 1])
    assert [type(e) for e in events] == [hs.RequestReceived, hs.StreamEnded]


def test_h2_server_hpack_errors() -> None:
    """4.3: a block that does not decode is COMPRESSION_ERROR; RFC 7541 7.3: one that
    decodes past max_header_list_size is ENHANCE_YOUR_CALM."""
    c = Client()
    raw = HeadersFrame(1, b"\xff\xff\xff\xff\xff\xff")
    raw.flags.add("END_HEADERS")
    assert c.connection_error(raw).error_code == ErrorCodes.COMPRESSION_ERROR
    c = Client(max_header_list_size=1000)
    assert c.connection_error(
        c.headers(1, GET + [(b"x-big", b"v" * 2000)])).error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_h2_server_receive_windows() -> None:
    """6.9.1: DATA past the stream's or the connection's window is FLOW_CONTROL_ERROR."""
    c = Client(initial_window=100)
    c.feed(c.headers(1, [(b":method", b"POST")] + GET[1:], end_stream=False))
    c.feed(data(1, b"x" * 100))
    assert c.connection_error(data(1, b"x")).error_code == ErrorCodes.FLOW_CONTROL_ERROR
    c = Client(initial_window=1 << 20)
    for sid in (1, 3, 5, 7, 9):
        c.feed(c.headers(sid, [(b":method", b"POST")] + GET[1:], end_stream=False))
    for sid in (1, 3, 5, 7):
        c.feed(data(sid, b"x" * 16_000))
    # 64,000 of the connection's 65,535 taken: 1,536 more is past it.
    assert c.connection_error(data(9, b"x" * 1536)).error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_h2_server_window_updates_follow_what_was_processed() -> None:
    """h2's WindowManager rule: a WINDOW_UPDATE once half the window was processed."""
    c = Client(initial_window=1000)
    c.feed(c.headers(1, [(b":method", b"POST")] + GET[1:], end_stream=False))
    c.feed(data(1, b"x" * 400))
    c.conn.acknowledge_received_data(400, 1)
    assert c.out() == []
    c.feed(data(1, b"x" * 200))
    c.conn.acknowledge_received_data(200, 1)
    out = c.out()
    assert [(f.stream_id, f.window_increment) for f in out] == [(1, 600)]
    c.conn.increment_flow_control_window(100_000)
    c.feed(data(1, b"x" * 1000))
    c.conn.acknowledge_received_data(1000, 0)  # of a stream gone: the connection's only
    c.conn.acknowledge_received_data(60_000, 0)
    assert [(f.stream_id, f.window_increment) for f in c.out()][-1][0] == 0


def test_h2_server_send_windows_and_settings() -> None:
    """6.9: what is sent stays within the client's windows; 6.9.2: INITIAL_WINDOW_SIZE
    moves open streams' windows; 6.5.2: values out of range."""
    c = Client()
    c.feed(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 10,
                                      SettingsFrame.MAX_FRAME_SIZE: 20_000}))
    c.feed(c.headers(1))
    assert c.conn.local_flow_control_window(1) == 10
    assert c.conn.max_outbound_frame_size == 20_000
    c.conn.send_headers(1, [(b":status", b"200")])
    with pytest.raises(FlowControlError):
        c.conn.send_data(1, b"x" * 11)
    c.conn.send_data(1, b"x" * 10)
    assert c.conn.local_flow_control_window(1) == 0
    ev = c.feed(WindowUpdateFrame(1, 5))
    assert type(ev[0]) is hs.WindowUpdated and c.conn.local_flow_control_window(1) == 5
    c.feed(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 20}))
    assert c.conn.local_flow_control_window(1) == 15
    ev = c.feed(WindowUpdateFrame(1, 2**31 - 1))  # past 2^31-1: a stream error
    assert type(ev[0]) is hs.StreamReset and ev[0].error_code == ErrorCodes.FLOW_CONTROL_ERROR
    for settings, code in (({SettingsFrame.ENABLE_PUSH: 2}, ErrorCodes.PROTOCOL_ERROR),
                           ({SettingsFrame.INITIAL_WINDOW_SIZE: 2**31},
                            ErrorCodes.FLOW_CONTROL_ERROR),
                           ({SettingsFrame.MAX_FRAME_SIZE: 100}, ErrorCodes.PROTOCOL_ERROR),
                           ({SettingsFrame.MAX_FRAME_SIZE: 2**24}, ErrorCodes.PROTOCOL_ERROR),
                           ({8: 2}, ErrorCodes.PROTOCOL_ERROR)):
        assert Client().connection_error(SettingsFrame(0, settings=settings)).error_code == code
    c = Client()
    c.feed(c.headers(1), WindowUpdateFrame(1, 100))  # 65,635: a new initial 2^31-1 passes it
    assert c.connection_error(SettingsFrame(0, settings={
        SettingsFrame.INITIAL_WINDOW_SIZE: 2**31 - 1})).error_code == \
        ErrorCodes.FLOW_CONTROL_ERROR
    assert Client().connection_error(WindowUpdateFrame(0, 2**31 - 1)).error_code == \
        ErrorCodes.FLOW_CONTROL_ERROR


def test_h2_server_large_header_blocks_are_split() -> None:
    """6.10: a block past the client's frame size goes on CONTINUATION frames."""
    c = Client()
    c.feed(c.headers(1))
    c.conn.send_headers(1, [(b":status", b"200"), (b"x-big", b"v" * 40_000)],
                        end_stream=True)
    out = c.out()
    assert [type(f) for f in out] == [HeadersFrame, ContinuationFrame, ContinuationFrame]
    assert "END_STREAM" in out[0].flags and "END_HEADERS" in out[-1].flags
    assert all(len(f.data) <= 16_384 for f in out)


def test_h2_server_ping_goaway_and_reset() -> None:
    c = Client()
    ev = c.feed(PingFrame(0, b"abcdefgh"))
    assert type(ev[0]) is hs.PingReceived
    ack = c.out()[0]
    assert isinstance(ack, PingFrame) and "ACK" in ack.flags and ack.opaque_data == b"abcdefgh"
    assert c.feed(c.headers(1), GoAwayFrame(0, last_stream_id=0))[-1].last_stream_id == 0
    c.conn.send_headers(1, [(b":status", b"200")], end_stream=True)  # streams finish
    with pytest.raises(StreamClosedError):
        c.conn.reset_stream(1)
    with pytest.raises(ProtocolError):
        c.conn.reset_stream(99)
    c.conn.close_connection(ErrorCodes.NO_ERROR)
    g = next(f for f in c.out() if isinstance(f, GoAwayFrame))
    assert g.last_stream_id == 1 and g.error_code == 0
    assert c.conn.highest_inbound_stream_id == 1


def test_h2_server_hpack_table_size_from_the_client() -> None:
    """6.5.2 SETTINGS_HEADER_TABLE_SIZE: the encoder says the new size in its next block
    (RFC 7541 4.2), which an h2 client decodes."""
    from hpack import Decoder
    c = Client()
    c.feed(SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 0}), c.headers(1))
    c.conn.send_headers(1, [(b":status", b"200"), (b"x-a", b"1")], end_stream=True)
    block = c.out()[-1].data
    dec = Decoder()
    dec.max_allowed_table_size = 4096
    assert dec.decode(block, raw=True)[1] == (b"x-a", b"1")
    assert dec.header_table_size == 0


def test_h2_server_a_frame_a_byte_at_a_time() -> None:
    """4.1: a DATA frame of 16,384 bytes that arrives a byte per read is read whole, once;
    header_block_pending says when a HEADERS frame is partly in."""
    c = Client()
    c.feed(c.headers(1, [(b":method", b"POST")] + GET[1:], end_stream=False))
    raw = data(1, b"z" * 16_384, end=True).serialize()
    events = []
    for i in range(len(raw)):
        events += c.conn.receive_data(raw[i:i + 1])
    assert [type(e) for e in events] == [hs.DataReceived, hs.StreamEnded]
    assert events[0].data == b"z" * 16_384
    raw = c.headers(3).serialize()
    assert c.conn.receive_data(raw[:3]) == [] and not c.conn.header_block_pending()
    assert c.conn.receive_data(raw[3:5]) == [] and c.conn.header_block_pending()
    assert len(c.conn.receive_data(raw[5:])) == 2 and not c.conn.header_block_pending()


def test_h2_server_encoder_table_at_most_4096() -> None:
    """RFC 7541 4.2: the encoder may use less than the client allows; a client's table of
    4 GiB would only make the proxy keep all it sent."""
    c = Client()
    c.feed(SettingsFrame(0, settings={SettingsFrame.HEADER_TABLE_SIZE: 2**32 - 1}))
    assert c.conn.encoder.header_table_size == 4096
