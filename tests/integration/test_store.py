"""The Store interface's behaviour, one suite for every implementation (control/store/):
revisions, compare-and-swap, watches from a revision, compaction, leases, persistence.
Each test runs against a real store: a SQLite file in the test's directory, and a real etcd
(Debian's etcd-server) started for the test on free loopback ports."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from meshproxy.control.store import Compacted, Conflict, Event, LeaseExpired, store_path
from meshproxy.control.store.etcd import EtcdStore
from meshproxy.control.store.sqlite import SQLiteStore
from tests.helpers import Etcd


class Opener:
    """Opens the store under test; `down(seconds)` keeps its server down that long (the
    SQLite store is its own server: it is down between two opens)."""

    def __init__(self, open_: Callable[..., AbstractAsyncContextManager[Any]],
                 down: Callable[[float], None] = time.sleep) -> None:
        self.open, self.down = open_, down

    def __call__(self, **kwargs: Any) -> AbstractAsyncContextManager[Any]:
        return self.open(**kwargs)


@pytest.fixture(params=["sqlite", "etcd"])
def opener(request, tmp_path: Path) -> Iterator[Opener]:
    if request.param == "sqlite":
        yield Opener(lambda **kw: SQLiteStore.open(tmp_path / "cp.db", **kw))
        return
    etcd = Etcd(tmp_path / "etcd").start()
    try:
        yield Opener(lambda **kw: EtcdStore.open(etcd.url, **kw), etcd.down)
    finally:
        etcd.stop()


def run(opener: Opener, test: Callable[[Any], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        with trio.fail_after(20):
            async with opener(**kwargs) as store:
                await test(store)
    trio.run(main)


async def take(events: AsyncIterator[Event], n: int) -> list[Event]:
    out = []
    async for ev in events:
        out.append(ev)
        if len(out) == n:
            break
    return out


def test_store_put_get_list_and_revisions(opener) -> None:
    async def t(store) -> None:
        base = await store.revision()
        r1 = await store.put("/svc/a", b"1")
        r2 = await store.put("/svc/b", b"2")
        r3 = await store.put("/svc/a", b"3")
        await store.put("/other/x", b"x")
        assert (r1, r2, r3) == (base + 1, base + 2, base + 3)
        a = await store.get("/svc/a")
        assert (a.value, a.revision, a.created, a.lease) == (b"3", r3, r1, 0)
        assert await store.get("/svc/none") is None
        entries, rev = await store.list("/svc/")
        assert [(e.key, e.value) for e in entries] == [("/svc/a", b"3"), ("/svc/b", b"2")]
        assert rev == await store.revision() == base + 4
        assert await store.delete("/svc/b") == base + 5
        assert await store.delete("/svc/b") is None
        assert [e.key for e in (await store.list(""))[0]] == ["/other/x", "/svc/a"]
    run(opener, t)


def test_store_compare_and_swap(opener) -> None:
    async def t(store) -> None:
        r = await store.put("/k", b"v1", expect=0)  # create only if absent
        with pytest.raises(Conflict) as info:
            await store.put("/k", b"again", expect=0)
        assert info.value.current == r
        r2 = await store.put("/k", b"v2", expect=r)
        with pytest.raises(Conflict):
            await store.put("/k", b"stale", expect=r)  # a stale resourceVersion: refused
        assert (await store.get("/k")).value == b"v2"
        with pytest.raises(Conflict):
            await store.delete("/k", expect=r)
        assert await store.delete("/k", expect=r2) is not None

        # Racing writers with the same expectation: exactly one wins.
        start = await store.put("/race", b"0")
        wins: list[int] = []

        async def writer(i: int) -> None:
            try:
                await store.put("/race", b"%d" % i, expect=start)
                wins.append(i)
            except Conflict:
                pass

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(writer, i)
        assert len(wins) == 1
        assert (await store.get("/race")).value == b"%d" % wins[0]
    run(opener, t)


def test_store_watch_replays_then_follows_in_order(opener) -> None:
    async def t(store) -> None:
        r0 = await store.put("/svc/a", b"1")
        await store.put("/elsewhere", b"no")
        await store.put("/svc/b", b"2")
        await store.delete("/svc/a")
        got: list[Event] = []

        async def follow() -> None:
            async with aclosing(store.watch("/svc/", r0 - 1)) as events:
                got.extend(await take(events, 5))

        async with trio.open_nursery() as n:
            n.start_soon(follow)
            await trio.sleep(0.1)
            await store.put("/svc/c", b"3")
            await store.put("/elsewhere", b"still no")
            await store.put("/svc/a", b"4")
        assert [(e.kind, e.key, e.value) for e in got] == [
            ("put", "/svc/a", b"1"), ("put", "/svc/b", b"2"), ("delete", "/svc/a", None),
            ("put", "/svc/c", b"3"), ("put", "/svc/a", b"4")]
        revs = [e.revision for e in got]
        assert revs == sorted(revs) and len(set(revs)) == 5
    run(opener, t)


def test_store_watch_from_the_present_sees_only_what_follows(opener) -> None:
    async def t(store) -> None:
        await store.put("/k/old", b"old")
        _, rev = await store.list("/k/")
        got: list[Event] = []

        async def follow() -> None:
            async with aclosing(store.watch("/k/", rev)) as events:
                got.extend(await take(events, 1))

        async with trio.open_nursery() as n:
            n.start_soon(follow)
            await trio.sleep(0.1)
            await store.put("/k/new", b"new")
        assert [(e.key, e.value) for e in got] == [("/k/new", b"new")]
    run(opener, t)


def test_store_watch_from_a_compacted_revision_is_refused(opener) -> None:
    async def t(store) -> None:
        for i in range(2100):
            await store.put("/k", b"%d" % i)
        with pytest.raises(Compacted):
            async with aclosing(store.watch("/k", 5)) as events:
                await take(events, 1)
        # What history still holds replays.
        recent = (await store.revision()) - 3
        async with aclosing(store.watch("/k", recent)) as events:
            assert len(await take(events, 3)) == 3
    run(opener, t, history=1000)


def test_store_lease_lapses_and_its_keys_go(opener) -> None:
    async def t(store) -> None:
        kept, lapsing = await store.grant(1.0), await store.grant(1.0)  # etcd: whole seconds
        assert kept and lapsing and kept != lapsing
        await store.put("/reg/kept", b"k", lease=kept)
        await store.put("/reg/lapsing", b"l", lease=lapsing)
        _, rev = await store.list("/reg/")
        started = time.monotonic()
        deleted: list[Event] = []
        gone_after = 0.0

        async def follow() -> None:
            nonlocal gone_after
            async with aclosing(store.watch("/reg/", rev)) as events:
                deleted.extend(await take(events, 1))
            gone_after = time.monotonic() - started

        async with trio.open_nursery() as n:
            n.start_soon(follow)
            for _ in range(10):  # heartbeats every 0.2 s keep one of them
                await trio.sleep(0.2)
                await store.keep_alive(kept)
        assert [(e.kind, e.key) for e in deleted] == [("delete", "/reg/lapsing")]
        # Its TTL, plus the store's expiry tick (SQLite 0.1 s; etcd's lessor about 0.5 s).
        assert 1.0 <= gone_after < 1.0 + 0.8, gone_after
        assert (await store.get("/reg/kept")).value == b"k"
        assert await store.get("/reg/lapsing") is None
        with pytest.raises(LeaseExpired):
            await store.keep_alive(lapsing)
        with pytest.raises(LeaseExpired):
            await store.put("/reg/again", b"x", lease=lapsing)
        await store.revoke(kept)  # a graceful deregistration: at once
        assert await store.get("/reg/kept") is None
    run(opener, t)


def test_store_persists_and_renews_leases_across_a_restart(opener) -> None:
    state: dict[str, int] = {}

    async def first(store) -> None:
        state["lease"] = await store.grant(1.0)
        await store.put("/reg/w", b"w", lease=state["lease"])
        state["rev"] = await store.put("/cfg/route", b"r")

    async def second(store) -> None:
        assert await store.revision() == state["rev"]
        assert (await store.get("/cfg/route")).value == b"r"
        # Down for longer than the lease's TTL: it gets a whole TTL again on start.
        assert (await store.get("/reg/w")).lease == state["lease"]
        await store.keep_alive(state["lease"])
        assert await store.put("/cfg/next", b"n") == state["rev"] + 1

    run(opener, first)
    opener.down(1.2)
    run(opener, second)


def test_store_url_forms(tmp_path: Path) -> None:
    assert store_path("sqlite:///var/lib/meshproxy/cp.db") == Path("/var/lib/meshproxy/cp.db")
    assert store_path("sqlite://cp.db") == Path("cp.db")
    assert store_path("cp.db") == Path("cp.db")
    with pytest.raises(ValueError, match="unknown scheme 'redis'"):
        store_path("redis://127.0.0.1")


def test_store_sqlite_file_is_private(tmp_path: Path) -> None:
    async def t(store) -> None:
        await store.put("/k", b"v")
    run(lambda **kw: SQLiteStore.open(tmp_path / "new" / "cp.db", **kw), t)
    assert (tmp_path / "new" / "cp.db").stat().st_mode & 0o777 == 0o600
