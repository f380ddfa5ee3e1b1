"""The operator API's client for meshctl: blocking HTTP/JSON with the bearer token (a
command line makes one request at a time; no event loop needed)."""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

TIMEOUT = 10.0


class APIError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        msg = body.get("error", "") if isinstance(body, dict) else str(body)
        super().__init__(f"{status}: {msg}")
        self.status = status
        self.errors: list[str] = body.get("errors", []) if isinstance(body, dict) else []


class Client:
    def __init__(self, server: str, token: str) -> None:
        u = urlsplit(server)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"--server: {server!r} is not http://HOST:PORT")
        self.host, self.port = u.hostname, u.port or 15080
        self.token = token

    def request(self, method: str, path: str, body: Any = None) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Authorization": f"Bearer {self.token}"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            raw = r.read()
        finally:
            conn.close()
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = raw.decode(errors="replace")
        if r.status >= 400:
            raise APIError(r.status, answer)
        return answer
