"""Command line: argument parsing only; the work is done by the modules it calls.

  meshproxy run --config F [--workers 1] [--access-log PATH|off] [--log-level L]
  meshproxy validate --config F
  meshproxy demo [--port P] [--check]
  meshproxy control --token-file F [--store URL] [--api-address HOST:PORT]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

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


def _cmd_run(args: argparse.Namespace) -> int:
    import trio

    from meshproxy.process.supervisor import Options, Supervisor

    try:
        config = load_file(args.config)
        sup = Supervisor(args.config, config, Options(
            workers=args.workers, cpu_affinity=args.cpu_affinity,
            max_connections=args.max_connections, drain_timeout=args.drain_timeout,
            admin_address=args.admin_address, log_level=args.log_level,
            access_log=args.access_log, stats=not args.no_stats))
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
    from meshproxy.demo import run_demo

    return run_demo(args.port, args.origin_port, check=args.check)


def _cmd_control(args: argparse.Namespace) -> int:
    import trio

    from meshproxy.control.main import run_control
    from meshproxy.control.store import store_path

    try:
        token = open(args.token_file, encoding="utf-8").read().strip()  # noqa: SIM115
    except OSError as exc:
        print(f"meshproxy control: --token-file {args.token_file}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_CONFIG
    if not token:
        print(f"meshproxy control: --token-file {args.token_file} is empty", file=sys.stderr)
        return EXIT_CONFIG
    host, _, port = args.api_address.rpartition(":")
    try:
        if not args.store.startswith("etcd://"):
            store_path(args.store)
        trio.run(run_control, args.store, host or "127.0.0.1", int(port), token)
    except ValueError as exc:
        print(f"meshproxy control: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"meshproxy control: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshproxy", description="meshproxy data plane")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="serve a config")
    run.add_argument("--config", "-c", required=True, help="YAML or JSON config file")
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
    run.add_argument("--log-level", default=os.environ.get("MESHPROXY_LOG_LEVEL", "info"),
                     choices=["debug", "info", "warning", "error"], help="default: info")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser("validate", help="check a config, print every error, exit 2 if any")
    validate.add_argument("--config", "-c", required=True)
    validate.set_defaults(func=_cmd_validate, log_level="warning")

    demo = sub.add_parser("demo", help="run a bundled origin behind the proxy and call it")
    demo.add_argument("--port", type=int, default=10000, help="proxy port (default 10000)")
    demo.add_argument("--origin-port", type=int, default=8080, help="origin port (default 8080)")
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
    control.add_argument("--log-level", default=os.environ.get("MESHPROXY_LOG_LEVEL", "info"),
                         choices=["debug", "info", "warning", "error"], help="default: info")
    control.set_defaults(func=_cmd_control)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
