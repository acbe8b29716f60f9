"""core.parse_proxy_header, proxy_header_v1 and proxy_header_v2: the PROXY protocol (issue 15).

The spec is HAProxy's doc/proxy-protocol.txt. Its examples, headers real HAProxy sends (``mode tcp`` with
``send-proxy``, ``send-proxy-v2`` and ``send-proxy-v2-options crc32c,unique-id``, read by a socket of
this test) and headers HAProxy accepts from us (``accept-proxy``, which re-sends what it understood) are
parsed, split at every byte, followed by application data and mutated. Every example runs on both twins;
hypothesis then checks that they agree on any bytes.
"""

import importlib
import shutil
import socket
import struct
import subprocess
import time

import pytest
import test_core
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastlb import _core_py
from fastlb import core as fastlb_core

core = test_core.core
compiled = test_core.compiled
P = _core_py
MORE, OK, LOCAL, BAD = P.PROXY_MORE, P.PROXY_OK, P.PROXY_LOCAL, P.PROXY_BAD
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
NOTHING = (0, None, 0, None, 0, ())


def v2(command=1, family=1, transport=1, block=None, tlvs=b""):
    """A v2 header; `block` defaults to 192.0.2.1:1234 -> 198.51.100.2:443 for INET, the IPv6 pair for
    INET6 (2001:db8::1 -> 2001:db8::2), 216 bytes of path for UNIX, nothing for UNSPEC."""
    if block is None:
        block = {
            0: b"",
            1: bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 1234, 443),
            2: socket.inet_pton(socket.AF_INET6, "2001:db8::1") + socket.inet_pton(socket.AF_INET6, "2001:db8::2")
            + struct.pack("!HH", 1234, 443),
            3: b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0"),
        }.get(family, b"")
    rest = block + tlvs
    return SIGNATURE + bytes([0x20 | command, family << 4 | transport]) + struct.pack("!H", len(rest)) + rest


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def crc32c(data):
    # Bitwise CRC-32C (RFC 4960 Appendix B), written independently of the twins' table-driven ones.
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def with_crc(header):
    """`header` (a v2 header whose TLVs end with a zeroed CRC32C TLV) with the checksum filled in."""
    return header[:-4] + struct.pack("!I", crc32c(header))


def test_crc32c_reference():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720 B.4 test vectors)


def test_fastlb_core_exports_the_selected_twin():
    twin = importlib.import_module("fastlb._core" if fastlb_core.EXTENSION else "fastlb._core_py")
    for name in ("parse_proxy_header", "proxy_header_v1", "proxy_header_v2", "PROXY_MORE", "PROXY_OK",
                 "PROXY_LOCAL", "PROXY_BAD", "PROXY_V1_MAX", "PP2_TYPE_CRC32C"):
        assert getattr(fastlb_core, name) is getattr(twin, name), name
        assert name in fastlb_core.__all__ and hasattr(_core_py, name), name

def test_constants(core):
    assert (core.PROXY_MORE, core.PROXY_OK, core.PROXY_LOCAL, core.PROXY_BAD) == (0, 1, 2, 3)
    assert (core.PROXY_V1_MAX, core.PP2_TYPE_CRC32C) == (107, 3)


# --- version 1 (the spec §2.1) ----------------------------------------------------------------------------

V1_OK = {
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n": ("192.168.0.1", 56324, "192.168.0.11", 443),
    b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n": ("255.255.255.255", 65535, "255.255.255.255",
                                                                   65535),
    b"PROXY TCP4 0.0.0.0 10.0.0.1 0 1\r\n": ("0.0.0.0", 0, "10.0.0.1", 1),
    b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n": ("2001:db8::1", 1, "::1", 2),
    b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n":
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    b"PROXY TCP6 ::ffff:192.0.2.1 0:0:0:0:0:0:0:1 80 8080\r\n": ("::ffff:192.0.2.1", 80, "::1", 8080),
}
V1_LOCAL = [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
    b"PROXY UNKNOWN anything at all, ignored\r\n",
]
V1_BAD = [
    b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n",  # heading zeroes are not permitted
    b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 -2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n",
    b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n",  # exactly one space
    b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
    b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n",
    b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n",  # the family dictates the format
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    b"PROXY TCP6 ::g ::1 1 2\r\n",
    b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n",
    b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
    b"PROXY UNKNOWNX\r\n",
    b"PROXY\r\n",
    b"PROXY \r\n",
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",  # a single CR or LF never ends the line
    b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\r\n",
    b"PROXY UNKNOWN \n\r\n",
    b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",  # 108 bytes: the CRLF is not within the first 107
    b"GET / HTTP/1.1\r\n",
    b"\x16\x03\x01\x02\x00\x01",
]


