"""TLS policy, SNI, ALPN, resumption and certificate checks of fastlb.net.tls, over real loopback sockets.

The server is what a worker runs: the context comes from `build_server_context` in this (master) process,
then `os.fork()`, then a uvloop server in the child on a SO_REUSEPORT socket opened before the fork, with
`ssl_handshake_timeout`. Clients are the stdlib `ssl` module and `openssl s_client`; nothing is mocked.
The server answers any request head with JSON facts about the connection as the *server* saw it.

TlsSpec/CertSpec are mostly stood in by SimpleNamespace: these tests exercise the checks tls.py makes itself,
which must hold even for a spec that config validation did not produce (one test uses the real dataclasses).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import select
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import trustme
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tlsutil import (
    DEFAULT_NAMES,
    OPENSSL,
    RSA_NAMES,
    WILDCARD_NAMES,
    client_context,
    client_hello,
    days_from_now,
    dns_names,
    handshake_facts,
    make_pems,
    s_client,
    write_certificate,
)

from fastlb.config import CertSpec, ConfigError, TlsSpec
from fastlb.net import certs, tls

# Mozilla intermediate, TLS 1.2 part (https://ssl-config.mozilla.org/guidelines/5.7.json)
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
SOURCE = "fastlb.toml"


def tls_spec(
    certificates,
    min_version="1.2",
    ciphers=INTERMEDIATE_CIPHERS,
    handshake_timeout=10.0,
    strict_sni=False,
    client_auth=None,
):
    return SimpleNamespace(
        min_version=min_version,
        ciphers=ciphers,
        handshake_timeout=handshake_timeout,
        certificates=tuple(SimpleNamespace(cert=cert, key=key) for cert, key in certificates),
        strict_sni=strict_sni,
        client_auth=client_auth,
    )


# ---------------------------------------------------------------------------------------------------------
# Certificates (made by tests/tlsutil.py, shared with tests/test_tls.py)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def pems(ca, tmp_path_factory):
    return make_pems(tmp_path_factory.mktemp("pems"), ca)


# ---------------------------------------------------------------------------------------------------------
# A forked uvloop server, as a worker runs it


class FactsProtocol(asyncio.Protocol):
    """Answers every request head with the server-side view of the TLS connection, keep-alive."""

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""

    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            ssl_object = self.transport.get_extra_info("ssl_object")
            version, cipher, reused = handshake_facts(ssl_object)
            body = json.dumps(
                {
                    "pid": os.getpid(),
                    "version": version,
                    "cipher": cipher,
                    "reused": reused,
                    "alpn": ssl_object.selected_alpn_protocol(),
                }
            ).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )


def _worker(sock, context, handshake_timeout, ready_fd):
    if callable(context):  # only the control test: a context made in the worker, after fork
        context = context()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(
        loop.create_server(FactsProtocol, sock=sock, ssl=context, ssl_handshake_timeout=handshake_timeout)
    )
    os.write(ready_fd, b"!")
    loop.run_forever()


@contextmanager
def forked_server(context, workers=1, handshake_timeout=10.0):
    """Yields (port, pids): `workers` forked uvloop processes, each on its own SO_REUSEPORT socket.

    The sockets are opened here, before fork, as the master does.
    """
    sockets = []
    port = 0
    for _ in range(workers):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        sockets.append(sock)
    ready_r, ready_w = os.pipe()
    pids = []
    try:
        for sock in sockets:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                status = 0
                try:
                    os.close(ready_r)
                    _worker(sock, context, handshake_timeout, ready_w)
                except BaseException:
                    traceback.print_exc()
                    status = 1
                finally:
                    os._exit(status)
            pids.append(pid)
        os.close(ready_w)
        ready_w = -1
        deadline = time.monotonic() + 10
        started = 0
        while started < workers:
            readable, _, _ = select.select([ready_r], [], [], max(0.0, deadline - time.monotonic()))
            data = os.read(ready_r, 16) if readable else b""
            assert data, "forked TLS server did not start"
            started += len(data)
        yield port, pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        for pid in pids:
            os.waitpid(pid, 0)
        for fd in (ready_r, ready_w):
            if fd >= 0:
                os.close(fd)
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def server(pems):
    """Intermediate policy, three certificates, two workers sharing one context built before fork."""
    spec = tls_spec([pems.default, pems.wildcard, pems.rsa])
    context = tls.build_server_context(spec, SOURCE)
    with forked_server(context, workers=2, handshake_timeout=spec.handshake_timeout) as (port, pids):
        yield SimpleNamespace(port=port, pids=pids)


@pytest.fixture(scope="module")
def modern_server(pems):
    context = tls.build_server_context(tls_spec([pems.default], min_version="1.3"), SOURCE)
    with forked_server(context) as (port, _):
        yield SimpleNamespace(port=port)


# ---------------------------------------------------------------------------------------------------------
# Client side


def _read_response(conn) -> dict:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = conn.recv(4096)
        assert chunk
        body += chunk
    return json.loads(body)


def exchange(port, context, server_hostname="localhost", session=None):
    """One TLS connection with one request; the server's facts and the client's view of it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        # Without it Nagle holds the request behind the client's Finished until the delayed ACK (40 ms).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=server_hostname, session=session) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            # TLS 1.3 tickets arrive after the handshake: reading the response processes them, so only
            # now does conn.session hold a resumable session.
            facts = _read_response(conn)
            return SimpleNamespace(
                server=facts,
                session=conn.session,
                reused=conn.session_reused,
                version=conn.version(),
                cipher=conn.cipher()[0],
                alpn=conn.selected_alpn_protocol(),
                handshake=handshake_facts(conn),
                names=dns_names(conn.getpeercert(binary_form=True)),
                key=type(x509.load_der_x509_certificate(conn.getpeercert(binary_form=True)).public_key()),
            )


