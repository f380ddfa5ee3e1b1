"""x-request-id values: random (version 4) UUIDs, as Envoy generates them.

uuid.uuid4() makes one os.urandom syscall per id; here random bytes are drawn from the OS in
blocks of 256 ids, and each id's text is made by compiled code (_core.uuid_text), which
keeps the hot path free of syscalls and of per-byte Python.
"""

from __future__ import annotations

import os

from meshproxy._core.uuid_text import uuid4_text

_BLOCK = 16 * 256
_pool = b""
_pos = _BLOCK


def new_request_id() -> bytes:
    global _pool, _pos
    if _pos >= _BLOCK:
        _pool = os.urandom(_BLOCK)
        _pos = 0
    _pos += 16
    return uuid4_text(_pool, _pos - 16)  # version 4, variant 10xx (RFC 9562 5.4)


def _reset_after_fork() -> None:
    """A forked worker must not reuse its parent's unused random bytes: ids would repeat."""
    global _pos
    _pos = _BLOCK


os.register_at_fork(after_in_child=_reset_after_fork)