@pytest.mark.parametrize("line", list(V1_OK), ids=repr)
def test_v1_examples(core, line):
    src, src_port, dst, dst_port = V1_OK[line]
    assert core.parse_proxy_header(line + b"GET / HTTP/1.1\r\n") == (OK, len(line), src, src_port, dst, dst_port, ())


@pytest.mark.parametrize("line", V1_LOCAL, ids=repr)
def test_v1_unknown_is_local(core, line):
    assert len(line) <= 107
    assert core.parse_proxy_header(line + b"\x16\x03\x01") == (LOCAL, len(line), None, 0, None, 0, ())


@pytest.mark.parametrize("line", V1_BAD, ids=repr)
def test_v1_bad(core, line):
    assert core.parse_proxy_header(line) == (BAD, *NOTHING)
    assert core.parse_proxy_header(line + b"x" * 200) == (BAD, *NOTHING)


@pytest.mark.parametrize("line", [*V1_OK, *V1_LOCAL], ids=repr)
def test_v1_split_at_every_byte(core, line):
    for cut in range(len(line)):
        assert core.parse_proxy_header(line[:cut]) == (MORE, *NOTHING), cut


def test_v1_refused_as_soon_as_it_cannot_be_a_header(core):
    for prefix in [b"PROXX", b"PROXY TCP7", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 ", b"PROXY TCP4 300", b"PROXY TCP4 01",
                   b"PROXY TCP4 1..", b"PROXY TCP4 1.2.3.4 1.2.3.4 70000", b"PROXY TCP6 ::1 ::1 1 2\r\r",
                   b"PROXY UNKNOWN x\nx", b"PROXY TCP6 ::x"]:
        assert core.parse_proxy_header(prefix) == (BAD, *NOTHING), prefix
    assert core.parse_proxy_header(b"PROXY UNKNOWN " + b"x" * 92) == (BAD, *NOTHING)  # 107 bytes, no CRLF
    assert core.parse_proxy_header(b"PROXY UNKNOWN " + b"x" * 91 + b"\r")[0] == MORE


# --- version 2 (the spec §2.2) ----------------------------------------------------------------------------


def test_v2_inet(core):
    header = v2()
    assert core.parse_proxy_header(header + b"data") == (OK, 28, "192.0.2.1", 1234, "198.51.100.2", 443, ())


def test_v2_inet6(core):
    header = v2(family=2)
    assert core.parse_proxy_header(header) == (OK, 52, "2001:db8::1", 1234, "2001:db8::2", 443, ())


def test_v2_tlvs_in_order(core):
    tlvs = tlv(0x02, b"example.test") + tlv(0x04, b"") + tlv(0x05, b"id-1") + tlv(0xE0, b"\x00" * 300)
    header = v2(tlvs=tlvs)
    assert core.parse_proxy_header(header + b"x") == (
        OK, len(header), "192.0.2.1", 1234, "198.51.100.2", 443,
        ((0x02, b"example.test"), (0x04, b""), (0x05, b"id-1"), (0xE0, b"\x00" * 300)))


def test_v2_crc32c(core):
    header = with_crc(v2(tlvs=tlv(0x05, b"id-1") + tlv(0x03, b"\0\0\0\0")))
    status, consumed, *_, tlvs = core.parse_proxy_header(header)
    assert (status, consumed, tlvs[0]) == (OK, len(header), (0x05, b"id-1"))
    for at in (0, 13, 17, 30, len(header) - 1):  # any damaged byte; the signature and version are refused anyway
        damaged = bytearray(header)
        damaged[at] ^= 0x01
        assert core.parse_proxy_header(bytes(damaged))[0] == BAD, at