def refused_by_server(port, context, server_hostname="localhost") -> None:
    """The handshake fails, and not because the client could not even build its hello."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as excinfo:
            with context.wrap_socket(raw, server_hostname=server_hostname) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                _read_response(conn)
    # uvloop (like asyncio's sslproto) closes the transport on a handshake error without flushing the
    # alert OpenSSL queued, so the client sees a bare EOF rather than e.g. "alert protocol version".
    error = excinfo.value
    reason = getattr(error, "reason", None) or ""
    assert isinstance(error, ConnectionResetError | ssl.SSLEOFError) or "ALERT" in reason, error


# ---------------------------------------------------------------------------------------------------------
# Policy


def test_context_options_follow_mozilla_intermediate(pems):
    context = tls.build_server_context(tls_spec([pems.default]), SOURCE)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.maximum_version == ssl.TLSVersion.MAXIMUM_SUPPORTED
    assert not context.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert not context.options & ssl.OP_NO_TICKET
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(INTERMEDIATE_CIPHERS.split(":"))
    assert context.sni_callback is None  # one certificate: nothing to select
    modern = tls.build_server_context(tls_spec([pems.default], min_version="1.3"), SOURCE)
    assert modern.minimum_version == ssl.TLSVersion.TLSv1_3


def test_real_config_spec_with_its_default_ciphers(pems):
    spec = TlsSpec(certificates=(CertSpec(cert=pems.default[0], key=pems.default[1]),))
    assert spec.ciphers == INTERMEDIATE_CIPHERS
    context = tls.build_server_context(spec, SOURCE)
    assert {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"} == set(
        spec.ciphers.split(":")
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls11_client_is_refused(server, pems):
    # OpenSSL 3 allows TLS 1.1 only at security level 0, so the client must ask for it to send the hello.
    context = client_context(
        pems, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0"
    )
    refused_by_server(server.port, context)


def test_weak_cipher_only_client_is_refused(server, pems):
    context = client_context(pems, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA")
    refused_by_server(server.port, context)


@pytest.mark.parametrize(
    ("server_hostname", "cipher", "key_type"),
    [
        ("localhost", "ECDHE-ECDSA-AES128-GCM-SHA256", ec.EllipticCurvePublicKey),
        ("rsa.example", "ECDHE-RSA-AES128-GCM-SHA256", rsa.RSAPublicKey),
    ],
)
def test_tls12_ecdhe_aes_gcm_works_with_ecdsa_and_rsa(server, pems, server_hostname, cipher, key_type):
    context = client_context(pems, maximum=ssl.TLSVersion.TLSv1_2, ciphers=cipher)
    result = exchange(server.port, context, server_hostname)
    assert (result.version, result.cipher) == ("TLSv1.2", cipher)
    assert (result.server["version"], result.server["cipher"]) == ("TLSv1.2", cipher)
    assert issubclass(result.key, key_type)


@pytest.mark.parametrize(
    "offered",
    [
        ["ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-ECDSA-AES256-GCM-SHA384"],
        ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"],
    ],
)
def test_client_cipher_order_wins(server, pems, offered):
    context = client_context(pems, maximum=ssl.TLSVersion.TLSv1_2, ciphers=":".join(offered))
    assert exchange(server.port, context).cipher == offered[0]


def test_tls13_works_by_default(server, pems):
    result = exchange(server.port, client_context(pems))
    assert result.version == "TLSv1.3"
    assert result.server["cipher"] in {
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
    }
    assert result.handshake == (result.version, result.cipher, False)


def test_min_version_13_refuses_tls12(modern_server, pems):
    refused = client_context(pems, maximum=ssl.TLSVersion.TLSv1_2)
    refused_by_server(modern_server.port, refused)
    assert exchange(modern_server.port, client_context(pems)).version == "TLSv1.3"


@pytest.mark.skipif(OPENSSL is None, reason="openssl command-line tool not installed")
@pytest.mark.parametrize(
    ("version", "group", "accepted", "temp_key"),
    [
        ("-tls1_3", "X25519", True, "X25519, 253 bits"),
        ("-tls1_3", "P-256", True, "ECDH, prime256v1, 256 bits"),
        ("-tls1_3", "P-384", True, "ECDH, secp384r1, 384 bits"),
        ("-tls1_3", "P-521", False, None),
        ("-tls1_3", "X448", False, None),
        ("-tls1_3", "ffdhe2048", False, None),
        ("-tls1_2", "X25519", True, "X25519, 253 bits"),
        ("-tls1_2", "P-521", False, None),
    ],
)
def test_key_exchange_groups_are_restricted_in_forked_workers(server, version, group, accepted, temp_key):
    # The RSA certificate: in TLS 1.2 the client's group list also bounds an ECDSA certificate's curve
    # (RFC 8422 section 5.1), which would mix that rule into this test.
    done = s_client(server.port, version, "-groups", group, "-servername", "rsa.example")
    handshake_done = done.returncode == 0 and "Cipher is (NONE)" not in done.stdout
    assert handshake_done == accepted, done.stdout + done.stderr
    if accepted:
        assert f"Server Temp Key: {temp_key}" in done.stdout, done.stdout


def test_group_list_openssl_refuses_is_a_clear_error():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(
        ConfigError, match=r"^fastlb.toml: tls: OpenSSL .* refused the group list X25519:nope$"
    ):
        tls._set_groups(context, "X25519:nope", SOURCE)


# ---------------------------------------------------------------------------------------------------------
# SNI


@pytest.mark.parametrize(
    ("server_hostname", "names"),
    [
        ("localhost", DEFAULT_NAMES[:2]),
        ("rsa.example", RSA_NAMES),
        ("a.wild.example", WILDCARD_NAMES),
        ("exact.wild.example", RSA_NAMES),  # exact beats the wildcard listed before it
        ("a.b.wild.example", DEFAULT_NAMES[:2]),  # the wildcard covers one label only
        ("wild.example", DEFAULT_NAMES[:2]),
        ("unknown.invalid", DEFAULT_NAMES[:2]),
        (None, DEFAULT_NAMES[:2]),  # no SNI at all
    ],
)
def test_sni_selects_certificate(server, pems, server_hostname, names):
    result = exchange(server.port, client_context(pems, check_hostname=False), server_hostname)
    assert result.names == names


# ---------------------------------------------------------------------------------------------------------
# Session resumption across forked workers


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
@pytest.mark.parametrize("server_hostname", ["localhost", "a.wild.example"])
def test_resumption_works_across_workers(server, pems, version, server_hostname):
    context = client_context(pems, minimum=version, maximum=version)
    first = exchange(server.port, context, server_hostname)
    assert not first.reused and first.session is not None
    seen_pids = {first.server["pid"]}
    for _ in range(20):
        result = exchange(server.port, context, server_hostname, session=first.session)
        assert result.reused and result.server["reused"], result.server
        assert result.version == version.name.replace("_", ".")
        assert result.names == first.names
        seen_pids.add(result.server["pid"])
    # SO_REUSEPORT hashes each new source port: 21 connections all on one of two workers is a 1-in-a-million.
    assert seen_pids == set(server.pids)


def test_resumption_control_contexts_made_after_fork_do_not_share_ticket_keys(pems):
    # Proves the test above can fail: each worker builds its own context, so each has its own ticket keys
    # and a session resumes only on the worker that issued it.
    spec = tls_spec([pems.default])
    with forked_server(lambda: tls.build_server_context(spec, SOURCE), workers=2) as (port, pids):
        context = client_context(pems)
        first = exchange(port, context)
        results = [exchange(port, context, session=first.session) for _ in range(20)]
    assert {r.server["pid"] for r in results} | {first.server["pid"]} == set(pids)
    assert {r.server["reused"] for r in results} == {True, False}
    assert all(r.server["reused"] == (r.server["pid"] == first.server["pid"]) for r in results)


# ---------------------------------------------------------------------------------------------------------
# ALPN


@pytest.mark.parametrize(
    ("server_hostname", "offered", "selected"),
    [
        ("localhost", ["h2"], None),
        ("localhost", ["h2", "http/1.1"], "http/1.1"),
        ("localhost", None, None),
        ("rsa.example", ["h2"], None),  # a context switched to by SNI: same ALPN
        ("rsa.example", ["h2", "http/1.1"], "http/1.1"),
    ],
)
def test_alpn_offers_http11_only_and_never_fails_the_handshake(
    server, pems, server_hostname, offered, selected
):
    result = exchange(server.port, client_context(pems, alpn=offered), server_hostname)
    assert result.alpn == selected
    assert result.server["alpn"] == selected


# ---------------------------------------------------------------------------------------------------------
# Handshake cost: the libssl settings tls.py changes for it (module docstring, "Handshake cost")

# openssl/ssl.h
SSL_CTRL_MODE = 33
SSL_CTRL_GET_SESS_CACHE_MODE = 45
SSL_SESS_CACHE_OFF = 0
SSL_MODE_NO_AUTO_CHAIN = 0x8


def test_libssl_settings_read_back_on_every_context(pems):
    spec = tls_spec([pems.default, pems.rsa])
    contexts = [tls.build_server_context(spec, SOURCE), tls._policy_context(spec, SOURCE)]
    for context in contexts:
        pointer = tls._ssl_ctx_pointer(context)
        assert tls._libssl.ctrl(pointer, SSL_CTRL_GET_SESS_CACHE_MODE, 0, None) == SSL_SESS_CACHE_OFF
        # SSL_CTX_get_mode: SSL_CTX_ctrl(SSL_CTRL_MODE) with no bits to add.
        assert tls._libssl.ctrl(pointer, SSL_CTRL_MODE, 0, None) & SSL_MODE_NO_AUTO_CHAIN
        assert context.num_tickets == tls.TLS13_TICKETS == 1


@pytest.mark.skipif(OPENSSL is None, reason="openssl command-line tool not installed")
def test_tls13_full_handshake_sends_one_ticket(server):
    # The server sends its tickets as soon as it has the client's Finished, before it reads any request, so
    # every ticket is on the wire ahead of the response: count them up to the response's last byte.
    request = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
    with subprocess.Popen(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{server.port}", "-tls1_3", "-msg", "-ign_eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as client:
        output = b""
        try:
            client.stdin.write(request)
            client.stdin.flush()
            deadline = time.monotonic() + 10
            # The JSON body ends without a newline, so read what arrives rather than lines.
            while not (b'{"pid"' in output and output.endswith(b"}")):
                readable, _, _ = select.select([client.stdout], [], [], max(0.0, deadline - time.monotonic()))
                chunk = os.read(client.stdout.fileno(), 65536) if readable else b""
                assert chunk, output.decode()
                output += chunk
        finally:
            client.kill()
    lines = output.decode().splitlines()
    tickets = [line for line in lines if line.startswith("<<< TLS 1.3, Handshake") and "NewSessionTicket" in line]
    assert len(tickets) == 1, output.decode()


def test_no_session_id_for_a_tls12_client_that_refuses_tickets(server, pems):
    # With the server-side cache on (CPython's default) OpenSSL would give this client a 32-byte session ID
    # and keep the session in that one worker's cache; off, the ServerHello's session ID is empty.
    context = client_context(pems, maximum=ssl.TLSVersion.TLSv1_2)
    context.options |= ssl.OP_NO_TICKET
    first = exchange(server.port, context)
    assert first.version == "TLSv1.2"
    assert first.session.id == b""
    assert not first.session.has_ticket
    assert not exchange(server.port, context, session=first.session).reused


@pytest.mark.skipif(OPENSSL is None, reason="openssl command-line tool not installed")
def test_served_chain_is_the_certificate_files_even_with_its_issuer_trusted(pems):
    # A leaf-only file while the context's trust store holds its issuer (as a CA for client certificates
    # will): OpenSSL's automatic chain building would send that CA too, after running X509_verify_cert on
    # every full handshake.
    context = tls.build_server_context(tls_spec([pems.default]), SOURCE)
    context.load_verify_locations(pems.ca)
    with forked_server(context) as (port, _):
        done = s_client(port, "-showcerts", "-servername", "localhost")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("-----BEGIN CERTIFICATE-----") == 1, done.stdout


# ---------------------------------------------------------------------------------------------------------
# uvloop's ssl_handshake_timeout


def _client_hello(pems) -> bytes:
    return client_hello(client_context(pems), server_hostname="localhost")


@pytest.mark.parametrize("trickle", [False, True], ids=["idle", "trickled-hello"])
def test_handshake_timeout_is_a_total_deadline(pems, trickle):
    # uvloop arms one timer when the connection is accepted; bytes arriving do not push it back, so a
    # client trickling its ClientHello (slowloris) is cut off as surely as an idle one.
    hello = _client_hello(pems)
    context = tls.build_server_context(tls_spec([pems.default]), SOURCE)
    with forked_server(context, handshake_timeout=0.5) as (port, _):
        with socket.create_connection(("127.0.0.1", port), timeout=0.1) as raw:
            started = time.monotonic()
            sent = 0
            while time.monotonic() - started < 3:
                try:
                    if trickle and sent < len(hello) - 1:  # never the last byte: the hello stays incomplete
                        raw.send(hello[sent : sent + 1])
                        sent += 1
                    if raw.recv(1) == b"":
                        break
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    break
            elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 2, elapsed
    assert sent > 3 if trickle else sent == 0


# ---------------------------------------------------------------------------------------------------------
# Configuration errors


def _config_error(spec) -> str:
    with pytest.raises(ConfigError) as excinfo:
        tls.build_server_context(spec, SOURCE)
    message = str(excinfo.value)
    assert message.startswith(f"{SOURCE}: ") and "\n" not in message, message
    return message


def test_missing_certificate_file(pems, tmp_path):
    missing = str(tmp_path / "missing.pem")
    message = _config_error(tls_spec([pems.default, (missing, pems.default[1])]))
    assert "tls.certificates[1].cert" in message and missing in message


def test_unreadable_key_file(pems, tmp_path):
    # Tests may run as root, for whom no mode bit makes a file unreadable: a directory cannot be read either.
    message = _config_error(tls_spec([(pems.default[0], str(tmp_path))]))
    assert "tls.certificates[0].key" in message and str(tmp_path) in message


def test_not_a_pem_certificate(pems, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"this is not a certificate\n")
    message = _config_error(tls_spec([(str(garbage), pems.default[1])]))
    assert "tls.certificates[0].cert" in message and "not a PEM certificate" in message


def test_key_that_does_not_match(pems):
    message = _config_error(tls_spec([(pems.default[0], pems.wildcard[1])]))
    assert "tls.certificates[0].key" in message and "does not match" in message


def test_expired_certificate(pems, tmp_path):
    expired = write_certificate(
        str(tmp_path), "expired.example", ["expired.example"], days_from_now(-30), days_from_now(-1)
    )
    message = _config_error(tls_spec([pems.default, expired]))
    assert "tls.certificates[1].cert" in message and "expired" in message


def test_not_yet_valid_certificate(pems, tmp_path):
    future = write_certificate(
        str(tmp_path), "future.example", ["future.example"], days_from_now(1), days_from_now(30)
    )
    message = _config_error(tls_spec([future]))
    assert "tls.certificates[0].cert" in message and "not valid before" in message


def test_bad_cipher_string(pems):
    message = _config_error(tls_spec([pems.default], ciphers="NOT-A-CIPHER:ALSO-NOT"))
    assert "tls.ciphers" in message and "NOT-A-CIPHER" in message


def test_bad_min_version(pems):
    assert "tls.min_version" in _config_error(tls_spec([pems.default], min_version="1.1"))


def test_no_certificates():
    assert "tls.certificates" in _config_error(tls_spec([]))


# ---------------------------------------------------------------------------------------------------------
# In-memory handshakes: a client SSLObject and a server SSLObject (from build_server_context) over
# MemoryBIOs, as fastlb's TLS layer drives OpenSSL. Real OpenSSL on both sides, no sockets: what the
# server raises and the alert it queues are exactly what that layer gets.


def bio_handshake(server_context, client_context=None, *, raw=None, server_hostname="localhost", session=None):
    """Pumps bytes both ways until both ends finish or one fails.

    `raw`: bytes sent instead of a client's (then the EOF if `raw` ends with None). Returns the two
    SSLObjects, what the server raised (`error`), the bytes it queued after failing (`sent`) and, when a
    client took those bytes in, what the client raised (`client_error`, naming the alert it received).
    """
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    result = SimpleNamespace(server=server, client=None, error=None, sent=b"", client_error=None)
    if raw is not None:
        for chunk in raw:
            s_in.write_eof() if chunk is None else s_in.write(chunk)
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError) as exc:
            result.error = exc
        result.sent = s_out.read()
        return result
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(c_in, c_out, server_hostname=server_hostname, session=session)
    result.client = client
    client_done = server_done = False
    for _ in range(8):
        if not client_done and result.client_error is None:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as client_exc:  # the client refused us: its alert goes to the server
                result.client_error = client_exc
        s_in.write(c_out.read())
        try:
            server.do_handshake()
            server_done = True
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            result.error = exc
            result.sent = s_out.read()
            if result.client_error is None:
                c_in.write(result.sent)
                try:  # TLS 1.3: the client may have finished already; the alert comes with its next read
                    client.read(1) if client_done else client.do_handshake()
                except ssl.SSLError as client_exc:
                    result.client_error = client_exc
            return result
        c_in.write(s_out.read())
        if client_done and server_done:
            # Application data both ways: the client takes in the TLS 1.3 tickets sent after the handshake.
            client.write(b"?")
            s_in.write(c_out.read())
            assert server.read(1) == b"?"
            server.write(b"!")
            c_in.write(s_out.read())
            assert client.read(1) == b"!"
            return result
    raise AssertionError("handshake neither completed nor failed")


def plaintext_alert(sent: bytes) -> int | None:
    """The description of a TLS alert record (RFC 8446 section 6: type 21, then level, description)
    sent in the clear, or None (nothing sent, or encrypted as TLS 1.3 sends it after the ServerHello)."""
    if sent[:1] == b"\x15":
        assert sent[5] == 2, "a fatal alert"
        return sent[6]
    return None


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory):
    """A CA for client certificates, its leaves, a CRL revoking one of them, and a stranger's leaf."""
    directory = tmp_path_factory.mktemp("clients")
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(directory / "client-ca.pem"))
    revoked = authority.issue_cert("revoked.example")
    crl = _crl(authority, [revoked], next_update=days_from_now(1))
    (directory / "crl.pem").write_bytes(crl)
    return SimpleNamespace(
        directory=directory,
        authority=authority,
        ca=str(directory / "client-ca.pem"),
        crl=str(directory / "crl.pem"),
        good=authority.issue_cert("alice.example", "alice@example.com"),
        revoked=revoked,
        stranger=trustme.CA().issue_cert("mallory.example"),
        expired=authority.issue_cert("expired.example", not_before=days_from_now(-10), not_after=days_from_now(-1)),
        # Signed by the right CA, but its extendedKeyUsage allows serverAuth only.
        server_only=write_certificate(
            str(directory), "server-only", ["server-only.example"], days_from_now(-1), days_from_now(1), ca=authority
        ),
    )


