"""Command line: argument parsing only; the work is done by the modules it calls.

  meshproxy run --config F [--workers 1] [--access-log PATH|off] [--log-level L]
  meshproxy run --control-plane URL --token-file F [--service S --workload-port N] ...
  meshproxy validate --config F
  meshproxy demo [--port P] [--check]
  meshproxy control --token-file F [--store URL] [--api-address HOST:PORT]
  meshproxy iptables [--proxy-uid 1337] [--dry-run | --cleanup] ...

Size: past 400 lines because every subcommand's flags, with their help text, are here and
only here (the README's flag tables are read from them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from meshproxy.config import schema
from meshproxy.config.load import ConfigError, load_file

EXIT_CONFIG = 2


def _print_config_errors(exc: ConfigError) -> None:
    print(f"meshproxy: invalid config {exc.source}:", file=sys.stderr)
    for line in exc.errors:
        print(f"  {line}", file=sys.stderr)


def _cmd_validate(args: argparse.Namespace) -> int:
    from meshproxy.process import cert_watch

    try:
        config = load_file(args.config)
        # The certificates too: a key that does not match its certificate is invalid.
        _material, errors = cert_watch.load(config)
        if errors:
            raise ConfigError(errors, args.config)
    except ConfigError as exc:
        _print_config_errors(exc)
        return EXIT_CONFIG
    print(f"{args.config}: valid")
    return 0


def _sidecar(args: argparse.Namespace, workers: int) -> tuple[schema.Config, Any, bool]:
    """The initial config and the discovery client of `run --control-plane`: the persisted
    last good config (served stale until the control plane confirms it) or an empty
    outbound listener; and whether the listeners wait for the first config (`--sidecar`
    with nothing persisted)."""
    from pathlib import Path

    from meshproxy.control.messages import Hello
    from meshproxy.control.translate import OUTBOUND
    from meshproxy.process.discovery_client import (
        DiscoveryClient,
        load_persisted,
        needs_identity,
    )
    from meshproxy.sidecar.iptables import INBOUND_PORT

    token = _read_token(args.token_file, "--token-file") if args.token_file else ""
    if not token:
        raise ValueError("--control-plane needs --token-file (a join token or the proxy "
                         "token)")
    # A join token names its namespace and service account (unverified here: the control
    # plane checks it; these are only defaults for what the proxy says it is).
    claims = _token_claims(token)
    namespace = args.namespace or claims.get("ns") or "default"
    service_account = args.service_account or claims.get("sa") or "default"
    ca_bundle = None
    if args.ca_bundle:
        try:
            with open(args.ca_bundle, "rb") as f:
                ca_bundle = f.read()
        except OSError as exc:
            raise ValueError(f"--ca-bundle {args.ca_bundle}: {exc.strerror}") from None
    labels = {}
    for item in args.label:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--label {item!r}: expected KEY=VALUE")
        labels[k] = v
    if args.service is not None and args.workload_port is None:
        raise ValueError("--service needs --workload-port (the port the workload serves on)")
    if args.sidecar:
        # Sidecar mode: both listeners take intercepted connections (meshproxy iptables),
        # dual-stack, on Istio's ports; every service up front, since an intercepted
        # connection names no service a request could ask for.
        if args.outbound_address is None:
            args.outbound_address = "::"
        if args.service is not None:
            if args.workload_address is None:
                raise ValueError("--sidecar --service needs --workload-address (the "
                                 "workload's own address, which its callers connect to)")
            if args.inbound_port is None:
                args.inbound_port = INBOUND_PORT
        if args.calls is None:
            args.calls = "*"
    if args.outbound_address is None:
        args.outbound_address = "127.0.0.1"
    if args.workload_address is None:
        args.workload_address = "127.0.0.1"
    if args.inbound_port is not None and args.service is None:
        raise ValueError("--inbound-port needs --service and --workload-port")
    node = args.node or f"{args.service or 'proxy'}-{os.getpid()}"
    path = Path(args.state_dir) / f"{node}.last-good"
    persisted = load_persisted(path)
    trust = b""
    if persisted is not None and needs_identity(persisted[1]):
        # Its TLS needs the identity, whose key was never persisted: wait for the control
        # plane rather than serve half of it.
        logging.getLogger("meshproxy").warning(
            "the persisted config %s needs the mesh identity, which is not persisted; "
            "waiting for the control plane", path)
        trust = persisted[2]
        persisted = None
    if persisted is not None:
        version, config, trust = persisted
        logging.getLogger("meshproxy").info(
            "serving the persisted config version %s from %s (stale until the control "
            "plane confirms it)", version, path)
    else:
        version = ""
        config = schema.Config(listeners=[schema.Listener(
            name=OUTBOUND, address=args.outbound_address, port=args.outbound_port,
            virtual_hosts=[])])
    base, _, cap = args.control_plane_backoff.partition(":")
    hello = Hello(node=node, namespace=namespace, service=args.service,
                  address=args.workload_address, port=args.workload_port, labels=labels,
                  service_account=service_account, lease_ttl=args.lease_ttl,
                  inbound_port=args.inbound_port,
                  outbound_address=args.outbound_address, outbound_port=args.outbound_port,
                  prefetch=None if args.calls == "*" else [
                      c for c in (args.calls or "").split(",") if c],
                  on_demand=args.calls != "*", version=version, workers=workers,
                  intercept=args.sidecar, outbound_traffic_policy=args.outbound_traffic_policy,
                  ready=not (args.sidecar and persisted is None))
    client = DiscoveryClient(args.control_plane, token, hello, path,
                             (float(base), float(cap or base)), ca_bundle, trust,
                             args.renewal_jitter)
    return config, client, not hello.ready


def _token_claims(token: str) -> dict[str, Any]:
    import base64
    import json

    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:
        return {}
    return claims if isinstance(claims, dict) else {}


def _cmd_run(args: argparse.Namespace) -> int:
    import trio

    from meshproxy.process.supervisor import Options, Supervisor
    from meshproxy.stats.shared_memory import Capacity

    opts = Options(
        workers=args.workers, cpu_affinity=args.cpu_affinity,
        max_connections=args.max_connections, drain_timeout=args.drain_timeout,
        admin_address=args.admin_address, log_level=args.log_level,
        access_log=args.access_log, stats=not args.no_stats, fast_path=args.fast_path,
        capacity=Capacity(args.max_listeners, args.max_clusters, args.max_endpoints))
    try:
        if args.control_plane:
            try:
                config, client, hold = _sidecar(args, args.workers)
            except ValueError as exc:
                print(f"meshproxy run: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            opts.hold_until_config = hold
            sup = Supervisor(None, config, opts, client)
        elif args.config:
            sup = Supervisor(args.config, load_file(args.config), opts)
        else:
            print("meshproxy run: give --config FILE or --control-plane URL", file=sys.stderr)
            return EXIT_CONFIG
    except ConfigError as exc:
        _print_config_errors(exc)
        return EXIT_CONFIG
    from meshproxy.process.errors import leaves

    try:
        trio.run(sup.run)
    except BaseException as exc:
        errors = leaves(exc, OSError)
        if errors is None:
            raise
        for err in errors:
            print(f"meshproxy: {err}", file=sys.stderr)
        return 1
    return 0


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.mesh:
        from meshproxy.demo_mesh import run_mesh_demo

        return run_mesh_demo(args.api_port, args.port, check=args.check)
    from meshproxy.demo import run_demo

    return run_demo(args.port, args.origin_port, check=args.check)


def _read_token(path: str, what: str) -> str:
    try:
        token = open(path, encoding="utf-8").read().strip()  # noqa: SIM115
    except OSError as exc:
        raise ValueError(f"{what} {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"{what} {path} is empty")
    return token


def _address(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not HOST:PORT") from None


def _cmd_control(args: argparse.Namespace) -> int:
    from pathlib import Path

    import trio

    from meshproxy.config.durations import parse_duration
    from meshproxy.control.ca import MAX_LEAF_TTL, CAError
    from meshproxy.control.main import ControlOptions, run_control
    from meshproxy.control.store import store_path

    try:
        token = _read_token(args.token_file, "--token-file")
        proxy_token = (_read_token(args.proxy_token_file, "--proxy-token-file")
                       if args.proxy_token_file else None)
        if args.ca_dir == "off":
            ca_dir = None
        elif args.ca_dir:
            ca_dir = Path(args.ca_dir)
        elif args.store.startswith("etcd://"):
            ca_dir = Path("meshproxy-ca")
        else:  # beside the embedded store
            ca_dir = store_path(args.store).parent / "meshproxy-ca"
        leaf_ttl = parse_duration(args.workload_cert_ttl)
        if not 0 < leaf_ttl <= MAX_LEAF_TTL:
            raise ValueError(f"--workload-cert-ttl: must be in (0, {MAX_LEAF_TTL:.0f} s]")
        opts = ControlOptions(
            args.store, _address(args.api_address, "--api-address"), token, proxy_token,
            None if args.admin_address == "off" else _address(args.admin_address,
                                                              "--admin-address"),
            args.self_preservation_threshold, ca_dir, args.trust_domain, leaf_ttl,
            None if args.discovery_address == "off" or ca_dir is None
            else _address(args.discovery_address, "--discovery-address"),
            ["localhost", *(n for n in args.serving_name if n)])
        if not args.store.startswith("etcd://"):
            store_path(args.store)
    except ValueError as exc:
        print(f"meshproxy control: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        trio.run(run_control, opts)
    except (ValueError, CAError) as exc:
        print(f"meshproxy control: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"meshproxy control: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_iptables(args: argparse.Namespace) -> int:
    from meshproxy.sidecar import netfilter
    from meshproxy.sidecar.iptables import Options, RulesError, parse_cidrs, parse_ports

    try:
        opts = Options(
            proxy_uid=args.proxy_uid, proxy_gid=args.proxy_gid
            if args.proxy_gid is not None else args.proxy_uid,
            outbound_port=args.outbound_port, inbound_port=args.inbound_port,
            inbound_ports=None if args.inbound_ports.strip() == "*"
            else parse_ports(args.inbound_ports, "--inbound-ports"),
            exclude_inbound_ports=parse_ports(args.exclude_inbound_ports,
                                              "--exclude-inbound-ports"),
            exclude_outbound_ports=parse_ports(args.exclude_outbound_ports,
                                               "--exclude-outbound-ports"),
            include_outbound_cidrs=None if args.include_outbound_cidrs.strip() == "*"
            else parse_cidrs(args.include_outbound_cidrs, "--include-outbound-cidrs"),
            exclude_outbound_cidrs=parse_cidrs(args.exclude_outbound_cidrs,
                                               "--exclude-outbound-cidrs"),
            ipv6=args.ipv6 == "on")
    except RulesError as exc:
        print(f"meshproxy iptables: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.dry_run:
            netfilter.dry_run(opts, print)
        elif args.cleanup:
            netfilter.remove(opts, print)
        else:
            netfilter.install(opts, print)
    except netfilter.NetfilterError as exc:
        print(f"meshproxy iptables: {exc}", file=sys.stderr)
        return 1
    return 0


def _iptables_parser(sub: Any) -> None:
    from meshproxy.sidecar import iptables as rules

    ipt = sub.add_parser(
        "iptables", help="redirect the workload's TCP to its sidecar (run as root in the "
                         "workload's network namespace, before the app starts)")
    ipt.add_argument("--proxy-uid", type=int, default=rules.PROXY_UID, metavar="UID",
                     help="the UID the sidecar runs as: its own connections are not "
                          f"redirected (default {rules.PROXY_UID}, Istio's)")
    ipt.add_argument("--proxy-gid", type=int, default=None, metavar="GID",
                     help="likewise, by group (default: the UID)")
    ipt.add_argument("--outbound-port", type=int, default=rules.OUTBOUND_PORT,
                     help=f"the sidecar's outbound listener (default {rules.OUTBOUND_PORT})")
    ipt.add_argument("--inbound-port", type=int, default=rules.INBOUND_PORT,
                     help=f"the sidecar's inbound listener (default {rules.INBOUND_PORT})")
    ipt.add_argument("--inbound-ports", default="*", metavar="PORTS|*",
                     help="the workload ports whose connections go to the sidecar: '*' "
                          "(every one but the excluded ones, the default), a comma list, or "
                          "'' for none")
    ipt.add_argument("--exclude-inbound-ports",
                     default=",".join(map(str, rules.EXCLUDED_INBOUND_PORTS)),
                     metavar="PORTS",
                     help="with --inbound-ports '*': ports left alone (default "
                          f"{','.join(map(str, rules.EXCLUDED_INBOUND_PORTS))}: the "
                          "sidecar's admin and readiness ports)")
    ipt.add_argument("--exclude-outbound-ports", default="", metavar="PORTS",
                     help="destination ports the app reaches directly, not through the "
                          "sidecar")
    ipt.add_argument("--include-outbound-cidrs", default="*", metavar="CIDRS|*",
                     help="destinations that go to the sidecar (default '*': all)")
    ipt.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDRS",
                     help="destinations the app reaches directly (IPv4 and IPv6)")
    ipt.add_argument("--ipv6", choices=["on", "off"], default="on",
                     help="the same rules for IPv6 with ip6tables (default on)")
    what = ipt.add_mutually_exclusive_group()
    what.add_argument("--dry-run", action="store_true",
                      help="print the rules, change nothing (needs no root)")
    what.add_argument("--cleanup", action="store_true",
                      help="remove exactly the rules and chains this command adds")
    ipt.set_defaults(func=_cmd_iptables, log_level="warning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshproxy", description="meshproxy data plane")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve a config")
    run.add_argument("--config", "-c", help="YAML or JSON config file")
    run.add_argument("--workers", type=_positive, default=os.cpu_count() or 1,
                     help="worker processes, each with its own event loop and SO_REUSEPORT "
                          "sockets (default: the number of CPUs)")
    run.add_argument("--cpu-affinity", action="store_true",
                     help="pin worker i to CPU i modulo the number of CPUs")
    run.add_argument("--max-connections", type=int, default=0, metavar="N",
                     help="per worker; beyond it new connections wait in the kernel backlog "
                          "(default 0: no limit)")
    run.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                     help="on SIGTERM/SIGINT, how long requests in flight may take to finish "
                          "(default 30)")
    run.add_argument("--admin-address", default=None, metavar="HOST:PORT",
                     help="admin API address (default: the config's admin section; "
                          "'off' disables it)")
    run.add_argument("--access-log", default=None, metavar="PATH",
                     help="override every listener's access log: stdout, stderr, a file, or off")
    run.add_argument("--no-stats", action="store_true",
                     help="workers record no stats (/stats then shows only server.*); for "
                          "measuring what stats cost")
    run.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                     default=os.environ.get("MESHPROXY_FAST_PATH", "on") != "off",
                     help="serve every request from a task, none from the reactor's compiled "
                          "fast path (the same behaviour, slower; default from "
                          "MESHPROXY_FAST_PATH=on|off, on)")
    run.add_argument("--log-level", default=os.environ.get("MESHPROXY_LOG_LEVEL", "info"),
                     choices=["debug", "info", "warning", "error"], help="default: info")
    run.add_argument("--max-listeners", type=_positive, default=64, metavar="N",
                     help="stats slots for listeners (default 64)")
    run.add_argument("--max-clusters", type=_positive, default=1024, metavar="N",
                     help="stats slots for clusters (default 1024)")
    run.add_argument("--max-endpoints", type=_positive, default=8192, metavar="N",
                     help="stats slots for endpoints; a departed endpoint's slot is reused "
                          "60 s after it left (default 8192)")
    cp = run.add_argument_group(
        "control plane", "take the config from `meshproxy control` instead of a file")
    cp.add_argument("--control-plane", metavar="URL",
                    help="the control plane: https://HOST:PORT (its TLS discovery port, "
                         "with a join token: the proxy gets a mesh identity) or "
                         "http://HOST:PORT (its API port, with the proxy token)")
    cp.add_argument("--token-file", help="file holding the join token (meshctl token "
                                         "create) or the proxy token")
    cp.add_argument("--ca-bundle", metavar="FILE",
                    help="PEM roots the control plane's certificate is verified against "
                         "(https://; meshctl ca bundle prints them)")
    cp.add_argument("--renewal-jitter", type=float, default=0.01, metavar="RATIO",
                    help="renew the certificate at 50%% of its lifetime, moved by up to "
                         "this share of it at random (default 0.01, istio-agent's)")
    cp.add_argument("--node", help="this proxy's id (default: SERVICE-PID)")
    cp.add_argument("--namespace", default=None,
                    help="default: the join token's, else default")
    cp.add_argument("--service", help="register the workload as an instance of this service")
    cp.add_argument("--workload-port", type=int, metavar="N",
                    help="the port the workload serves on (registered)")
    cp.add_argument("--workload-address", default=None,
                    help="the workload's address (registered; default 127.0.0.1, with "
                         "--sidecar required: the address its callers connect to)")
    cp.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="a label of the workload, e.g. version=v2 or zone=a (repeatable)")
    cp.add_argument("--service-account", default=None,
                    help="default: the join token's, else default")
    cp.add_argument("--inbound-port", type=int, metavar="N",
                    help="an inbound listener on the workload address for its callers, "
                         "with the authorization policies and rate limits that select it; "
                         "registered instead of --workload-port (with --sidecar: where "
                         "the rules redirect callers, default 15006, and the workload port "
                         "is registered)")
    cp.add_argument("--sidecar", action="store_true",
                    help="transparent sidecar mode, behind `meshproxy iptables`: the "
                         "outbound listener takes the app's intercepted connections and "
                         "the inbound one its callers', by their original destination; "
                         "no listener accepts before the first config is applied, and the "
                         "workload is registered \"starting\" until then")
    cp.add_argument("--outbound-traffic-policy", choices=["ALLOW_ANY", "REGISTRY_ONLY"],
                    default="ALLOW_ANY",
                    help="with --sidecar, a connection to no mesh service: passed through "
                         "(ALLOW_ANY, the default) or refused (REGISTRY_ONLY)")
    cp.add_argument("--lease-ttl", type=float, default=10.0, metavar="SECONDS",
                    help="the registration's lease; heartbeats every TTL/3 (default 10)")
    cp.add_argument("--outbound-address", default=None,
                    help="where the outbound listener listens (default 127.0.0.1; with "
                         "--sidecar '::', dual-stack)")
    cp.add_argument("--outbound-port", type=int, default=15001,
                    help="the outbound listener's port (default 15001)")
    cp.add_argument("--calls", metavar="SVC[,SVC...]",
                    help="services to receive before any request names them (name or "
                         "name.namespace); the others are asked for when a request names "
                         "them (on demand, the default); '*': every service, up front")
    cp.add_argument("--state-dir", default="meshproxy-state",
                    help="where the last good config is kept, mode 0600 (default "
                         "./meshproxy-state)")
    cp.add_argument("--control-plane-backoff", default="1:30", metavar="BASE:CAP",
                    help="reconnect back-off in seconds, jittered exponential "
                         "(default 1:30)")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a config, print every error, exit 2 if any")
    validate.add_argument("--config", "-c", required=True)
    validate.set_defaults(func=_cmd_validate, log_level="warning")

    demo = sub.add_parser("demo", help="run a bundled origin behind the proxy and call it")
    demo.add_argument("--port", type=int, default=10000, help="proxy port (default 10000)")
    demo.add_argument("--origin-port", type=int, default=8080, help="origin port (default 8080)")
    demo.add_argument("--mesh", action="store_true",
                      help="a whole mesh instead: control plane, two versions of a service "
                           "with their sidecars, a client sidecar (--port is its outbound "
                           "listener)")
    demo.add_argument("--api-port", type=int, default=15080,
                      help="with --mesh: the control plane's API port (default 15080)")
    demo.add_argument("--check", action="store_true",
                      help="exit after the first proxied response (0 when it was a 200)")
    demo.set_defaults(func=_cmd_demo, log_level="info")

    control = sub.add_parser("control", help="run the control plane (store and operator API)")
    control.add_argument("--store", default="sqlite://meshproxy-cp.db",
                         help="sqlite:///PATH (embedded, the default: meshproxy-cp.db here) "
                              "or etcd://HOST:PORT")
    control.add_argument("--api-address", default="127.0.0.1:15080", metavar="HOST:PORT",
                         help="operator API address (default 127.0.0.1:15080)")
    control.add_argument("--token-file", required=True,
                         help="file holding the bearer token operators must present")
    control.add_argument("--proxy-token-file", default=None,
                         help="file holding the token proxies present on their discovery "
                              "stream (default: the operators' token)")
    control.add_argument("--admin-address", default="127.0.0.1:15014", metavar="HOST:PORT",
                         help="admin port with /metrics and /ready (default "
                              "127.0.0.1:15014; 'off' disables it)")
    control.add_argument("--self-preservation-threshold", type=float, default=0.15,
                         metavar="SHARE",
                         help="evict no lapsed registration while more than this share of "
                              "them (and at least two) lapsed at once (default 0.15; 0 "
                              "disables self-preservation)")
    control.add_argument("--ca-dir", default=None, metavar="DIR|off",
                         help="the CA's directory (istiod's plugged-in layout: ca-cert.pem, "
                              "ca-key.pem, cert-chain.pem, root-cert.pem); a self-signed "
                              "root is made there when it has none (default: meshproxy-ca "
                              "beside the SQLite store, or here with etcd; off: no CA)")
    control.add_argument("--trust-domain", default="cluster.local",
                         help="the SPIFFE trust domain of issued identities (default "
                              "cluster.local)")
    control.add_argument("--workload-cert-ttl", default="24h", metavar="DURATION",
                         help="lifetime of workload certificates (default 24h, istiod's)")
    control.add_argument("--discovery-address", default="127.0.0.1:15012",
                         metavar="HOST:PORT",
                         help="the TLS discovery port, where proxies join with a join token "
                              "and get identities (default 127.0.0.1:15012; off: none)")
    control.add_argument("--serving-name", action="append", default=[], metavar="NAME",
                         help="another DNS name or IP address for the control plane's "
                              "serving certificate (repeatable)")
    control.add_argument("--log-level", default=os.environ.get("MESHPROXY_LOG_LEVEL", "info"),
                         choices=["debug", "info", "warning", "error"], help="default: info")
    control.set_defaults(func=_cmd_control)
    _iptables_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