@pytest.mark.parametrize("header,expected", [
    (v2(command=0, family=0, transport=0), (LOCAL, 16)),
    (v2(command=0, family=1), (LOCAL, 28)),  # LOCAL: the block is skipped whatever it holds
    (v2(command=0, family=0, transport=0, block=b"\xff" * 7), (LOCAL, 23)),
    (v2(family=0, transport=0), (LOCAL, 16)),  # UNSPEC: the real endpoints
    (v2(family=3), (LOCAL, 232)),  # UNIX stream
    (v2(family=3, transport=2), (LOCAL, 232)),
    (v2(family=1, transport=2), (LOCAL, 28)),  # UDP
    (v2(family=2, transport=0), (LOCAL, 52)),
], ids=repr)
def test_v2_local(core, header, expected):
    assert core.parse_proxy_header(header + b"GET")[:2] == expected
    assert core.parse_proxy_header(header + b"GET")[2:6] == (None, 0, None, 0)


def test_v2_local_command_tlvs_are_discarded_proxy_command_tlvs_kept(core):
    assert core.parse_proxy_header(v2(command=0, tlvs=tlv(5, b"x")))[6] == ()
    assert core.parse_proxy_header(v2(family=3, tlvs=tlv(5, b"x")))[6] == ((5, b"x"),)


V2_BAD = {
    "version 1": SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
    "version 3": SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
    "command 2": SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
    "family 4": SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),
    "transport 3": SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),
    "LOCAL with family 15": SIGNATURE + b"\x20\xf0\x00\x00",
    "signature": b"\r\n\r\n\x00\r\nQUIT\r" + b"\x21\x11\x00\x0c" + bytes(12),
    "INET block short": v2(block=bytes(11)),
    "INET6 block short": v2(family=2, block=bytes(35)),
    "UNIX block short": v2(family=3, block=bytes(215)),
    "TLV overruns": v2(tlvs=b"\x05\x00\x05abcd"),
    "TLV header cut": v2(tlvs=b"\x05\x00"),
    "TLV header cut to one byte": v2(tlvs=b"\x05"),
    "CRC32C of 3 bytes": v2(tlvs=tlv(3, b"\0\0\0")),
    "CRC32C wrong": v2(tlvs=tlv(3, b"\0\0\0\0")),
    "two CRC32C": with_crc(v2(tlvs=tlv(3, struct.pack("!I", crc32c(v2(tlvs=tlv(3, bytes(4)))))) + tlv(3, bytes(4)))),
}


@pytest.mark.parametrize("name", list(V2_BAD))
def test_v2_bad(core, name):
    assert core.parse_proxy_header(V2_BAD[name] + b"more") == (BAD, *NOTHING)


@pytest.mark.parametrize("header", [v2(), v2(family=2, tlvs=tlv(5, b"abc")), v2(command=0, family=0, transport=0),
                                    with_crc(v2(tlvs=tlv(3, bytes(4)))), v2(family=3)], ids=repr)
def test_v2_split_at_every_byte(core, header):
    for cut in range(len(header)):
        assert core.parse_proxy_header(header[:cut]) == (MORE, *NOTHING), cut


def test_v2_largest_header(core):
    header = v2(tlvs=tlv(0xE1, bytes(0xFFFF - 12 - 3)))
    assert len(header) == 16 + 0xFFFF
    assert core.parse_proxy_header(header + b"data")[:2] == (OK, len(header))
    assert core.parse_proxy_header(header[:-1])[0] == MORE


def test_bytearray_input_and_type_errors(core):
    assert core.parse_proxy_header(bytearray(v2()))[0] == OK
    for value in ("PROXY", memoryview(v2()), None):
        with pytest.raises(TypeError):
            core.parse_proxy_header(value)


def test_neither_version_is_bad(core):
    assert core.parse_proxy_header(b"") == (MORE, *NOTHING)
    for data in (b"G", b"\x16", b"\r\n\r\n\x01", b"\r\r"):
        assert core.parse_proxy_header(data) == (BAD, *NOTHING), data


# --- the generators ----------------------------------------------------------------------------------------

