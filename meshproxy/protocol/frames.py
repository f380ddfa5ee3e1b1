"""Length-prefixed msgpack frames, sans-IO: a 4-byte big-endian length, then one msgspec
msgpack message. Both of the proxy's one-way and two-way message streams use them: the
supervisor's pipe to its workers (process/messages.py) and the discovery stream to the
control plane (control/messages.py)."""

from __future__ import annotations

import struct
from typing import Any

import msgspec

_LEN = struct.Struct(">I")
_encoder = msgspec.msgpack.Encoder()


def frame(msg: Any) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Feed bytes, take whole messages of `kind` (a Struct or a tagged union); a frame
    longer than `max_frame` is a broken or hostile peer: ValueError."""

    def __init__(self, kind: Any, max_frame: int, what: str) -> None:
        self._decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(kind)
        self._max = max_frame
        self._what = what
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray) -> list[Any]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > self._max:
                raise ValueError(f"{self._what} frame of {n} bytes (at most {self._max})")
            if len(self._buf) < 4 + n:
                break
            # A copy: a decoded msgspec.Raw keeps a view of what it was decoded from.
            out.append(self._decoder.decode(bytes(self._buf[4:4 + n])))
            del self._buf[:4 + n]
        return out
