"""The compiled HPACK (meshproxy._core.hpack) against the `hpack` package (the oracle h2
has used): RFC 7541 Appendix C's examples byte for byte, each side decoding what the other
encoded over connections' worth of blocks that share the dynamic table (with table size
changes), and the decoding errors section 6 and 5.2 call for."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)

from meshproxy._core.hpack import Decoder, Encoder

C4 = [  # RFC 7541 C.4: three requests on one connection, Huffman-coded
    ("828684418cf1e3c2e5f23a6ba0ab90f4ff",
     [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
      (b":authority", b"www.example.com")]),
    ("828684be5886a8eb10649cbf",
     [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
      (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")]),
    ("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
     [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
      (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")]),
]
C3 = [  # C.3: the same without Huffman
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]


def test_hpack_rfc7541_c4_encodes_and_decodes_byte_for_byte() -> None:
    enc, dec = Encoder(), Decoder()
    for wire, fields in C4:
        assert enc.encode(fields).hex() == wire
        assert dec.decode(bytes.fromhex(wire)) == fields


def test_hpack_rfc7541_c3_without_huffman() -> None:
    dec = Decoder()
    for wire, (_h, fields) in zip(C3, C4, strict=True):
        assert dec.decode(bytes.fromhex(wire)) == fields


_NAMES = [b":method", b":path", b":authority", b":scheme", b"user-agent", b"accept",
          b"cookie", b"x-request-id", b"content-type", b"x-custom", b"te", b"grpc-timeout"]


def _random_fields(rng: random.Random) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(rng.randint(0, 14)):
        name = rng.choice(_NAMES) if rng.random() < 0.8 else bytes(
            rng.choice(b"abcdefghijklmnopqrstuvwxyz-") for _ in range(rng.randint(1, 20)))
        if rng.random() < 0.5:
            value = rng.choice([b"GET", b"/", b"http", b"gzip, deflate", b"trailers", b""])
        else:
            value = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        out.append((name, value))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_hpack_decodes_what_hpack_encodes(seed: int) -> None:
    rng = random.Random(seed)
    theirs, ours, oracle = hpack.Encoder(), Decoder(), hpack.Decoder()
    ours.max_allowed_table_size = oracle.max_allowed_table_size = 65536
    ours.max_header_list_size = oracle.max_header_list_size = 1 << 20
    for i in range(300):
        if i % 50 == 25:
            theirs.header_table_size = rng.choice([0, 256, 4096, 16384, 65536])
        fields = _random_fields(rng)
        # Some sent as never-indexed literals (6.2.3): ours says so, as hpack's does, so
        # that the proxy re-encodes them so (7.1.3).
        fields = [hpack.NeverIndexedHeaderTuple(*f) if rng.random() < 0.2 else f
                  for f in fields]
        block = theirs.encode(fields, huffman=rng.random() < 0.7)
        got, want = ours.decode(block), oracle.decode(block, raw=True)
        assert got == [tuple(f) for f in want]
        assert [type(f) is hpack.NeverIndexedHeaderTuple for f in got] == [
            not f.indexable for f in want]


@pytest.mark.parametrize("seed", range(6))
def test_hpack_encodes_what_hpack_decodes(seed: int) -> None:
    rng = random.Random(100 + seed)
    ours, oracle = Encoder(), hpack.Decoder()
    oracle.max_header_list_size = 1 << 20
    oracle.max_allowed_table_size = 65536
    for i in range(300):
        if i % 40 == 20:
            # The peer's SETTINGS_HEADER_TABLE_SIZE moves, twice before one block at times:
            # the smallest and the final size are both said (RFC 7541 4.2).
            for _ in range(rng.randint(1, 2)):
                ours.header_table_size = rng.choice([0, 100, 4096, 65536])
        fields = _random_fields(rng)
        marked = [hpack.NeverIndexedHeaderTuple(*f) if f[0] == b"cookie" else f
                  for f in fields]
        block = ours.encode(marked)
        got = oracle.decode(block, raw=True)
        assert [tuple(f) for f in got] == fields
        for sent, back in zip(marked, got, strict=True):
            # 7.1.3: a never-indexed field stays never-indexed on the wire.
            assert (not back.indexable) == isinstance(sent, hpack.NeverIndexedHeaderTuple)


@pytest.mark.parametrize("block, error", [
    ("80", InvalidTableIndex),                       # index 0 (6.1)
    ("bf", InvalidTableIndex),                       # index 63: no dynamic entry yet
    ("3fe21f", InvalidTableSizeError),               # size update to 4097, past 4096
    ("8220", HPACKDecodingError),                    # size update after a field (4.2)
    ("4085ffffffffff00", HPACKDecodingError),        # EOS inside a Huffman string (5.2)
    ("408100", HPACKDecodingError),                  # padding of zeros (5.2)
    ("4082ffff00", HPACKDecodingError),              # 16 bits of padding (at most 7)
    ("400a6162", HPACKDecodingError),                # a string past the block's end
    ("7f", HPACKDecodingError),                      # a truncated integer
    ("7fffffffffff7f", HPACKDecodingError),          # an integer past 2^28
])
def test_hpack_decoding_errors(block: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        Decoder().decode(bytes.fromhex(block))


def test_hpack_header_list_bound_refuses_the_bomb() -> None:
    """One big entry indexed once, then referenced thousands of times: refused as the
    decoded list passes max_header_list_size, not after (the HPACK bomb)."""
    enc = hpack.Encoder()
    enc.header_table_size = 4096
    first = enc.encode([(b"x-bomb", b"b" * 4000)])
    dec = Decoder(max_header_list_size=65536)
    assert dec.decode(first) == [(b"x-bomb", b"b" * 4000)]
    with pytest.raises(OversizedHeaderListError):
        dec.decode(b"\xbe" * 5000)


def test_hpack_entry_larger_than_the_table_empties_it() -> None:
    """4.4: an entry larger than the table is not added and evicts everything; indexes
    into the dynamic table are then errors, on both sides alike."""
    theirs = hpack.Encoder()
    theirs.header_table_size = 100
    ours = Decoder()
    ours.max_allowed_table_size = 4096
    assert ours.decode(theirs.encode([(b"a", b"1")])) == [(b"a", b"1")]
    big = theirs.encode([(b"b", b"x" * 200)])
    assert ours.decode(big) == [(b"b", b"x" * 200)]
    with pytest.raises(InvalidTableIndex):
        ours.decode(b"\xbe")


def test_hpack_table_size_unchanged_is_not_announced() -> None:
    """The peer's SETTINGS restating the default 4,096 adds no size update to the next
    block; a real change does, once (RFC 7541 4.2, 6.3)."""
    enc = Encoder()
    enc.header_table_size = 4096
    assert enc.encode([(b":method", b"GET")]) == b"\x82"
    enc.header_table_size = 1024
    assert enc.encode([(b":method", b"GET")]) == b"\x3f\xe1\x07\x82"
    assert enc.encode([(b":method", b"GET")]) == b"\x82"


def test_hpack_credentials_are_never_indexed() -> None:
    """RFC 7541 7.1.3: authorization, proxy-authorization and short cookies go as
    never-indexed literals and never enter the dynamic table; a long cookie is indexed."""
    enc, oracle = Encoder(), hpack.Decoder()
    fields = [(b"authorization", b"Bearer abc.def"), (b"proxy-authorization", b"Basic x"),
              (b"cookie", b"sid=12345"), (b"cookie", b"prefs=" + b"p" * 30)]
    got = oracle.decode(enc.encode(fields), raw=True)
    assert [tuple(f) for f in got] == fields
    assert [f.indexable for f in got] == [False, False, False, True]
    assert len(oracle.header_table.dynamic_entries) == 1
