"""x-request-id values: random (version 4) UUIDs, as Envoy generates them.

uuid.uuid4() makes one os.urandom syscall per id; here random bytes are drawn from the OS in
blocks of 256 ids and sliced, which keeps the hot path free of syscalls.
"""

from __future__ import annotations

import os

_BLOCK = 16 * 256
_pool = b""
_pos = _BLOCK


def new_request_id() -> bytes:
    global _pool, _pos
    if _pos >= _BLOCK:
        _pool = os.urandom(_BLOCK)
        _pos = 0
    raw = bytearray(_pool[_pos:_pos + 16])
    _pos += 16
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4 (RFC 9562 section 5.4)
    raw[8] = (raw[8] & 0x3F) | 0x80  # variant 10xx
    h = raw.hex().encode("ascii")
    return h[:8] + b"-" + h[8:12] + b"-" + h[12:16] + b"-" + h[16:20] + b"-" + h[20:]


def _reset_after_fork() -> None:
    """A forked worker must not reuse its parent's unused random bytes: ids would repeat."""
    global _pos
    _pos = _BLOCK


os.register_at_fork(after_in_child=_reset_after_fork)
