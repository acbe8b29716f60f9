"""Command line: `fastlb serve | check | reload | stop | version`."""

import argparse
import os
import signal
import sys

from fastlb import __version__
from fastlb.obs import errorlog

# Flags of `serve`, each the same setting as the FASTLB_* variable it names (flag > env > file > default).
_SERVE_FLAGS = [
    ("--workers", "FASTLB_WORKERS", "worker processes (0 = one per usable core)"),
    ("--listen", "FASTLB_LISTEN", "address of the first plain HTTP listener"),
    ("--tls-listen", "FASTLB_TLS_LISTEN", "address of the first TLS listener"),
    ("--tls-cert", "FASTLB_TLS_CERT", "certificate (PEM) of the first TLS certificate"),
    ("--tls-key", "FASTLB_TLS_KEY", "private key (PEM) of the first TLS certificate"),
    ("--backends", "FASTLB_BACKENDS", "comma-separated servers of a catch-all backend"),
    ("--balance", "FASTLB_BALANCE", "balancing algorithm of that backend"),
    ("--admin-listen", "FASTLB_ADMIN_LISTEN", "admin listener address ('' disables)"),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastlb", description="TLS-terminating HTTP/1.1 load balancer")
    p.add_argument("--version", action="version", version=f"fastlb {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the load balancer")
    serve.add_argument("--config", "-c", help="TOML config file (or FASTLB_CONFIG)")
    serve.add_argument("--demo", action="store_true", help="serve three built-in demo backends")
    serve.add_argument("--ingress", action="append", default=[], metavar="FILE",
                       help="Kubernetes Ingress manifest to route from (repeatable; needs fastlb[k8s])")
    for flag, env, helptext in _SERVE_FLAGS:
        serve.add_argument(flag, dest=env, help=f"{helptext} [{env}]")
    check = sub.add_parser("check", help="validate a config file without serving")
    check.add_argument("config")
    check.add_argument("--ingress", action="append", default=[], metavar="FILE")
    for name in ("reload", "stop"):
        cmd = sub.add_parser(name, help=f"{name} the running master (found through its pid file)")
        cmd.add_argument("--config", "-c", help="config file naming [server] pid_file")
        cmd.add_argument("--pid-file", help="pid file of the master")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"fastlb {__version__}")
        return 0
    from fastlb import config

    if args.command == "check":
        try:
            cfg = load_config(args.config, {}, args.ingress)
            if any(spec.tls for spec in cfg.listeners):
                from fastlb.net.tls import build_server_context

                build_server_context(cfg.tls, cfg.source or "environment")
        except config.ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{cfg.source}: ok")
        return 0
    if args.command in ("reload", "stop"):
        return _signal_master(args, signal.SIGHUP if args.command == "reload" else signal.SIGTERM)
    return _serve(args, config)


def load_config(path, cli, ingress_files):
    """The config from file, environment and flags, plus the routes of any Ingress manifests."""
    from fastlb import config

    return config.load(path, os.environ, cli, ingress_files)


def _serve(args, config) -> int:
    log = errorlog.setup()
    cli = {env: getattr(args, env) for _, env, _ in _SERVE_FLAGS if getattr(args, env) is not None}
    fingerprint = None
    if args.demo:
        from fastlb import demo

        settings, fingerprint = demo.cli_settings()
        cli = {**settings, **cli}
        log.info("demo mode: built-in backends on %s", ", ".join(str(a) for _, a in demo.DEMO_SERVERS))

    def load():
        return load_config(args.config, cli, args.ingress)

    try:
        cfg = load()
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    errorlog.configure(cfg.log)
    from fastlb.process.master import Master

    try:
        return Master(cfg, load, demo=fingerprint, log=log).run()
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fastlb: cannot start: {exc}", file=sys.stderr)
        return 1


def _signal_master(args, signum: int) -> int:
    from fastlb import config
    from fastlb.process.master import default_pid_file

    path = args.pid_file
    if path is None:
        try:
            cfg = config.load(args.config, os.environ, {})
        except config.ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        path = cfg.server.pid_file or default_pid_file()
    try:
        with open(path) as f:
            pid = int(f.read().strip())
        os.kill(pid, signum)
    except (OSError, ValueError) as exc:
        print(f"fastlb: cannot signal the master from {path}: {exc}", file=sys.stderr)
        return 1
    return 0
