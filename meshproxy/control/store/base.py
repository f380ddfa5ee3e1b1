"""The Store interface: a revisioned key-value store with compare-and-swap, watches and
leases, the subset of etcd v3's model the control plane needs (so that SQLite and etcd can
both implement it, and both pass tests/integration/test_store.py).

Model (etcd's):
- the store has one revision, raised by one for every change; each key keeps the revision
  of its creation and of its last change (`Entry.revision`, etcd's mod_revision);
- `put(key, value, expect=R)` succeeds only if the key's revision is R (0: the key must not
  exist), else raises Conflict carrying the current revision: optimistic concurrency, the
  resourceVersion of the operator API;
- `watch(prefix, after=R)` yields every change to keys under prefix with a revision above R,
  in revision order, then the ones that follow as they happen. A revision that history no
  longer holds raises Compacted (the watcher lists again and watches from the list's
  revision);
- a lease lives for its TTL unless kept alive; when it lapses every key put with it is
  deleted, each deletion an event like any other (registrations held by heartbeats).

All methods are async: a store may do network I/O (etcd) or run blocking calls in a thread
(SQLite). Stores are opened as async context managers, which own their background tasks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

# Revisions of history every store keeps for watches: a watcher that falls further behind
# lists again. At 10 changes a second (a busy registry) that is almost three hours, a few
# tens of MB.
HISTORY = 100_000


@dataclass(frozen=True, slots=True)
class Entry:
    key: str
    value: bytes
    revision: int  # of its last change (etcd's mod_revision)
    created: int  # revision of its creation
    lease: int  # 0: none


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    revision: int
    value: bytes | None  # None for a delete


class Conflict(Exception):
    """A compare-and-swap failed: `current` is the key's revision now (0: absent)."""

    def __init__(self, key: str, expected: int, current: int) -> None:
        super().__init__(f"{key}: expected revision {expected}, it is {current}")
        self.key, self.expected, self.current = key, expected, current


class Compacted(Exception):
    """A watch asked for changes older than the history kept."""

    def __init__(self, after: int, oldest: int) -> None:
        super().__init__(f"changes after revision {after} are compacted (history starts at "
                         f"{oldest})")
        self.after, self.oldest = after, oldest


class LeaseExpired(Exception):
    """The lease is gone (lapsed or revoked): its keys were deleted."""


class Store(Protocol):
    async def get(self, key: str) -> Entry | None: ...

    async def list(self, prefix: str) -> tuple[list[Entry], int]:
        """Entries under prefix in key order, and the store revision they were read at."""
        ...

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  lease: int = 0) -> int:
        """The new revision. Raises Conflict when `expect` is given and not the key's
        revision, LeaseExpired when `lease` is not alive."""
        ...

    async def delete(self, key: str, *, expect: int | None = None) -> int | None:
        """The revision of the deletion; None when the key did not exist (and `expect` was
        not given; with `expect`, a mismatch raises Conflict)."""
        ...

    def watch(self, prefix: str, after: int) -> AsyncIterator[Event]: ...

    async def grant(self, ttl: float) -> int:
        """A new lease of `ttl` seconds; its id (never 0)."""
        ...

    async def keep_alive(self, lease: int) -> None:
        """Restart the lease's TTL; LeaseExpired when it is gone."""
        ...

    async def revoke(self, lease: int) -> None:
        """End the lease now: its keys are deleted (a graceful deregistration)."""
        ...

    async def revision(self) -> int: ...
