"""core.parse_client_hello: the TLS ClientHello peeked at for SNI passthrough (issue 15).

The ClientHellos come from real clients (Python's ssl over a MemoryBIO, ``openssl s_client`` and curl
against a socket that records what they send), so "valid" means what TLS stacks really send. Each is fed
split at every byte (MORE until it is complete), re-fragmented over many TLS records (which OpenSSL
itself accepts, checked below), truncated and mutated. Hand-built ClientHellos pin each malformation to
HELLO_BAD. Every example runs on both twins; hypothesis then checks that they agree on any bytes.
"""

import importlib
import socket
import ssl
import subprocess
import threading

import pytest
import test_core
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tlsutil import client_hello, make_pems

from fastlb import _core_py
from fastlb import core as fastlb_core

core = test_core.core
compiled = test_core.compiled
P = _core_py
MORE, OK, NOT_TLS, BAD = P.HELLO_MORE, P.HELLO_OK, P.HELLO_NOT_TLS, P.HELLO_BAD


# --- ClientHellos from real clients ----------------------------------------------------------------------


def python_hello(sni="Example.TEST", alpn=("h2", "http/1.1"), maximum=None):
    context = ssl.create_default_context()
    if maximum:
        context.maximum_version = maximum
    if alpn:
        context.set_alpn_protocols(list(alpn))
    return client_hello(context, sni)


