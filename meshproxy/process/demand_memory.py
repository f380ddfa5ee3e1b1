"""On-demand discovery's one channel from workers to the supervisor: shared memory, like
the stats (DESIGN.md section 1 keeps the control pipe one way). A worker that meets a
request for an authority it has no route for writes the authority here and holds the
request until its next snapshot; the supervisor reads what is new every POLL and
subscribes to it on the discovery stream (Linkerd's per-authority subscriptions).

Layout per worker: an 8-byte count of entries written, then RING entries of ENTRY bytes
(a 2-byte length and the authority). The worker writes entry n at n % RING and only then
raises the count; the supervisor reads the entries between its last count and the new one
(the last RING of them if it fell further behind: a lost one is asked again by the next
request that misses). One writer per ring: no locks.
"""

from __future__ import annotations

import mmap
import os
import struct

from meshproxy.protocol.authority import MAX_AUTHORITY

RING = 64
ENTRY = MAX_AUTHORITY + 2  # its length, then the name
POLL = 0.02
_COUNT = struct.Struct("<q")
_LEN = struct.Struct("<H")
_STRIDE = 8 + RING * ENTRY
class DemandMemory:
    def __init__(self, workers: int, fd: int | None = None) -> None:
        self.workers = workers
        size = max(1, workers) * _STRIDE
        if fd is None:
            fd = os.memfd_create("meshproxy-demand", 0)
            os.ftruncate(fd, size)
        self.fd = fd
        self.buf = mmap.mmap(fd, size)
        self._read = [0] * workers

    # ---------------------------------------------------------------- the worker's side

    def note(self, index: int, authority: bytes) -> None:
        base = index * _STRIDE
        (n,) = _COUNT.unpack_from(self.buf, base)
        at = base + 8 + (n % RING) * ENTRY
        _LEN.pack_into(self.buf, at, len(authority))
        self.buf[at + 2:at + 2 + len(authority)] = authority
        _COUNT.pack_into(self.buf, base, n + 1)

    # ---------------------------------------------------------------- the supervisor's

    def read_new(self) -> set[str]:
        out: set[str] = set()
        for i in range(self.workers):
            base = i * _STRIDE
            (n,) = _COUNT.unpack_from(self.buf, base)
            start = max(self._read[i], n - RING)
            for k in range(start, n):
                at = base + 8 + (k % RING) * ENTRY
                (length,) = _LEN.unpack_from(self.buf, at)
                if 0 < length <= ENTRY - 2:
                    out.add(self.buf[at + 2:at + 2 + length].decode("ascii", "replace"))
            self._read[i] = n
        return out

    def reset(self, index: int) -> None:
        """A replaced worker starts its ring from 0."""
        _COUNT.pack_into(self.buf, index * _STRIDE, 0)
        self._read[index] = 0
