"""The reactor: no lost edge-triggered wake-ups, closing wakes waiters, coarse timers."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from meshproxy.transport.reactor import TICK, Channel, Reactor
from meshproxy.transport.sockio import close, recv_after_wait, recv_now


@asynccontextmanager
async def running(timers: bool = False
                  ) -> AsyncIterator[tuple[Reactor, Channel, socket.socket, trio.Nursery]]:
    """A running reactor with one end of a socket pair registered (the channel) and the
    other end for the test to write; everything is torn down afterwards."""
    reactor = Reactor()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    async with trio.open_nursery() as n:
        await n.start(reactor.run)
        if timers:
            n.start_soon(reactor.run_timers)
        ch = reactor.register(a)
        try:
            yield reactor, ch, b, n
        finally:
            close(ch)
            b.close()
            n.cancel_scope.cancel()


def test_reactor_edge_before_wait_is_not_lost() -> None:
    async def main() -> None:
        async with running() as (_, ch, peer, _n):
            peer.send(b"early")
            await trio.sleep(0.05)  # the edge fires while nobody waits
            with trio.fail_after(1):
                assert await recv_after_wait(ch) == b"early"
            peer.send(b"late")
            with trio.fail_after(1):
                assert await recv_now(ch) == b"late"

    trio.run(main)


def test_reactor_eof_wakes_reader() -> None:
    async def main() -> None:
        async with running() as (_, ch, peer, n):

            async def closer() -> None:
                await trio.sleep(0.05)
                peer.close()

            n.start_soon(closer)
            with trio.fail_after(1):
                assert await recv_now(ch) == b""

    trio.run(main)


def test_reactor_close_wakes_parked_task() -> None:
    async def main() -> None:
        async with running() as (_, ch, _peer, n):

            async def closer() -> None:
                await trio.sleep(0.05)
                close(ch)

            n.start_soon(closer)
            with pytest.raises(trio.ClosedResourceError), trio.fail_after(1):
                await ch.wait_readable()

    trio.run(main)


class _Conn:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.cs = trio.CancelScope()

    def expire(self) -> None:
        self.cs.cancel()


def test_reactor_timers_cancel_after_deadline() -> None:
    async def main() -> None:
        async with running(timers=True) as (reactor, _ch, _peer, _n):
            start = trio.current_time()
            conn = _Conn(start + 0.2)
            reactor.timed.add(conn)
            with conn.cs:
                await trio.sleep(5)
            took = trio.current_time() - start
            assert conn.cs.cancelled_caught
            assert 0.2 <= took <= 0.2 + 2 * TICK + 0.1

    trio.run(main)


def test_reactor_parked_channel_woken_once_from_the_batch() -> None:
    async def main() -> None:
        async with running() as (reactor, ch, peer, _n):
            woken: list[int] = []
            ch.parked = lambda: woken.append(1)
            await trio.sleep(0.05)
            assert woken == []  # nothing sent: nothing called
            peer.send(b"x")
            with trio.fail_after(1):
                while not woken:
                    await trio.sleep(0.01)
            assert ch.parked is None and ch.ready  # once, and the edge is kept for the task
            peer.send(b"y")
            await trio.sleep(0.05)
            assert woken == [1]
            with trio.fail_after(1):
                assert await recv_after_wait(ch) == b"xy"

    trio.run(main)


def test_reactor_timed_wait_raises_too_slow() -> None:
    async def main() -> None:
        async with running(timers=True) as (reactor, ch, peer, _n):
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await recv_after_wait(ch, deadline=trio.current_time() + 0.2)
            assert 0.2 <= trio.current_time() - start <= 0.2 + 2 * TICK + 0.1
            assert not reactor.waits  # no registration left behind
            peer.send(b"x")  # and a later plain wait still works
            with trio.fail_after(1):
                assert await recv_after_wait(ch) == b"x"

    trio.run(main)
