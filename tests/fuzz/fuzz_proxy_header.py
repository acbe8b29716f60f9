"""Differential fuzz target: ``parse_proxy_header``, ``proxy_header_v1`` and ``proxy_header_v2`` of
``fastlb._core`` (Cython) against ``fastlb._core_py``.

Both twins must return the same tuple, or raise the same exception type, for every input; the parser
never raises on bytes and keeps its contract (issue 15): a status in PROXY_MORE/OK/LOCAL/BAD, nothing
but the status for MORE and BAD, ``0 < consumed <= len(data)`` otherwise. Inputs: v1 lines assembled
from fuzzer-chosen words (addresses, ports, separators), v2 headers with fuzzer-chosen version, command,
family, length and TLVs (a correct CRC32C now and then), the generators' output with bytes overwritten,
and plain fuzzer bytes. Every OK header must still parse the same with data after it, and each of its
prefixes must be PROXY_MORE. The generators get fuzzer-chosen addresses and ports, and whatever they
return must parse back to the same endpoints.

    pip install atheris      # not in the default test extras: a libFuzzer-based tool
    python tests/fuzz/fuzz_proxy_header.py -max_total_time=60
    python tests/fuzz/fuzz_proxy_header.py -runs=20000 [corpus_dir]
"""

import ipaddress
import socket
import sys
from collections import Counter
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, when not installed
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests/, for test_proxy_header's CRC-32C

with atheris.instrument_imports():
    from fastlb import _core_py

from test_proxy_header import crc32c  # noqa: E402

from fastlb import _core  # noqa: E402  (compiled: no Python coverage to instrument)

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
WORDS = [b"PROXY", b"TCP4", b"TCP6", b"UNKNOWN", b"192.168.0.1", b"255.255.255.255", b"0.0.0.0", b"01.2.3.4",
         b"1.2.3", b"::1", b"2001:db8::1", b"::ffff:1.2.3.4", b"1::2::3", b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
         b"0", b"443", b"65535", b"65536", b"08", b"-1", b""]
SEPARATORS = [b" "] * 8 + [b"  ", b"\t", b""]
ENDINGS = [b"\r\n"] * 6 + [b"\n", b"\r", b"", b"\r\r\n"]
ADDRESSES = ["192.0.2.1", "10.0.0.1", "::1", "2001:db8::7", "::ffff:192.0.2.1", "0.0.0.0", "::", "1.2.3", "x", ""]
RUNS = Counter()


def _pick(fdp, options):
    return options[fdp.ConsumeIntInRange(0, len(options) - 1)]


def _v1(fdp):
    line = b"PROXY" if fdp.ConsumeIntInRange(0, 20) else _pick(fdp, WORDS)
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        word = _pick(fdp, WORDS) if fdp.ConsumeIntInRange(0, 8) else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 6))
        line += _pick(fdp, SEPARATORS) + word
    return line + _pick(fdp, ENDINGS)


def _v2(fdp):
    ver_cmd = 0x21 if fdp.ConsumeIntInRange(0, 6) else fdp.ConsumeInt(1) & 0xFF
    fam = _pick(fdp, [0x11, 0x21, 0x00, 0x31, 0x12, 0x22, 0x32]) if fdp.ConsumeIntInRange(0, 6) else \
        fdp.ConsumeInt(1) & 0xFF
    block = fdp.ConsumeBytes({0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}.get(fam, 0))
    tlvs = b""
    crc_at = -1
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        kind = _pick(fdp, [0x01, 0x02, 0x03, 0x04, 0x05, 0x20, 0xE0])
        value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 12))
        if kind == 0x03 and fdp.ConsumeBool():
            value = bytes(4)
            crc_at = len(block) + len(tlvs) + 19
        size = len(value) if fdp.ConsumeIntInRange(0, 10) else fdp.ConsumeIntInRange(0, 0xFFFF)
        tlvs += bytes([kind]) + size.to_bytes(2, "big") + value
    rest = block + tlvs
    size = len(rest) if fdp.ConsumeIntInRange(0, 8) else fdp.ConsumeIntInRange(0, 0xFFFF)
    header = bytearray(SIGNATURE + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + rest)
    if 0 <= crc_at <= len(header) - 4 and fdp.ConsumeBool():
        header[crc_at:crc_at + 4] = crc32c(bytes(header[:16 + size])).to_bytes(4, "big")
    return bytes(header)


