"""`meshproxy iptables`: the I/O around sidecar.iptables' rules, run as root in the
workload's network namespace (an init step, before the app and its sidecar start).

It runs the system's `iptables-save` and `iptables-restore` (`ip6tables-*` for IPv6):
on Debian 12 they are the nft backend (iptables-nft, `iptables --version` says
"nf_tables"), whose rules live in nftables' `ip nat` / `ip6 nat` tables and show in
`nft list ruleset` as well. Each family is read, then written in one restore transaction.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

from meshproxy.sidecar.iptables import Options, apply_input, cleanup_input

TOOLS = {4: ("iptables-save", "iptables-restore"), 6: ("ip6tables-save", "ip6tables-restore")}
# iptables commands return at once; a minute is a kernel or lock that will not answer.
COMMAND_TIMEOUT = 60.0


class NetfilterError(RuntimeError):
    """A command that failed, with its name and what it printed."""


def _run(argv: list[str], stdin: str | None = None) -> str:
    if shutil.which(argv[0]) is None:
        raise NetfilterError(f"{argv[0]} not found (Debian: apt-get install iptables)")
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise NetfilterError(f"{' '.join(argv)}: no answer in {COMMAND_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise NetfilterError(f"{' '.join(argv)} failed (exit {done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()}")
    return done.stdout


def saved(family: int) -> str:
    """`iptables-save -t nat` of one family."""
    return _run([TOOLS[family][0], "-t", "nat"])


def restore(family: int, text: str) -> None:
    _run([TOOLS[family][1], "--noflush"], text)


def backend() -> str:
    """What `iptables --version` says, e.g. "iptables v1.8.9 (nf_tables)"."""
    return _run(["iptables", "--version"]).strip()


def install(opts: Options, say: Callable[[str], None]) -> None:
    """Install the rules in every family: idempotent (a second run rewrites our chains with
    the same rules and adds no jump)."""
    for family in opts.families:
        text = apply_input(opts, family, saved(family))
        restore(family, text)
        say(f"IPv{family}: {TOOLS[family][1]} --noflush <<EOF\n{text}EOF")


def remove(opts: Options, say: Callable[[str], None]) -> None:
    """Remove exactly our jumps and chains, in every family."""
    for family in opts.families:
        text = cleanup_input(saved(family))
        if text is None:
            say(f"IPv{family}: no meshproxy rules")
            continue
        restore(family, text)
        say(f"IPv{family}: {TOOLS[family][1]} --noflush <<EOF\n{text}EOF")


def dry_run(opts: Options, say: Callable[[str], None]) -> None:
    """The rules as they would be applied to a table with none of ours; runs nothing."""
    for family in opts.families:
        say(f"# IPv{family}: {TOOLS[family][1]} --noflush <<EOF\n"
            f"{apply_input(opts, family)}EOF")
