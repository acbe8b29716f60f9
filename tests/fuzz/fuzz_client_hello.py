"""Differential fuzz target: ``parse_client_hello`` of ``fastlb._core`` (Cython) against ``fastlb._core_py``.

Both twins must return the same tuple for every input, never raise on bytes, and keep the contract
(issue 15): a status in HELLO_MORE/OK/NOT_TLS/BAD, sni and alpn only with HELLO_OK, sni lowercase ASCII.
Inputs are built from the fuzzer's bytes around real ClientHellos (Python's ssl, with and without SNI
and ALPN, TLS 1.2 and 1.3): their handshake message with bytes overwritten, inserted or cut, then
re-fragmented over records of fuzzer-chosen sizes and truncated; hand-assembled hellos whose extensions
come from the fuzzer; and plain fuzzer bytes. For every input whose prefix was complete, each shorter
prefix must be HELLO_MORE (or the same answer, when the cut falls after the hello): a caller fed
segment by segment gets the answer the whole hello gives.

    pip install atheris      # not in the default test extras: a libFuzzer-based tool
    python tests/fuzz/fuzz_client_hello.py -max_total_time=60
    python tests/fuzz/fuzz_client_hello.py -runs=20000 [corpus_dir]
"""

import ssl
import sys
from collections import Counter
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when not installed
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/, for tlsutil

with atheris.instrument_imports():
    from fastlb import _core_py

from tlsutil import client_hello  # noqa: E402

from fastlb import _core  # noqa: E402  (compiled: no Python coverage to instrument)


def _real_hellos():
    out = []
    for sni, alpn, maximum in [("Example.TEST", ["h2", "http/1.1"], None), (None, None, None),
                               ("a.test", ["acme-tls/1"], ssl.TLSVersion.TLSv1_2)]:
        context = ssl.create_default_context()
        if alpn:
            context.set_alpn_protocols(alpn)
        if maximum:
            context.maximum_version = maximum
        wire = client_hello(context, sni)
        out.append(wire[5:5 + int.from_bytes(wire[3:5], "big")])  # the handshake message
    return out


MESSAGES = _real_hellos()
EXTENSION_TYPES = [0, 16, 43, 10, 13, 51, 21, 41, 0xFFFF]
RUNS = Counter()


def _records(fdp, message):
    out, pos = bytearray(), 0
    sizes = [fdp.ConsumeIntInRange(1, 600) for _ in range(fdp.ConsumeIntInRange(1, 3))]
    i = 0
    while pos < len(message):
        size = sizes[min(i, len(sizes) - 1)]
        fragment = message[pos:pos + size]
        version = b"\x03\x01" if fdp.ConsumeIntInRange(0, 20) else fdp.ConsumeBytes(2).ljust(2, b"\x03")
        out += b"\x16" + version + len(fragment).to_bytes(2, "big") + fragment
        pos += size
        i += 1
    return bytes(out)


def _mutated(fdp):
    message = bytearray(MESSAGES[fdp.ConsumeIntInRange(0, len(MESSAGES) - 1)])
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        at = fdp.ConsumeIntInRange(0, len(message) - 1)
        action = fdp.ConsumeIntInRange(0, 2)
        if action == 0:
            message[at] = fdp.ConsumeInt(1) & 0xFF
        elif action == 1:
            message[at:at] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4))
        else:
            del message[at:at + fdp.ConsumeIntInRange(1, 4)]
    return _records(fdp, bytes(message))


def _assembled(fdp):
    extensions = b""
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        kind = EXTENSION_TYPES[fdp.ConsumeIntInRange(0, len(EXTENSION_TYPES) - 1)]
        value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        size = len(value) if fdp.ConsumeIntInRange(0, 10) else fdp.ConsumeIntInRange(0, 0xFFFF)
        extensions += kind.to_bytes(2, "big") + size.to_bytes(2, "big") + value
    body = b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    return _records(fdp, b"\x01" + len(body).to_bytes(3, "big") + body)


def _check(data):
    RUNS["inputs"] += 1
    if RUNS["inputs"] % 50_000 == 0:
        print("fuzz_client_hello:", dict(RUNS), file=sys.stderr)
    compiled = _core.parse_client_hello(data)
    python = _core_py.parse_client_hello(data)
    if compiled != python:
        raise AssertionError(f"parse_client_hello({data!r}):\n  _core    -> {compiled!r}\n  _core_py -> {python!r}")
    status, sni, alpn = compiled
    assert status in (0, 1, 2, 3), compiled
    if status != 1:
        assert (sni, alpn) == (None, ()), compiled
    else:
        RUNS["ok"] += 1
        assert sni is None or (sni.isascii() and sni == sni.lower()), compiled
        assert all(isinstance(name, bytes) and name for name in alpn), compiled
    return compiled


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    choice = fdp.ConsumeIntInRange(0, 2)
    if choice == 0:
        wire = _mutated(fdp)
    elif choice == 1:
        wire = _assembled(fdp)
    else:
        wire = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
    wire += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
    result = _check(wire)
    if result[0] == 1:
        for cut in {fdp.ConsumeIntInRange(0, len(wire)) for _ in range(3)}:
            shorter = _check(wire[:cut])
            assert shorter[0] == 0 or shorter == result, (wire, cut, shorter, result)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
