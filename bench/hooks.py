"""What Python hooks and route policies cost fastlb per request: proxy CPU µs per request, one worker.

    python bench/hooks.py                  # 3 rounds of 5 s windows per case
    python bench/hooks.py --seconds 10 --rounds 5

Topology as bench/compare.py's (wrk, 50 keep-alive connections -> fastlb, ONE worker, plain HTTP -> one
nginx backend), on ports of its own so it can run next to compare.py.  Cases, interleaved round by round
so that load from elsewhere on the machine spreads over all of them:

- `plain`: no hook and no policy anywhere (the baseline);
- `plain, hooks elsewhere`: the same route while another route has a hook and the config a [hooks]
  module: what a route without hooks pays for hooks existing (its Route.policy is None);
- `trivial hook`: a route whose hook is `def noop(req): return None`;
- `header rule`: a route with request_headers = { set = { "X-A" = "1" } } (a head rebuilt per request);
- `rate limit`: a route with a rate_limit far above the load (a token taken from shared memory).
The figure is the proxy's CPU (user + system of master and workers) over the window / requests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import load
import proxies

HOST = proxies.HOST
PORT, BACKEND_PORT, ADMIN_PORT = 18080, 19111, 19900

HOOKS = "def noop(req):\n    return None\n"
PLAIN = f'[backends.app]\nservers = ["{HOST}:{BACKEND_PORT}"]\n\n[[routes]]\npath = "/"\nbackend = "app"\n'
# The backend serves "/" only: the routes differ by host, and wrk sends that Host.
ELSEWHERE = '[hooks]\nmodule = "benchhooks"\n\n[[routes]]\nhost = "hooked.test"\nbackend = "app"\nhook = "noop"\n'
POLICIES = """
[[routes]]
host = "headers.test"
backend = "app"
request_headers = { set = { "X-A" = "1" } }

[[routes]]
host = "limited.test"
backend = "app"
rate_limit = { rate = "1000000/s", burst = 1000000 }
"""
# case -> (config, Host sent)
CASES = {
    "plain": (PLAIN, "plain.test"),
    "plain, hooks elsewhere": (PLAIN + ELSEWHERE + POLICIES, "plain.test"),
    "trivial hook": (PLAIN + ELSEWHERE + POLICIES, "hooked.test"),
    "header rule": (PLAIN + ELSEWHERE + POLICIES, "headers.test"),
    "rate limit": (PLAIN + ELSEWHERE + POLICIES, "limited.test"),
}


class Backend(proxies.Backend):
    """bench/compare.py's nginx backend, on this benchmark's port."""

    required_ports = (BACKEND_PORT,)

    def command(self) -> list[str]:
        saved, proxies.BACKEND_PORTS = proxies.BACKEND_PORTS, (BACKEND_PORT,)
        try:
            return super().command()
        finally:
            proxies.BACKEND_PORTS = saved


class Fastlb(proxies.Service):
    name = "fastlb"
    required_ports = (PORT,)
    optional_ports = (ADMIN_PORT,)
    start_timeout = 20.0
    config = ""

    def command(self) -> list[str]:
        (self.dir / "benchhooks.py").write_text(HOOKS)
        (self.dir / "fastlb.toml").write_text(self.config)
        return [sys.executable, "-m", "fastlb", "serve", "--config", str(self.dir / "fastlb.toml")]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_")}
        env.update(FASTLB_WORKERS="1", FASTLB_LISTEN=f"{HOST}:{PORT}", FASTLB_ADMIN_LISTEN=f"{HOST}:{ADMIN_PORT}",
                   PYTHONPATH=str(self.dir))
        return env


def measure(workdir: Path, cert, config: str, host: str, seconds: float) -> tuple[float, float]:
    """(proxy CPU µs per request, requests per second) over one wrk window."""
    lb = Fastlb(workdir, *cert, proxies.nofile_limit())
    lb.config = config
    lb.start()
    try:
        url = f"http://{HOST}:{PORT}/"
        headers = [f"Host: {host}"]
        load.wrk(url, 1, headers)  # warm-up: connections, pools, caches
        before = lb.cpu_seconds()
        result = load.wrk(url, seconds, headers)
        used = lb.cpu_seconds() - before
        if result.errors:
            raise SystemExit(f"{host}: {result.detail}")
        return used / result.requests * 1e6, result.rps
    finally:
        lb.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fastlb-bench-hooks-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o755)
        cert = proxies.make_cert(workdir)
        backend = Backend(workdir, *cert, proxies.nofile_limit())
        backend.start()
        samples: dict[str, list[tuple[float, float]]] = {case: [] for case in CASES}
        try:
            for _ in range(args.rounds):
                for case, (config, host) in CASES.items():
                    samples[case].append(measure(workdir, cert, config, host, args.seconds))
        finally:
            backend.stop()
    base = statistics.median(us for us, _ in samples["plain"])
    print(f"{'case':<26} {'CPU µs/req (median)':>20} {'vs plain':>10} {'req/s':>9}   samples µs")
    for case, values in samples.items():
        us = statistics.median(v for v, _ in values)
        rps = statistics.median(r for _, r in values)
        print(f"{case:<26} {us:>20.1f} {us - base:>+10.1f} {rps:>9.0f}   "
              + " ".join(f"{v:.1f}" for v, _ in values))


if __name__ == "__main__":
    main()
