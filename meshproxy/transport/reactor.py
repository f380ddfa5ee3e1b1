"""A per-worker readiness reactor under trio: one epoll, one trio task, many sockets.

Why (DESIGN.md section 6): trio's `wait_readable` re-arms a one-shot epoll registration
with an epoll_ctl syscall on every wait and keeps per-fd bookkeeping in Python; with two
waits per proxied request that is a large share of the request's CPU. Here every socket is
registered once, edge-triggered, in the reactor's own epoll; a single trio task waits on
that epoll's fd and, for each batch of events, wakes the tasks parked on those sockets with
`trio.lowlevel.reschedule`. A wait costs a task switch, no syscall; a batch costs one trio
wait plus one `epoll_wait`, shared by every socket that became ready in it.

Edge-triggered rules (epoll(7)):
- a task may only wait after a read returned EAGAIN, or when it knows nothing can be
  queued yet; an edge that arrives while nobody waits is remembered in `Channel.ready`
  and consumed by the next wait, so no wake-up is lost;
- "knows nothing can be queued" is `Channel.drained and not Channel.hup`: the last read
  returned less than it asked for (a short TCP read empties the receive queue, so whatever
  arrives after it raises a new edge), and the peer has not shut down its side. A FIN
  that came with the last bytes raised no edge of its own (it rode the data's, already
  consumed by a wait), so once the reactor has seen EPOLLRDHUP every wait reads first;
- a spurious wake-up is harmless: callers loop on EAGAIN.
Only readability goes through the reactor. Writability is rare (a full send buffer) and
uses trio's own `wait_writable`.

Parking: a keep-alive connection idle for a while gives up its trio task (a task and its
chain of suspended coroutines is most of an idle connection's memory) and leaves a
callback in `Channel.parked`; the next edge on the socket calls it from the batch, and it
hands the connection a new task. An edge that came before the callback was left is in
`ready`, which the parker checks.

Timers: connections keep their deadline as a plain float (`Timed.deadline`), set with one
attribute store per phase; a ticker checks them every TICK seconds and cancels the scope of
any connection past its deadline. Timeouts therefore fire up to TICK late, like HAProxy's
and Envoy's coarse timers, and moving a deadline costs nothing on the hot path. `now` is
refreshed at every batch and tick, so `reactor.now` is never more than one batch old.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from typing import Protocol

import outcome
import trio
from trio.lowlevel import Abort, current_task, reschedule, wait_task_rescheduled

EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
# The peer shut down its side (FIN) or the connection failed: reads never block again.
HANGUP = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
# EPOLLERR and EPOLLHUP are always reported; either means a read will not block.
READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
# Events taken per epoll_wait; more are left for the next batch.
MAX_EVENTS = 512
# Timer resolution: deadlines fire at most this late.
TICK = 0.05


class Channel:
    """A socket registered with the reactor."""

    __slots__ = ("sock", "fd", "reader", "ready", "drained", "hup", "deadline", "parked",
                 "_channels", "_waits")

    def __init__(self, sock: socket.socket, channels: dict[int, Channel],
                 waits: set[Channel]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.reader: trio.lowlevel.Task | None = None
        self.ready = False
        # Nothing read yet is in the receive queue without an edge to announce it: true for
        # a new registration (epoll reports data already queued when the fd is added), and
        # after every short read (sockio.recv_now keeps it).
        self.drained = True
        self.hup = False  # the peer shut down its sending side, or the socket failed
        self.deadline = 0.0
        # A connection parked without a task (nobody waits on the channel): called once by
        # the reactor, from its batch, at the next edge; it hands the connection a task.
        self.parked: Callable[[], None] | None = None
        self._channels = channels
        self._waits = waits

    async def wait_readable(self, deadline: float = 0.0) -> None:
        """Until the socket may be readable (see the edge-triggered rules above). With a
        deadline (reactor time), raises trio.TooSlowError once it has passed: a coarse
        timer, checked by the reactor's ticker, costing a set insertion instead of a trio
        cancel scope (about 12 us)."""
        if self.ready:
            self.ready = False
            return
        self.reader = current_task()
        if deadline:
            self.deadline = deadline
            self._waits.add(self)

        def abort(_: object) -> Abort:
            self.reader = None
            self._waits.discard(self)
            return Abort.SUCCEEDED

        try:
            await wait_task_rescheduled(abort)
        finally:
            if deadline:
                self._waits.discard(self)

    def forget(self) -> None:
        """Before the socket is closed: the kernel drops the fd from the epoll set on
        close; a task still parked on it is woken with ClosedResourceError."""
        if self._channels.get(self.fd) is self:
            del self._channels[self.fd]
        self.parked = None
        if self.reader is not None:
            task, self.reader = self.reader, None
            reschedule(task, outcome.Error(trio.ClosedResourceError("socket closed")))


class Timed(Protocol):
    """A connection with a deadline: `expire` is called once it has passed (it cancels the
    connection's scope, or closes a connection that has no task)."""

    deadline: float

    def expire(self) -> None: ...


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._channels: dict[int, Channel] = {}
        self.timed: set[Timed] = set()
        self.waits: set[Channel] = set()  # channel waits with a deadline
        self.now = trio.current_time()

    def register(self, sock: socket.socket) -> Channel:
        ch = Channel(sock, self._channels, self.waits)
        self._channels[ch.fd] = ch
        self._epoll.register(ch.fd, EVENTS)
        return ch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        epoll = self._epoll
        channels = self._channels
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                self.now = trio.current_time()
                for fd, ev in epoll.poll(0, MAX_EVENTS):
                    if ev & READABLE:
                        ch = channels.get(fd)
                        if ch is None:
                            continue
                        if ev & HANGUP:
                            ch.hup = True
                        task = ch.reader
                        if task is not None:
                            ch.reader = None
                            reschedule(task)
                        else:
                            ch.ready = True
                            wake = ch.parked
                            if wake is not None:
                                ch.parked = None
                                wake()
        finally:
            epoll.close()

    async def run_timers(self) -> None:
        while True:
            await trio.sleep(TICK)
            now = self.now = trio.current_time()
            expired = [t for t in self.timed if t.deadline <= now]
            for t in expired:
                t.expire()
            for ch in [c for c in self.waits if c.deadline <= now]:
                self.waits.discard(ch)
                if ch.reader is not None:
                    task, ch.reader = ch.reader, None
                    reschedule(task, outcome.Error(trio.TooSlowError()))