def _outcome(function, args):
    try:
        return "ok", function(*args)
    except Exception as exc:  # the exception *type* is part of the contract
        return "raised", type(exc)


def _parse(data):
    RUNS["parsed"] += 1
    if RUNS["parsed"] % 50_000 == 0:
        print("fuzz_proxy_header:", dict(RUNS), file=sys.stderr)
    compiled = _core.parse_proxy_header(data)
    python = _core_py.parse_proxy_header(data)
    if compiled != python:
        raise AssertionError(f"parse_proxy_header({data!r}):\n  _core    -> {compiled!r}\n  _core_py -> {python!r}")
    status, consumed = compiled[:2]
    assert status in (0, 1, 2, 3), compiled
    if status in (0, 3):
        assert compiled[1:] == (0, None, 0, None, 0, ()), compiled
    else:
        RUNS["ok" if status == 1 else "local"] += 1
        assert 0 < consumed <= len(data), compiled
    return compiled


def _generate(fdp):
    src = _pick(fdp, ADDRESSES) if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeUnicodeNoSurrogates(12)
    dst = _pick(fdp, ADDRESSES)
    ports = [fdp.ConsumeIntInRange(-2, 70000) if fdp.ConsumeIntInRange(0, 10) == 0 else fdp.ConsumeIntInRange(0, 65535)
             for _ in range(2)]
    args = (src, ports[0], dst, ports[1])
    for name in ("proxy_header_v1", "proxy_header_v2"):
        compiled = _outcome(getattr(_core, name), args)
        python = _outcome(getattr(_core_py, name), args)
        if compiled != python:
            raise AssertionError(f"{name}{args!r}:\n  _core    -> {compiled!r}\n  _core_py -> {python!r}")
        if compiled[0] == "ok":
            RUNS["generated"] += 1
            parsed = _parse(compiled[1] + b"data")
            packed = [ipaddress.ip_address(ip).packed for ip in (src, dst)]
            if len(packed[0]) != len(packed[1]):  # one family per header: IPv4 is written IPv4-mapped
                packed = [b"\0" * 10 + b"\xff\xff" + p if len(p) == 4 else p for p in packed]
            family = socket.AF_INET if len(packed[0]) == 4 else socket.AF_INET6
            expected = [socket.inet_ntop(family, p) for p in packed]
            assert parsed == (1, len(compiled[1]), expected[0], ports[0], expected[1], ports[1], ()), (args, parsed)


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    choice = fdp.ConsumeIntInRange(0, 4)
    if choice == 4:
        _generate(fdp)
        return
    if choice == 0:
        header = _v1(fdp)
    elif choice == 1:
        header = _v2(fdp)
    elif choice == 2:
        header = bytearray(_core_py.proxy_header_v2("192.0.2.1", 1, "2001:db8::2", 2) if fdp.ConsumeBool() else
                           _core_py.proxy_header_v1("192.0.2.1", 1, "198.51.100.2", 2))
        for _ in range(fdp.ConsumeIntInRange(1, 3)):
            header[fdp.ConsumeIntInRange(0, len(header) - 1)] = fdp.ConsumeInt(1) & 0xFF
        header = bytes(header)
    else:
        header = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 120))
    result = _parse(header)
    if result[0] in (1, 2):
        consumed = result[1]
        assert _parse(header[:consumed] + fdp.ConsumeBytes(8)) == result, header
        for cut in {fdp.ConsumeIntInRange(0, consumed - 1) for _ in range(3)}:
            assert _parse(header[:cut])[0] == 0, (header, cut)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
