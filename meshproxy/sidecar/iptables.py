"""The interception rules of a sidecar (`meshproxy iptables`), sans-IO: options in, the
text that `iptables-restore` / `ip6tables-restore` read out.

What they do (the nat table, as istio-iptables arranges it, in our own chains):
  PREROUTING -p tcp -> MESH_INBOUND: a connection to one of the workload's ports (all but
      the excluded ones, or only the included ones) goes to MESH_IN_REDIRECT, which
      REDIRECTs it to the proxy's inbound port (15006). The proxy learns the port it was
      meant for from SO_ORIGINAL_DST.
  OUTPUT -p tcp -> MESH_OUTPUT, in this order, the first that matches decides:
      1. a destination port excluded by flag: untouched;
      2. the proxy's own connection to the workload's own address (not 127.0.0.1) over
         loopback: to the inbound port (an app calling its own service through the mesh
         comes back in through its sidecar, as a caller from outside would);
      3. the app's traffic over loopback: untouched (an app talking to itself, or to the
         proxy's outbound port by name, stays alone);
      4. the proxy's own traffic (owner match on its UID, then its GID, Istio's 1337):
         untouched, so its upstream connections are not looped back into it;
      5. a destination of 127.0.0.1 (::1): untouched;
      6. an excluded CIDR: untouched; then an included CIDR (every one by default): to
         MESH_REDIRECT, which REDIRECTs to the proxy's outbound port (15001).
Both families get the same rules, with ::1 for 127.0.0.1 and only the CIDRs of their own
family.

Why iptables-restore, not one `iptables` command per rule: one transaction per family
(with the nft backend, one netlink batch that the kernel applies whole or not at all), so a
failure never leaves half a rule set, and the text is the same as `iptables-save` prints,
so `--dry-run` shows exactly what is applied. `--noflush` keeps every other rule of the
table; declaring our chains flushes only them, which is what makes a second run change
nothing: the chains are rewritten with the same rules, and a jump into them is added only
when it is missing (`jumps_present`, read from `iptables-save`). `cleanup_input` deletes
exactly our jumps and chains.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

CHAIN_INBOUND = "MESH_INBOUND"
CHAIN_IN_REDIRECT = "MESH_IN_REDIRECT"
CHAIN_OUTPUT = "MESH_OUTPUT"
CHAIN_REDIRECT = "MESH_REDIRECT"
CHAINS = (CHAIN_INBOUND, CHAIN_IN_REDIRECT, CHAIN_OUTPUT, CHAIN_REDIRECT)
# The jumps from the built-in chains into ours: (built-in chain, rule text after -A CHAIN).
JUMP_INBOUND = ("PREROUTING", f"-p tcp -j {CHAIN_INBOUND}")
JUMP_OUTPUT = ("OUTPUT", f"-p tcp -j {CHAIN_OUTPUT}")

# Istio's conventions: the proxy runs as UID and GID 1337; its outbound listener is 15001,
# its inbound one 15006; the ports of the sidecar itself that callers reach directly
# (readiness 15021, admin 15000) are not redirected.
PROXY_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
EXCLUDED_INBOUND_PORTS = (15000, 15021)


class RulesError(ValueError):
    """An option that cannot become a rule; the message names the option."""


@dataclass(frozen=True)
class Options:
    proxy_uid: int = PROXY_UID
    proxy_gid: int = PROXY_UID
    outbound_port: int = OUTBOUND_PORT
    inbound_port: int = INBOUND_PORT
    # None: every port of the workload but the excluded ones; a tuple: only those (empty:
    # no inbound interception at all).
    inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = EXCLUDED_INBOUND_PORTS
    exclude_outbound_ports: tuple[int, ...] = ()
    # None: every destination; a tuple: only these CIDRs go to the proxy.
    include_outbound_cidrs: tuple[str, ...] | None = None
    exclude_outbound_cidrs: tuple[str, ...] = ()
    ipv6: bool = True
    families: tuple[int, ...] = field(init=False, default=(4, 6))

    def __post_init__(self) -> None:
        object.__setattr__(self, "families", (4, 6) if self.ipv6 else (4,))


def parse_ports(text: str, what: str) -> tuple[int, ...]:
    """"15020,15021" -> (15020, 15021); "" -> ()."""
    out = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise RulesError(f"{what}: {item!r} is not a port (1-65535)")
        out.append(int(item))
    return tuple(out)


def parse_cidrs(text: str, what: str) -> tuple[str, ...]:
    """"10.0.0.0/8,fd00::/8" -> each in its canonical form (an address alone is a /32 or
    /128); a host part past the prefix is an error, as iptables would silently drop it."""
    out = []
    for item in (c.strip() for c in text.split(",")):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=True)))
        except ValueError as exc:
            raise RulesError(f"{what}: {item!r}: {exc}") from None
    return tuple(out)


def _family(cidr: str) -> int:
    return ipaddress.ip_network(cidr).version


def chain_rules(opts: Options, family: int) -> list[str]:
    """The rules of our four chains for one family, as `-A CHAIN ...` lines."""
    loopback = "127.0.0.1/32" if family == 4 else "::1/128"
    rules = [f"-A {CHAIN_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {opts.inbound_port}",
             f"-A {CHAIN_REDIRECT} -p tcp -j REDIRECT --to-ports {opts.outbound_port}"]
    if opts.inbound_ports is None:
        for p in opts.exclude_inbound_ports:
            rules.append(f"-A {CHAIN_INBOUND} -p tcp -m tcp --dport {p} -j RETURN")
        rules.append(f"-A {CHAIN_INBOUND} -p tcp -j {CHAIN_IN_REDIRECT}")
    else:
        for p in opts.inbound_ports:
            rules.append(f"-A {CHAIN_INBOUND} -p tcp -m tcp --dport {p} -j {CHAIN_IN_REDIRECT}")
    out = CHAIN_OUTPUT
    for p in opts.exclude_outbound_ports:
        rules.append(f"-A {out} -p tcp -m tcp --dport {p} -j RETURN")
    for kind, ident in (("uid", opts.proxy_uid), ("gid", opts.proxy_gid)):
        rules += [
            f"-A {out} ! -d {loopback} -o lo -m owner --{kind}-owner {ident} "
            f"-j {CHAIN_IN_REDIRECT}",
            f"-A {out} -o lo -m owner ! --{kind}-owner {ident} -j RETURN",
            f"-A {out} -m owner --{kind}-owner {ident} -j RETURN"]
    rules.append(f"-A {out} -d {loopback} -j RETURN")
    for cidr in opts.exclude_outbound_cidrs:
        if _family(cidr) == family:
            rules.append(f"-A {out} -d {cidr} -j RETURN")
    if opts.include_outbound_cidrs is None:
        rules.append(f"-A {out} -j {CHAIN_REDIRECT}")
    else:
        for cidr in opts.include_outbound_cidrs:
            if _family(cidr) == family:
                rules.append(f"-A {out} -d {cidr} -j {CHAIN_REDIRECT}")
    return rules


def wanted_jumps(opts: Options) -> list[tuple[str, str]]:
    jumps = [JUMP_OUTPUT]
    if opts.inbound_ports is None or opts.inbound_ports:
        jumps.insert(0, JUMP_INBOUND)
    return jumps


def jumps_present(saved: str) -> list[tuple[str, str]]:
    """The jumps into our chains that an `iptables-save -t nat` output holds, once per
    occurrence (a rule added twice by hand is deleted twice by a cleanup)."""
    found = []
    for line in _nat_lines(saved):
        parts = line.split(" ", 2)
        if (len(parts) == 3 and parts[0] == "-A" and parts[1] in ("PREROUTING", "OUTPUT")
                and any(parts[2].endswith(f"-j {c}") for c in CHAINS)):
            found.append((parts[1], parts[2]))
    return found


def chains_present(saved: str) -> list[str]:
    return [c for c in CHAINS if any(line.startswith(f":{c} ") for line in _nat_lines(saved))]


def _nat_lines(saved: str) -> list[str]:
    """The lines of the nat table's section of an iptables-save output."""
    lines, inside = [], False
    for line in saved.splitlines():
        if line.startswith("*"):
            inside = line == "*nat"
        elif inside:
            lines.append(line.strip())
    return lines


def apply_input(opts: Options, family: int, saved: str = "") -> str:
    """The iptables-restore --noflush input that installs the rules for one family, given
    what `iptables-save -t nat` shows now ("" for a dry run: as on an empty table)."""
    present = set(jumps_present(saved))
    lines = ["*nat"]
    lines += [f":{c} - [0:0]" for c in CHAINS]
    lines += chain_rules(opts, family)
    lines += [f"-A {chain} {rule}" for chain, rule in wanted_jumps(opts)
              if (chain, rule) not in present]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def cleanup_input(saved: str) -> str | None:
    """The iptables-restore --noflush input that removes exactly what apply_input added
    (our jumps, then our chains), or None when there is nothing of ours."""
    jumps = jumps_present(saved)
    chains = chains_present(saved)
    if not jumps and not chains:
        return None
    lines = ["*nat"]
    lines += [f"-D {chain} {rule}" for chain, rule in jumps]
    lines += [f"-F {c}" for c in chains]
    lines += [f"-X {c}" for c in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
