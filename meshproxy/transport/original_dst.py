"""Where an intercepted connection was going: SO_ORIGINAL_DST.

A connection that the nat table REDIRECTed (sidecar.iptables) arrives at the proxy's
listener with its destination rewritten; conntrack keeps the original, which the kernel
gives back through getsockopt: SO_ORIGINAL_DST at SOL_IP (linux/netfilter_ipv4.h) as a
struct sockaddr_in, IP6T_SO_ORIGINAL_DST at SOL_IPV6, which is IPPROTO_IPV6
(linux/netfilter_ipv6/ip6_tables.h), as a struct sockaddr_in6; both options are 80.
An IPv4 connection accepted by a dual-stack ("::") listener has an IPv4-mapped peer and is
asked at SOL_IP, as Envoy does.

A connection that was not redirected (a client that named the listener itself) has no
original destination: None here. The kernel says so with ENOENT only when conntrack has no
entry; with the nat table loaded every connection has one, and its original destination
is then the listener's own address, which is what is compared.
"""

from __future__ import annotations

import socket
import struct

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN = 16   # family, port, 4-byte address, 8 bytes of padding
_SOCKADDR_IN6 = 28  # family, port, flow info, 16-byte address, scope id


def original_dst(sock: socket.socket, peer: tuple) -> tuple[str, int] | None:
    """(address, port) the client connected to, or None when it was not redirected."""
    try:
        if sock.family == socket.AF_INET or peer[0].startswith("::ffff:"):
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
            port, = struct.unpack_from("!H", raw, 2)
            dst = socket.inet_ntop(socket.AF_INET, raw[4:8]), port
        else:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
            port, = struct.unpack_from("!H", raw, 2)
            dst = socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        local = sock.getsockname()
    except OSError:
        return None
    host = local[0][7:] if local[0].startswith("::ffff:") else local[0]
    return None if (host, local[1]) == dst else dst
