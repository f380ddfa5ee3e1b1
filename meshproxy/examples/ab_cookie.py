"""An example Python filter (filters.python): A/B assignment by cookie, for routes that
split on a header (a route match on `x-ab-group`).

    filters:
      - python: meshproxy.examples.ab_cookie:ABCookie
        config: {cookie: ab, header: x-ab-group, b_percent: 10, max_age: 2592000}

A request with the cookie keeps its group; one without is assigned B with `b_percent`
probability (A otherwise), and its response sets the cookie so the client stays in its
group. The group is put in `header` on the request, where the upstream sees it and where
routes match it: a filter that changes a request's fields has the request routed again
(Envoy's clearRouteCache), so a route matching `x-ab-group: b` takes the B group.
"""

from __future__ import annotations

import random
from typing import Any

from meshproxy.filters.python import Request, Response

GROUPS = ("a", "b")


class ABCookie:
    def __init__(self, config: dict[str, Any]) -> None:
        self.cookie = str(config.get("cookie", "ab"))
        self.header = str(config.get("header", "x-ab-group"))
        self.b_share = float(config.get("b_percent", 50)) / 100.0
        self.max_age = int(config.get("max_age", 30 * 24 * 3600))
        if not 0.0 <= self.b_share <= 1.0:
            raise ValueError("b_percent must be within 0..100")

    def _from_cookie(self, req: Request) -> str | None:
        for value in req.headers.get_all("cookie"):
            for part in value.split(";"):
                name, _, val = part.strip().partition("=")
                if name == self.cookie and val in GROUPS:
                    return val
        return None

    def on_request_headers(self, req: Request) -> None:
        group = self._from_cookie(req)
        if group is None:
            group = "b" if random.random() < self.b_share else "a"
            req.state["assigned"] = group
        req.headers.set(self.header, group)

    def on_response_headers(self, req: Request, resp: Response) -> None:
        group = req.state.get("assigned")
        if group is not None:
            resp.headers.add("set-cookie", f"{self.cookie}={group}; Path=/; "
                             f"Max-Age={self.max_age}; HttpOnly; SameSite=Lax")
