"""Response diffing for dark launches: a request copy's response (proxy.mirror) against the
primary's. No anchor ships this; the rules are ours. Sans-IO: a Capture reads a response as
it is written (HTTP/1.1 bytes, or HTTP/2 fields and DATA), `compare` says how two differ.

Compared, in order (DiffSpec, from config.schema.ResponseDiff):
- the status;
- the configured headers, by value (absent on one side and present on the other differs;
  names compare lowercase, values as sent);
- the body: when both are JSON (application/json, or a +json type) and each was kept whole
  (within max_body_bytes), value by value: objects by key, arrays by position, numbers as
  numbers (1 and 1.0 agree), the `ignore_json_paths` left out; otherwise by SHA-256 of the
  whole body (a body past max_body_bytes is still hashed whole, never kept).
A Capture never holds more than max_body_bytes of a body, and 64 KiB of a head.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import msgspec

from meshproxy._core.http1_parser import ChunkedDecoder, HeadParser, ParseError

# A response head bigger than this is not one the proxy would have relayed.
MAX_HEAD = 65536
# Differences named per pair (the first ones found).
MAX_REASONS = 5

ANY = object()  # a path segment matching any key or index
_SEGMENT = re.compile(r"([^.\[\]]+)|\[(\*|\d+)\]|(\.)")


def json_path(text: str) -> tuple[Any, ...] | None:
    """A path to ignore: "a.b", "$.a.b", "items[*].id", "items[0]", "*.id"; its
    segments (keys, indexes, ANY), or None when it does not parse."""
    if text.startswith("$"):
        text = text[1:]
        if text.startswith("."):
            text = text[1:]
    out: list[Any] = []
    pos = 0
    after_dot = False
    while pos < len(text):
        m = _SEGMENT.match(text, pos)
        if m is None:
            return None
        key, index, dot = m.groups()
        if dot is not None:
            if not out or after_dot or m.end() >= len(text):
                return None
            after_dot = True
        elif key is not None:
            out.append(ANY if key == "*" else key)
            after_dot = False
        else:
            if after_dot:
                return None
            out.append(ANY if index == "*" else int(index))
        pos = m.end()
    return tuple(out) if out else None


@dataclass(frozen=True, slots=True)
class DiffSpec:
    headers: tuple[bytes, ...]
    ignore: tuple[tuple[Any, ...], ...]
    max_body: int


class Capture:
    """One response as it was written: status, fields, body digest, the body while it fits
    max_body, and whether it ended whole."""

    __slots__ = ("max_body", "head_request", "status", "fields", "sha", "body", "size",
                 "kept_whole", "complete", "on_body", "_head", "_dec", "_left", "_parser",
                 "_close")

    def __init__(self, max_body: int, head_request: bool = False,
                 on_body: Any = None) -> None:
        """`on_body(piece)`: called with each body piece as it is read (the Python
        filters' response body phase, proxy.python_filters)."""
        self.max_body = max_body
        self.head_request = head_request
        self.status = 0
        self.fields: dict[bytes, bytes] = {}
        self.sha = hashlib.sha256()
        self.body = bytearray()
        self.size = 0
        self.kept_whole = True
        self.complete = False
        self.on_body = on_body
        self._head = b""       # HTTP/1.1: the head while it is incomplete
        self._dec: ChunkedDecoder | None = None
        self._left = -1        # HTTP/1.1: content-length bytes still to come (-1: none)
        self._parser: HeadParser | None = None
        self._close = False    # HTTP/1.1: the body ends with the connection

    # ------------------------------------------------------------------ the body

    def _body(self, data: bytes) -> None:
        if not data:
            return
        if self.on_body is not None:
            self.on_body(data)
        self.sha.update(data)
        self.size += len(data)
        if self.kept_whole:
            if len(self.body) + len(data) > self.max_body:
                self.kept_whole = False
                self.body = bytearray()
            else:
                self.body += data

    # ------------------------------------------------------------------ HTTP/2

    def h2_fields(self, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        if not self.status:
            for name, value in fields:
                if name == b":status":
                    if value[:1] == b"1":
                        return  # an interim response
                    self.status = int(value)
                elif name[:1] != b":":
                    self.fields[name] = value
        if end:
            self.complete = True

    def h2_data(self, data: bytes, end: bool) -> None:
        self._body(data)
        if end:
            self.complete = True

    # ------------------------------------------------------------------ HTTP/1.1

    def wire(self, data: bytes) -> None:
        """HTTP/1.1 bytes as written to a client."""
        if self.complete or not data:
            return
        if not self.status:
            buf = self._head + data
            if self._parser is None:
                self._parser = HeadParser(MAX_HEAD, 1024, MAX_HEAD)
            try:
                head = self._parser.parse_response(buf)
            except ParseError:
                self.complete = True  # not a response we can read: left incomplete
                self.status = -1
                return
            if head is None:
                self._head = buf if len(buf) <= MAX_HEAD else b""
                return
            self._head = b""
            rest = buf[head.end:]
            if 100 <= head.status < 200:
                self.wire(rest)  # an interim response: the final one follows
                return
            self.status = head.status
            self.fields = {k: v for k, v in head.headers}
            if self.head_request or head.status in (204, 304):
                self.complete = True
                return
            if head.chunked:
                self._dec = ChunkedDecoder()
            elif head.content_length >= 0:
                self._left = head.content_length
            else:
                self._close = True
            data = rest
            if not data:
                if self._left == 0:
                    self.complete = True
                return
        if self._dec is not None:
            try:
                parts, _pos = self._dec.feed(data, 0)
            except ParseError:
                self.complete = True
                self.status = -1
                return
            for p in parts:
                self._body(p)
            if self._dec.done:
                self.complete = True
        elif self._left >= 0:
            take = data[:self._left]
            self._body(take)
            self._left -= len(take)
            if not self._left:
                self.complete = True
        else:
            self._body(data)

    def closed(self) -> None:
        """The response's writer is done: a close-delimited body ends here."""
        if self._close and self.status > 0:
            self.complete = True


def _is_json(fields: dict[bytes, bytes]) -> bool:
    ctype = fields.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
    return ctype == b"application/json" or ctype.endswith(b"+json")


def _ignored(path: tuple[Any, ...], ignore: tuple[tuple[Any, ...], ...]) -> bool:
    for pattern in ignore:
        if len(pattern) == len(path) and all(
                p is ANY or p == q for p, q in zip(pattern, path, strict=True)):
            return True
    return False


def _walk(a: Any, b: Any, path: tuple[Any, ...], ignore: tuple[tuple[Any, ...], ...],
          out: list[str]) -> None:
    if len(out) >= MAX_REASONS or _ignored(path, ignore):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if len(out) >= MAX_REASONS:
                return
            sub = (*path, key)
            if key not in a or key not in b:
                if not _ignored(sub, ignore):
                    out.append(f"body {_text(sub)}: only in the "
                               f"{'primary' if key in a else 'shadow'}'s")
                continue
            _walk(a[key], b[key], sub, ignore, out)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            sub = (*path, i)
            if i >= len(a) or i >= len(b):
                if not _ignored(sub, ignore):
                    out.append(f"body {_text(path)}: {len(a)} items against {len(b)}")
                return
            _walk(a[i], b[i], sub, ignore, out)
        return
    numbers = (int, float)
    same = (a == b and type(a) is type(b)) or (
        isinstance(a, numbers) and isinstance(b, numbers)
        and not isinstance(a, bool) and not isinstance(b, bool) and a == b)
    if not same:
        out.append(f"body {_text(path)}: {_short(a)} against {_short(b)}")


def _text(path: tuple[Any, ...]) -> str:
    out = "$"
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _short(v: Any) -> str:
    s = msgspec.json.encode(v).decode()
    return s if len(s) <= 60 else s[:57] + "..."


def compare(spec: DiffSpec, primary: Capture, shadow: Capture) -> list[str]:
    """How the shadow's response differs from the primary's ([]: the same)."""
    out: list[str] = []
    if primary.status != shadow.status:
        out.append(f"status: {primary.status} against {shadow.status}")
    for name in spec.headers:
        a, b = primary.fields.get(name), shadow.fields.get(name)
        if a != b:
            out.append(f"header {name.decode()}: {_value(a)} against {_value(b)}")
    if (primary.kept_whole and shadow.kept_whole and _is_json(primary.fields)
            and _is_json(shadow.fields)):
        try:
            a = msgspec.json.decode(bytes(primary.body))
            b = msgspec.json.decode(bytes(shadow.body))
        except msgspec.DecodeError:
            pass
        else:
            _walk(a, b, (), spec.ignore, out)
            return out[:MAX_REASONS]
    if primary.sha.digest() != shadow.sha.digest():
        out.append(f"body: {primary.size} bytes against {shadow.size}, digests differ")
    return out[:MAX_REASONS]


def _value(v: bytes | None) -> str:
    return "(absent)" if v is None else repr(v.decode("latin-1"))
