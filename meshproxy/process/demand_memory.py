"""On-demand discovery's one channel from workers to the supervisor: shared memory, like
the stats (DESIGN.md section 1 keeps the control pipe one way). A worker that meets a
request for an authority it has no route for writes the authority here and holds the
request until its next snapshot; the supervisor reads what is new every POLL and
subscribes to it on the discovery stream (Linkerd's per-authority subscriptions).

The rings are stats.worker_rings, an entry an authority. The supervisor reads the
entries past its last count (the last RING of them if it fell further behind: a lost one
is asked again by the next request that misses).
"""

from __future__ import annotations

from meshproxy.protocol.authority import MAX_AUTHORITY
from meshproxy.stats.worker_rings import WorkerRings

RING = 64
ENTRY = MAX_AUTHORITY + 4  # its length, then the name
POLL = 0.02


class DemandMemory(WorkerRings):
    def __init__(self, workers: int, fd: int | None = None) -> None:
        super().__init__("meshproxy-demand", workers, RING, ENTRY, fd)
        self._read = [0] * workers

    # ---------------------------------------------------------------- the worker's side

    def note(self, index: int, authority: bytes) -> None:
        self.write(index, authority)

    # ---------------------------------------------------------------- the supervisor's

    def read_new(self) -> set[str]:
        out: set[str] = set()
        for i in range(self.workers):
            n = self.count(i)
            for entry in self.entries(i, self._read[i]):
                out.add(entry.decode("ascii", "replace"))
            self._read[i] = n
        return out

    def reset(self, index: int) -> None:
        """A replaced worker starts its ring from 0."""
        super().reset(index)
        self._read[index] = 0
