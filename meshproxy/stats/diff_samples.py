"""Mirrored routes' differing pairs, the latest few per worker (proxy.mirror, shown by the
admin server's /mirror_diffs): a stats.worker_rings ring per worker whose entries are JSON
documents. A torn entry (overwritten while read) does not decode and is dropped.
"""

from __future__ import annotations

from typing import Any

import msgspec

from meshproxy.stats.worker_rings import WorkerRings

RING = 16
ENTRY = 4096


class DiffSamples(WorkerRings):
    def __init__(self, workers: int, fd: int | None = None) -> None:
        super().__init__("meshproxy-mirror-diffs", workers, RING, ENTRY, fd)

    def record(self, index: int, sample: dict[str, Any]) -> None:
        """A worker's new sample; one too big for an entry loses its summaries first."""
        data = msgspec.json.encode(sample)
        if len(data) > ENTRY - 4:
            data = msgspec.json.encode({**sample, "primary": None, "shadow": None,
                                        "truncated": True})
        self.write(index, data)

    def read(self) -> list[dict[str, Any]]:
        """Every worker's latest samples, newest first."""
        out = []
        for i in range(self.workers):
            for entry in self.entries(i):
                try:
                    sample = msgspec.json.decode(entry)
                except msgspec.DecodeError:
                    continue
                if isinstance(sample, dict):
                    sample["worker"] = i
                    out.append(sample)
        out.sort(key=lambda s: s.get("time", 0), reverse=True)
        return out
