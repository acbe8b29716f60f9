"""Command line: `fastlb serve | check | reload | stop | version`."""

import argparse
import fcntl
import json
import os
import signal
import sys
import time

from fastlb import __version__
from fastlb.obs import errorlog

# Flags of `serve`, each the same setting as the FASTLB_* variable it names (flag > env > file > default).
_SERVE_FLAGS = [
    ("--workers", "FASTLB_WORKERS", "worker processes (default 0 = one per usable core)"),
    ("--listen", "FASTLB_LISTEN", "address of the first plain HTTP listener (default 0.0.0.0:8080)"),
    ("--tls-listen", "FASTLB_TLS_LISTEN", "address of the first TLS listener (needs --tls-cert and --tls-key)"),
    ("--tls-cert", "FASTLB_TLS_CERT", "certificate chain (PEM) of the first TLS certificate"),
    ("--tls-key", "FASTLB_TLS_KEY", "private key (PEM) of the first TLS certificate"),
    ("--backends", "FASTLB_BACKENDS",
     "servers of a backend named 'default', with a catch-all route to it if no route is configured"),
    ("--balance", "FASTLB_BALANCE",
     "balancing algorithm of that backend: roundrobin (default), leastconn, p2c, hash or random"),
    ("--admin-listen", "FASTLB_ADMIN_LISTEN",
     "admin listener for /metrics, /status and /healthz (default 127.0.0.1:9900; '' disables)"),
]
# What each flag's value looks like; argparse would otherwise show the variable name as the metavar.
_METAVARS = {"FASTLB_WORKERS": "N", "FASTLB_TLS_CERT": "FILE", "FASTLB_TLS_KEY": "FILE",
             "FASTLB_BACKENDS": "HOST:PORT,...", "FASTLB_BALANCE": "ALGORITHM"}

_EPILOG = """\
examples:
  fastlb serve --demo                   try it: 127.0.0.1:8080 in front of three built-in backends
  fastlb serve --backends 127.0.0.1:9101,127.0.0.1:9102 --listen 0.0.0.0:8080
  fastlb serve --config /etc/fastlb.toml
  fastlb check /etc/fastlb.toml && fastlb reload --config /etc/fastlb.toml

Settings come from command-line flags, then FASTLB_* environment variables, then the TOML file, then
defaults. docs/configuration.md lists every key with its type, default and variable; `fastlb COMMAND
--help` shows each command's options.
"""

_SERVE_EPILOG = """\
examples:
  fastlb serve --demo
  FASTLB_BACKENDS=10.0.0.5:8080,10.0.0.6:8080 fastlb serve --listen 0.0.0.0:80
  fastlb serve --listen :80 --tls-listen :443 --tls-cert site.pem --tls-key site.key \\
               --backends 10.0.0.5:8080
  fastlb serve --config fastlb.toml --ingress ingress.yaml

signals to the master: HUP reloads, TERM stops gracefully, INT/QUIT stop at once, USR1 reopens the access
log, USR2 re-executes fastlb without refusing a connection.
"""

