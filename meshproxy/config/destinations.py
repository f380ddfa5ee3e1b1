"""Original destinations -> what an intercepted connection becomes (sans-IO).

A sidecar's intercepting listener (schema.Listener.use_original_dst) reads where each
connection was going (transport.original_dst) and looks it up here once, at accept. The
most specific match wins, as Envoy's filter chain match orders destination_port and
prefix_ranges: the address with the port, the address with any port, the longest CIDR
with the port then with any port, any address with the port, then any at all. A
connection that matches nothing is passed through (ALLOW_ANY) or refused
(REGISTRY_ONLY), as the listener says: `unmatched`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from meshproxy.config import schema

HTTP = 0     # the listener's virtual hosts route it
TCP = 1      # bytes to `cluster`
AUTO = 2     # the HTTP inspector decides: HTTP, or TCP to `cluster`
PASSTHROUGH = 3  # bytes to the original destination (or passthrough_address, same port)
BLACKHOLE = 4    # refused: closed at once
_KINDS = {"http": HTTP, "tcp": TCP, "auto": AUTO}

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    name: str        # for the stats and the access log
    kind: int
    cluster: str     # "" for HTTP
    # HTTP: a Host that routes to the destination's virtual host (its first domain), for
    # a request whose own Host no virtual host serves; b"" for none.
    host: bytes = b""


class DestinationTable:
    __slots__ = ("_exact", "_cidrs", "_ports", "_any", "unmatched", "passthrough_address",
                 "detection_timeout", "own_ports")

    def __init__(self, matches: list[schema.DestinationMatch], unmatched: DestinationSpec,
                 passthrough_address: str | None, detection_timeout: float,
                 own_ports: frozenset[int], hosts: dict[str, bytes] | None = None) -> None:
        """`hosts`: a virtual host's name -> a Host it serves (DestinationSpec.host)."""
        self._exact: dict[tuple[str, int], DestinationSpec] = {}
        self._cidrs: list[tuple[int, IPNetwork, int, DestinationSpec]] = []
        self._ports: dict[int, DestinationSpec] = {}
        self._any: DestinationSpec | None = None
        self.unmatched = unmatched
        self.passthrough_address = passthrough_address
        self.detection_timeout = detection_timeout
        # The proxy's own listener ports: a connection passed through to one of them on
        # this host would come straight back (a loop), so it is refused instead.
        self.own_ports = own_ports
        for m in matches:
            spec = DestinationSpec(m.name or m.cluster or f"{m.protocol}:{m.port}",
                                   _KINDS[m.protocol], m.cluster or "",
                                   (hosts or {}).get(m.virtual_host or "", b""))
            if not m.addresses:
                if m.port:
                    self._ports.setdefault(m.port, spec)
                elif self._any is None:
                    self._any = spec
            for a in m.addresses:
                net = ipaddress.ip_network(a)
                if net.num_addresses == 1:
                    self._exact.setdefault((str(net.network_address), m.port), spec)
                else:
                    self._cidrs.append((net.prefixlen, net, m.port, spec))
        self._cidrs.sort(key=lambda c: -c[0])

    def match(self, address: str, port: int) -> DestinationSpec:
        exact = self._exact
        found = exact.get((address, port)) or exact.get((address, 0))
        if found is not None:
            return found
        if self._cidrs:
            ip = ipaddress.ip_address(address)
            for _len, net, p, spec in self._cidrs:
                if p == port and ip in net:
                    return spec
            for _len, net, p, spec in self._cidrs:
                if p == 0 and ip in net:
                    return spec
        return self._ports.get(port) or self._any or self.unmatched