def _crl(authority, revoked_leaves, next_update, last_update=None) -> bytes:
    key = serialization.load_pem_private_key(authority.private_key_pem.bytes(), password=None)
    issuer = x509.load_pem_x509_certificate(authority.cert_pem.bytes()).subject
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(last_update or days_from_now(-1))
        .next_update(next_update)
    )
    for leaf in revoked_leaves:
        serial = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).serial_number
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(days_from_now(-1)).build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def client_auth(client_pki, mode="require", crl=True):
    return SimpleNamespace(ca=client_pki.ca, mode=mode, crl=client_pki.crl if crl else "")


def with_certificate(context, leaf):
    if isinstance(leaf, tuple):  # (cert_path, key_path) from write_certificate
        context.load_cert_chain(*leaf)
    else:
        leaf.configure_cert(context)
    return context


# ---------------------------------------------------------------------------------------------------------
# Handshake failures: the reason, and the alert the server queued


TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
# alert descriptions (RFC 8446 section 6.2, RFC 5246 section 7.2) and the reason a client reports for each
PROTOCOL_VERSION, HANDSHAKE_FAILURE, UNSUPPORTED_CERTIFICATE, CERTIFICATE_REVOKED = 70, 40, 43, 44
CERTIFICATE_EXPIRED, UNKNOWN_CA = 45, 48
UNRECOGNIZED_NAME, CERTIFICATE_REQUIRED = 112, 116
CLIENT_SEES = {
    PROTOCOL_VERSION: "TLSV1_ALERT_PROTOCOL_VERSION",
    HANDSHAKE_FAILURE: "SSLV3_ALERT_HANDSHAKE_FAILURE",
    UNSUPPORTED_CERTIFICATE: "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
    CERTIFICATE_REVOKED: "SSLV3_ALERT_CERTIFICATE_REVOKED",
    CERTIFICATE_EXPIRED: "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    UNKNOWN_CA: "TLSV1_ALERT_UNKNOWN_CA",
    UNRECOGNIZED_NAME: "TLSV1_UNRECOGNIZED_NAME",
    CERTIFICATE_REQUIRED: "TLSV13_ALERT_CERTIFICATE_REQUIRED",
}


