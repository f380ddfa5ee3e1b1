"""Running Python filters (filters.python says the API) at the data path's phases: request
headers (dispatch, after the built-in filters), request body pieces (the BodyState's
tap), response headers (relay.deliver, before the response is written), response body
pieces (what is written to the client, read back by a mirror_diff Capture), and the log
(exchange.finish).

Every call of a header phase is bounded by its filter's timeout (trio.move_on_after). A
filter that raises or outlasts it answers 500 (flag FE, details
python_filter_error[name] / python_filter_timeout[name]) and is counted; a body or log
phase that fails is counted and logged, and that filter's body phases stop for the
request. Nothing a filter does can end the worker: only trio's own cancellation passes
through.
"""

from __future__ import annotations

import inspect
import logging
from time import perf_counter
from typing import Any

import trio

from meshproxy._core.http1_parser import ChunkedDecoder, MessageHead
from meshproxy.filters.mirror_diff import Capture
from meshproxy.filters.python import Headers, LoadedFilter, Reply, Request, Response
from meshproxy.protocol import errors as flags
from meshproxy.protocol.errors import ProxyError
from meshproxy.proxy.client_side import ClientSide
from meshproxy.proxy.exchange import Exchange
from meshproxy.proxy.local_reply import LocalReply

log = logging.getLogger("meshproxy.python_filter")

# Response body pieces are handed to filters as they are written; none is kept.
OBSERVE_MAX_BODY = 0


class _Failed(Exception):
    def __init__(self, name: str, timed_out: bool) -> None:
        super().__init__(name)
        self.name = name
        self.timed_out = timed_out


def _counted(side: ClientSide, name: str, timed_out: bool) -> str:
    """A filter that raised or overran its timeout, counted: the access log's details
    (python_filter_timeout[name] / python_filter_error[name])."""
    hs = side.ctx.hstats
    hs.block.inc(hs.python_filter_timeouts if timed_out else hs.python_filter_errors)
    return f"python_filter_{'timeout' if timed_out else 'error'}[{name}]"


class PyExchange:
    """A request's Python filters and what they see of it (ex.python)."""

    __slots__ = ("filters", "req", "resp", "side", "dead", "dec", "capture", "wants_body",
                 "wants_response", "wants_log")

    def __init__(self, filters: tuple[LoadedFilter, ...], req: Request, side: ClientSide,
                 chunked: bool) -> None:
        self.filters = filters
        self.req = req
        self.resp: Response | None = None
        self.side = side
        self.dead: set[str] = set()  # filters whose body phases failed for this request
        # A chunked request body comes framed from the HTTP/1.1 relay: decoded here.
        self.dec: ChunkedDecoder | None = None
        self.capture: Capture | None = None
        # Which later phases any of the filters defines: the others cost nothing.
        self.wants_body = any("on_request_body" in f.phases for f in filters)
        self.wants_response = any("on_response_headers" in f.phases for f in filters)
        self.wants_log = any("on_log" in f.phases for f in filters)
        if chunked and self.wants_body:
            self.dec = ChunkedDecoder()

    def _count(self, name: str, timed_out: bool) -> None:
        _counted(self.side, name, timed_out)
        self.dead.add(name)

    def _observe(self, phase: str, chunk: bytes, end: bool) -> None:
        for f in self.filters:
            fn = f.phases.get(phase)
            if fn is None or f.name in self.dead:
                continue
            try:
                fn(self.req, chunk, end)
            except Exception:
                log.exception("python filter %s failed in %s", f.name, phase)
                self._count(f.name, False)

    # The request body, as BodyState.tap: HTTP/1.1 chunks framed are decoded first.

    def feed(self, data: bytes) -> None:
        if self.dec is None:
            self._observe("on_request_body", data, False)
            return
        try:
            parts, _pos = self.dec.feed(data, 0)
        except Exception:  # the relay itself refuses a broken chunk
            return
        for p in parts:
            if p:
                self._observe("on_request_body", p, False)

    def end(self) -> None:
        self._observe("on_request_body", b"", True)

    def unframed(self) -> None:
        """The body comes as its payload (an HTTP/2 origin's relay)."""
        self.dec = None

    def response_body(self, chunk: bytes) -> None:
        self._observe("on_response_body", chunk, False)

    def response_written(self) -> None:
        if self.capture is not None:
            self.capture.closed()
            if self.capture.complete:
                self._observe("on_response_body", b"", True)

    def log(self) -> None:
        """The log phase (exchange.finish): plain calls now, async ones in the worker's
        nursery within their timeout."""
        if not self.wants_log:
            return
        for f in self.filters:
            fn = f.phases.get("on_log")
            if fn is None:
                continue
            try:
                result = fn(self.req, self.resp)
                if inspect.isawaitable(result):
                    spawn = self.side.ctx.state.spawn
                    if spawn is not None:
                        spawn(self._await_log, f, result)
                    else:
                        result.close()  # type: ignore[attr-defined]
            except Exception:
                log.exception("python filter %s failed in on_log", f.name)
                self._count(f.name, False)

    async def _await_log(self, f: LoadedFilter, result: Any) -> None:
        with trio.move_on_after(f.timeout) as scope:
            try:
                await result
            except Exception:
                log.exception("python filter %s failed in on_log", f.name)
                self._count(f.name, False)
        if scope.cancelled_caught:
            self._count(f.name, True)


