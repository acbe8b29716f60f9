"""Per-call cost of fastlb._core (Cython) vs fastlb._core_py (its Python twin).

    python setup.py build_ext --inplace && python bench/micro_core.py [--quick]

Each figure is the best of several timeit repeats (the minimum is the least noisy estimate of the
cost itself; the rest is the machine doing other things).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastlb import _core_py  # noqa: E402

# A Chrome navigation as llhttp hands it over: 13 fields, about 700 bytes on the wire.
BROWSER_REQUEST = [
    (b"Host", b"shop.example.com"),
    (b"Connection", b"keep-alive"),
    (b"Cache-Control", b"max-age=0"),
    (b"sec-ch-ua", b'"Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"'),
    (b"sec-ch-ua-mobile", b"?0"),
    (b"Upgrade-Insecure-Requests", b"1"),
    (
        b"User-Agent",
        b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    ),
    (
        b"Accept",
        b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,*/*;q=0.8",
    ),
    (b"Sec-Fetch-Site", b"same-origin"),
    (b"Sec-Fetch-Mode", b"navigate"),
    (b"Accept-Encoding", b"gzip, deflate, br, zstd"),
    (b"Accept-Language", b"en-GB,en;q=0.9,fr;q=0.8"),
    (
        b"Cookie",
        b"session=5f2b8c1e9a4d4e7fb1c3a2d9e8f7a6b5; cart=3; theme=dark; _ga=GA1.2.1234567890.1700000000; "
        b"consent=analytics%3Dyes%2Cads%3Dno",
    ),
]
REQUEST_ARGS = (
    b"GET",
    b"/products/42?ref=home",
    BROWSER_REQUEST,
    b"203.0.113.7",
    b"https",
    b"443",
    False,
    b"7f3c2a9e-5b1d-4c8e-9a2f-1e6d3b8c4a70",
)
RESPONSE_ARGS = (
    200,
    b"OK",
    [
        (b"Server", b"gunicorn"),
        (b"Date", b"Tue, 26 Nov 2024 09:30:00 GMT"),
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Content-Length", b"5120"),
        (b"Cache-Control", b"private, max-age=0"),
        (b"Vary", b"Accept-Encoding, Cookie"),
        (b"Set-Cookie", b"session=5f2b8c1e9a4d4e7fb1c3a2d9e8f7a6b5; Path=/; HttpOnly; Secure; SameSite=Lax"),
        (b"Connection", b"keep-alive"),
    ],
    False,
    True,
    False,
)
# The same two heads on the wire, for the one-call parsers (issue 13): what the client protocol frames.
REQUEST_BYTES = (
    b"GET /products/42?ref=home HTTP/1.1\r\n"
    + b"".join(b"%s: %s\r\n" % field for field in BROWSER_REQUEST)
    + b"X-Request-ID: 7f3c2a9e-5b1d-4c8e-9a2f-1e6d3b8c4a70\r\n\r\n"
)
PARSE_REQUEST_ARGS = (REQUEST_BYTES, 0, len(REQUEST_BYTES), b"203.0.113.7", b"https", b"443", False, b"w1", 4242,
                      b"shop.example.com:443", 8192, 16384, 100)
RESPONSE_BYTES = b"HTTP/1.1 200 OK\r\n" + b"".join(b"%s: %s\r\n" % field for field in RESPONSE_ARGS[2]) + b"\r\n"
PARSE_RESPONSE_ARGS = (RESPONSE_BYTES, 0, len(RESPONSE_BYTES), False, True, False, 65536, 400)
KEY = b"203.0.113.7:51514/cart/checkout"  # 32 bytes
SERVERS = [b"10.0.1.%d:8080" % i for i in range(1, 11)]
WEIGHTS = [1] * 10
SIZE = 65537


def cases(core):
    table = core.maglev_table(SERVERS, WEIGHTS, SIZE)
    key_hash = core.hash64(KEY)
    request_head, response_head, hash64 = core.request_head, core.response_head, core.hash64
    parse_request, parse_response, find_field = core.parse_request, core.parse_response, core.find_field
    maglev_table, maglev_lookup = core.maglev_table, core.maglev_lookup
    return {
        "request_head (13 fields, ~700 B)": lambda: request_head(*REQUEST_ARGS),
        "response_head (8 fields)": lambda: response_head(*RESPONSE_ARGS),
        f"parse_request (raw, {len(REQUEST_BYTES)} B)": lambda: parse_request(*PARSE_REQUEST_ARGS),
        f"parse_response (raw, {len(RESPONSE_BYTES)} B)": lambda: parse_response(*PARSE_RESPONSE_ARGS),
        "find_field (Cookie, in that request)": lambda: find_field(REQUEST_BYTES, 0, len(REQUEST_BYTES), b"cookie"),
        "hash64 (32 B)": lambda: hash64(KEY),
        "maglev_table (10 servers, 65537)": lambda: maglev_table(SERVERS, WEIGHTS, SIZE),
        "maglev_lookup": lambda: maglev_lookup(table, key_hash),
    }


def ns_per_call(fn, budget: float) -> float:
    number, elapsed = timeit.Timer(fn).autorange()  # calls that take >= 0.2 s
    number = max(1, int(number * budget / 0.2 / 5))
    best = min(timeit.repeat(fn, number=number, repeat=5))
    return best / number * 1e9


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="about 10x shorter runs (noisier)")
    args = parser.parse_args()
    budget = 0.1 if args.quick else 1.0

    try:
        compiled = importlib.import_module("fastlb._core")
    except ImportError as exc:
        print(f"fastlb._core is not built ({exc}); run: python setup.py build_ext --inplace", file=sys.stderr)
        return 1
    # Same answers, or the comparison means nothing.
    for name, fn in cases(compiled).items():
        assert fn() == cases(_core_py)[name](), name

    rows = []
    c_cases, py_cases = cases(compiled), cases(_core_py)
    for name in c_cases:
        c_ns = ns_per_call(c_cases[name], budget)
        py_ns = ns_per_call(py_cases[name], budget)
        rows.append((name, c_ns, py_ns))

    width = max(len(name) for name, _, _ in rows)
    print(f"{'call':<{width}}  {'_core ns':>12}  {'_core_py ns':>12}  {'speed-up':>8}")
    for name, c_ns, py_ns in rows:
        print(f"{name:<{width}}  {c_ns:>12,.0f}  {py_ns:>12,.0f}  {py_ns / c_ns:>7.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
