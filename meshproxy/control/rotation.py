"""Root rotation without restarts (`meshctl ca rotate-root`), beyond Istio, where replacing
a root means restarting every workload. Sans-IO: the phase and the proxies' status records
in, the next phase out; the replica does the store I/O and the pushes.

Phases, each entered only when every connected proxy with an identity has applied the
previous one (their status records say what they serve):

  TRUST_BOTH  the bundle is the old and the new root: pushed with every proxy's config.
              Done when each has ACKed a push carrying that bundle.
  ISSUE_NEW   leaves come from the new root; every proxy is asked to renew now (Renew).
              Done when each serves a certificate from the new root (IdentityStatus).
  DROP_OLD    the bundle is the new root alone. Done when each has ACKed it; then the
              new root's files become the CA directory's and the rotation ends.

Why this order gives zero failed handshakes: while any workload may present a leaf of
either root, every workload trusts both (TRUST_BOTH holds until all trust the new one);
the old root leaves the bundles only once no workload presents its leaves. A connection
established before a phase keeps working: certificates are checked at the handshake.

The state lives in the store (`/ca/rotation`), so a replica that takes over leadership,
or restarts, continues where the rotation was; every replica follows it (bundle, signer,
renewals for its own proxies), only the leader moves it on.
"""

from __future__ import annotations

from typing import Any

import msgspec

from meshproxy.control.ca import DROP_OLD, ISSUE_NEW, TRUST_BOTH

KEY = "/ca/rotation"
DONE = "done"
# How often the leader looks at the proxies' records while a rotation runs.
INTERVAL = 0.25


class Rotation(msgspec.Struct, frozen=True):
    phase: str  # one of ca.PHASES
    old_root: str  # fingerprints
    new_root: str
    started: float  # wall clock
    phase_since: float


def holding(phase: str, records: list[dict[str, Any]], bundle: str, new_root: str
            ) -> list[str]:
    """The connected proxies with an identity that have not applied `phase` yet (nodes);
    `bundle` is the hash of the phase's trust bundle as pushes carry it."""
    out = []
    for r in records:
        if r.get("status") == "DISCONNECTED" or not r.get("spiffe_id"):
            continue
        if phase in (TRUST_BOTH, DROP_OLD):
            if r.get("bundle") != bundle:
                out.append(r["node"])
        elif phase == ISSUE_NEW and r.get("identity_root") != new_root:
            out.append(r["node"])
    return sorted(out)


def following(phase: str) -> str:
    return {TRUST_BOTH: ISSUE_NEW, ISSUE_NEW: DROP_OLD, DROP_OLD: DONE}[phase]


PHASE_NUMBER = {"": 0, TRUST_BOTH: 1, ISSUE_NEW: 2, DROP_OLD: 3}
