"""The compiled inbound field checks (meshproxy._core.h2_fields) against h2's own
(h2.utilities), which they replace inside h2: on valid and malformed blocks of every kind
(requests, responses, trailers, CONNECT and extended CONNECT), both accept the same list or
both raise ProtocolError with the same message."""

from __future__ import annotations

import random

import pytest
from h2 import utilities as h2u
from h2.exceptions import ProtocolError

import meshproxy.protocol.http2  # noqa: F401 - installs the compiled checks in h2.stream
from meshproxy._core import h2_fields

REQ = h2u.HeaderValidationFlags(is_client=False, is_trailer=False, is_response_header=False,
                                is_push_promise=False)
RESP = h2u.HeaderValidationFlags(is_client=True, is_trailer=False, is_response_header=True,
                                 is_push_promise=False)
TRAILER = h2u.HeaderValidationFlags(is_client=False, is_trailer=True,
                                    is_response_header=False, is_push_promise=False)

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/x"),
       (b":authority", b"a.example")]

CASES = [
    (REQ, GET),
    (REQ, GET + [(b"cookie", b"a=1"), (b"accept", b"*/*"), (b"cookie", b"b=2")]),
    (REQ, GET + [(b"te", b"trailers"), (b"te", b"TRAILERS")]),
    (REQ, GET + [(b"te", b"gzip")]),
    (REQ, GET + [(b"X-Upper", b"v")]),
    (REQ, GET + [(b"bad name", b"v")]),
    (REQ, GET + [(b"na:me", b"v")]),
    (REQ, GET + [(b"", b"v")]),
    (REQ, GET + [(b"x", b"a\r\nb")]),
    (REQ, GET + [(b"x", b"a\x00")]),
    (REQ, GET + [(b"x", b" lead")]),
    (REQ, GET + [(b"x", b"trail\t")]),
    (REQ, GET + [(b"x", b"")]),
    (REQ, GET + [(b"x", b"\xff\x80 inside is fine")]),
    (REQ, GET + [(b"connection", b"close")]),
    (REQ, GET + [(b"keep-alive", b"1")]),
    (REQ, GET + [(b"transfer-encoding", b"chunked")]),
    (REQ, GET + [(b"upgrade", b"h2c")]),
    (REQ, GET + [(b"proxy-connection", b"x")]),
    (REQ, GET + [(b":method", b"POST")]),
    (REQ, [(b"accept", b"*/*")] + GET),
    (REQ, GET + [(b":custom", b"x")]),
    (REQ, GET + [(b":status", b"200")]),
    (REQ, GET[1:]),
    (REQ, [GET[0], GET[2], GET[3]]),
    (REQ, [GET[0], GET[1], GET[3]]),
    (REQ, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b""),
           (b":authority", b"a")]),
    (REQ, GET[:3]),
    (REQ, GET[:3] + [(b"host", b"h")]),
    (REQ, GET + [(b"host", b"a.example")]),
    (REQ, GET + [(b"host", b"other")]),
    (REQ, GET[:3] + [(b"host", b"h"), (b"host", b"h")]),
    (REQ, [(b":method", b"CONNECT"), (b":authority", b"a:443")]),
    (REQ, [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")]),
    (REQ, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
           (b":path", b"/chat"), (b":authority", b"a")]),
    (REQ, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":authority", b"a")]),
    (REQ, GET + [(b":protocol", b"websocket")]),
    (RESP, [(b":status", b"200"), (b"content-type", b"text/plain")]),
    (RESP, [(b"content-type", b"text/plain")]),
    (RESP, [(b":status", b"200"), (b":path", b"/")]),
    (RESP, [(b":status", b"200"), (b"connection", b"close")]),
    (RESP, [(b":status", b"204"), (b"Server", b"x")]),
    (TRAILER, [(b"grpc-status", b"0"), (b"x-sum", b"abc")]),
    (TRAILER, [(b":status", b"200")]),
    (TRAILER, [(b"te", b"x")]),
]


def _outcome(fn, flags, fields):
    try:
        return "ok", [tuple(f) for f in fn(iter(fields), flags)]
    except ProtocolError as exc:
        return "error", str(exc)


def _theirs(fields, flags):
    return h2u.validate_headers(h2u.normalize_inbound_headers(fields, flags), flags)


def _ours(fields, flags):
    return h2_fields.validate_headers(h2_fields.normalize_inbound_headers(fields, flags),
                                      flags)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_h2_fields_match_h2_on_the_cases(i: int) -> None:
    flags, fields = CASES[i]
    assert _outcome(_ours, flags, fields) == _outcome(_theirs, flags, fields)


def test_h2_fields_match_h2_on_mutations() -> None:
    """Random edits of valid blocks (a byte changed, fields swapped, repeated, dropped)."""
    rng = random.Random(7)
    seen = {"ok": 0, "error": 0}
    for _ in range(4000):
        flags, base = rng.choice(CASES[:3] + CASES[37:38] + CASES[42:43])
        fields = [tuple(f) for f in base]
        for _ in range(rng.randint(1, 3)):
            k = rng.randrange(len(fields))
            op = rng.randrange(5)
            name, value = fields[k]
            if op == 0 and value:
                j = rng.randrange(len(value))
                value = value[:j] + bytes([rng.randrange(256)]) + value[j + 1:]
            elif op == 1 and name:
                j = rng.randrange(len(name))
                name = name[:j] + bytes([rng.randrange(256)]) + name[j + 1:]
            elif op == 2:
                fields.append((name, value))
            elif op == 3 and len(fields) > 1:
                j = rng.randrange(len(fields))
                fields[k], fields[j] = fields[j], fields[k]
            elif op == 4 and len(fields) > 1:
                del fields[k]
                continue
            fields[k] = (name, value)
        ours, theirs = _outcome(_ours, flags, fields), _outcome(_theirs, flags, fields)
        assert ours == theirs, fields
        seen[ours[0]] += 1
    assert seen["ok"] > 200 and seen["error"] > 200  # both sides of the rules exercised


def test_h2_fields_are_what_h2_runs() -> None:
    """protocol.http2 installed them: h2's streams call the compiled checks."""
    import h2.stream

    assert h2.stream.validate_headers is h2_fields.validate_headers
    assert h2.stream.normalize_inbound_headers is h2_fields.normalize_inbound_headers