def captured(command):
    """The first bytes `command` (formatted with the port) sends to a TCP listener that answers nothing
    and closes once it has a complete ClientHello."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    received = bytearray()

    def accept():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            while _core_py.parse_client_hello(bytes(received))[0] == MORE:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received.extend(chunk)

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        subprocess.run([part.format(port=port) for part in command], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=10)
    finally:
        thread.join(10)
        listener.close()
    return bytes(received)


@pytest.fixture(scope="module")
def real_hellos():
    """(name, bytes, expected sni, expected alpn) from each real client."""
    return [
        ("python-tls13", python_hello(), "example.test", (b"h2", b"http/1.1")),
        ("python-tls12", python_hello(maximum=ssl.TLSVersion.TLSv1_2), "example.test", (b"h2", b"http/1.1")),
        ("python-no-sni-no-alpn", python_hello(sni=None, alpn=None), None, ()),
        ("openssl-s_client",
         captured(["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-servername", "Api.Example.TEST",
                   "-alpn", "h2,http/1.1,acme-tls/1"]),
         "api.example.test", (b"h2", b"http/1.1", b"acme-tls/1")),
        ("openssl-s_client-tls12-noservername",
         captured(["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-tls1_2", "-noservername"]), None, ()),
        ("curl",
         captured(["curl", "-sk", "--max-time", "5", "--resolve", "curl.example.test:{port}:127.0.0.1",
                   "https://curl.example.test:{port}/"]),
         "curl.example.test", (b"h2", b"http/1.1")),
    ]


def handshake_message(wire):
    """The handshake bytes of the records in `wire` (the ClientHello itself)."""
    pos, out = 0, b""
    while pos < len(wire):
        length = int.from_bytes(wire[pos + 3:pos + 5], "big")
        out += wire[pos + 5:pos + 5 + length]
        pos += 5 + length
    return out


def records(message, sizes, version=b"\x03\x01"):
    """`message` in handshake records whose fragments have the given sizes in turn (the last repeats)."""
    out, pos, i = b"", 0, 0
    while pos < len(message):
        size = sizes[min(i, len(sizes) - 1)]
        fragment = message[pos:pos + size]
        out += b"\x16" + version + len(fragment).to_bytes(2, "big") + fragment
        pos += size
        i += 1
    return out


def test_fastlb_core_exports_the_selected_twin():
    twin = importlib.import_module("fastlb._core" if fastlb_core.EXTENSION else "fastlb._core_py")
    for name in ("parse_client_hello", "HELLO_MORE", "HELLO_OK", "HELLO_NOT_TLS", "HELLO_BAD", "HELLO_MAX"):
        assert getattr(fastlb_core, name) is getattr(twin, name), name
        assert name in fastlb_core.__all__ and hasattr(_core_py, name), name

def test_constants_are_the_twins(core):
    assert (core.HELLO_MORE, core.HELLO_OK, core.HELLO_NOT_TLS, core.HELLO_BAD) == (0, 1, 2, 3)
    assert core.HELLO_MAX == P.HELLO_MAX == 16384


def test_real_clients(core, real_hellos):
    for name, wire, sni, alpn in real_hellos:
        assert wire, name
        assert core.parse_client_hello(wire) == (OK, sni, alpn), name
        assert core.parse_client_hello(bytearray(wire)) == (OK, sni, alpn), name


def test_real_clients_split_at_every_byte(core, real_hellos):
    for name, wire, _, _ in real_hellos:
        for cut in range(len(wire)):
            assert core.parse_client_hello(wire[:cut]) == (MORE, None, ()), (name, cut)


def test_bytes_after_the_hello_are_not_read(core):
    # A TLS 1.3 client may follow with change_cipher_spec and early data records (RFC 8446 §D.4, §4.2.10).
    wire = python_hello()
    assert core.parse_client_hello(wire + b"\x14\x03\x03\x00\x01\x01\x17\x03\x03\x00")[0] == OK


@pytest.mark.parametrize("sizes", [[1], [2], [3], [4], [5, 1], [7], [100], [1, 300, 2]])
def test_hello_fragmented_over_records(core, real_hellos, sizes):
    # RFC 8446 §5.1: a handshake message may be fragmented over several records, its header included.
    for name, wire, sni, alpn in real_hellos:
        fragmented = records(handshake_message(wire), sizes)
        assert core.parse_client_hello(fragmented) == (OK, sni, alpn), (name, sizes)
    # Every prefix of the smallest (each cut re-reads every record before it: quadratic in the records).
    fragmented = records(handshake_message(real_hellos[2][1]), sizes)
    for cut in range(len(fragmented)):
        assert core.parse_client_hello(fragmented[:cut]) == (MORE, None, ()), (sizes, cut)


def test_openssl_accepts_the_fragmented_hello(tmp_path):
    # The re-fragmented ClientHellos above are legitimate: a TLS server (OpenSSL) answers one with its
    # ServerHello instead of an alert.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*make_pems(tmp_path).default)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(records(handshake_message(python_hello()), [1, 2, 3, 50]))
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    assert outgoing.read()[:1] == b"\x16"  # a handshake record: the ServerHello


# --- hand-built ClientHellos: each rule -----------------------------------------------------------------


def ext(kind, value):
    return kind.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value


def sni_ext(*names, name_type=0):
    entries = b"".join(bytes([name_type]) + len(n).to_bytes(2, "big") + n for n in names)
    return ext(0, len(entries).to_bytes(2, "big") + entries)


def alpn_ext(*names):
    entries = b"".join(bytes([len(n)]) + n for n in names)
    return ext(16, len(entries).to_bytes(2, "big") + entries)


def body(extensions=None, *, version=b"\x03\x03", session_id=b"\x11" * 32, suites=b"\x13\x01\x13\x02",
         methods=b"\x00"):
    out = version + b"\x5a" * 32 + bytes([len(session_id)]) + session_id
    out += len(suites).to_bytes(2, "big") + suites + bytes([len(methods)]) + methods
    if extensions is not None:
        block = b"".join(extensions)
        out += len(block).to_bytes(2, "big") + block
    return out


def hello(hello_body, msg_type=1):
    return records(bytes([msg_type]) + len(hello_body).to_bytes(3, "big") + hello_body, [16384])


def test_hand_built_hello(core):
    wire = hello(body([ext(43, b"\x02\x03\x04"), sni_ext(b"WWW.Example.test"), alpn_ext(b"h2")]))
    assert core.parse_client_hello(wire) == (OK, "www.example.test", (b"h2",))


def test_tls12_hello_without_extensions(core):
    # RFC 5246 §7.4.1.2: the extensions block may be absent altogether.
    assert core.parse_client_hello(hello(body(None))) == (OK, None, ())
    assert core.parse_client_hello(hello(body([]))) == (OK, None, ())


@pytest.mark.parametrize("name", [b"a", b"xn--bcher-kva.example", b"under_score.test", b"1.2.3.4", b"a" * 255])
def test_sni_names_accepted(core, name):
    assert core.parse_client_hello(hello(body([sni_ext(name)])))[:2] == (OK, name.lower().decode())


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x80\x2e\x01\x03\x01", b"\x16\x02", b"\x15\x03\x03",
                                  b"\x17", b"PROXY TCP4 "])
def test_not_tls(core, data):
    # An SSLv2-format hello (0x80...) is "not TLS" too: no TLS 1.2+ stack sends one.
    assert core.parse_client_hello(data) == (NOT_TLS, None, ())


HELLO = body([sni_ext(b"a.test")])
GOOD = hello(HELLO)
BAD_CASES = {
    # records (RFC 8446 §5.1)
    "second record not handshake": records(GOOD[5:], [10])[:15] + b"\x17" + records(GOOD[5:], [10])[16:],
    "second record version 2.x": records(GOOD[5:], [10])[:16] + b"\x02" + records(GOOD[5:], [10])[17:],
    "zero-length record": b"\x16\x03\x01\x00\x00" + GOOD,
    "record over 2^14": b"\x16\x03\x01\x40\x01" + GOOD[5:],
    # handshake message (RFC 8446 §4)
    "server hello": hello(HELLO, msg_type=2),
    "bytes after the hello in its record": records(GOOD[5:] + b"\x01", [16384]),
    "hello over 16 KiB": hello(body([ext(21, b"\0" * 16400)])),
    # ClientHello fields (RFC 8446 §4.1.2)
    "legacy_version 2.x": hello(body([], version=b"\x02\x00")),
    "session id of 33": hello(body([], session_id=b"\0" * 33)),
    "odd cipher suites": hello(body([], suites=b"\x13\x01\x13")),
    "no cipher suite": hello(body([], suites=b"")),
    "no compression method": hello(body([], methods=b"")),
    "truncated body": hello(HELLO[:30]),
    "one byte of extensions length": hello(body(None) + b"\x00"),
    "extensions shorter than said": hello(body(None) + b"\x00\x10" + ext(43, b"\x02\x03\x04")),
    "extensions longer than said": hello(body(None) + b"\x00\x02" + ext(43, b"\x02\x03\x04")),
    "extension overruns": hello(body(None) + b"\x00\x06\x00\x2b\x00\x09\x02\x03"),
    "extension header cut": hello(body(None) + b"\x00\x02\x00\x2b"),
    # server_name (RFC 6066 §3)
    "two server_name extensions": hello(body([sni_ext(b"a.test"), sni_ext(b"b.test")])),
    "two host names": hello(body([sni_ext(b"a.test", b"b.test")])),
    "name_type 1": hello(body([sni_ext(b"a.test", name_type=1)])),
    "empty host name": hello(body([sni_ext(b"")])),
    "empty server_name extension": hello(body([ext(0, b"")])),
    "empty server name list": hello(body([ext(0, b"\x00\x00")])),
    "list length wrong": hello(body([ext(0, b"\x00\x0a\x00\x00\x06a.test")])),
    "name length wrong": hello(body([ext(0, b"\x00\x09\x00\x00\x07a.test")])),
    "host name of 256": hello(body([sni_ext(b"a" * 256)])),
    "NUL in host name": hello(body([sni_ext(b"a\0.test")])),
    "space in host name": hello(body([sni_ext(b"a .test")])),
    "slash in host name": hello(body([sni_ext(b"a/b")])),
    "non-ASCII host name": hello(body([sni_ext("bücher.test".encode())])),
    # ALPN (RFC 7301 §3.1)
    "two ALPN extensions": hello(body([alpn_ext(b"h2"), alpn_ext(b"h2")])),
    "empty protocol name": hello(body([alpn_ext(b"h2", b"")])),
    "empty ALPN list": hello(body([ext(16, b"\x00\x00")])),
    "ALPN list length wrong": hello(body([ext(16, b"\x00\x04\x02h2")])),
    "ALPN name overruns": hello(body([ext(16, b"\x00\x03\x05h2")])),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_malformed_is_bad(core, name):
    assert core.parse_client_hello(BAD_CASES[name]) == (BAD, None, ()), name


def test_oversized_is_bad_as_soon_as_its_header_says_so(core):
    # The caller never buffers more than HELLO_MAX bytes waiting for a hello that cannot fit.
    wire = hello(body([ext(21, b"\0" * 16400)]))
    assert core.parse_client_hello(wire[:9]) == (BAD, None, ())
    # The largest that fits: one record ending at byte 16384, holding a 16379-byte message.
    assert core.parse_client_hello(b"\x16\x03\x01\x3f\xfb\x01\x00\x3f\xf7")[0] == MORE
    assert core.parse_client_hello(b"\x16\x03\x01\x3f\xfb\x01\x00\x3f\xf8")[0] == BAD
    assert core.parse_client_hello(b"\x16\x03\x01\x3f\xfc")[0] == BAD


def test_fragmented_hello_may_not_run_past_hello_max(core):
    message = handshake_message(python_hello())
    assert core.parse_client_hello(records(message, [2]))[0] == OK
    padded = hello(body([sni_ext(b"a.test"), ext(21, b"\0" * 3000)]))[5:]
    assert core.parse_client_hello(records(padded, [3000]))[0] == OK
    assert core.parse_client_hello(records(padded, [1]))[0] == BAD  # 6 wire bytes per message byte


def test_type_errors(core):
    for value in ("\x16\x03", memoryview(b"\x16"), None, 22):
        with pytest.raises(TypeError):
            core.parse_client_hello(value)


# --- the twins agree on anything; nothing raises -------------------------------------------------------


def both(compiled, data):
    c, p = compiled.parse_client_hello(data), P.parse_client_hello(data)
    assert c == p, data
    assert c[0] in (MORE, OK, NOT_TLS, BAD)
    return c


SETTINGS = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(data=st.binary(max_size=64) | st.builds(lambda tail: b"\x16\x03" + tail, st.binary(max_size=64)))
def test_twins_agree_on_random_bytes(compiled, data):
    both(compiled, data)


@SETTINGS
@given(base=st.sampled_from([GOOD, *BAD_CASES.values(), hello(body([sni_ext(b"x.test"), alpn_ext(b"h2", b"x")]))]),
       edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, 20_000), sizes=st.lists(st.integers(1, 400), min_size=1, max_size=3))
def test_twins_agree_on_mutated_hellos(compiled, base, edits, cut, sizes):
    data = bytearray(records(handshake_message(base), sizes) if len(base) < 16000 else base)
    for at, value in edits:
        data[at % len(data)] = value
    status = both(compiled, bytes(data[:cut]))[0]
    if bytes(data[:cut]) == GOOD[:cut] and cut < len(GOOD):
        assert status == MORE
