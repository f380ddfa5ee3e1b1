"""Python filters: Zuul's dynamic filters and Envoy's Lua filter, in the language our users
write. This module is the API a filter is written against, and the loader.

A filter is a class, named in the config as "package.module:Class" on a listener (every
route's requests) or a route, with its own `config` mapping and a `timeout`:

    filters:
      - python: mycompany.filters:ApiKeyCheck
        config: {keys_file: /etc/keys.txt}
        timeout: 250ms

It is imported and built once per config snapshot, `Class(config)`, and rebuilt with the
next (its module imported again when its file changed). It defines any of these phases,
each optional, each called per request with that request's `Request` (whose `state` dict
is the filter's own for the request):

    async def on_request_headers(self, req: Request) -> Reply | None
        read and change req.headers; return a Reply to answer the request here;
    def on_request_body(self, req: Request, chunk: bytes, end: bool) -> None
        each piece of the request body as it passes (observed, not changed);
    async def on_response_headers(self, req: Request, resp: Response) -> None
        read and change resp.headers and resp.status before the response is sent;
    def on_response_body(self, req: Request, chunk: bytes, end: bool) -> None
        each piece of the response body as it is sent (observed, not changed);
    def on_log(self, req: Request, resp: Response | None) -> None
        once the request is over (an async one is run in the background, within the
        timeout).
The header phases may be plain or async functions; each call is bounded by the filter's
timeout. A filter that raises, or outlasts its timeout, answers the request 500 (flag FE;
response code details python_filter_error[name] or python_filter_timeout[name]) and is
counted (http.<listener>.python_filter.errors, .timeouts); a body or log phase that fails
is counted and logged, and stops being called for that request. Never a dead worker.

The fields a filter may not change: the framing and connection fields (content-length,
transfer-encoding, connection, keep-alive, upgrade, te) and Host (the route chose the
destination already): Headers.set/add/remove raise ValueError for them.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

PROTECTED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive",
                       "upgrade", "te", "host"})
PHASES = ("on_request_headers", "on_request_body", "on_response_headers",
          "on_response_body", "on_log")


class Headers:
    """A message's header fields, in order, as text (latin-1); names compare lowercase."""

    __slots__ = ("_fields", "changed")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self._fields = fields  # the message's own list: changes are the message's
        self.changed = False

    def get(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self._fields:
            if k == key:
                return v.decode("latin-1")
        return None

    def get_all(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [v.decode("latin-1") for k, v in self._fields if k == key]

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for k, v in self._fields:
            yield k.decode("latin-1"), v.decode("latin-1")

    def _key(self, name: str) -> bytes:
        key = name.lower()
        if key in PROTECTED:
            raise ValueError(f"{name} is the proxy's to set, not a filter's")
        if not key or any(c in key for c in " \t\r\n:"):
            raise ValueError(f"not a field name: {name!r}")
        return key.encode("latin-1")

    @staticmethod
    def _value(value: str) -> bytes:
        if any(c in value for c in "\r\n\0"):
            raise ValueError("a field value has no CR, LF or NUL")
        return value.strip(" \t").encode("latin-1")

    def add(self, name: str, value: str) -> None:
        self._fields.append((self._key(name), self._value(value)))
        self.changed = True

    def set(self, name: str, value: str) -> None:
        """Replace every field of that name with one (added last when there was none)."""
        key, val = self._key(name), self._value(value)
        at = next((i for i, (k, _v) in enumerate(self._fields) if k == key), None)
        self._fields[:] = [f for f in self._fields if f[0] != key]
        self._fields.insert(len(self._fields) if at is None else at, (key, val))
        self.changed = True

    def remove(self, name: str) -> None:
        key = self._key(name)
        self._fields[:] = [f for f in self._fields if f[0] != key]
        self.changed = True


@dataclass
class Request:
    method: str
    path: str
    authority: str
    headers: Headers
    peer: str                     # the client's address
    principal: str                # its SPIFFE ID (mTLS), or ""
    state: dict[str, Any] = field(default_factory=dict)  # the filter's, for this request


@dataclass
class Response:
    status: int
    headers: Headers


@dataclass
class Reply:
    """A filter's own answer to the request (on_request_headers)."""

    status: int
    body: bytes | str = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "text/plain"


class LoadedFilter:
    """One configured filter: its instance and the phases it defines."""

    __slots__ = ("name", "instance", "timeout", "phases")

    def __init__(self, name: str, instance: Any, timeout: float) -> None:
        self.name = name
        self.instance = instance
        self.timeout = timeout
        self.phases = {p: getattr(instance, p) for p in PHASES
                       if callable(getattr(instance, p, None))}


class FilterLoadError(Exception):
    pass


_loaded: dict[str, float] = {}  # module -> the mtime of the file it was imported from


def _module(name: str) -> Any:
    """The module, imported again when its file changed since it was."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = importlib.import_module(name)
    else:
        path = getattr(mod, "__file__", None)
        mtime = os.stat(path).st_mtime if path and os.path.exists(path) else 0.0
        if mtime != _loaded.get(name, mtime):
            mod = importlib.reload(mod)
    path = getattr(mod, "__file__", None)
    _loaded[name] = os.stat(path).st_mtime if path and os.path.exists(path) else 0.0
    return mod


def load(target: str, config: dict[str, Any], timeout: float, name: str) -> LoadedFilter:
    """Import "package.module:Class" and build it with `config`; FilterLoadError says why
    it could not be."""
    modname, _, clsname = target.partition(":")
    cls: Any
    try:
        cls = getattr(_module(modname), clsname)
    except (ImportError, AttributeError, SyntaxError) as exc:
        raise FilterLoadError(f"cannot import {target}: {exc}") from None
    if not inspect.isclass(cls):
        raise FilterLoadError(f"{target} is not a class")
    try:
        factory: Any = cls
        instance = factory(dict(config))
    except Exception as exc:
        raise FilterLoadError(f"{target}({config!r}) failed: {type(exc).__name__}: {exc}"
                              ) from None
    loaded = LoadedFilter(name or target, instance, timeout)
    if not loaded.phases:
        raise FilterLoadError(f"{target} defines none of {', '.join(PHASES)}")
    return loaded