async def _call(f: LoadedFilter, phase: str, *args: Any) -> Any:
    """One header phase of one filter, within its timeout; _Failed when it raised or
    timed out. An async phase is cut off at the timeout (a trio cancel scope, made only
    for one: a scope costs more than a plain call); a plain one cannot be interrupted, and
    one that took longer than the timeout fails the same way once it returns."""
    fn = f.phases.get(phase)
    if fn is None:
        return None
    start = perf_counter()
    try:
        result = fn(*args)
    except Exception:
        log.exception("python filter %s failed in %s", f.name, phase)
        raise _Failed(f.name, False) from None
    if inspect.isawaitable(result):
        with trio.move_on_after(max(0.0, f.timeout - (perf_counter() - start))) as scope:
            try:
                result = await result
            except Exception:
                log.exception("python filter %s failed in %s", f.name, phase)
                raise _Failed(f.name, False) from None
        if not scope.cancelled_caught:
            return result
    elif perf_counter() - start <= f.timeout:
        return result
    log.warning("python filter %s took longer than %.3f s in %s", f.name, f.timeout, phase)
    raise _Failed(f.name, True)


def _failure(side: ClientSide, ex: Exchange, exc: _Failed) -> LocalReply:
    ex.details = _counted(side, exc.name, exc.timed_out)
    what = "timeout" if exc.timed_out else "error"
    return LocalReply(500, f"python filter {what}: {exc.name}\n".encode(), flags.FILTER_ERROR)


def _reply(r: Reply) -> LocalReply:
    body = r.body.encode() if isinstance(r.body, str) else bytes(r.body)
    extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in r.headers]
    return LocalReply(r.status, body, "-", extra=extra,
                      content_type=r.content_type.encode("latin-1"))


async def on_request(side: ClientSide, filters: tuple[LoadedFilter, ...], head: MessageHead,
                     ex: Exchange) -> LocalReply | None:
    """The request headers phase, filter by filter: None to go on, or the reply (a filter's
    own, or 500 for one that failed)."""
    ident = side.identity
    req = Request(head.method.decode("latin-1"), ex.target.decode("latin-1"),
                  ex.host.decode("latin-1"), Headers(head.headers),
                  side.peer[0] if side.peer else "",
                  ident.spiffe_id if ident is not None and ident.spiffe_id else "")
    py = ex.python = PyExchange(filters, req, side, head.chunked)
    for f in filters:
        try:
            answer = await _call(f, "on_request_headers", req)
        except _Failed as exc:
            return _failure(side, ex, exc)
        if isinstance(answer, Reply):
            return _reply(answer)
    if any("on_response_body" in f.phases for f in filters):
        py.capture = Capture(OBSERVE_MAX_BODY, head.method == b"HEAD", py.response_body)
    return None


async def on_response(side: ClientSide, ex: Exchange, resp: MessageHead) -> None:
    """The response headers phase (relay.deliver), before anything is written; a filter
    that fails makes the response a 500 (ProxyError, which the router answers)."""
    py = ex.python
    if py is None or not (py.wants_response or py.wants_log):
        return
    out = py.resp = Response(resp.status, Headers(resp.headers))  # what on_log is given
    if not py.wants_response:
        return
    for f in py.filters:
        try:
            await _call(f, "on_response_headers", py.req, out)
        except _Failed as exc:
            raise ProxyError(500, flags.FILTER_ERROR, "internal",
                             _counted(side, exc.name, exc.timed_out)) from None
    if out.status != resp.status:
        if not 200 <= out.status <= 599:
            raise ProxyError(500, flags.FILTER_ERROR, "internal",
                             "python_filter_error[status out of range]")
        resp.status = out.status
        resp.reason = b""