ENDPOINTS = [
    (("203.0.113.7", 51000, "192.0.2.10", 443), "TCP4", ("203.0.113.7", 51000, "192.0.2.10", 443)),
    (("2001:DB8::7", 1, "2001:db8:0:0::10", 65535), "TCP6", ("2001:db8::7", 1, "2001:db8::10", 65535)),
    (("203.0.113.7", 0, "::1", 8443), "TCP6", ("::ffff:203.0.113.7", 0, "::1", 8443)),
    (("::1", 2, "192.0.2.10", 3), "TCP6", ("::1", 2, "::ffff:192.0.2.10", 3)),
]


@pytest.mark.parametrize("args,proto,parsed", ENDPOINTS, ids=repr)
def test_generators_round_trip(core, args, proto, parsed):
    line = core.proxy_header_v1(*args)
    assert line.startswith(b"PROXY " + proto.encode() + b" ")
    assert core.parse_proxy_header(line + b"x") == (OK, len(line), *parsed, ())
    header = core.proxy_header_v2(*args)
    assert len(header) == (28 if proto == "TCP4" else 52)
    assert core.parse_proxy_header(header + b"x") == (OK, len(header), *parsed, ())


def test_generators_exact_bytes(core):
    assert core.proxy_header_v1("192.168.0.1", 56324, "192.168.0.11", 443) == \
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert core.proxy_header_v2("192.0.2.1", 1234, "198.51.100.2", 443) == v2()


@pytest.mark.parametrize("args,error", [
    (("1.2.3", 1, "1.2.3.4", 2), ValueError),
    (("1.2.3.4", 1, "example.test", 2), ValueError),
    (("1.2.3.4\0", 1, "1.2.3.4", 2), ValueError),
    (("1.2.3.é", 1, "1.2.3.4", 2), ValueError),
    (("1.2.3.4", 65536, "1.2.3.4", 2), ValueError),
    (("1.2.3.4", 1, "1.2.3.4", -1), ValueError),
    ((b"1.2.3.4", 1, "1.2.3.4", 2), TypeError),
    (("1.2.3.4", "1", "1.2.3.4", 2), TypeError),
    (("1.2.3.4", 1, None, 2), TypeError),
])
def test_generator_errors(core, args, error):
    for generate in (core.proxy_header_v1, core.proxy_header_v2):
        with pytest.raises(error):
            generate(*args)


# --- real HAProxy on both sides -----------------------------------------------------------------------------

HAPROXY = shutil.which("haproxy")


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory):
    """One HAProxy, `mode tcp`: frontends that send each header kind to `backend` (a listening socket of
    the test), and one with `accept-proxy` that relays what it accepted to it with send-proxy-v2."""
    if HAPROXY is None:
        pytest.fail("haproxy is not installed (tests/system-deps.sh installs it)")
    backend = socket.create_server(("127.0.0.1", free_port()))
    backend.settimeout(10)
    port = backend.getsockname()[1]
    fronts = {name: free_port() for name in ("v1", "v2", "v2-crc", "accept")}
    server = f"server s 127.0.0.1:{port}"
    config = f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend v1
    bind 127.0.0.1:{fronts['v1']}
    default_backend v1
backend v1
    {server} send-proxy
frontend v2
    bind 127.0.0.1:{fronts['v2']}
    default_backend v2
backend v2
    {server} send-proxy-v2
frontend v2-crc
    bind 127.0.0.1:{fronts['v2-crc']}
    unique-id-format conn-%ci-%cp
    default_backend v2-crc
backend v2-crc
    {server} send-proxy-v2 proxy-v2-options crc32c,unique-id
frontend accept
    bind 127.0.0.1:{fronts['accept']} accept-proxy
    default_backend v2
"""
    path = tmp_path_factory.mktemp("haproxy") / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    process = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        for front in fronts.values():
            while True:
                try:
                    socket.create_connection(("127.0.0.1", front), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "haproxy did not listen"
                    time.sleep(0.02)
        # The probes above reached the backend too: drain them.
        backend.settimeout(0.3)
        try:
            while True:
                backend.accept()[0].close()
        except TimeoutError:
            pass
        backend.settimeout(10)
        yield backend, fronts
    finally:
        process.terminate()
        process.wait(10)
        backend.close()


def through_haproxy(haproxy, front, first_bytes):
    """What the backend socket receives when a client connects to `front` and sends `first_bytes` + b"app",
    and the client's own address."""
    backend, fronts = haproxy
    with socket.create_connection(("127.0.0.1", fronts[front]), timeout=10) as client:
        client.sendall(first_bytes + b"app")
        received = b""
        while not received.endswith(b"app"):
            # A connection that closes without b"app" is one of the fixture's readiness probes, relayed late.
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(10)
                received = b""
                while chunk := conn.recv(65536):
                    received += chunk
                    if received.endswith(b"app"):
                        break
        return received, client.getsockname(), ("127.0.0.1", fronts[front])


