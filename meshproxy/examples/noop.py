"""A Python filter that does nothing (filters.python): what bench.load's
`meshproxy +python-filter` variant measures, the cost of the filter machinery itself."""

from __future__ import annotations

from typing import Any

from meshproxy.filters.python import Request


class NoOp:
    def __init__(self, config: dict[str, Any]) -> None:
        pass

    def on_request_headers(self, req: Request) -> None:
        return None


class AsyncNoOp:
    """The same as an async phase: what its timeout's cancel scope costs."""

    def __init__(self, config: dict[str, Any]) -> None:
        pass

    async def on_request_headers(self, req: Request) -> None:
        return None
