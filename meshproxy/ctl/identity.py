"""meshctl's identity commands: join tokens, the CA (status, bundle, root rotation) and a
workload's certificate as its sidecar reports it."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Any

from meshproxy.config.durations import parse_duration
from meshproxy.ctl.client import Client


def cmd_token(c: Client, args: argparse.Namespace) -> int:
    ttl = parse_duration(args.ttl)
    answer = c.request("POST", "/v1/tokens", {"namespace": args.namespace or "default",
                                              "service_account": args.service_account,
                                              "ttl": ttl})
    if args.output_file:
        # The token is a credential: only its owner reads the file.
        fd = os.open(args.output_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(answer["token"] + "\n")
        print(f"join token for {answer['spiffe_id']} written to {args.output_file} "
              f"(expires {_when(answer['expires_at'])})", file=sys.stderr)
    else:
        print(answer["token"])
    return 0


def cmd_ca(c: Client, args: argparse.Namespace) -> int:
    if args.action == "bundle":
        print(c.request("GET", "/v1/ca")["bundle_pem"], end="")
        return 0
    if args.action == "rotate-root":
        started = c.request("POST", "/v1/ca/rotate-root")
        print(f"root rotation begun: {started['old_root']} -> {started['new_root']}")
        if not args.wait:
            return 0
        seen = ""
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            view = c.request("GET", "/v1/ca")
            phase = view["phase"]
            if phase != seen:
                print(f"  phase {phase or 'done'}", flush=True)
                seen = phase
            if not phase:
                return 0
            time.sleep(0.2)
        print("meshctl: the rotation is still running (some proxies have not applied a "
              "phase: see meshctl ca status)", file=sys.stderr)
        return 1
    view = c.request("GET", "/v1/ca")
    print(f"Trust domain:  {view['trust_domain']}")
    print(f"Signer:        {view['signer']['subject']} (root {view['signer_root']}, "
          f"{'plugged-in' if view['plugged_in'] else 'self-signed'})")
    print(f"Leaf TTL:      {view['leaf_ttl']:g} s")
    print("Roots in the trust bundle:")
    for r in view["roots"]:
        print(f"  {r['fingerprint']}  {r['subject']}  expires {r['not_after']}")
    rot = view.get("rotation")
    if rot:
        print(f"Rotation:      phase {rot['phase']} since {_when(rot['phase_since'])} "
              f"({rot['old_root']} -> {rot['new_root']})")
        holding = view.get("holding") or []
        if holding:
            print(f"  waiting for: {', '.join(holding)}")
    return 0


def identity_lines(status: dict[str, Any] | None) -> list[str]:
    """The identity section of `describe workload`, from the proxy's status record."""
    if status is None:
        return ["Identity: (no sidecar with this name is known to the control plane)"]
    ident = status.get("identity")
    if not ident:
        if status.get("spiffe_id"):
            return [f"Identity: {status['spiffe_id']} (authenticated; no certificate yet)"]
        return ["Identity: none (the sidecar joined without a join token)"]
    left = ident["renew_at"] - time.time()
    return ["Identity:",
            f"  SPIFFE ID:     {ident['spiffe_id']}",
            f"  Serial:        {ident['serial']}",
            f"  Expires:       {_when(ident['not_after'])}",
            f"  Next renewal:  {_when(ident['renew_at'])} (in {_span(left)})",
            f"  Root:          {ident['root']}"]


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


def _span(seconds: float) -> str:
    if seconds < 0:
        return "due now"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("token", help="join tokens: token create -n NS --service-account SA")
    p.add_argument("action", choices=["create"])
    p.add_argument("-n", "--namespace")
    p.add_argument("--service-account", required=True)
    p.add_argument("--ttl", default="24h", help="how long it may be used (default 24h)")
    p.add_argument("-o", "--output-file", help="write it to this file (mode 0600)")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("ca", help="the mesh CA: status, bundle, rotate-root")
    p.add_argument("action", choices=["status", "bundle", "rotate-root"])
    p.add_argument("--wait", action="store_true",
                   help="rotate-root: follow the phases until the rotation is done")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="with --wait: give up after this many seconds (default 300)")
    p.set_defaults(func=cmd_ca)
