"""Type stubs for meshproxy._core.route_table (see the .pyx for the precedence rules)."""

from collections.abc import Iterable
from typing import Any, Literal

class HeaderMatcher:
    name: bytes
    invert: bool
    def __init__(
        self,
        name: bytes,
        kind: Literal["exact", "prefix", "suffix", "regex", "present", "absent"],
        value: bytes = b"",
        invert: bool = False,
        lower_name: bool = True,
    ) -> None: ...

class Route:
    action: Any
    name: str
    def __init__(
        self,
        path_kind: Literal["prefix", "path", "regex"],
        path: bytes,
        methods: Iterable[bytes] | None,
        headers: list[HeaderMatcher],
        query: list[HeaderMatcher],
        action: Any,
        case_sensitive: bool = True,
        name: str = "",
    ) -> None: ...

class VirtualHost:
    name: str
    routes: list[Route]
    extra: Any
    def __init__(self, name: str, routes: list[Route], extra: Any = None) -> None: ...
    def find_route(
        self, method: bytes, path: bytes, query: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Route | None: ...

class RouteTable:
    default: VirtualHost | None
    def __init__(self, virtual_hosts_with_domains: list[tuple[VirtualHost, list[str]]]) -> None: ...
    def find_virtual_host(self, host: bytes) -> VirtualHost | None: ...
    def route(
        self, host: bytes, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
    ) -> tuple[VirtualHost | None, Route | None]: ...
