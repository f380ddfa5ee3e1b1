"""Python filters the tests load through real proxies (tests/integration/test_python_filters.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio

from meshproxy.filters.python import Reply, Request, Response


class Headers:
    """Adds a request field, rewrites the response (a field and, on /teapot, the status)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.tag = config.get("tag", "x")

    async def on_request_headers(self, req: Request) -> Reply | None:
        await trio.sleep(0.001)  # async is allowed
        if req.path == "/local":
            return Reply(299, "answered by a filter\n", headers=[("x-by", self.tag)])
        req.headers.set("x-filtered", self.tag)
        req.headers.remove("x-drop")
        req.state["seen"] = req.method
        return None

    def on_response_headers(self, req: Request, resp: Response) -> None:
        resp.headers.set("x-filter-saw", req.state.get("seen", "-"))
        resp.headers.remove("x-origin-secret")
        if req.path == "/teapot":
            resp.status = 418


class Raising:
    def __init__(self, config: dict[str, Any]) -> None:
        self.where = config.get("where", "request")

    def on_request_headers(self, req: Request) -> None:
        if self.where == "request":
            raise RuntimeError("boom")

    def on_response_headers(self, req: Request, resp: Response) -> None:
        if self.where == "response":
            raise KeyError("bang")


class Sleeping:
    def __init__(self, config: dict[str, Any]) -> None:
        self.seconds = float(config.get("seconds", 5))

    async def on_request_headers(self, req: Request) -> None:
        await trio.sleep(self.seconds)


class Recorder:
    """Counts the bodies both ways and writes a line per request at the log phase."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.path = Path(config["path"])

    def on_request_headers(self, req: Request) -> None:
        req.state.update(request_bytes=0, response_bytes=0, request_end=False,
                         response_end=False)

    def on_request_body(self, req: Request, chunk: bytes, end: bool) -> None:
        req.state["request_bytes"] += len(chunk)
        req.state["request_end"] |= end

    def on_response_body(self, req: Request, chunk: bytes, end: bool) -> None:
        req.state["response_bytes"] += len(chunk)
        req.state["response_end"] |= end

    def on_log(self, req: Request, resp: Response | None) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"path": req.path, "status": resp.status if resp else None,
                                **req.state}) + "\n")


class Version:
    """What a reloaded module says (the test rewrites this file's copy)."""

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def on_request_headers(self, req: Request) -> Reply:
        return Reply(200, "v1\n")
