"""x-request-id values (proxy.request_id over _core.uuid_text): version 4 UUIDs in their
canonical text (RFC 9562 4 and 5.4), unique, and the same as Python's uuid module makes
from the same random bytes."""

from __future__ import annotations

import os
import uuid

import pytest

from meshproxy._core.uuid_text import uuid4_text
from meshproxy.proxy.request_id import new_request_id


def test_request_id_is_a_version_4_uuid() -> None:
    ids = [new_request_id() for _ in range(2000)]  # past one block of 256
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text.decode())
        assert u.version == 4 and u.variant == uuid.RFC_4122
        assert str(u).encode() == text


def test_request_id_text_matches_the_uuid_module() -> None:
    pool = os.urandom(64)
    for pos in (0, 16, 48):
        expected = uuid.UUID(bytes=pool[pos:pos + 16], version=4)
        assert uuid4_text(pool, pos) == str(expected).encode()
    with pytest.raises(ValueError):
        uuid4_text(pool, 49)