@pytest.mark.parametrize("front", ["v1", "v2", "v2-crc"])
def test_headers_haproxy_sends(core, haproxy, front):
    received, (client_ip, client_port), (front_ip, front_port) = through_haproxy(haproxy, front, b"")
    status, consumed, src, src_port, dst, dst_port, tlvs = core.parse_proxy_header(received)
    assert (status, src, src_port, dst, dst_port) == (OK, client_ip, client_port, front_ip, front_port)
    assert received[consumed:] == b"app"
    if front == "v2-crc":
        assert dict(tlvs)[0x05] == f"conn-{client_ip}-{client_port}".encode()  # PP2_TYPE_UNIQUE_ID
        assert 0x03 in dict(tlvs)
        damaged = bytearray(received[:consumed])
        damaged[16] ^= 0x01  # the source address: verified by the CRC only
        assert core.parse_proxy_header(bytes(damaged))[0] == BAD
    for cut in range(consumed):
        assert core.parse_proxy_header(received[:cut])[0] == MORE


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("endpoints", [("203.0.113.7", 4242, "198.51.100.1", 443),
                                       ("2001:db8::7", 4242, "2001:db8::1", 8443)])
def test_headers_haproxy_accepts(core, haproxy, version, endpoints):
    # HAProxy (accept-proxy) takes our header's addresses as the client's and re-sends them in its own.
    header = (core.proxy_header_v1 if version == "v1" else core.proxy_header_v2)(*endpoints)
    received, _, _ = through_haproxy(haproxy, "accept", header)
    status, consumed, *addresses, _ = core.parse_proxy_header(received)
    assert (status, tuple(addresses)) == (OK, endpoints)
    assert received[consumed:] == b"app"


# --- the twins agree on anything; nothing raises -------------------------------------------------------


def both(compiled, data):
    c, p = compiled.parse_proxy_header(data), P.parse_proxy_header(data)
    assert c == p, data
    assert c[0] in (MORE, OK, LOCAL, BAD)
    if c[0] in (MORE, BAD):
        assert c[1:] == NOTHING
    else:
        assert 0 < c[1] <= len(data)
    return c


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
BASES = [*V1_OK, *V1_LOCAL, *V1_BAD, *V2_BAD.values(), v2(), v2(family=2, tlvs=tlv(5, b"abc")),
         with_crc(v2(tlvs=tlv(3, bytes(4)))), v2(family=3), v2(command=0)]


@SETTINGS
@given(data=st.binary(max_size=120)
       | st.builds(lambda tail: b"PROXY " + tail, st.binary(max_size=110))
       | st.builds(lambda tail: SIGNATURE + tail, st.binary(max_size=80)))
def test_twins_agree_on_random_bytes(compiled, data):
    both(compiled, data)


@SETTINGS
@given(base=st.sampled_from(BASES), edits=st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=3),
       cut=st.integers(0, 300), tail=st.binary(max_size=4))
def test_twins_agree_on_mutated_headers(compiled, base, edits, cut, tail):
    data = bytearray(base)
    for at, value in edits:
        data[at % len(data)] = value
    both(compiled, bytes(data[:cut]) + tail)


@SETTINGS
@given(src=st.ip_addresses(), dst=st.ip_addresses(), ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)))
def test_twins_agree_on_generated_headers(compiled, src, dst, ports):
    args = (str(src), ports[0], str(dst), ports[1])
    for name in ("proxy_header_v1", "proxy_header_v2"):
        header = getattr(compiled, name)(*args)
        assert header == getattr(P, name)(*args)
        status, consumed, *_ = both(compiled, header + b"x")
        assert (status, consumed) == (OK, len(header))
