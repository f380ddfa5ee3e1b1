"""`meshproxy iptables` in a network namespace of the test's own: the rules it installs,
that a second run changes nothing, that --cleanup leaves the tables as they were, and
where connections really go with them (tests/netns_tools.py servers standing in for the
proxy's listeners and for another host)."""

from __future__ import annotations

import re
import sys

from tests.netns import PROXY_UID, Net

MESHPROXY = [sys.executable, "-m", "meshproxy"]


def _tables(net: Net, ns: str) -> str:
    """Both families' nat tables as iptables-save prints them, without its dated comments
    and packet counters."""
    out = []
    for save in ("iptables-save", "ip6tables-save"):
        text = net.run(ns, [save, "-t", "nat"]).stdout
        out += [re.sub(r"\[\d+:\d+\]", "[0:0]", line) for line in text.splitlines()
                if not line.startswith("#")]
    return "\n".join(out)


def test_sidecar_iptables_dry_run_prints_the_rules_and_runs_nothing(net: Net) -> None:
    ns = net.host("pod")
    before = _tables(net, ns)
    # With no iptables command to be found, a dry run still prints the rules.
    out = net.run(ns, ["env", "PATH=/nonexistent", *MESHPROXY, "iptables",
                       "--dry-run"]).stdout
    assert "-A MESH_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in out
    assert "-A MESH_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in out
    assert "-A MESH_OUTPUT -m owner --uid-owner 1337 -j RETURN" in out
    assert "-A MESH_OUTPUT -d ::1/128 -j RETURN" in out  # the IPv6 half
    assert _tables(net, ns) == before


def test_sidecar_iptables_twice_changes_nothing_and_cleanup_restores(net: Net) -> None:
    ns = net.host("pod")
    # Somebody else's rules, which must survive both the install and the cleanup.
    net.run(ns, ["iptables", "-t", "nat", "-N", "OTHER"])
    net.run(ns, ["iptables", "-t", "nat", "-A", "OUTPUT", "-d", "10.99.0.1", "-j", "OTHER"])
    net.run(ns, ["ip6tables", "-t", "nat", "-A", "PREROUTING", "-p", "udp", "-j", "RETURN"])
    before = _tables(net, ns)
    net.run(ns, [*MESHPROXY, "iptables"])
    once = _tables(net, ns)
    assert once != before and ":MESH_OUTPUT" in once and "-j OTHER" in once
    net.run(ns, [*MESHPROXY, "iptables"])
    assert _tables(net, ns) == once
    out = net.run(ns, [*MESHPROXY, "iptables", "--cleanup"]).stdout
    assert "-D OUTPUT -p tcp -j MESH_OUTPUT" in out
    assert _tables(net, ns) == before
    # Nothing left to remove: a second cleanup says so and changes nothing.
    out = net.run(ns, [*MESHPROXY, "iptables", "--cleanup"]).stdout
    assert "IPv4: no meshproxy rules" in out and _tables(net, ns) == before


def test_sidecar_iptables_bad_flags_are_named(net: Net) -> None:
    ns = net.host("pod")
    r = net.run(ns, [*MESHPROXY, "iptables", "--exclude-outbound-cidrs", "10.0.0.1/8"],
                check=False)
    assert r.returncode == 2 and "--exclude-outbound-cidrs: '10.0.0.1/8'" in r.stderr
    r = net.run(ns, [*MESHPROXY, "iptables", "--exclude-inbound-ports", "15021,x"],
                check=False)
    assert r.returncode == 2 and "--exclude-inbound-ports: 'x' is not a port" in r.stderr
    assert ":MESH" not in _tables(net, ns)


def test_sidecar_iptables_sends_each_connection_where_the_rules_say(net: Net) -> None:
    pod = net.host("pod")
    peer = net.host("peer")
    (pod4, pod6), (peer4, peer6) = net.link(pod, peer)
    (_x4, _x6), (far4, _far6) = net.link(pod, net.host("far"))  # an excluded network
    # Stand-ins for the sidecar's listeners (they report the original destination), the
    # app's own loopback server, and the other hosts' servers.
    net.serve(pod, "::", "15001", "outbound", "::", "15006", "inbound",
              "::", "15021", "readiness", "127.0.0.1", "9000", "app-local")
    net.serve(peer, "::", "80", "peer", "::", "81", "peer", "::", "8080", "peer")
    net.serve(net.namespaces[-1], far4, "80", "far")
    net.run(pod, [*MESHPROXY, "iptables", "--exclude-outbound-ports", "81",
                  "--exclude-outbound-cidrs", f"{far4.rsplit('.', 1)[0]}.0/24"])

    def app(host: str, port: int) -> str:
        return net.tool(pod, "call", host, str(port))

    def proxy(host: str, port: int) -> str:
        return net.tool(pod, "call", host, str(port), uid=PROXY_UID)

    # The app's outbound connections reach the outbound listener, which learns where they
    # were going, over IPv4 and IPv6.
    assert app(peer4, 80) == f"outbound {peer4} 80"
    assert app(peer6, 8080) == f"outbound {peer6} 8080"
    # The proxy's own connections are not looped back.
    assert proxy(peer4, 80) == "peer -"
    assert proxy(peer6, 80) == "peer -"
    # Excluded port and CIDR go straight out.
    assert app(peer4, 81) == "peer -"
    assert app(far4, 80) == "far -"
    # The app's loopback traffic stays its own: to itself, and to the listener by name.
    assert app("127.0.0.1", 9000) == "app-local -"
    assert app("127.0.0.1", 15001) == "outbound -"
    # Inbound: a caller's connection to any workload port reaches the inbound listener,
    # but the sidecar's readiness port is left alone.
    assert net.tool(peer, "call", pod4, "8080") == f"inbound {pod4} 8080"
    assert net.tool(peer, "call", pod6, "5432") == f"inbound {pod6} 5432"
    assert net.tool(peer, "call", pod4, "15021") == "readiness -"
    # The proxy calling its own workload's address comes back in through the inbound side.
    assert proxy(pod4, 8080) == f"inbound {pod4} 8080"
    # And after --cleanup everything goes where it was addressed.
    net.run(pod, [*MESHPROXY, "iptables", "--cleanup"])
    assert app(peer4, 80) == "peer -"
    assert net.tool(peer, "call", pod4, "8080") == "refused"
