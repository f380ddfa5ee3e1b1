"""Rings in shared memory, one per worker, that workers write and the supervisor reads: the
channels from workers to the supervisor besides the stats (DESIGN.md section 1 keeps the
control pipe one way). On-demand discovery's missing authorities
(process.demand_memory) and mirrored routes' differing pairs (stats.diff_samples) use them.

Layout per worker: an 8-byte count of entries written, then `ring` entries of `entry`
bytes (a 4-byte length and the payload, cut to fit). The worker writes entry n at
n % ring and only then raises the count; a reader takes entries by count (the last `ring`
of them at most). One writer per ring, no locks: an entry overwritten while it is read may
be torn, so a reader checks what it decodes.
"""

from __future__ import annotations

import mmap
import os
import struct

_COUNT = struct.Struct("<q")
_LEN = struct.Struct("<I")


class WorkerRings:
    def __init__(self, name: str, workers: int, ring: int, entry: int,
                 fd: int | None = None) -> None:
        self.workers = workers
        self.ring = ring
        self.entry = entry
        self.stride = 8 + ring * entry
        size = max(1, workers) * self.stride
        if fd is None:
            fd = os.memfd_create(name, 0)
            os.ftruncate(fd, size)
        self.fd = fd
        self.buf = mmap.mmap(fd, size)

    def write(self, index: int, payload: bytes) -> None:
        """Worker `index` adds an entry (cut to what an entry holds)."""
        payload = payload[:self.entry - 4]
        base = index * self.stride
        (n,) = _COUNT.unpack_from(self.buf, base)
        at = base + 8 + (n % self.ring) * self.entry
        _LEN.pack_into(self.buf, at, len(payload))
        self.buf[at + 4:at + 4 + len(payload)] = payload
        _COUNT.pack_into(self.buf, base, n + 1)

    def count(self, index: int) -> int:
        return int(_COUNT.unpack_from(self.buf, index * self.stride)[0])

    def entries(self, index: int, since: int = 0) -> list[bytes]:
        """Worker `index`'s entries from number `since` on (the last `ring` at most)."""
        base = index * self.stride
        n = self.count(index)
        out = []
        for k in range(max(since, n - self.ring), n):
            at = base + 8 + (k % self.ring) * self.entry
            (length,) = _LEN.unpack_from(self.buf, at)
            if 0 < length <= self.entry - 4:
                out.append(bytes(self.buf[at + 4:at + 4 + length]))
        return out

    def reset(self, index: int) -> None:
        """A replaced worker starts its ring from 0."""
        _COUNT.pack_into(self.buf, index * self.stride, 0)
