"""The shared GCRA token buckets: burst and refill arithmetic, keyed tables, and exactness
when several processes take from the same buckets at once (atomic compare-and-swap)."""

from __future__ import annotations

import mmap
import multiprocessing
import os

from meshproxy._core.token_bucket import TokenBuckets, now_ns
from meshproxy.process.bucket_memory import BucketMemory

SECOND = 1_000_000_000


def test_token_bucket_burst_then_refill() -> None:
    b = TokenBuckets(bytearray(64), 0, 1, 5, 10.0)  # 5 tokens, 10 per second
    t = now_ns()
    assert [b.take(0, t) for _ in range(6)] == [True] * 5 + [False]
    assert b.remaining == 0 and abs(b.reset - 0.1) < 1e-6  # next token in 100 ms
    assert not b.take(0, t + SECOND // 20)                  # 50 ms: not yet
    assert b.take(0, t + SECOND // 10)                      # 100 ms: one token back
    assert b.take(0, t + 10 * SECOND) and b.remaining == 4  # long idle: full, no more


def test_token_bucket_remaining_and_reset_count_down() -> None:
    b = TokenBuckets(bytearray(64), 0, 1, 3, 1.0)
    t = now_ns()
    seen = []
    for _ in range(3):
        b.take(0, t)
        seen.append((b.remaining, round(b.reset)))
    assert seen == [(2, 1), (1, 2), (0, 3)]  # reset: seconds until full again


def test_token_bucket_keys_are_separate() -> None:
    b = TokenBuckets(bytearray(16 * 16), 0, 16, 2, 1.0)
    t = now_ns()
    assert [b.take(11, t) for _ in range(3)] == [True, True, False]
    assert [b.take(22, t) for _ in range(3)] == [True, True, False]


def test_token_bucket_idle_slots_are_reused_beyond_capacity() -> None:
    b = TokenBuckets(bytearray(2 * 2 * 8), 0, 2, 1, 1.0)  # two slots only
    t = now_ns()
    for key in range(1, 40):  # each key's bucket refills before the next one comes
        assert b.take(key * 7919, t + key * 2 * SECOND)


def _hammer(fd: int, tries: int, t: int, out: multiprocessing.Queue) -> None:
    buf = mmap.mmap(fd, 4096)
    b = TokenBuckets(buf, 0, 1, 1000, 1.0)
    out.put(sum(b.take(0, t) for _ in range(tries)))


def test_token_bucket_exact_across_processes() -> None:
    """Two processes race for 1,000 tokens at one instant: exactly 1,000 are granted."""
    fd = os.memfd_create("test-buckets", 0)
    os.ftruncate(fd, 4096)
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    t = now_ns()
    procs = [ctx.Process(target=_hammer, args=(fd, 5000, t, out)) for _ in range(3)]
    for p in procs:
        p.start()
    granted = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    os.close(fd)
    assert sum(granted) == 1000, granted


def test_bucket_memory_places_tables_once() -> None:
    mem = BucketMemory(cells=100)
    assert mem.assign({"a": 10, "b": 20}) == []
    assert mem.slots == {"a": 0, "b": 10}
    assert mem.assign({"a": 10, "c": 30}) == [] and mem.slots["c"] == 30
    assert "b" not in mem.slots  # parked: still in no one's way for REUSE_AFTER
    errors = mem.assign({"d": 90})
    assert errors and "room for 100 cells" in errors[0] and "d" not in mem.slots


def test_bucket_memory_reuses_a_departed_table_after_the_wait() -> None:
    from meshproxy.stats.shared_memory import REUSE_AFTER

    mem = BucketMemory(cells=30)
    assert mem.assign({"a": 10, "b": 20}, now=0.0) == []
    mem.buf[mem.slots["b"] * 8:mem.slots["b"] * 8 + 8] = (7).to_bytes(8, "little")
    first_b = mem.slots["b"]
    assert mem.assign({"a": 10}, now=1.0) == []  # b leaves
    assert mem.assign({"a": 10, "c": 20}, now=2.0)  # its cells are still parked
    assert mem.assign({"a": 10, "c": 20}, now=1.0 + REUSE_AFTER) == []
    assert mem.slots["c"] == first_b and mem.slots["a"] == 0
    assert mem.buf[first_b * 8:first_b * 8 + 8] == bytes(8)  # zeroed before reuse
