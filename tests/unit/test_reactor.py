"""The reactor: no lost edge-triggered wake-ups, closing wakes waiters, coarse timers."""

from __future__ import annotations

import socket

import pytest
import trio

from meshproxy.transport.reactor import TICK, Reactor
from meshproxy.transport.sockio import close, recv_after_wait, recv_now


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def test_reactor_edge_before_wait_is_not_lost() -> None:
    async def main() -> None:
        reactor = Reactor()
        async with trio.open_nursery() as n:
            await n.start(reactor.run)
            a, b = pair()
            ch = reactor.register(a)
            b.send(b"early")
            await trio.sleep(0.05)  # the edge fires while nobody waits
            with trio.fail_after(1):
                assert await recv_after_wait(ch) == b"early"
            b.send(b"late")
            with trio.fail_after(1):
                assert await recv_now(ch) == b"late"
            close(ch)
            b.close()
            n.cancel_scope.cancel()

    trio.run(main)


def test_reactor_eof_wakes_reader() -> None:
    async def main() -> None:
        reactor = Reactor()
        async with trio.open_nursery() as n:
            await n.start(reactor.run)
            a, b = pair()
            ch = reactor.register(a)

            async def closer() -> None:
                await trio.sleep(0.05)
                b.close()

            n.start_soon(closer)
            with trio.fail_after(1):
                assert await recv_now(ch) == b""
            close(ch)
            n.cancel_scope.cancel()

    trio.run(main)


def test_reactor_close_wakes_parked_task() -> None:
    async def main() -> None:
        reactor = Reactor()
        async with trio.open_nursery() as n:
            await n.start(reactor.run)
            a, b = pair()
            ch = reactor.register(a)

            async def closer() -> None:
                await trio.sleep(0.05)
                close(ch)

            n.start_soon(closer)
            with pytest.raises(trio.ClosedResourceError), trio.fail_after(1):
                await ch.wait_readable()
            b.close()
            n.cancel_scope.cancel()

    trio.run(main)


class _Conn:
    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.cs = trio.CancelScope()


def test_reactor_timers_cancel_after_deadline() -> None:
    async def main() -> None:
        reactor = Reactor()
        async with trio.open_nursery() as n:
            n.start_soon(reactor.run_timers)
            start = trio.current_time()
            conn = _Conn(start + 0.2)
            reactor.timed.add(conn)
            with conn.cs:
                await trio.sleep(5)
            took = trio.current_time() - start
            assert conn.cs.cancelled_caught
            assert 0.2 <= took <= 0.2 + 2 * TICK + 0.1
            n.cancel_scope.cancel()

    trio.run(main)


def test_reactor_timed_wait_raises_too_slow() -> None:
    async def main() -> None:
        reactor = Reactor()
        async with trio.open_nursery() as n:
            await n.start(reactor.run)
            n.start_soon(reactor.run_timers)
            a, b = pair()
            ch = reactor.register(a)
            start = trio.current_time()
            with pytest.raises(trio.TooSlowError):
                await recv_after_wait(ch, deadline=trio.current_time() + 0.2)
            assert 0.2 <= trio.current_time() - start <= 0.2 + 2 * TICK + 0.1
            assert not reactor.waits  # no registration left behind
            b.send(b"x")  # and a later plain wait still works
            with trio.fail_after(1):
                assert await recv_after_wait(ch) == b"x"
            close(ch)
            b.close()
            n.cancel_scope.cancel()

    trio.run(main)
