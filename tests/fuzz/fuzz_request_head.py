"""Differential fuzz target: ``request_head`` of ``fastlb._core`` (Cython) against ``fastlb._core_py``.

Both twins must return the same tuple, or raise the same exception type, for every input (DESIGN.md
"The Cython boundary"). The inputs are built from the fuzzer's bytes with a bias towards the fields
whose rules are subtle (framing, Host, Connection, Upgrade, Expect, X-Forwarded-*, `_` aliases), with
random casing, OWS and separators, plus a few type errors.

    pip install atheris      # not in the default test extras: a libFuzzer-based tool
    python tests/fuzz/fuzz_request_head.py -max_total_time=60
    python tests/fuzz/fuzz_request_head.py -runs=20000 [corpus_dir]

libFuzzer's options apply (-max_total_time, -runs, -jobs, a corpus directory). Not part of the pytest
suite (the file name does not start with test_).
"""

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when not installed

with atheris.instrument_imports():
    from fastlb import _core_py

from fastlb import _core  # noqa: E402  (compiled: no Python coverage to instrument)

NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect", b"Keep-Alive",
         b"Proxy-Connection", b"TE", b"Trailer", b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Port",
         b"X-Forwarded-Host", b"X-Request-ID", b"Content_Length", b"Transfer_Encoding", b"X_Forwarded_For",
         b"Host_", b"X-Custom", b"Accept", b"HTTP2-Settings", b"Cookie"]
VALUES = [b"chunked", b"CHUNKED", b" chunked ", b"\tchunked", b"gzip, chunked", b"chunked, gzip", b",chunked",
          b"identity", b"0", b"5", b"005", b"+5", b"-1", b"0x10", b"1 0", b"5, 5", b"99999999999999999999",
          b"999999999999999999", b"100-continue", b"100-Continue", b"foo", b"close", b"keep-alive",
          b"Upgrade", b"upgrade, close", b"x-custom, content-length, host", b"websocket", b"h2c",
          b"h2c, websocket", b"websocket/13", b"example.test", b"example.test:8443", b"", b"  ",
          b"203.0.113.9", b"a\rb", b"a\nb", b"a\x00b", b"a\x0bb", b"\xff", b"abc-123"]
SEPARATED = [b"", b" ", b"\t", b",", b", ", b" ,"]


def _case(fdp, options: list[bytes]) -> bytes:
    choice = fdp.ConsumeIntInRange(0, 9)
    if choice < 7:
        value = options[fdp.ConsumeIntInRange(0, len(options) - 1)]
        if fdp.ConsumeBool():
            value = bytes(c ^ 0x20 if 0x41 <= (c & 0xDF) <= 0x5A and fdp.ConsumeBool() else c for c in value)
        return value
    if choice < 9:
        a = options[fdp.ConsumeIntInRange(0, len(options) - 1)]
        b = options[fdp.ConsumeIntInRange(0, len(options) - 1)]
        return a + SEPARATED[fdp.ConsumeIntInRange(0, len(SEPARATED) - 1)] + b
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24))


def _inputs(data: bytes):
    fdp = atheris.FuzzedDataProvider(data)
    method = _case(fdp, [b"GET", b"POST", b"HEAD", b"CONNECT", b"OPTIONS", b"G T", b""])
    target = _case(fdp, [b"/", b"/a?b=c", b"*", b"http://x/", b"/a b", b"/\x00", b""])
    headers = []
    for _ in range(fdp.ConsumeIntInRange(0, 10)):
        name = _case(fdp, NAMES)
        value = _case(fdp, VALUES)
        if fdp.ConsumeIntInRange(0, 60) == 0:  # the type checks must agree too
            headers.append([name, value] if fdp.ConsumeBool() else (name.decode("latin-1"), value))
        else:
            headers.append((name, value))
    client_ip = _case(fdp, [b"127.0.0.1", b"::1", b""])
    proto = _case(fdp, [b"http", b"https"])
    port = _case(fdp, [b"80", b"443", b"8443"])
    trust_xff = fdp.ConsumeBool()
    request_id = _case(fdp, [b"generated-1", b""])
    if fdp.ConsumeIntInRange(0, 80) == 0:
        target = target.decode("latin-1")
    return method, target, headers, client_ip, proto, port, trust_xff, request_id


def _outcome(function, args):
    try:
        return "ok", function(*args)
    except Exception as exc:  # the exception *type* is part of the contract
        return "raised", type(exc)


def TestOneInput(data: bytes) -> None:
    args = _inputs(data)
    compiled = _outcome(_core.request_head, args)
    python = _outcome(_core_py.request_head, args)
    if compiled != python:
        raise AssertionError(f"request_head{args!r}:\n  _core    -> {compiled!r}\n  _core_py -> {python!r}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