_CHECK_EPILOG = """\
exit status 0 and "FILE: ok", or 1 and one line on stderr: FILE: KEY: REASON.

examples:
  fastlb check fastlb.toml
  fastlb check fastlb.toml --ingress ingress.yaml
"""


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter  # keeps the examples' line breaks
    p = argparse.ArgumentParser(prog="fastlb", description="TLS-terminating HTTP/1.1 load balancer",
                                epilog=_EPILOG, formatter_class=raw)
    p.add_argument("--version", action="version", version=f"fastlb {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           help="one of these (fastlb COMMAND --help shows its options)")
    serve = sub.add_parser("serve", help="run the load balancer", epilog=_SERVE_EPILOG, formatter_class=raw,
                           description="Run the load balancer in the foreground until stopped.")
    serve.add_argument("--config", "-c", metavar="FILE", help="TOML config file [env FASTLB_CONFIG]")
    serve.add_argument("--demo", action="store_true",
                       help="serve 127.0.0.1:8080 and (TLS, self-signed) :8443 in front of three built-in "
                       "backends on 127.0.0.1:18101-18103; --listen, --tls-listen and --backends move them")
    serve.add_argument("--ingress", action="append", default=[], metavar="FILE",
                       help="Kubernetes Ingress manifest to route from (repeatable; needs PyYAML)")
    for flag, env, helptext in _SERVE_FLAGS:
        serve.add_argument(flag, dest=env, metavar=_METAVARS.get(env, "HOST:PORT"), help=f"{helptext} [env {env}]")
    serve.add_argument("--allow-shared-ports", action="store_true",
                       help="start even where another process listens on a listener's port, sharing its "
                       "connections through SO_REUSEPORT (refused by default)")
    check = sub.add_parser("check", help="validate a config file without serving", epilog=_CHECK_EPILOG,
                           formatter_class=raw,
                           description="Validate a config file (and Ingress manifests), as serve would load it.")
    check.add_argument("config", metavar="FILE", help="TOML config file to validate")
    check.add_argument("--ingress", action="append", default=[], metavar="FILE",
                       help="Kubernetes Ingress manifest to validate with it (repeatable)")
    for name in ("reload", "stop"):
        cmd = sub.add_parser(name, help=f"{name} the running master (found through its pid file)",
                             description=f"{name.capitalize()} the running master, found through its pid file: "
                             "--pid-file, else [server] pid_file of the config, else the default.")
        cmd.add_argument("--config", "-c", metavar="FILE", help="config file naming [server] pid_file")
        cmd.add_argument("--pid-file", metavar="FILE", help="pid file of the master")
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
                from fastlb.acme import tls_to_check
                from fastlb.net.tls import build_server_context

                with tls_to_check(cfg) as tls:  # acme = true: checked with a stand-in certificate
                    build_server_context(tls, cfg.source or "environment")
            from fastlb.net.upstream_tls import build_contexts

            build_contexts(cfg)  # [backends.NAME.tls]: CA bundles and client certificates
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
    from fastlb.lb import ingress

    def merge(cfg):
        return ingress.apply(cfg, list(ingress_files)) if ingress_files else cfg

    # config.load calls merge before the checks that need its routes and certificates; config itself
    # does not import the Ingress reader (which imports config).
    return config.load(path, os.environ, cli, merge)


def _serve(args, config) -> int:
    log = errorlog.setup()
    cli = {env: getattr(args, env) for _, env, _ in _SERVE_FLAGS if getattr(args, env) is not None}
    fingerprint = None
    if args.demo:
        from fastlb import demo

        settings, fingerprint = demo.cli_settings(cli)
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
        return Master(cfg, load, demo=fingerprint, log=log, allow_shared_ports=args.allow_shared_ports,
                      ingress_files=args.ingress).run()
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fastlb: cannot start: {exc}", file=sys.stderr)
        return 1


def _signal_master(args, signum: int) -> int:
    """Signal the master named by the pid file; for a reload, wait for its outcome: exit 0 once the
    new generation serves, 1 with the master's reason when the old one had to stay."""
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
        pid = _running_master(path)
        sent = time.monotonic()
        os.kill(pid, signum)
    except (OSError, ValueError) as exc:
        print(f"fastlb: cannot signal the master from {path}: {exc}", file=sys.stderr)
        return 1
    if signum != signal.SIGHUP:
        return 0
    return _wait_for_reload(path, pid, sent)


def _running_master(path: str) -> int:
    """The pid in path, if a master holds the file's lock: a pid file nobody locks is stale, and its
    pid may since have been given to another process."""
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return int(f.read().strip())
        stale = f.read().strip()
    raise ValueError(f"no running master holds its lock (the file is stale: pid {stale} is not signalled)")


def _wait_for_reload(path: str, pid: int, sent: float) -> int:
    from fastlb.process.master import BOOT_TIMEOUT, reload_status_file

    status_file = reload_status_file(path)
    # The master may first finish a reload started before ours, then run ours: up to two boots.
    deadline = sent + 2 * BOOT_TIMEOUT + 10
    while time.monotonic() < deadline:
        try:
            with open(status_file) as f:
                status = json.load(f)
        except (OSError, ValueError):
            status = {}
        # Written by this master, for a reload that began after our signal (CLOCK_MONOTONIC is
        # system-wide, so the master's clock and ours compare).
        if status.get("pid") == pid and status.get("started", 0) >= sent:
            if status.get("result") == "success":
                print(f"reloaded: {status.get('reason', '')}")
                return 0
            print(f"fastlb: reload failed, the master keeps the running config: {status.get('reason')}",
                  file=sys.stderr)
            return 1
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"fastlb: the master {pid} exited during the reload", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"fastlb: no answer from the master {pid} in {status_file}", file=sys.stderr)
    return 1
