"""meshctl: apply, get, delete and describe mesh/v1 resources; proxy-status; registry list.

    meshctl [--server URL] [--token-file F] apply -f FILE|DIR
    meshctl get KIND [NAME] [-n NS | -A] [-o table|yaml|json]
    meshctl delete KIND NAME [-n NS]      |  meshctl delete -f FILE|DIR
    meshctl describe KIND NAME [-n NS]
    meshctl proxy-status [-o table|json]
    meshctl registry list [-o table|json]

The server and token come from the flags, else MESHCTL_SERVER (default
http://127.0.0.1:15080) and MESHCTL_TOKEN_FILE / MESHCTL_TOKEN. Exit status: 0 done, 1 the
API refused (its errors printed with their field paths), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from meshproxy.config.load import ConfigError
from meshproxy.control.api import PLURALS
from meshproxy.control.resources import decode, load_documents
from meshproxy.ctl.client import APIError, Client
from meshproxy.ctl.identity import add_parsers, identity_lines

ALIASES = {"svc": "services", "dp": "destinationpolicies", "ap": "authorizationpolicies",
           "rl": "ratelimits", "wl": "workloads", "pa": "peerauthentications"}
for _p, _k in PLURALS.items():
    ALIASES[_p] = _p
    ALIASES[_k.lower()] = _p


def _plural(kind: str) -> str:
    p = ALIASES.get(kind.lower())
    if p is None:
        raise ValueError(f"no such kind {kind!r} (known: {', '.join(sorted(PLURALS))})")
    return p


def _files(target: str) -> list[Path]:
    p = Path(target)
    if p.is_dir():
        return sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
    return [p]


def _documents(target: str) -> list[tuple[str, dict[str, Any]]]:
    """(source, document) of every resource in FILE or DIR, each checked here first so
    that nothing is sent when one of them is invalid."""
    out = []
    errors = []
    for f in _files(target):
        try:
            text = f.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"{f}: {exc.strerror}") from None
        try:
            docs = load_documents(text, str(f))
        except ConfigError as exc:
            errors += [f"{f}: {e}" for e in exc.errors]
            continue
        for i, doc in enumerate(docs):
            where = f"{f}[{i}]"
            try:
                decode(doc, where)
            except ConfigError as exc:
                errors += [f"{where}: {e}" for e in exc.errors]
                continue
            out.append((where, doc))
    if errors:
        raise ConfigError(errors, target)
    return out


def _path(plural: str, ns: str | None, name: str | None = None) -> str:
    base = "/apis/mesh/v1/"
    if ns is None:
        return f"{base}{plural}"
    return f"{base}namespaces/{ns}/{plural}" + (f"/{name}" if name else "")


def _kind_plural(kind: str) -> str:
    return next(p for p, k in PLURALS.items() if k == kind)


# ---------------------------------------------------------------- commands

def cmd_apply(c: Client, args: argparse.Namespace) -> int:
    for _where, doc in _documents(args.filename):
        meta = doc.get("metadata", {})
        ns = meta.get("namespace", "default")
        plural = _kind_plural(doc["kind"])
        path = _path(plural, ns, meta["name"])
        try:
            c.request("GET", path)
            verb = "configured"
        except APIError as exc:
            if exc.status != 404:
                raise
            verb = "created"
        c.request("PUT", path, doc)
        print(f"{doc['kind'].lower()}/{meta['name']} ({ns}) {verb}")
    return 0


def _summary(item: dict[str, Any]) -> str:
    spec = item["spec"]
    kind = item["kind"]
    if kind == "Service":
        return ",".join(f"{p['port']}/{p.get('protocol', 'http')}" for p in spec["ports"])
    if kind == "Workload":
        labels = ",".join(f"{k}={v}" for k, v in sorted(spec.get("labels", {}).items()))
        return f"{spec['service']} {spec['address']}:{spec['port']} {labels}".rstrip()
    if kind == "Route":
        return ",".join(spec["hosts"])
    if kind == "DestinationPolicy":
        subsets = ",".join(s["name"] for s in spec.get("subsets", []))
        return f"{spec['service']} subsets={subsets or '-'}"
    return json.dumps(spec, sort_keys=True)[:60]


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _emit(data: Any, output: str) -> None:
    if output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump(data, sort_keys=False).rstrip())


def cmd_get(c: Client, args: argparse.Namespace) -> int:
    plural = _plural(args.kind)
    if args.name:
        item = c.request("GET", _path(plural, args.namespace or "default", args.name))
        items = [item]
    else:
        ns = None if args.all_namespaces else (args.namespace or "default")
        items = c.request("GET", _path(plural, ns))["items"]
    if args.output in ("yaml", "json"):
        _emit(items[0] if args.name else {"items": items}, args.output)
        return 0
    if not items:
        print(f"No {plural} found.", file=sys.stderr)
        return 0
    _table([[i["metadata"]["namespace"], i["metadata"]["name"],
             i["metadata"]["resourceVersion"], _summary(i)] for i in items],
           ["NAMESPACE", "NAME", "VERSION", "SPEC"])
    return 0


def cmd_delete(c: Client, args: argparse.Namespace) -> int:
    if args.filename:
        targets = [(_kind_plural(d["kind"]), d.get("metadata", {}).get("namespace", "default"),
                    d["metadata"]["name"]) for _, d in _documents(args.filename)]
    elif args.kind and args.name:
        targets = [(_plural(args.kind), args.namespace or "default", args.name)]
    else:
        raise ValueError("delete needs KIND NAME or -f FILE")
    for plural, ns, name in targets:
        c.request("DELETE", _path(plural, ns, name))
        print(f"{PLURALS[plural].lower()}/{name} ({ns}) deleted")
    return 0


def cmd_describe(c: Client, args: argparse.Namespace) -> int:
    plural = _plural(args.kind)
    ns = args.namespace or "default"
    if plural == "workloads":
        return _describe_workload(c, ns, args.name)
    item = c.request("GET", _path(plural, ns, args.name))
    _emit(item, "yaml")
    if item["kind"] == "Service":
        name = item["metadata"]["name"]
        workloads = [w for w in c.request("GET", _path("workloads", ns))["items"]
                     if w["spec"]["service"] == name]
        registered = [r for r in c.request("GET", "/v1/registry")["registrations"]
                      if r["namespace"] == ns and r["service"] == name]
        print("\nEndpoints:")
        rows = [["Workload", w["metadata"]["name"], f"{w['spec']['address']}:"
                 f"{w['spec']['port']}", "STATIC",
                 ",".join(f"{k}={v}" for k, v in sorted(w["spec"].get("labels", {}).items()))]
                for w in workloads]
        rows += [["Registration", r["node"], f"{r['address']}:{r['port']}", r["state"],
                  ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items()))]
                 for r in registered]
        if rows:
            _table(rows, ["FROM", "NAME", "ADDRESS", "STATE", "LABELS"])
        else:
            print("  (none)")
        for other, label in (("routes", "Route"), ("destinationpolicies", "Policy")):
            for r in c.request("GET", _path(other, ns))["items"]:
                spec = r["spec"]
                if other == "routes":
                    related = any(h.split(".")[0] == name for h in spec["hosts"])
                else:
                    related = spec.get("service") == name
                if related:
                    print(f"{label}: {r['metadata']['name']}")
    return 0


def _describe_workload(c: Client, ns: str, name: str) -> int:
    """A Workload resource, or a workload its sidecar registered (by node name), with the
    identity the sidecar serves."""
    try:
        _emit(c.request("GET", _path("workloads", ns, name)), "yaml")
        found = True
    except APIError as exc:
        if exc.status != 404:
            raise
        found = False
    regs = [r for r in c.request("GET", "/v1/registry")["registrations"]
            if r["namespace"] == ns and r["node"] == name]
    for r in regs:
        found = True
        labels = ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-"
        print(f"Registration: {r['namespace']}/{r['service']} {r['node']} "
              f"{r['address']}:{r['port']} {r['state']} labels {labels}")
    status = next((p for p in c.request("GET", "/v1/proxy-status")["proxies"]
                   if p["node"] == name and p["namespace"] == ns), None)
    if not found and status is None:
        raise APIError(404, {"error": f"workload {ns}/{name} not found (neither a Workload "
                                      "nor a registered sidecar)"})
    if status is not None:
        print(f"Sidecar: {status['node']} {status['status']} version {status['version']}")
    print("\n".join(identity_lines(status)))
    return 0


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0.0, time.time() - t)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m"


def cmd_proxy_status(c: Client, args: argparse.Namespace) -> int:
    proxies = c.request("GET", "/v1/proxy-status")["proxies"]
    if args.output == "json":
        _emit(proxies, "json")
        return 0
    rows = []
    for p in sorted(proxies, key=lambda p: p["node"]):
        conv = p.get("convergence")
        rows.append([p["node"], p.get("service") or "-", p["status"], p["version"] or "-",
                     p["replica"], f"{conv * 1000:.0f}ms" if conv is not None else "-",
                     _ago(p.get("last_seen"))])
    _table(rows, ["NAME", "SERVICE", "STATUS", "VERSION", "REPLICA", "CONVERGENCE",
                  "LAST SEEN"])
    for p in proxies:
        if p["status"] == "NACKED":
            print(f"\n{p['node']} rejected version {p['nack_version']}:")
            for e in p["nack_errors"]:
                print(f"  {e}")
    return 0


def cmd_registry(c: Client, args: argparse.Namespace) -> int:
    view = c.request("GET", "/v1/registry")
    if args.output == "json":
        _emit(view, "json")
        return 0
    if view["self_preservation"]:
        print(f"SELF-PRESERVATION: more than {view['threshold']:.0%} of the leases lapsed "
              f"within one TTL; no registration is evicted until they renew.\n")
    rows = [[r["namespace"], r["service"], r["node"], f"{r['address']}:{r['port']}",
             r["state"], f"{r['last_heartbeat']:.1f}s", f"{r['lease_ttl']:g}s",
             ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-"]
            for r in view["registrations"]]
    if rows:
        _table(rows, ["NAMESPACE", "SERVICE", "NODE", "ADDRESS", "STATE", "LAST HEARTBEAT",
                      "TTL", "LABELS"])
    else:
        print("No registrations.", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="meshctl", description="operate a meshproxy mesh")
    ap.add_argument("--server", default=os.environ.get("MESHCTL_SERVER",
                                                       "http://127.0.0.1:15080"))
    ap.add_argument("--token-file", default=os.environ.get("MESHCTL_TOKEN_FILE"))
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("apply", help="create or replace every resource of FILE or DIR")
    p.add_argument("-f", "--filename", required=True)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("get", help="list resources, or show one")
    p.add_argument("kind")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=["table", "yaml", "json"], default="table")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("delete", help="delete KIND NAME, or every resource of FILE")
    p.add_argument("kind", nargs="?")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace")
    p.add_argument("-f", "--filename")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("describe", help="a resource, and for a service its endpoints")
    p.add_argument("kind")
    p.add_argument("name")
    p.add_argument("-n", "--namespace")
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("proxy-status", help="every proxy: SYNCED, STALE, NACKED, ...")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_proxy_status)

    p = sub.add_parser("registry", help="the registry")
    p.add_argument("action", choices=["list"])
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_registry)
    add_parsers(sub)
    return ap


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"--token-file {args.token_file}: {exc.strerror}") from None
    token = os.environ.get("MESHCTL_TOKEN", "")
    if not token:
        raise ValueError("no token: give --token-file, MESHCTL_TOKEN_FILE or MESHCTL_TOKEN")
    return token


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = Client(args.server, _token(args))
        return int(args.func(client, args))
    except ConfigError as exc:
        print("meshctl: invalid resources:", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return 2
    except APIError as exc:
        print(f"meshctl: the control plane refused: {exc}", file=sys.stderr)
        for e in exc.errors:
            print(f"  {e}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"meshctl: cannot reach the control plane at {args.server}: {exc}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