def _tls11(pems, client_pki):
    # OpenSSL 3 offers TLS 1.1 only at security level 0.
    return client_context(pems, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")


def _x448_only(pems, client_pki):
    context = client_context(pems)
    tls._set_groups(context, "X448", SOURCE)  # a group the server's list leaves out
    return context


FAILURES = [
    # (case, client, openssl reason, reason, alert, sent in the clear)
    ("tls1.1", _tls11, "UNSUPPORTED_PROTOCOL", "unsupported_version", PROTOCOL_VERSION, True),
    ("no-common-tls1.2-cipher",
     lambda pems, pki: client_context(pems, maximum=TLS12, ciphers="ECDHE-ECDSA-AES128-SHA"),
     "NO_SHARED_CIPHER", "no_shared_cipher", HANDSHAKE_FAILURE, True),
    ("no-common-group", _x448_only, "NO_SUITABLE_KEY_SHARE", "no_shared_cipher", HANDSHAKE_FAILURE, True),
    ("no-client-cert-tls1.3", lambda pems, pki: client_context(pems, minimum=TLS13),
     "PEER_DID_NOT_RETURN_A_CERTIFICATE", "bad_client_certificate", CERTIFICATE_REQUIRED, False),
    ("no-client-cert-tls1.2", lambda pems, pki: client_context(pems, maximum=TLS12),
     "PEER_DID_NOT_RETURN_A_CERTIFICATE", "bad_client_certificate", HANDSHAKE_FAILURE, True),
    ("unknown-ca-tls1.3", lambda pems, pki: with_certificate(client_context(pems, minimum=TLS13), pki.stranger),
     "CERTIFICATE_VERIFY_FAILED", "bad_client_certificate", UNKNOWN_CA, False),
    ("unknown-ca-tls1.2", lambda pems, pki: with_certificate(client_context(pems, maximum=TLS12), pki.stranger),
     "CERTIFICATE_VERIFY_FAILED", "bad_client_certificate", UNKNOWN_CA, True),
    ("revoked-tls1.3", lambda pems, pki: with_certificate(client_context(pems, minimum=TLS13), pki.revoked),
     "CERTIFICATE_VERIFY_FAILED", "bad_client_certificate", CERTIFICATE_REVOKED, False),
    ("revoked-tls1.2", lambda pems, pki: with_certificate(client_context(pems, maximum=TLS12), pki.revoked),
     "CERTIFICATE_VERIFY_FAILED", "bad_client_certificate", CERTIFICATE_REVOKED, True),
    ("expired-tls1.3", lambda pems, pki: with_certificate(client_context(pems, minimum=TLS13), pki.expired),
     "CERTIFICATE_VERIFY_FAILED", "bad_client_certificate", CERTIFICATE_EXPIRED, False),
    ("server-only-eku-tls1.2",
     lambda pems, pki: with_certificate(client_context(pems, maximum=TLS12), pki.server_only),
     "CERTIFICATE_VERIFY_FAILED", "bad_client_certificate", UNSUPPORTED_CERTIFICATE, True),
]


@pytest.fixture(scope="module")
def mtls_server_context(pems, client_pki):
    """Two certificates (so an SNI switch happens too), client certificates required, the CRL on."""
    return tls.build_server_context(tls_spec([pems.default, pems.rsa], client_auth=client_auth(client_pki)), SOURCE)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ssl.TLSVersion.TLSv1_1
@pytest.mark.parametrize("server_hostname", ["localhost", "rsa.example"])
@pytest.mark.parametrize(
    ("make_client", "openssl_reason", "reason", "alert", "clear"),
    [case[1:] for case in FAILURES],
    ids=[case[0] for case in FAILURES],
)
def test_handshake_failure_reason_and_alert(
    pems, client_pki, mtls_server_context, server_hostname, make_client, openssl_reason, reason, alert, clear
):
    done = bio_handshake(mtls_server_context, make_client(pems, client_pki), server_hostname=server_hostname)
    assert done.error is not None and done.error.reason == openssl_reason, done.error
    assert tls.handshake_failure_reason(done.error) == reason
    assert plaintext_alert(done.sent) == (alert if clear else None), done.sent[:8].hex()
    assert done.client_error is not None and done.client_error.reason == CLIENT_SEES[alert], done.client_error


@pytest.mark.parametrize("server_hostname", [None, "unknown.invalid", "wild.example", "a.b.wild.example"])
def test_strict_sni_refuses_unknown_and_missing_names_with_unrecognized_name(pems, server_hostname):
    for certificates in ([pems.default], [pems.default, pems.wildcard]):  # one certificate needs the callback too
        context = tls.build_server_context(tls_spec(certificates, strict_sni=True), SOURCE)
        done = bio_handshake(context, client_context(pems, check_hostname=False), server_hostname=server_hostname)
        assert done.error is not None and done.error.reason == "CALLBACK_FAILED", done.error
        assert tls.handshake_failure_reason(done.error) == "unknown_sni"
        assert plaintext_alert(done.sent) == UNRECOGNIZED_NAME
        assert done.client_error.reason == CLIENT_SEES[UNRECOGNIZED_NAME]
        # The control: the same client without strict_sni gets the default certificate.
        lenient = tls.build_server_context(tls_spec(certificates), SOURCE)
        assert bio_handshake(lenient, client_context(pems, check_hostname=False), server_hostname=server_hostname).error is None


@pytest.mark.parametrize(
    ("server_hostname", "names"),
    [("localhost", DEFAULT_NAMES[:2]), ("DEFAULT.example", DEFAULT_NAMES[:2]), ("a.wild.example", WILDCARD_NAMES),
     ("exact.wild.example", RSA_NAMES)],
)
def test_strict_sni_serves_every_configured_name(pems, server_hostname, names):
    context = tls.build_server_context(tls_spec([pems.default, pems.wildcard, pems.rsa], strict_sni=True), SOURCE)
    done = bio_handshake(context, client_context(pems), server_hostname=server_hostname)
    assert done.error is None, done.error
    assert dns_names(done.client.getpeercert(binary_form=True)) == names


@pytest.mark.parametrize(
    ("raw", "openssl_reason", "reason"),
    [
        ([b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"], "HTTP_REQUEST", "not_tls"),
        ([b"POST /x HTTP/1.1\r\n"], "HTTP_REQUEST", "not_tls"),
        ([b"CONNECT a:443 HTTP/1.1\r\n\r\n"], "HTTPS_PROXY_REQUEST", "not_tls"),
        ([b"SSH-2.0-OpenSSH_9.2\r\n"], "WRONG_VERSION_NUMBER", "not_tls"),
        ([b"\x16\x03\x01\x00", None], "UNEXPECTED_EOF_WHILE_READING", "reset"),  # closed mid-hello
        ([None], "UNEXPECTED_EOF_WHILE_READING", "reset"),
        ([b"\x16\x03\x01\xff\xff" + bytes(64)], "PACKET_LENGTH_TOO_LONG", "other"),  # a record over 2^14 + 2048
    ],
    ids=["http", "http-post", "connect", "ssh", "eof-mid-hello", "eof", "oversized-record"],
)
def test_bytes_that_are_not_a_handshake(pems, raw, openssl_reason, reason):
    context = tls.build_server_context(tls_spec([pems.default]), SOURCE)
    done = bio_handshake(context, raw=raw)
    assert done.error is not None and done.error.reason == openssl_reason, done.error
    assert tls.handshake_failure_reason(done.error) == reason
    if reason == "not_tls":
        assert done.sent == b""  # no alert: the peer speaks something else; the caller answers in kind


def test_failure_reasons_outside_openssl(pems):
    assert tls.handshake_failure_reason(ConnectionResetError(104, "Connection reset by peer")) == "reset"
    assert tls.handshake_failure_reason(BrokenPipeError(32, "Broken pipe")) == "reset"
    assert tls.handshake_failure_reason(ValueError("anything else")) == "other"
    # A client that refuses *our* certificate: its alert, not a failure of this server's policy.
    other_ca = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    other_ca.load_verify_locations(cadata=trustme.CA().cert_pem.bytes().decode())
    done = bio_handshake(tls.build_server_context(tls_spec([pems.default]), SOURCE), other_ca)
    assert done.error.reason == "TLSV1_ALERT_UNKNOWN_CA"
    assert tls.handshake_failure_reason(done.error) == "other"
    assert set(tls.HANDSHAKE_FAILURE_REASONS) == {
        "unsupported_version", "no_shared_cipher", "unknown_sni", "bad_client_certificate", "not_tls", "reset", "other",
    }


# ---------------------------------------------------------------------------------------------------------
# Client certificates


@pytest.mark.parametrize("version", [TLS12, TLS13])
@pytest.mark.parametrize("server_hostname", ["localhost", "rsa.example"])
def test_verified_client_certificate_on_every_sni_context(pems, client_pki, mtls_server_context, version, server_hostname):
    context = with_certificate(client_context(pems, minimum=version, maximum=version), client_pki.good)
    done = bio_handshake(mtls_server_context, context, server_hostname=server_hostname)
    assert done.error is None, done.error
    peer = done.server.getpeercert(binary_form=True)
    assert peer == x509.load_pem_x509_certificate(client_pki.good.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert dns_names(done.client.getpeercert(binary_form=True)) == (
        DEFAULT_NAMES[:2] if server_hostname == "localhost" else RSA_NAMES
    )
    # The session resumes, with the client's certificate still attached for X-Forwarded-Client-Cert.
    again = bio_handshake(mtls_server_context, context, server_hostname=server_hostname, session=done.client.session)
    assert again.error is None and again.server.session_reused
    assert again.server.getpeercert(binary_form=True) == peer


def test_optional_client_certificate(pems, client_pki):
    context = tls.build_server_context(
        tls_spec([pems.default], client_auth=client_auth(client_pki, mode="optional")), SOURCE
    )
    assert context.verify_mode == ssl.CERT_OPTIONAL
    without = bio_handshake(context, client_context(pems))
    assert without.error is None and without.server.getpeercert(binary_form=True) is None
    verified = bio_handshake(context, with_certificate(client_context(pems), client_pki.good))
    assert verified.error is None and verified.server.getpeercert(binary_form=True) is not None
    # A certificate sent must verify, optional or not.
    for leaf in (client_pki.stranger, client_pki.revoked):
        refused = bio_handshake(context, with_certificate(client_context(pems), leaf))
        assert tls.handshake_failure_reason(refused.error) == "bad_client_certificate"


@pytest.mark.parametrize("server_hostname", ["localhost", "rsa.example"])
def test_certificate_request_names_the_client_cas(pems, client_pki, mtls_server_context, server_hostname):
    # TLS 1.2 sends the CertificateRequest in the clear: its certificate_authorities list is in the
    # server's first flight. The stdlib alone (load_verify_locations, the control) sends an empty list.
    subject = x509.load_pem_x509_certificate(client_pki.authority.cert_pem.bytes()).subject.public_bytes()

    def first_flight(context):
        s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        server = context.wrap_bio(s_in, s_out, server_side=True)
        s_in.write(client_hello(client_context(pems, maximum=TLS12), server_hostname=server_hostname))
        with pytest.raises(ssl.SSLWantReadError):
            server.do_handshake()
        return s_out.read()

    assert subject in first_flight(mtls_server_context)
    control = tls.build_server_context(tls_spec([pems.default]), SOURCE)
    control.verify_mode = ssl.CERT_REQUIRED
    control.load_verify_locations(client_pki.ca)
    assert subject not in first_flight(control)


def _reloaded(running, spec):
    """A new generation's default context with the running one's ticket keys, as the master reloads."""
    new = tls.build_server_context(spec, SOURCE)
    assert tls.carry_ticket_keys(running, new)
    return new


@pytest.mark.parametrize("version", [TLS12, TLS13])
def test_a_policy_change_on_reload_never_resumes_an_older_session(pems, client_pki, version):
    plain = tls.build_server_context(tls_spec([pems.default]), SOURCE)
    anonymous = client_context(pems, minimum=version, maximum=version)
    first = bio_handshake(plain, anonymous)
    # require turned on: the ticket of a client that never showed a certificate must not resume.
    required = _reloaded(plain, tls_spec([pems.default], client_auth=client_auth(client_pki, crl=False)))
    refused = bio_handshake(required, anonymous, session=first.client.session)
    assert tls.handshake_failure_reason(refused.error) == "bad_client_certificate"
    # The control: with CPython's one session ID context for all ("Python"), that ticket resumes.
    python = b"Python\x00"
    tls._libssl.set_session_id_context(tls._ssl_ctx_pointer(required), python, len(python))
    resumed = bio_handshake(required, anonymous, session=first.client.session)
    assert resumed.error is None and resumed.server.session_reused
    assert resumed.server.getpeercert(binary_form=True) is None

    # A CRL revoking a client that holds a ticket: it must verify again, and fail.
    revoked = with_certificate(client_context(pems, minimum=version, maximum=version), client_pki.revoked)
    before = _reloaded(plain, tls_spec([pems.default], client_auth=client_auth(client_pki, crl=False)))
    held = bio_handshake(before, revoked)
    assert held.error is None
    after = _reloaded(before, tls_spec([pems.default], client_auth=client_auth(client_pki)))
    assert tls.handshake_failure_reason(bio_handshake(after, revoked, session=held.client.session).error) == (
        "bad_client_certificate"
    )
    # The same policy again: sessions resume across the reload, as without client certificates.
    good = with_certificate(client_context(pems, minimum=version, maximum=version), client_pki.good)
    issued = bio_handshake(after, good)
    same = _reloaded(after, tls_spec([pems.default], client_auth=client_auth(client_pki)))
    assert bio_handshake(same, good, session=issued.client.session).server.session_reused


def test_client_auth_file_errors(pems, client_pki, tmp_path):
    def error(**changes):
        auth = SimpleNamespace(**{**vars(client_auth(client_pki)), **changes})
        message = _config_error(tls_spec([pems.default], client_auth=auth))
        return message[len(SOURCE) + 2 :]

    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not PEM\n")
    assert error(ca=str(garbage)).startswith("tls.client_auth.ca: not a PEM certificate")
    assert error(crl=str(garbage)).startswith("tls.client_auth.crl: not a PEM CRL")
    broken = tmp_path / "broken.pem"
    broken.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
    assert error(crl=str(broken)).startswith("tls.client_auth.crl: not a valid PEM CRL")
    stranger = tmp_path / "stranger-crl.pem"
    stranger.write_bytes(_crl(trustme.CA(), [], next_update=days_from_now(1)))
    assert error(crl=str(stranger)).startswith("tls.client_auth.crl: the CRL of ") and "signed by no certificate" in (
        error(crl=str(stranger))
    )
    stale = tmp_path / "stale-crl.pem"
    stale.write_bytes(_crl(client_pki.authority, [], next_update=days_from_now(-1), last_update=days_from_now(-8)))
    assert "expired on" in error(crl=str(stale)).partition(": ")[2]
    assert error(mode="sometimes").startswith("tls.client_auth.mode: ")


# ---------------------------------------------------------------------------------------------------------
# X-Forwarded-Client-Cert


def _parse_xfcc(value: bytes) -> list[tuple[str, str]]:
    """Envoy's reading of one XFCC element: `;` and `=` outside double quotes separate, a quote after a
    backslash does not end a quoted value (source/extensions/formatter/xfcc_value)."""
    text = value.decode("ascii")
    pairs, start, quoted = [], 0, False
    for i, char in enumerate(text + ";"):
        if char == '"' and (i == 0 or text[i - 1] != "\\"):
            quoted = not quoted
        elif char in ",;" and not quoted:
            assert char == ";", "one element: no comma outside quotes"
            key, _, val = text[start:i].partition("=")
            pairs.append((key, val[1:-1] if val.startswith('"') else val))
            start = i + 1
    assert not quoted
    return pairs


def test_xfcc_of_a_trustme_client_certificate(client_pki):
    der = x509.load_pem_x509_certificate(client_pki.good.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER
    )
    value = certs.xfcc(der)
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    assert value == f'Hash={hashlib.sha256(der).hexdigest()};Subject="{subject}";URI=;DNS=alice.example'.encode()
    assert _parse_xfcc(value) == [
        ("Hash", hashlib.sha256(der).hexdigest()), ("Subject", subject), ("URI", ""), ("DNS", "alice.example")
    ]


def test_xfcc_quotes_and_escapes_what_a_certificate_may_carry(client_pki):
    # Everything a CA might sign that could split the header or forge a pair: separators, quotes,
    # backslashes, a CR LF, non-ASCII, an e-mail attribute.
    authority = client_pki.authority
    ca_key = serialization.load_pem_private_key(authority.private_key_pem.bytes(), password=None)
    ca_name = x509.load_pem_x509_certificate(authority.cert_pem.bytes()).subject
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(x509.NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, 'Müller, "Söhne"; a=b \\ c'),
        x509.NameAttribute(x509.NameOID.EMAIL_ADDRESS, "ops@example.com"),
        x509.NameAttribute(x509.NameOID.COMMON_NAME, "line\r\nX-Injected: 1"),
    ])
    uris = ["spiffe://example.org/ns/a/sa/b", "https://example.org/x?a=1;b=2", 'urn:x:"quoted"\\ \r\nX: 1']
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(days_from_now(-1))
        .not_valid_after(days_from_now(1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri) for uri in uris]
                + [x509.DNSName("a.example"), x509.DNSName("b.example")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    value = certs.xfcc(der)
    assert all(0x20 <= byte < 0x7F for byte in value), value  # one header line, ASCII
    pairs = _parse_xfcc(value)
    assert [key for key, _ in pairs] == ["Hash", "Subject", "URI", "URI", "URI", "DNS", "DNS"]
    dn = dict(pairs)["Subject"]
    assert '"' not in dn and "\\\\" not in dn
    assert dn.startswith("CN=line\\0D\\0AX-Injected: 1,emailAddress=ops@example.com,O=M\\C3\\BCller\\, \\22S")
    # Still RFC 4514: the same attributes when parsed back, \XX pairs being UTF-8 bytes (section 2.4).
    # (cryptography's own parser reads them as Latin-1 before version 47, so the test reads them itself.)
    assert _rfc4514_attributes(dn) == [
        ("CN", "line\r\nX-Injected: 1"), ("emailAddress", "ops@example.com"),
        ("O", 'Müller, "Söhne"; a=b \\ c'), ("C", "DE"),
    ]
    assert [v for k, v in pairs if k == "URI"] == [
        "spiffe://example.org/ns/a/sa/b",
        "https://example.org/x?a=1;b=2",  # quoted on the wire, for its ; and =
        "urn:x:%22quoted%22%5C%20%0D%0AX:%201",
    ]
    assert b'URI="https://example.org/x?a=1;b=2"' in value
    assert [v for k, v in pairs if k == "DNS"] == ["a.example", "b.example"]


def _rfc4514_attributes(dn: str) -> list[tuple[str, str]]:
    """(type, value) of each attribute of an RFC 4514 string without multi-valued RDNs."""
    attributes, raw, i = [], bytearray(), 0
    while i <= len(dn):
        char = dn[i] if i < len(dn) else ","
        if char == "\\":
            pair = dn[i + 1:i + 3]
            if len(pair) == 2 and all(c in "0123456789ABCDEFabcdef" for c in pair):
                raw.append(int(pair, 16))
                i += 3
                continue
            raw += dn[i + 1].encode()
            i += 2
            continue
        if char == ",":
            kind, _, value = raw.decode("utf-8").partition("=")
            attributes.append((kind, value))
            raw = bytearray()
        else:
            raw += char.encode()
        i += 1
    return attributes


def test_xfcc_of_a_certificate_cryptography_cannot_fully_read(client_pki):
    der = x509.load_pem_x509_certificate(client_pki.good.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER
    )
    # The DNS name's length one byte too long: the subjectAltName no longer parses; the subject still does.
    at = der.index(b"\x82\x0dalice.example")
    broken_san = der[: at + 1] + b"\x0e" + der[at + 2 :]
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    assert certs.xfcc(broken_san) == f'Hash={hashlib.sha256(broken_san).hexdigest()};Subject="{subject}";URI='.encode()
    garbage = b"\x30\x03not"
    assert certs.xfcc(garbage) == f'Hash={hashlib.sha256(garbage).hexdigest()};Subject="";URI='.encode()


# ---------------------------------------------------------------------------------------------------------
# Facts


def test_certificate_facts(pems):
    facts = tls.certificate_facts(tls_spec([pems.default, pems.wildcard, pems.rsa]))
    assert [name for name, _ in facts] == ["localhost", "*.wild.example", "rsa.example"]
    in_90_days = time.time() + 90 * 86400
    assert all(abs(not_after - in_90_days) < 2 * 86400 for _, not_after in facts)


# ---------------------------------------------------------------------------------------------------------
# Demo certificate


def test_demo_certificate_is_generated_once_and_served(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cert_path, key_path, fingerprint = certs.ensure_demo_certificate()
    assert os.path.dirname(cert_path) == str(tmp_path / "fastlb")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600

    with open(cert_path, "rb") as f:
        certificate = x509.load_pem_x509_certificate(f.read())
    digest = certificate.fingerprint(hashes.SHA256()).hex().upper()
    assert fingerprint == ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
    assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
    assert certificate.public_key().curve.name == "secp256r1"
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=365)

    mtime = os.stat(cert_path).st_mtime_ns
    assert certs.ensure_demo_certificate() == (cert_path, key_path, fingerprint)
    assert os.stat(cert_path).st_mtime_ns == mtime

    # And it serves: a client that trusts exactly this certificate connects to "localhost".
    context = tls.build_server_context(tls_spec([(cert_path, key_path)]), SOURCE)
    with forked_server(context) as (port, _):
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.load_verify_locations(cert_path)
        assert exchange(port, client, "localhost").version == "TLSv1.3"


def test_demo_certificate_is_replaced_near_expiry(tmp_path):
    old_cert, old_key = write_certificate(
        str(tmp_path), "old", ["localhost"], days_from_now(-360), days_from_now(3)
    )
    os.replace(old_cert, tmp_path / certs.DEMO_CERT_FILE)
    os.replace(old_key, tmp_path / certs.DEMO_KEY_FILE)
    cert_path, _, fingerprint = certs.ensure_demo_certificate(str(tmp_path))
    with open(cert_path, "rb") as f:
        certificate = x509.load_pem_x509_certificate(f.read())
    assert certificate.not_valid_after_utc > days_from_now(364)
    assert certs.ensure_demo_certificate(str(tmp_path))[2] == fingerprint


# ---------------------------------------------------------------------------------------------------------
# sslyze: a test dependency (for the pyproject [test] extra); deliberately no skip when it is missing.


def test_sslyze_mozilla_intermediate_compliance(server, pems):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sslyze",
            f"localhost:{server.port}{{127.0.0.1}}",
            "--mozilla_config=intermediate",
            "--certinfo_ca_file",
            pems.ca,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"localhost:{server.port}: OK - Compliant." in done.stdout, done.stdout
