"""CORS: Envoy's CORS filter (envoy.filters.http.cors), Istio's corsPolicy. Sans-IO: the
policy is compiled once per route (config.compile) and answers what a request's Origin
gets; the filter chain (proxy.filter_chain.on_cors) applies it.

The Fetch standard's rules, as Envoy applies them:
- a request with an Origin field is a CORS request; without one, the filter does nothing;
- a preflight is an OPTIONS request with Origin and Access-Control-Request-Method. From an
  allowed origin it is answered by the proxy (200, no body) with
  Access-Control-Allow-Origin (the origin itself), -Allow-Methods, -Allow-Headers,
  -Max-Age and, with allow_credentials, -Allow-Credentials: true; the upstream never sees
  it. From another origin it goes upstream (Envoy's forward_not_matching_preflights,
  true by default) or is answered 200 without any CORS field;
- any other request from an allowed origin gets Access-Control-Allow-Origin (the origin),
  -Allow-Credentials and -Expose-Headers on its response, whoever answers it (the
  upstream, or a local reply: a browser may then read the error);
- every response the policy shapes says `Vary: Origin` (its fields depend on it).
Stats (Envoy's): http.<listener>.cors.origin_valid, cors.origin_invalid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ORIGIN = b"origin"
REQUEST_METHOD = b"access-control-request-method"
VARY_ORIGIN = (b"vary", b"origin")


@dataclass(frozen=True, slots=True)
class OriginMatch:
    kind: str        # exact | prefix | suffix | regex
    value: bytes     # lowercased when ignore_case (but a regex's)
    ignore_case: bool


class CorsPolicy:
    """One route's CORS policy, built once per snapshot."""

    __slots__ = ("matches", "regexes", "preflight_fields", "response_fields", "forward",
                 "credentials")

    def __init__(self, matches: list[OriginMatch], methods: list[str], headers: list[str],
                 expose: list[str], max_age: float | None, credentials: bool,
                 forward_not_matching: bool) -> None:
        self.matches = matches
        self.regexes = {id(m): re.compile(m.value, re.IGNORECASE if m.ignore_case else 0)
                        for m in matches if m.kind == "regex"}
        self.forward = forward_not_matching
        self.credentials = credentials
        common: list[tuple[bytes, bytes]] = []
        if credentials:
            common.append((b"access-control-allow-credentials", b"true"))
        pre = list(common)
        if methods:
            pre.append((b"access-control-allow-methods", ", ".join(methods).encode()))
        if headers:
            pre.append((b"access-control-allow-headers", ", ".join(headers).encode()))
        if max_age is not None:
            pre.append((b"access-control-max-age", b"%d" % int(max_age)))
        self.preflight_fields = tuple(pre)
        resp = list(common)
        if expose:
            resp.append((b"access-control-expose-headers", ", ".join(expose).encode()))
        self.response_fields = tuple(resp)

    def allowed(self, origin: bytes) -> bool:
        for m in self.matches:
            value = origin.lower() if m.ignore_case else origin
            if m.kind == "exact":
                if value == m.value:
                    return True
            elif m.kind == "prefix":
                if value.startswith(m.value):
                    return True
            elif m.kind == "suffix":
                if value.endswith(m.value):
                    return True
            elif self.regexes[id(m)].fullmatch(origin):
                return True
        return False

    @staticmethod
    def is_preflight(head: Any) -> bool:
        return head.method == b"OPTIONS" and head.get(REQUEST_METHOD) is not None

    def preflight_answer(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """The fields of the proxy's answer to an allowed origin's preflight."""
        return [(b"access-control-allow-origin", origin), *self.preflight_fields, VARY_ORIGIN]

    def response_extra(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """The fields every response to an allowed origin's request carries."""
        return [(b"access-control-allow-origin", origin), *self.response_fields, VARY_ORIGIN]
