"""Leader election over the Store, for the singleton tasks (lease expiry of the registry):
the replica that creates `/election/leader` with its own lease leads while it keeps that
lease alive (etcd's concurrency/election recipe, with compare-and-swap on absence).

If the leader dies its lease lapses within LEASE_TTL and the key with it; another replica
creates it within one POLL after that. A leader that cannot renew (store unreachable,
lease lost) stops leading at once: two replicas may both believe they lead for at most the
time a renewal takes to fail, and the task they guard (evicting lapsed registrations with
compare-and-swap on each record's revision) is safe to run twice.
"""

from __future__ import annotations

import logging

import trio

from meshproxy.control.store import Conflict, LeaseExpired, Store

log = logging.getLogger("meshproxy.control.election")

KEY = "/election/leader"
LEASE_TTL = 3.0
POLL = 0.5


class Election:
    def __init__(self, store: Store, replica: str, ttl: float = LEASE_TTL) -> None:
        self.store = store
        self.replica = replica
        self.ttl = ttl
        self.leader = False
        self.since = 0.0  # trio time at which this replica became leader
        self.changed = trio.Event()

    def _set(self, leader: bool) -> None:
        if leader != self.leader:
            self.leader = leader
            self.since = trio.current_time()
            log.info("replica %s %s the singleton tasks", self.replica,
                     "now runs" if leader else "no longer runs")
            self.changed.set()
            self.changed = trio.Event()

    async def run(self) -> None:
        while True:
            try:
                await self._campaign()
            except (OSError, trio.BrokenResourceError) as exc:
                log.warning("election: the store failed (%s); retrying", exc)
            self._set(False)
            await trio.sleep(POLL)

    async def _campaign(self) -> None:
        lease = await self.store.grant(self.ttl)
        try:
            await self.store.put(KEY, self.replica.encode(), expect=0, lease=lease)
        except Conflict:
            await self.store.revoke(lease)
            return
        self._set(True)
        try:
            while True:
                await trio.sleep(self.ttl / 3)
                with trio.fail_after(self.ttl / 2):
                    await self.store.keep_alive(lease)
        except (LeaseExpired, trio.TooSlowError):
            log.warning("election: replica %s lost its lease", self.replica)
        finally:
            self._set(False)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await self.store.revoke(lease)
                except (LeaseExpired, OSError, trio.BrokenResourceError):
                    pass
