"""Shared memory for rate-limit buckets: one memfd the supervisor makes and every worker
maps, so that all workers take tokens from the same buckets (`_core.token_bucket`).

Unlike the stats segment (one writer per slab), these cells are written by every worker,
with atomic compare-and-swap only. Tables are assigned by name by the supervisor: a limiter
kept across a reload keeps its buckets, a changed one (another table size) gets another
table. The table of a limiter that left is parked for REUSE_AFTER (the stats slots' rule:
requests on an older snapshot may still take tokens from it), then zeroed and given to a
new table of the same size, so limiters coming and going with pushed configs never
exhaust the memory. The file is sparse: pages never touched cost nothing.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from meshproxy.stats.shared_memory import REUSE_AFTER

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
        self.sizes: dict[str, int] = {}  # table name -> cells
        self._next = 0
        self._free: dict[int, list[int]] = {}  # cells -> first cells of zeroed tables
        self._parked: list[tuple[float, int, int]] = []  # (left at, first, cells)

    def _release(self, now: float) -> None:
        keep = []
        for at, first, cells in self._parked:
            if now - at >= REUSE_AFTER:
                self.buf[first * 8:(first + cells) * 8] = bytes(cells * 8)
                self._free.setdefault(cells, []).append(first)
            else:
                keep.append((at, first, cells))
        self._parked = keep

    def assign(self, tables: dict[str, int], now: float = 0.0) -> list[str]:
        """Place new tables and park those no longer wanted; errors (and nothing changed)
        when the new ones do not fit."""
        self._release(now)
        new = {n: c for n, c in tables.items() if n not in self.slots}
        free = {cells: len(firsts) for cells, firsts in self._free.items()}
        need = 0
        for cells in new.values():
            if free.get(cells):
                free[cells] -= 1
            else:
                need += cells
        if self._next + need > self.cells:
            return [f"rate limits: the bucket memory has room for {self.cells} cells, "
                    f"this config needs {self._next + need} (tables released less than "
                    f"{REUSE_AFTER:.0f} s ago included)"]
        for name in [n for n in self.slots if n not in tables]:
            self._parked.append((now, self.slots.pop(name), self.sizes.pop(name)))
        for name, cells in new.items():
            reuse = self._free.get(cells)
            if reuse:
                self.slots[name] = reuse.pop()
            else:
                self.slots[name] = self._next
                self._next += cells
            self.sizes[name] = cells
        return []

    def memory(self, slots: dict[str, int]) -> Any:
        """A compile_config `memory` placing each table where the supervisor put it."""
        buf = self.buf

        def place(name: str, cells: int) -> tuple[Any, int]:
            return buf, slots[name]

        return place
