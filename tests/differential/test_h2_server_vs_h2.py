"""The compiled HTTP/2 server connection (meshproxy._core.h2_server) against h2's
H2Connection, which it replaces on the proxy's client side: an h2 client makes random valid
traffic (requests with and without bodies, trailers, cookies, resets, PINGs, SETTINGS
changes, window updates, frames split anywhere), both servers read the same bytes and
answer alike, and they must yield the same events; the client, which reads the compiled
server's frames, must find them valid (h2 raises on any it is not)."""

from __future__ import annotations

import random

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes, Settings

from meshproxy._core.h2_server import H2ServerConnection

WINDOW = 1 << 16


def reference() -> H2Connection:
    """h2 as ServerCodec configured it before the compiled connection."""
    conn = H2Connection(H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=True,
        normalize_inbound_headers=True, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    conn.local_settings = Settings(client=False, initial_values={
        SettingCodes.MAX_CONCURRENT_STREAMS: 100,
        SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
        SettingCodes.HEADER_TABLE_SIZE: 4096,
        SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
        SettingCodes.ENABLE_PUSH: 0,
    })
    conn.initiate_connection()
    return conn


def shape(ev) -> tuple:
    """What an event says, whichever library made it."""
    kind = type(ev).__name__
    if kind in ("RequestReceived", "TrailersReceived"):
        return (kind, ev.stream_id, [tuple(h) for h in ev.headers], ev.stream_ended is not None)
    if kind == "DataReceived":
        return (kind, ev.stream_id, bytes(ev.data), ev.flow_controlled_length,
                ev.stream_ended is not None)
    if kind == "StreamReset":
        return (kind, ev.stream_id, int(ev.error_code))
    if kind == "WindowUpdated":
        return (kind, ev.stream_id, ev.delta)
    if kind == "PingReceived":
        return (kind, ev.ping_data)
    if kind in ("StreamEnded", "PriorityUpdated"):
        return (kind, ev.stream_id)
    return (kind,)


def run(seed: int) -> int:
    rng = random.Random(seed)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    ours = H2ServerConnection(max_concurrent_streams=100, initial_window=WINDOW)
    ours.initiate_connection()
    ref = reference()
    client.receive_data(ours.data_to_send())
    open_streams: list[int] = []   # the client may still send on these
    ended: list[int] = []          # the client ended these: the servers answer them
    compared = 0
    methods: dict[int, bytes] = {}

    def pump() -> None:
        nonlocal compared
        data = client.data_to_send()
        while data:  # split anywhere (4.1: a frame may arrive in pieces)
            cut = rng.randint(1, len(data))
            piece, data = data[:cut], data[cut:]
            a = [shape(e) for e in ours.receive_data(piece)]
            b = [shape(e) for e in ref.receive_data(piece)]
            b = [e for e in b if e[0] not in ("SettingsAcknowledged", "PingAckReceived")]
            a = [e for e in a if e[0] not in ("SettingsAcknowledged",)]
            assert a == b, (seed, a, b)
            compared += len(a)
            for e in a:
                if e[0] == "DataReceived" and e[3]:
                    ours.acknowledge_received_data(e[3], e[1])
                    ref.acknowledge_received_data(e[3], e[1])
                if e[0] == "StreamEnded":
                    ended.append(e[1])
        for ev in client.receive_data(ours.data_to_send()):
            assert type(ev).__name__ not in ("ConnectionTerminated",), ev
        ref.data_to_send()

    for _ in range(40):
        op = rng.random()
        if op < 0.3 and len(open_streams) < 20:
            sid = client.get_next_available_stream_id()
            fields = [(b":method", rng.choice([b"GET", b"POST", b"HEAD"])),
                      (b":scheme", b"http"), (b":path", b"/p%d" % rng.randint(0, 9)),
                      (b":authority", b"a.example")]
            for _k in range(rng.randint(0, 4)):
                fields.append(rng.choice([(b"cookie", b"c%d=1" % rng.randint(0, 3)),
                                          (b"x-a", b"%d" % rng.randint(0, 5)),
                                          (b"accept", b"*/*"),
                                          (b"authorization", b"secret")]))
            end = fields[0][1] != b"POST" or rng.random() < 0.2
            client.send_headers(sid, fields, end_stream=end)
            methods[sid] = fields[0][1]
            if not end:
                open_streams.append(sid)
        elif op < 0.55 and open_streams:
            sid = rng.choice(open_streams)
            room = min(client.local_flow_control_window(sid), 4000)
            if room:
                client.send_data(sid, bytes([65 + sid % 26]) * rng.randint(0, room),
                                 end_stream=rng.random() < 0.3)
                if client.streams[sid].closed or client.streams[sid].state_machine.state.name \
                        == "HALF_CLOSED_LOCAL":
                    open_streams.remove(sid)
        elif op < 0.62 and open_streams:
            sid = open_streams.pop(rng.randrange(len(open_streams)))
            client.send_headers(sid, [(b"x-trailer", b"t")], end_stream=True)
        elif op < 0.68 and open_streams:
            sid = open_streams.pop(rng.randrange(len(open_streams)))
            client.reset_stream(sid, rng.choice([0, 8]))
        elif op < 0.74:
            client.ping(b"%08d" % rng.randint(0, 10**7))
        elif op < 0.8:
            client.update_settings({
                SettingCodes.INITIAL_WINDOW_SIZE: rng.choice([100, 65535, 1 << 20]),
                SettingCodes.HEADER_TABLE_SIZE: rng.choice([0, 512, 4096])})
        elif op < 0.85:
            client.increment_flow_control_window(rng.randint(1, 1000))
        pump()
        # Both servers answer the requests that ended, alike.
        while ended:
            sid = ended.pop(0)
            try:
                n = min(ours.local_flow_control_window(sid), 100)
            except StreamClosedError:  # the client reset it
                continue
            assert ref.local_flow_control_window(sid) == ours.local_flow_control_window(sid)
            head = methods[sid] == b"HEAD"
            for server in (ours, ref):
                server.send_headers(sid, [(b":status", b"200"), (b"x-b", b"1")],
                                    end_stream=head)
                if not head:
                    server.send_data(sid, b"r" * n, end_stream=True)
            pump()
    return compared


@pytest.mark.parametrize("seed", range(150))
def test_h2_server_events_match_h2(seed) -> None:
    assert run(seed) > 0
