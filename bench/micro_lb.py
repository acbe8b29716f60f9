"""Per-call cost of route matching (10 vs 10,000 routes) and of each balancer's pick.

    python bench/micro_lb.py [--quick]

Route tables are dicts walked by path segment, so the match cost should not grow with the number of
routes; this measures it rather than asserting it in a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from fastlb.config import Address, BackendSpec, RouteSpec, ServerSpec  # noqa: E402
from fastlb.lb import balance  # noqa: E402
from fastlb.lb.backend import Backend  # noqa: E402
from fastlb.lb.router import Router  # noqa: E402


def ns_per_call(fn, budget: float) -> float:
    """Best of 5 runs, in CPU time of this thread: on the shared 2-core test VM (load average 7 while
    others run tests) wall-clock runs of the same pick varied 5x, CPU time by about 20%."""
    timer = timeit.Timer(fn, timer=time.thread_time)
    number, _ = timer.autorange()  # calls that take >= 0.2 s
    number = max(1, int(number * budget / 0.2 / 5))
    return min(timer.repeat(number=number, repeat=5)) / number * 1e9


def router(n: int) -> Router:
    routes = [RouteSpec(host=f"h{i}.example.com", path=f"/p{i}/api", match="prefix", backend="b")
              for i in range(n // 2)]
    routes += [RouteSpec(host=None, path=f"/static{i}", match="exact", backend="b") for i in range(n - n // 2)]
    return Router(routes, None, {"b": "backend"})


def backend(balance: str, servers: int = 10) -> Backend:
    specs = tuple(ServerSpec(Address("10.0.0.1", 8000 + i), 1 + i % 3) for i in range(servers))
    spec = BackendSpec(name="b", servers=specs, balance=balance, hash_on="client_ip")
    return Backend(spec, 0, bytearray([1]) * servers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    budget = 0.1 if ap.parse_args().quick else 1.0
    print(f"{'operation':<52} {'ns/call':>9}")
    for n in (10, 10_000):
        r = router(n)
        host, path = b"h3.example.com", b"/p3/api/users/42?x=1"
        assert r.match(host, path) is not None
        hit = ns_per_call(lambda r=r, host=host, path=path: r.match(host, path), budget)
        miss = ns_per_call(lambda r=r: r.match(None, b"/static-none/a/b"), budget)
        print(f"{f'route match, {n:,} routes (host + 4-segment prefix)':<52} {hit:>9,.0f}")
        print(f"{f'route match, {n:,} routes (no match: walk to 404)':<52} {miss:>9,.0f}")
    build = "balance_c, compiled" if balance.EXTENSION else "balance_py, FASTLB_NO_EXTENSIONS=1"
    print(f"balancer picks, 10 servers ({build}):")
    for algorithm in ("roundrobin", "leastconn", "p2c", "random", "hash"):
        b = backend(algorithm)
        first = b.balancer.pick((), b"203.0.113.7")
        cost = ns_per_call(lambda pick=b.balancer.pick: pick((), b"203.0.113.7"), budget)
        retry = ns_per_call(lambda pick=b.balancer.pick, tried=(first,): pick(tried, b"203.0.113.7"), budget)
        print(f"{f'pick, {algorithm}':<52} {cost:>9,.0f}")
        print(f"{f'pick, {algorithm}, retry (first choice excluded)':<52} {retry:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
