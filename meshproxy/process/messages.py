"""What the supervisor tells its workers, one way, over a pipe: msgspec msgpack frames.

A frame is a 4-byte big-endian length and a msgpack-encoded message. A snapshot carries the
validated config (each worker compiles it: compiled route tables are not shared between
processes) and the stats slots the supervisor assigned, so that every worker writes the
same names at the same offsets.
"""

from __future__ import annotations

import struct

import msgspec

from meshproxy.config import schema

MAX_FRAME = 64 * 1024 * 1024  # a config larger than this is a mistake, not a mesh
_LEN = struct.Struct(">I")


class SnapshotMsg(msgspec.Struct, tag="snapshot", frozen=True):
    version: int
    config: schema.Config
    access_log_override: str | None
    listener_slots: dict[str, int]
    cluster_slots: dict[str, int]
    endpoint_slots: dict[str, int]
    workers: int = 1
    # The bytes of every TLS file the config names, as the supervisor read and checked them.
    material: dict[str, bytes] = {}
    # Rate-limit bucket tables: name -> first cell in the shared bucket memory.
    bucket_slots: dict[str, int] = {}


class DrainMsg(msgspec.Struct, tag="drain", frozen=True):
    timeout: float


Message = SnapshotMsg | DrainMsg

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    body = _encoder.encode(msg)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Sans-IO: feed bytes, take whole messages."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_FRAME:
                raise ValueError(f"control frame of {n} bytes")
            if len(self._buf) < 4 + n:
                break
            out.append(_decoder.decode(self._buf[4:4 + n]))
            self._buf = self._buf[4 + n:]
        return out
