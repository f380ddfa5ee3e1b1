"""The push debounce (sans-IO timing under trio's MockClock): a service's changes go out
after 100 ms of quiet on it, or 10 s after its first when it never quiets; a steady stream
of changes to one service never holds another's."""

from __future__ import annotations

import trio
import trio.testing

from meshproxy.control.metrics import Metrics
from meshproxy.control.push import DEBOUNCE_AFTER, DEBOUNCE_MAX, Hooks, PushServer
from meshproxy.control.translate import MeshIndex


def _run(script) -> list[tuple[float, set[str]]]:
    flushed: list[tuple[float, set[str]]] = []

    async def main() -> None:
        ps = PushServer(MeshIndex(), Metrics(), Hooks())
        ps._flush = lambda ready: flushed.append((round(trio.current_time(), 3),  # type: ignore[method-assign]
                                                  set(ready)))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ps.debounce)
            await script(ps)
            await trio.sleep(DEBOUNCE_MAX + 1)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return flushed


def test_debounce_waits_for_quiet_then_flushes_once() -> None:
    async def script(ps: PushServer) -> None:
        ps.notify({"default/a"})
        await trio.sleep(0.05)
        ps.notify({"default/a"})

    assert _run(script) == [(round(0.05 + DEBOUNCE_AFTER, 3), {"default/a"})]


def test_debounce_is_per_service_and_capped() -> None:
    async def script(ps: PushServer) -> None:
        ps.notify({"default/b"})
        for _ in range(300):  # a change to a every 50 ms for 15 s: never quiet
            ps.notify({"default/a"})
            await trio.sleep(0.05)

    flushed = _run(script)
    assert flushed[0] == (DEBOUNCE_AFTER, {"default/b"})  # not held by a's stream
    a = [t for t, svcs in flushed if svcs == {"default/a"}]
    assert a[0] == DEBOUNCE_MAX  # capped, 10 s after its first change
    assert a[1] <= 2 * DEBOUNCE_MAX + 0.05
