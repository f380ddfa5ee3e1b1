"""The replicated Store: etcd v3, through its JSON gateway (for several control-plane
replicas on one etcd).

Why the JSON gateway and not a gRPC client: the maintained Python clients are built on
grpcio's own threads and event loop (or asyncio), none on trio, and their generated code
trails current protobuf; etcd's gateway (`/v3/kv/range`, `/v3/watch`, ...) is part of every
etcd server since 3.3, speaks the same API as JSON over HTTP/1.1, and a client for the calls
used here is small. Keys and values travel base64-encoded, 64-bit integers as strings.

Calls are POSTs on pooled keep-alive connections (h11 over trio streams); a watch holds one
connection of its own and reads the gateway's stream of newline-separated messages.

Semantics as base.py states them, mapped to etcd's:
- put/delete with `expect` are transactions comparing the key's mod_revision (0 for a key
  that does not exist, which is etcd's rule too); on failure the current one is read in the
  same transaction;
- leases have whole-second TTLs in etcd (a fraction is rounded up); etcd itself expires
  them (its lessor checks about every 500 ms), so a lapse shows within TTL + about 0.6 s;
- history is kept to the last HISTORY revisions by compacting every 1,000 revisions, as
  the SQLite store trims its changes (a watch from before raises Compacted).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import trio

from meshproxy.control.store.base import (
    HISTORY,
    Compacted,
    Conflict,
    Entry,
    Event,
    LeaseExpired,
)

# Idle connections kept to etcd; more concurrent calls open more, which are then closed.
POOL = 8
# A call that takes longer than this has lost etcd (a watch has no such bound).
CALL_TIMEOUT = 10.0
LEASE_NOT_FOUND = "requested lease not found"


class StoreError(Exception):
    """etcd refused a call or could not be reached; says which call and why."""


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def _range_end(prefix: str) -> str:
    """etcd's range end for a prefix: the prefix with its last byte raised by one ("\\0",
    every key from `key` on, for the empty prefix)."""
    raw = prefix.encode()
    if not raw:
        return _b64(b"\0")
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            return _b64(raw[:i] + bytes([raw[i] + 1]))
    return _b64(b"\0")


def _entry(kv: dict[str, Any]) -> Entry:
    return Entry(_unb64(kv["key"]).decode(), _unb64(kv.get("value")),
                 int(kv.get("mod_revision", 0)), int(kv.get("create_revision", 0)),
                 int(kv.get("lease", 0)))


class _Conn:
    """One HTTP/1.1 keep-alive connection to etcd."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, path: str, body: bytes) -> None:
        out = self.h11.send(h11.Request(method="POST", target=path, headers=[
            ("host", self.host), ("content-type", "application/json"),
            ("content-length", str(len(body)))]))
        out += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(out)

    async def next_event(self) -> Any:
        while True:
            ev = self.h11.next_event()
            if ev is not h11.NEED_DATA:
                return ev
            self.h11.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> tuple[int, bytes]:
        status, body = 0, b""
        while True:
            ev = await self.next_event()
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                body += bytes(ev.data)
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, body

    def reusable(self) -> bool:
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            return True
        return False


