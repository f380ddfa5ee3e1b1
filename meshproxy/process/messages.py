"""What the supervisor tells its workers, one way, over a pipe: msgspec msgpack frames.

A frame is a 4-byte big-endian length and a msgpack-encoded message. A snapshot carries the
validated config (each worker compiles it: compiled route tables are not shared between
processes) and the stats slots the supervisor assigned, so that every worker writes the
same names at the same offsets.
"""

from __future__ import annotations

import msgspec

from meshproxy.config import schema
from meshproxy.protocol.frames import FrameReader as Frames
from meshproxy.protocol.frames import frame

MAX_FRAME = 64 * 1024 * 1024  # a config larger than this is a mistake, not a mesh


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
    # Mirrored routes whose responses are compared: route name -> stats slot.
    mirror_slots: dict[str, int] = {}


class DrainMsg(msgspec.Struct, tag="drain", frozen=True):
    timeout: float


Message = SnapshotMsg | DrainMsg

def encode(msg: Message) -> bytes:
    return frame(msg)


class FrameReader(Frames):
    """Sans-IO: feed bytes, take whole messages."""

    def __init__(self) -> None:
        super().__init__(Message, MAX_FRAME, "control")
