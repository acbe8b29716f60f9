"""`fastlb serve --demo`: three small backends in the control process, so the balancer works out of the box."""

import sys

from fastlb.config import Address

DEMO_SERVERS = [(f"demo-{i}", Address("127.0.0.1", 18100 + i)) for i in (1, 2, 3)]
LISTEN = "127.0.0.1:8080"


def cli_settings() -> dict[str, str]:
    """What --demo sets, below any flag the user gave explicitly (flags still win)."""
    return {
        "FASTLB_LISTEN": LISTEN,
        "FASTLB_BACKENDS": ",".join(str(addr) for _, addr in DEMO_SERVERS),
    }


def handler(name: str):
    def handle(method, path, headers):
        got = dict(headers)
        body = (
            f"hello from {name}: {method} {path}\n"
            f"  X-Forwarded-For: {got.get('x-forwarded-for', '-')}\n"
            f"  X-Forwarded-Proto: {got.get('x-forwarded-proto', '-')}\n"
            f"  X-Request-ID: {got.get('x-request-id', '-')}\n"
        )
        return 200, "text/plain; charset=utf-8", body.encode()

    return handle


def announce(cfg) -> None:
    for spec in cfg.listeners:
        scheme = "https" if spec.tls else "http"
        url = f"{scheme}://{spec.address}/"
        print(f"fastlb demo: {len(DEMO_SERVERS)} backends behind {url}", file=sys.stderr)
        print(f"  try: for i in 1 2 3; do curl -s {url}; done", file=sys.stderr)
    print("  stop with Ctrl-C", file=sys.stderr, flush=True)