class EtcdStore:
    def __init__(self, host: str, port: int, history: int = HISTORY) -> None:
        self.host, self.port, self.history = host, port, history
        self._idle: list[_Conn] = []

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, **kwargs: Any) -> AsyncIterator[EtcdStore]:
        """`etcd://host:port`; the first call checks that etcd answers."""
        hostport = url.split("://", 1)[1].rstrip("/")
        host, _, port = hostport.rpartition(":")
        store = cls(host or "127.0.0.1", int(port or 2379), **kwargs)
        try:
            await store.revision()
            yield store
        finally:
            for c in store._idle:
                await c.stream.aclose()

    # ---------------------------------------------------------------- plumbing

    async def _connect(self) -> _Conn:
        try:
            stream = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:
            raise StoreError(f"etcd at {self.host}:{self.port}: {exc}") from None
        return _Conn(stream, f"{self.host}:{self.port}")

    async def _call(self, path: str, req: dict[str, Any]) -> dict[str, Any]:
        conn = self._idle.pop() if self._idle else await self._connect()
        body = json.dumps(req).encode()
        try:
            with trio.fail_after(CALL_TIMEOUT):
                await conn.send(path, body)
                status, data = await conn.response()
        except (OSError, trio.BrokenResourceError, trio.TooSlowError, h11.ProtocolError) as exc:
            await conn.stream.aclose()
            raise StoreError(f"etcd {path}: {type(exc).__name__}: {exc}") from None
        if conn.reusable() and len(self._idle) < POOL:
            self._idle.append(conn)
        else:
            await conn.stream.aclose()
        out = json.loads(data or b"{}")
        if status != 200:
            message = out.get("message") or out.get("error") or data.decode(errors="replace")
            if LEASE_NOT_FOUND in message:
                raise LeaseExpired(message)
            raise StoreError(f"etcd {path}: {status} {message}")
        return out

    @staticmethod
    def _rev(out: dict[str, Any]) -> int:
        return int(out["header"]["revision"])

    async def _maybe_compact(self, rev: int) -> None:
        if rev % 1000 == 0 and rev > self.history:
            await self._call("/v3/kv/compaction", {"revision": str(rev - self.history + 1)})

    # ---------------------------------------------------------------- reads

    async def get(self, key: str) -> Entry | None:
        out = await self._call("/v3/kv/range", {"key": _b64(key)})
        kvs = out.get("kvs") or []
        return _entry(kvs[0]) if kvs else None

    async def list(self, prefix: str) -> tuple[list[Entry], int]:
        key = _b64(prefix) if prefix else _b64(b"\0")
        out = await self._call("/v3/kv/range", {"key": key, "range_end": _range_end(prefix)})
        return [_entry(kv) for kv in out.get("kvs") or []], self._rev(out)

    async def revision(self) -> int:
        return self._rev(await self._call("/v3/kv/range", {"key": _b64(b"\0"),
                                                           "count_only": True}))

    # ---------------------------------------------------------------- writes

    async def _cas(self, key: str, expect: int, op: dict[str, Any]) -> dict[str, Any]:
        out = await self._call("/v3/kv/txn", {
            "compare": [{"target": "MOD", "key": _b64(key), "mod_revision": str(expect),
                         "result": "EQUAL"}],
            "success": [op], "failure": [{"request_range": {"key": _b64(key)}}]})
        if not out.get("succeeded"):
            kvs = out["responses"][0]["response_range"].get("kvs") or []
            raise Conflict(key, expect, int(kvs[0]["mod_revision"]) if kvs else 0)
        return out

    async def put(self, key: str, value: bytes, *, expect: int | None = None,
                  lease: int = 0) -> int:
        req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            req["lease"] = str(lease)
        if expect is None:
            rev = self._rev(await self._call("/v3/kv/put", req))
        else:
            rev = self._rev(await self._cas(key, expect, {"request_put": req}))
        await self._maybe_compact(rev)
        return rev

    async def delete(self, key: str, *, expect: int | None = None) -> int | None:
        req = {"key": _b64(key)}
        if expect is None:
            out = await self._call("/v3/kv/deleterange", req)
            deleted = int(out.get("deleted", 0))
        else:
            out = await self._cas(key, expect, {"request_delete_range": req})
            deleted = int(out["responses"][0]["response_delete_range"].get("deleted", 0))
        return self._rev(out) if deleted else None

    # ---------------------------------------------------------------- leases

    async def grant(self, ttl: float) -> int:
        out = await self._call("/v3/lease/grant", {"TTL": str(max(1, math.ceil(ttl)))})
        return int(out["ID"])

    async def keep_alive(self, lease: int) -> None:
        out = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        if int(out.get("result", {}).get("TTL", 0)) <= 0:
            raise LeaseExpired(f"lease {lease} is gone")

    async def revoke(self, lease: int) -> None:
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)})
        except LeaseExpired:
            pass  # already gone, and its keys with it

    # ---------------------------------------------------------------- watches

    async def watch(self, prefix: str, after: int) -> AsyncIterator[Event]:
        key = _b64(prefix) if prefix else _b64(b"\0")
        conn = await self._connect()
        try:
            await conn.send("/v3/watch", json.dumps({"create_request": {
                "key": key, "range_end": _range_end(prefix),
                "start_revision": str(after + 1)}}).encode())
            ev = await conn.next_event()
            if not isinstance(ev, h11.Response) or ev.status_code != 200:
                raise StoreError(f"etcd /v3/watch: {getattr(ev, 'status_code', ev)}")
            buf = b""
            while True:
                ev = await conn.next_event()
                if not isinstance(ev, h11.Data):
                    raise StoreError("etcd /v3/watch: the stream ended")
                buf += bytes(ev.data)
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        raise StoreError(f"etcd /v3/watch: {msg['error']}")
                    res = msg.get("result", {})
                    if int(res.get("compact_revision", 0)):
                        raise Compacted(after, int(res["compact_revision"]))
                    if res.get("canceled"):
                        raise StoreError(f"etcd /v3/watch: canceled: {res.get('cancel_reason')}")
                    for e in res.get("events") or []:
                        kv = e["kv"]
                        deleted = e.get("type") == "DELETE"
                        yield Event("delete" if deleted else "put",
                                    _unb64(kv["key"]).decode(), int(kv["mod_revision"]),
                                    None if deleted else _unb64(kv.get("value")))
        finally:
            await conn.stream.aclose()
