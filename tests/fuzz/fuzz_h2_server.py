"""Coverage-guided fuzzing of the compiled HTTP/2 server connection (atheris, i.e.
libFuzzer): what a client can send after its preface.

    python -m tests.fuzz.fuzz_h2_server -runs=10000000          # or -max_total_time=SECONDS

meshproxy/_core/h2_server is built a second time, instrumented, into build/fuzz/
(tests/fuzz/instrument.py). The seeds are frame sequences an h2 client makes (requests with
and without bodies, trailers, resets, PINGs, SETTINGS, window updates), written to
build/fuzz/h2-seeds/. An input is one byte that says where to cut, then the bytes the
client sends after its preface and SETTINGS. The checks, beyond "does not crash":
- the only exception is h2's ProtocolError (a connection error), and then the last frame
  queued is a GOAWAY with its error code, and nothing more is taken;
- the input fed whole and fed in two pieces gives the same frames out, the same error, and
  without an error the same events (frames are read whole however they arrive, RFC 9113 4.1);
- every frame queued is whole and within 16,384 bytes; every request event is on an odd
  stream and has a :method;
- answering every stream opened (HEADERS and DATA within the windows) raises nothing but
  StreamClosedError for the ones already closed.
Any other exception, or a failed check, is a crash: libFuzzer writes the input to
crash-<sha1> in build/fuzz/.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris
import h2.config
import h2.connection
from h2.exceptions import ProtocolError, StreamClosedError

from tests.fuzz.instrument import BUILD, instrumented

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    while data:
        assert len(data) >= 9, data
        n = int.from_bytes(data[:3], "big")
        assert n <= 16_384 and len(data) >= 9 + n, (n, len(data))
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9:9 + n]))
        data = data[9 + n:]
    return out


def shape(ev) -> tuple:
    return (type(ev).__name__,) + tuple(
        getattr(ev, a, None) if a != "headers" else
        tuple(tuple(h) for h in getattr(ev, a)) for a in (
            "stream_id", "headers", "data", "flow_controlled_length", "error_code",
            "remote_reset", "delta", "ping_data", "last_stream_id") if hasattr(ev, a))


class Target:
    def __init__(self, mod) -> None:
        self.mod = mod

    def feed(self, pieces: list[bytes]):
        conn = self.mod.H2ServerConnection(max_concurrent_streams=8, initial_window=1000,
                                           max_header_list_size=4096)
        conn.initiate_connection()
        events: list = []
        error = None
        try:
            for piece in pieces:
                events += conn.receive_data(piece)
        except ProtocolError as exc:
            error = int(getattr(exc, "error_code", 1))
        out = conn.data_to_send()
        return conn, events, error, out

    def one(self, data: bytes) -> None:
        if not data:
            return
        body = PREFACE + SETTINGS + data[1:]
        cut = len(PREFACE) + data[0] * 7 % (len(body) - len(PREFACE) + 1)
        conn, events, error, out = self.feed([body])
        _, events2, error2, out2 = self.feed([body[:cut], body[cut:]])
        assert error == error2 and out == out2, (error, error2)
        if error is None:  # (a receive that raises returns no events: the connection ends)
            assert [shape(e) for e in events] == [shape(e) for e in events2]
        sent = frames(out)
        if error is not None:
            assert sent[-1][0] == 0x7 and int.from_bytes(sent[-1][3][4:8], "big") == error
            assert conn.receive_data(SETTINGS) == []
            return
        for ev in events:
            name = type(ev).__name__
            if name == "RequestReceived":
                assert ev.stream_id % 2 == 1
                assert any(h[0] == b":method" for h in ev.headers)
        for ev in events:
            if type(ev).__name__ != "RequestReceived":
                continue
            try:
                conn.send_headers(ev.stream_id, [(b":status", b"200")])
                n = max(0, min(conn.local_flow_control_window(ev.stream_id), 100))
                conn.send_data(ev.stream_id, b"x" * n, end_stream=True)
            except StreamClosedError:
                pass
        frames(conn.data_to_send())


def make_seeds() -> Path:
    """Frame sequences of an h2 client, past its preface and SETTINGS."""
    seeds = BUILD / "h2-seeds"
    seeds.mkdir(parents=True, exist_ok=True)
    get = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
           (b":authority", b"a")]
    post = [(b":method", b"POST")] + get[1:] + [(b"content-length", b"3")]
    for i, script in enumerate((
            lambda c: c.send_headers(1, get, end_stream=True),
            lambda c: (c.send_headers(1, post), c.send_data(1, b"abc", end_stream=True)),
            lambda c: (c.send_headers(1, post[:-1]), c.send_data(1, b"ab"),
                       c.send_headers(1, [(b"x-t", b"1")], end_stream=True)),
            lambda c: (c.send_headers(1, post), c.reset_stream(1), c.ping(b"12345678")),
            lambda c: (c.send_headers(1, get + [(b"cookie", b"a"), (b"cookie", b"b")],
                                      end_stream=True),
                       c.increment_flow_control_window(100),
                       c.send_headers(3, get, end_stream=True)),
            lambda c: c.update_settings({4: 100, 1: 0}),
    )):
        c = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
        c.initiate_connection()
        c.data_to_send()
        script(c)
        (seeds / f"seed{i}").write_bytes(b"\x00" + c.data_to_send())
    return seeds


def main() -> None:
    target = Target(instrumented("h2_server"))
    args = [sys.argv[0]] + [a if a.startswith("-") else os.path.abspath(a)
                            for a in sys.argv[1:]]
    args.append(str(make_seeds()))
    os.chdir(BUILD)
    atheris.Setup(args, target.one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
