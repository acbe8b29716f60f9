"""`fastlb serve --demo`: three small backends in the control process, so the balancer works out of the box."""

import os
import sys

from fastlb.config import Address, parse_address

# The demo backends' names and addresses; cli_settings moves them where --backends says.
DEMO_SERVERS = [(f"demo-{i}", Address("127.0.0.1", 18100 + i)) for i in (1, 2, 3)]
LISTEN = "127.0.0.1:8080"
TLS_LISTEN = "127.0.0.1:8443"


def cli_settings(flags: dict[str, str]) -> tuple[dict[str, str], str]:
    """What --demo sets, below any flag the user gave explicitly (flags still win), and the
    self-signed certificate's SHA-256 fingerprint.  The certificate is kept in the user's cache
    directory so a browser exception made once survives restarts.

    Each address the demo uses is only a default: `--listen`, `--tls-listen` and `--backends` (or
    their FASTLB_* variables) move it, and with `--backends` the built-in backends serve on those
    addresses, so the demo can run where its usual ports are taken (and tests never need them)."""
    global DEMO_SERVERS
    from fastlb.net.certs import ensure_demo_certificate

    cert, key, fingerprint = ensure_demo_certificate()
    given = {**{k: v for k, v in os.environ.items() if k.startswith("FASTLB_")}, **flags}
    settings = {
        "FASTLB_LISTEN": given.get("FASTLB_LISTEN", LISTEN),
        "FASTLB_TLS_LISTEN": given.get("FASTLB_TLS_LISTEN", TLS_LISTEN),
        "FASTLB_TLS_CERT": cert,
        "FASTLB_TLS_KEY": key,
    }
    backends = given.get("FASTLB_BACKENDS")
    if backends:
        try:
            addresses = [parse_address(a.strip()) for a in backends.split(",")]
        except ValueError:
            addresses = []  # loading the config names the bad address
        if addresses:
            DEMO_SERVERS = [(f"demo-{i}", a) for i, a in enumerate(addresses, 1)]
    settings["FASTLB_BACKENDS"] = ",".join(str(addr) for _, addr in DEMO_SERVERS)
    return settings, fingerprint


def handler(name: str):
    def handle(method, path, headers):
        got = dict(headers)
        body = (
            f"hello from {name}: {method} {path}\n"
            f"  X-Forwarded-For: {got.get('x-forwarded-for', '-')}\n"
            f"  X-Forwarded-Proto: {got.get('x-forwarded-proto', '-')}\n"
            f"  X-Forwarded-Port: {got.get('x-forwarded-port', '-')}\n"
            f"  X-Forwarded-Host: {got.get('x-forwarded-host', '-')}\n"
            f"  X-Request-ID: {got.get('x-request-id', '-')}\n"
        )
        return 200, "text/plain; charset=utf-8", body.encode()

    return handle


def announce(cfg, fingerprint: str) -> None:
    for spec in cfg.listeners:
        scheme = "https" if spec.tls else "http"
        url = f"{scheme}://{spec.address}/"
        insecure = "-k " if spec.tls else ""
        print(f"fastlb demo: {len(DEMO_SERVERS)} backends behind {url}", file=sys.stderr)
        print(f"  try: for i in 1 2 3; do curl -s {insecure}{url}; done", file=sys.stderr)
    print(f"  self-signed certificate, SHA-256 fingerprint {fingerprint}", file=sys.stderr)
    if cfg.admin.address is not None:
        print(f"  status page: http://{cfg.admin.address}/  (metrics: /metrics)", file=sys.stderr)
    print("  stop with Ctrl-C", file=sys.stderr, flush=True)
