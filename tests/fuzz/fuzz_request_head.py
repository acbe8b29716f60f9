"""Differential fuzz target: ``request_head``, ``parse_request`` and ``parse_response`` of ``fastlb._core``
(Cython) against ``fastlb._core_py``, and ``parse_request`` against llhttp.

Both twins must return the same tuple, or raise the same exception type, for every input (DESIGN.md
"The Cython boundary"). The first byte picks the function. ``request_head`` gets inputs built from the
fuzzer's bytes with a bias towards the fields whose rules are subtle (framing, Host, Connection,
Upgrade, Expect, X-Forwarded-*, `_` aliases), with random casing, OWS and separators, plus a few type
errors. The raw parsers get heads assembled the same way, corpus heads with bytes overwritten, and
plain fuzzer bytes; whatever parse_request forwards, llhttp (strict) must read with the same method and
target, except where tests/test_parse.py documents that it differs (HTTP/1.2+, extension methods, an
HTAB after a Transfer-Encoding value).

    pip install atheris      # not in the default test extras: a libFuzzer-based tool
    python tests/fuzz/fuzz_request_head.py -max_total_time=60
    python tests/fuzz/fuzz_request_head.py -runs=20000 [corpus_dir]

libFuzzer's options apply (-max_total_time, -runs, -jobs, a corpus directory). Not part of the pytest
suite (the file name does not start with test_).
"""

import sys
from collections import Counter
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when not installed
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/, for test_parse's oracle helpers

with atheris.instrument_imports():
    from fastlb import _core_py

from test_parse import CORPUS_HEADS, LLHTTP_METHODS, llhttp_reading  # noqa: E402

from fastlb import _core  # noqa: E402  (compiled: no Python coverage to instrument)

NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"Expect", b"Keep-Alive",
         b"Proxy-Connection", b"TE", b"Trailer", b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Port",
         b"X-Forwarded-Host", b"X-Request-ID", b"Content_Length", b"Transfer_Encoding", b"X_Forwarded_For",
         b"Host_", b"X-Custom", b"Accept", b"HTTP2-Settings", b"Cookie", b"X-Forwarded-Client-Cert",
         b"X_Forwarded_Client_Cert"]
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
    fdp = atheris.FuzzedDataProvider(data)  # its own provider: the request_head inputs predate the others
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


REQUEST_LINES = [b"GET / HTTP/1.1", b"POST /a?b=c HTTP/1.1", b"HEAD / HTTP/1.0", b"OPTIONS * HTTP/1.1",
                 b"GET / HTTP/1.2", b"CONNECT a:443 HTTP/1.1", b"GET http://a/ HTTP/1.1", b"GET /", b"PRI * HTTP/2.0",
                 b"\r\nPUT /x HTTP/1.1", b"GET  / HTTP/1.1", b"TRACE / HTTP/1.1", b"FOO /x HTTP/1.1"]
STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 204",
                b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 100 Continue", b"HTTP/1.1 2OO OK", b"HTTP/1.1 599 \xff"]
EOLS = [b"\r\n"] * 12 + [b"\n", b"\r", b"\r\n "]


def _head(fdp, lines: list[bytes]) -> bytes:
    """A head: assembled from known pieces, a corpus head with bytes overwritten, or raw bytes."""
    choice = fdp.ConsumeIntInRange(0, 3)
    if choice == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200)) + b"\r\n\r\n"
    if choice == 1 and lines is REQUEST_LINES:
        head = bytearray(CORPUS_HEADS[fdp.ConsumeIntInRange(0, len(CORPUS_HEADS) - 1)])
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            head[fdp.ConsumeIntInRange(0, len(head) - 1)] = fdp.ConsumeInt(1) & 0xFF
        head = bytes(head)
        found = head.find(b"\r\n\r\n")
        return head[:found + 4] if found >= 0 else head + b"\r\n\r\n"
    out = _case(fdp, lines) + EOLS[fdp.ConsumeIntInRange(0, len(EOLS) - 1)]
    if lines is REQUEST_LINES and fdp.ConsumeBool():
        out += b"Host: example.test\r\n"  # so that more heads are forwarded, for llhttp to read
    for _ in range(fdp.ConsumeIntInRange(0, 8)):
        out += _case(fdp, NAMES) + _case(fdp, [b":", b": ", b":\t", b" :", b""]) + _case(fdp, VALUES)
        out += EOLS[fdp.ConsumeIntInRange(0, len(EOLS) - 1)]
    return out + b"\r\n"


# Inputs per target, and parse_request results checked against llhttp. Printed every 50,000 inputs:
# libFuzzer ends the process without running Python's atexit handlers.
RUNS = Counter()


def _check(name, args):
    RUNS[name] += 1
    if RUNS.total() % 50_000 == 0:
        print("fuzz_request_head:", dict(RUNS), file=sys.stderr)
    compiled = _outcome(getattr(_core, name), args)
    python = _outcome(getattr(_core_py, name), args)
    if compiled != python:
        raise AssertionError(f"{name}{args!r}:\n  _core    -> {compiled!r}\n  _core_py -> {python!r}")
    return compiled


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    target = fdp.ConsumeIntInRange(0, 2)
    if target == 0:
        _check("request_head", _inputs(fdp.ConsumeBytes(len(data))))
    elif target == 1:
        head = _head(fdp, REQUEST_LINES)
        limits = (8192, 16384, 100) if fdp.ConsumeBool() else (20, 60, 3)
        args = (b"x" + head, 1, 1 + len(head), b"127.0.0.1", b"http", b"80", fdp.ConsumeBool(), b"f", 9,
                b"lb:80", *limits)
        kind, result = _check("parse_request", args)
        if kind == "ok" and result[0] == 0 and result[2] in LLHTTP_METHODS:
            llhttp = llhttp_reading(head)
            version = head.split(b"\r\n", 2)[1 if head.startswith(b"\r\n") else 0].rsplit(b" ", 1)[-1]
            te_tab = b"\t\r\n" in head  # llhttp refuses it after Transfer-Encoding (documented)
            if version in (b"HTTP/1.0", b"HTTP/1.1") and not te_tab:
                RUNS["parse_request forwarded, llhttp agrees"] += 1
                if not isinstance(llhttp, tuple) or llhttp[:2] != result[2:4]:
                    raise AssertionError(f"parse_request forwards {head!r} as {result[2:4]}, llhttp reads {llhttp}")
    else:
        head = _head(fdp, STATUS_LINES)
        args = (head, 0, len(head), fdp.ConsumeBool(), fdp.ConsumeBool(), fdp.ConsumeBool(), 65536, 400)
        _check("parse_response", args)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
