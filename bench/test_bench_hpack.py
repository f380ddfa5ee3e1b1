"""HPACK per request head: the compiled codec (meshproxy._core.hpack) against the pure-
Python `hpack` package h2 ships with, on a browser-like request (a block per request on a
connection whose dynamic table is warm) and the proxy's response head."""

from __future__ import annotations

import hpack
import pytest

from meshproxy._core.hpack import Decoder, Encoder

REQUEST = [
    (b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"api.example.com"),
    (b":path", b"/v1/orders/12345?expand=items"),
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36"),
    (b"accept", b"application/json"), (b"accept-encoding", b"gzip, deflate, br"),
    (b"accept-language", b"en-US,en;q=0.9"), (b"x-request-id", b"5d1f0b6e-1c2a-4b7e-9f00"),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"),
            (b"content-length", b"100"), (b"date", b"Thu, 03 Dec 2026 08:00:00 GMT"),
            (b"server", b"nginx")]
BLOCK = hpack.Encoder().encode(REQUEST)


@pytest.mark.parametrize("impl", ["compiled", "hpack"])
def test_bench_hpack_decode_request(benchmark, impl: str) -> None:
    dec = Decoder() if impl == "compiled" else hpack.Decoder()
    dec.decode(BLOCK, raw=True)  # the dynamic table warm, as on a live connection
    warm = hpack.Encoder()
    warm.encode(REQUEST)
    again = warm.encode(REQUEST)  # every field indexed now
    benchmark(dec.decode, again, True)


@pytest.mark.parametrize("impl", ["compiled", "hpack"])
def test_bench_hpack_encode_response(benchmark, impl: str) -> None:
    enc = Encoder() if impl == "compiled" else hpack.Encoder()
    benchmark(enc.encode, RESPONSE)
