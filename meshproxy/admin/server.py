"""The admin API, served by the supervisor (Envoy's admin endpoints, same names).

    GET  /stats[?format=json][&filter=REGEX]   every stat, summed over workers
    GET  /stats/prometheus                     Prometheus text exposition (with histograms)
    GET  /clusters[?format=json]               endpoints: weight, health, active requests
    GET  /config_dump                          the effective config (defaults filled in)
    GET  /ready                                200 only while every worker serves
    GET  /healthz                              200 while the supervisor runs
    GET  /workers                              pid, state, uptime, restarts, connections
    POST /drain                                stop accepting everywhere (process stays up)
    POST /reload                               read the config file again
    POST /quitquitquit                         drain, then exit 0
Unknown paths get 404, known paths with the wrong method 405 (with Allow).

It binds 127.0.0.1 unless told otherwise: /drain, /reload and /quitquitquit are not
authenticated, so the admin port must not be reachable by clients.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio

from meshproxy.process.cert_watch import certs_report
from meshproxy.stats.names import CONTROL_PLANE, Scope, offset
from meshproxy.stats.render import (
    PROM_PREFIX,
    Sample,
    collect,
    endpoint_stats,
    render_json,
    render_prometheus,
    render_text,
)
from meshproxy.stats.sink import endpoint_key
from meshproxy.transport.h11_io import next_event, respond, serve_tcp


class Supervised(Protocol):
    """What the admin API reads and drives: the supervisor (process.supervisor), which
    starts this server; named here as an interface so that the import points one way."""

    workers: list[Any]  # handles with .index, .proc, .restarts
    draining: bool
    version: int
    config: Any  # the schema.Config served
    material: Any  # cert_watch.Material
    segment: Any  # the shared-memory stats Segment
    slots: Any
    discovery: Any  # the DiscoveryClient, or None
    samples: Any  # stats.diff_samples.DiffSamples: mirrored routes' differing pairs

    @property
    def ready(self) -> bool: ...

    def uptime(self) -> float: ...

    async def drain(self) -> None: ...

    async def reload(self) -> tuple[int, list[str]]: ...

    def stop(self) -> None: ...

log = logging.getLogger("meshproxy.admin")

Reply = tuple[int, str, bytes]
# Bound on one admin exchange: the admin API is for people and scrapers, not for streaming.
REQUEST_TIMEOUT = 10.0
MAX_BODY = 64 * 1024

TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


def _json(obj: object, status: int = 200) -> Reply:
    return status, JSON, msgspec.json.encode(obj) + b"\n"


class AdminServer:
    def __init__(self, sup: Supervised) -> None:
        self.sup = sup
        self.routes: dict[str, dict[str, Callable[[dict[str, list[str]]], Awaitable[Reply]]]] = {
            "/stats": {"GET": self.stats},
            "/stats/prometheus": {"GET": self.prometheus},
            "/clusters": {"GET": self.clusters},
            "/config_dump": {"GET": self.config_dump},
            "/certs": {"GET": self.certs},
            "/ready": {"GET": self.ready},
            "/healthz": {"GET": self.healthz},
            "/workers": {"GET": self.workers},
            "/mirror_diffs": {"GET": self.mirror_diffs},
            "/drain": {"POST": self.drain},
            "/reload": {"POST": self.reload},
            "/quitquitquit": {"POST": self.quit},
        }

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        await serve_tcp(self._handle, host, port, task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                while True:
                    req, body = await self._read(conn, stream)
                    if req is None:
                        return
                    status, ctype, payload = await self._dispatch(req)
                    headers = [("content-type", ctype), ("content-length", str(len(payload))),
                               ("cache-control", "no-cache")]
                    if status == 405:
                        allowed = self.routes[urlsplit(req.target.decode()).path]
                        headers.append(("allow", ", ".join(sorted(allowed))))
                    if not await respond(conn, stream, status, headers, payload):
                        return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def _read(self, conn: h11.Connection, stream: trio.SocketStream
                    ) -> tuple[h11.Request | None, bytes]:
        req, body = None, b""
        while True:
            ev = await next_event(conn, stream)
            if isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > MAX_BODY:
                    return None, b""
            elif isinstance(ev, h11.EndOfMessage):
                return req, body
            else:
                return None, b""

    async def _dispatch(self, req: h11.Request) -> Reply:
        url = urlsplit(req.target.decode("latin-1"))
        methods = self.routes.get(url.path)
        if methods is None:
            return 404, TEXT, b"unknown admin path\n"
        handler = methods.get(req.method.decode())
        if handler is None:
            return 405, TEXT, b"method not allowed\n"
        try:
            return await handler(parse_qs(url.query))
        except Exception:
            log.exception("admin %s failed", url.path)
            return 500, TEXT, b"internal error\n"

    # ---------------------------------------------------------------- stats

    def _live_slabs(self) -> dict[int, int]:
        return {w.index: w.index for w in self.sup.workers if w.proc is not None}

    def _samples(self) -> list:
        sup = self.sup
        server = {
            "live": 0 if sup.draining else 1,
            "uptime": int(sup.uptime()),
            "config_version": sup.version,
            "concurrency": len(sup.workers),
            "worker_restarts": sum(w.restarts for w in sup.workers),
        }
        samples = collect(sup.segment, sup.slots, self._live_slabs(), server)
        if sup.discovery is not None:
            st = sup.discovery.state
            values = {"connected_state": int(st.connected), "stale": int(st.stale),
                      "update_success": st.update_success,
                      "update_rejected": st.update_rejected}
            samples += [Sample(f"control_plane.{s.name}", s.kind,
                               f"{PROM_PREFIX}control_plane_{s.name}", {}, values[s.name])
                        for s in CONTROL_PLANE]
        return samples

    async def stats(self, q: dict[str, list[str]]) -> Reply:
        samples = self._samples()
        if "filter" in q:
            try:
                pattern = re.compile(q["filter"][0])
            except re.error as exc:
                return 400, TEXT, f"invalid filter: {exc}\n".encode()
            samples = [s for s in samples if pattern.search(s.name)]
        if q.get("format") == ["json"]:
            return _json(render_json(samples))
        if q.get("format") == ["prometheus"]:
            return 200, PROMETHEUS, render_prometheus(samples).encode()
        return 200, TEXT, render_text(samples).encode()

    async def prometheus(self, q: dict[str, list[str]]) -> Reply:
        return 200, PROMETHEUS, render_prometheus(self._samples()).encode()

    async def mirror_diffs(self, q: dict[str, list[str]]) -> Reply:
        """The latest responses of mirrored routes that differed from the primary's (a
        bounded sample per worker, newest first), with what differed."""
        return _json({"samples": self.sup.samples.read()})

    async def clusters(self, q: dict[str, list[str]]) -> Reply:
        sup = self.sup
        out: list[dict[str, object]] = []
        for c in sup.config.clusters:
            eps = []
            for e in c.endpoints:
                label = f"{e.address}:{e.port}"
                st = endpoint_stats(sup.segment, sup.slots, self._live_slabs(),
                                    endpoint_key(c.name, label))
                ejected = st.get("ejected", 0)  # workers whose outlier detection ejected it
                health = ("failed_active_hc" if st.get("hc_failed", 0)
                          else "failed_outlier_check" if ejected else "healthy")
                eps.append({"address": label, "weight": e.weight, "health": health,
                            "ejected_workers": ejected,
                            "rq_active": st.get("rq_active", 0),
                            "rq_total": st.get("rq_total", 0),
                            "rq_error": st.get("rq_error", 0),
                            "cx_active": st.get("cx_active", 0)})
            out.append({"name": c.name, "endpoints": eps})
        if q.get("format") == ["json"]:
            return _json({"clusters": out})
        lines = []
        for entry in out:
            for e in entry["endpoints"]:  # type: ignore[attr-defined]
                for key in ("weight", "health", "ejected_workers", "rq_active", "rq_total",
                            "rq_error", "cx_active"):
                    lines.append(f"{entry['name']}::{e['address']}::{key}::{e[key]}")
        return 200, TEXT, ("\n".join(lines) + "\n").encode()

    async def config_dump(self, q: dict[str, list[str]]) -> Reply:
        out: dict[str, object] = {"version": self.sup.version, "config": self.sup.config}
        if self.sup.discovery is not None:
            out["control_plane"] = self.sup.discovery.state.dump()
        return _json(out)

    async def certs(self, q: dict[str, list[str]]) -> Reply:
        """Envoy's /certs: the TLS material in service, with SPIFFE IDs, serials and days
        until expiry."""
        return _json(certs_report(self.sup.config, self.sup.material))

    async def ready(self, q: dict[str, list[str]]) -> Reply:
        sup = self.sup
        if sup.ready:
            return 200, TEXT, b"LIVE\n"
        state = "DRAINING" if sup.draining else "NOT READY"
        return 503, TEXT, f"{state}\n".encode()

    async def healthz(self, q: dict[str, list[str]]) -> Reply:
        return 200, TEXT, b"ok\n"

    async def workers(self, q: dict[str, list[str]]) -> Reply:
        sup = self.sup
        layout = sup.segment.layout
        base = layout.first(Scope.WORKER, 0)
        out = []
        now = time.monotonic()
        for w in sup.workers:
            blk = sup.segment.block(w.index)
            out.append({
                "index": w.index,
                "pid": w.proc.pid if w.proc is not None else None,
                "state": w.state,
                "uptime": round(now - w.started_at, 3) if w.proc is not None else 0,
                "restarts": w.restarts,
                "crash_loop": w.quick_crashes > 1,
                "last_exit": w.last_exit,
                "connections": blk.get(base + offset(Scope.WORKER, "downstream_cx_active")),
                "requests": blk.get(base + offset(Scope.WORKER, "downstream_rq_total")),
                "config_version": blk.get(base + offset(Scope.WORKER, "config_version")),
            })
        return _json({"workers": out})

    # ---------------------------------------------------------------- actions

    async def drain(self, q: dict[str, list[str]]) -> Reply:
        await self.sup.drain()
        return 200, TEXT, b"draining\n"

    async def reload(self, q: dict[str, list[str]]) -> Reply:
        version, errors = await self.sup.reload()
        if errors:
            return _json({"version": version, "errors": errors}, status=400)
        return _json({"version": version})

    async def quit(self, q: dict[str, list[str]]) -> Reply:
        self.sup.stop()
        return 200, TEXT, b"OK\n"
