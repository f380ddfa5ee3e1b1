"""Config strings as the bytes they are compared with on the wire.

One rule for every place that turns a config string into wire bytes (header names and
values, paths, regexes): ASCII as is, anything else as UTF-8 (what clients send for
non-ASCII paths, percent-decoded or not). The config checks use it too, so that a regex is
checked in the form the route table compiles: `\\N{...}` escapes, for one, exist only in
str patterns and must be refused at load time, not found when a worker compiles.
"""

from __future__ import annotations


def wire_bytes(s: str) -> bytes:
    return s.encode("latin-1") if s.isascii() else s.encode("utf-8")
