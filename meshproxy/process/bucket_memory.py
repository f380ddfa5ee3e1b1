"""Shared memory for rate-limit buckets: one memfd the supervisor makes and every worker
maps, so that all workers take tokens from the same buckets (`_core.token_bucket`).

Unlike the stats segment (one writer per slab), these cells are written by every worker,
with atomic compare-and-swap only. Tables are assigned by name by the supervisor and never
reused within the process lifetime: a limiter kept across a reload keeps its buckets, a
changed one (another table size) gets a fresh table. The file is sparse: pages never
touched cost nothing.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

# 8 Mi cells = 64 MiB of address space: 4 Mi keyed buckets over the process lifetime.
CAPACITY_CELLS = 8 * 1024 * 1024


class BucketMemory:
    def __init__(self, fd: int | None = None, cells: int = CAPACITY_CELLS) -> None:
        self.cells = cells
        if fd is None:
            fd = os.memfd_create("meshproxy-ratelimit", 0)
            os.ftruncate(fd, cells * 8)
        self.fd = fd
        self.buf = mmap.mmap(fd, cells * 8)
        self.slots: dict[str, int] = {}  # table name -> first cell
        self._next = 0

    def assign(self, tables: dict[str, int]) -> list[str]:
        """Place new tables; errors (and nothing placed) when they do not fit."""
        new = {n: c for n, c in tables.items() if n not in self.slots}
        need = sum(new.values())
        if self._next + need > self.cells:
            return [f"rate limits: the bucket memory has room for {self.cells} cells over "
                    f"the process lifetime, this config needs {self._next + need}"]
        for name, cells in new.items():
            self.slots[name] = self._next
            self._next += cells
        return []

    def memory(self, slots: dict[str, int]) -> Any:
        """A compile_config `memory` placing each table where the supervisor put it."""
        buf = self.buf

        def place(name: str, cells: int) -> tuple[Any, int]:
            return buf, slots[name]

        return place
