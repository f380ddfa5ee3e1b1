"""The control plane's admin port (istiod's monitoring port 15014): GET /metrics
(Prometheus text), /ready (200 once the replica watches the store), /healthz. No token:
like the data plane's admin, it is bound to loopback by default and changes nothing."""

from __future__ import annotations

import h11
import trio

from meshproxy.control.metrics import Metrics
from meshproxy.transport.h11_io import next_event, respond, serve_tcp

REQUEST_TIMEOUT = 10.0


class ControlAdmin:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.ready = False

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        await serve_tcp(self._connection, host, port, task_status)

    def _answer(self, target: bytes) -> tuple[int, bytes]:
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            return 200, self.metrics.render().encode()
        if path == b"/ready":
            return (200, b"ready\n") if self.ready else (503, b"not ready\n")
        if path == b"/healthz":
            return 200, b"ok\n"
        return 404, b"no such path\n"

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                ev = None
                with trio.move_on_after(REQUEST_TIMEOUT):
                    ev = await next_event(conn, stream)
                    while isinstance(ev, h11.Request):
                        req = ev
                        ev = await next_event(conn, stream)
                        while isinstance(ev, h11.Data):
                            ev = await next_event(conn, stream)
                        status, body = self._answer(req.target)
                        kind = ("text/plain; version=0.0.4" if req.target == b"/metrics"
                                else "text/plain")
                        if not await respond(conn, stream, status, [
                                ("content-type", kind), ("content-length", str(len(body)))],
                                body):
                            return
                        ev = await next_event(conn, stream)
                if not isinstance(ev, h11.Request):
                    return
        except (trio.BrokenResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()
