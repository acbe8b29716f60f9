"""TLS through the real server: `fastlb serve` with a TLS listener, real backends, real clients.

Every test starts the real master (tests/conftest.py) from a TOML config and talks to it with `curl`,
`openssl s_client`, the stdlib `ssl` module or `python -m sslyze`; the backends (tests/backend.py) log every
request they receive, which is how the X-Forwarded-* headers are checked. tests/test_tls_context.py covers
fastlb.net.tls in isolation; here the question is whether the running server keeps those promises:
contexts built by the master, shared by forked workers, reloaded on SIGHUP.

Certificates come from tests/tlsutil.py (leaves signed by a trustme CA), made once per module.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
from conftest import FastLB, free_port
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tlsutil import (
    DEFAULT_NAMES,
    RSA_NAMES,
    WILDCARD_NAMES,
    client_context,
    client_hello,
    days_from_now,
    dns_names,
    fingerprint,
    load_certificate,
    make_pems,
    s_client,
    write_certificate,
)

CURL = "curl"


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    return make_pems(tmp_path_factory.mktemp("pems"))


# ---------------------------------------------------------------------------------------------------------
# Starting fastlb with a TLS listener


def write_config(path, *, tls_address, plain_port, certificates, servers, tls=None, redirect=False):
    """A TOML config: a TLS listener first, then a plain one, one backend with a catch-all route."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = ["[[listeners]]", f"address = {q(tls_address)}", "tls = true", ""]
    lines += ["[[listeners]]", f"address = {q(f'127.0.0.1:{plain_port}')}"]
    if redirect:
        lines.append("redirect_to_https = true")
    lines += ["", "[tls]"] + [f"{key} = {q(value)}" for key, value in (tls or {}).items()]
    for cert, key in certificates:
        lines += ["", "[[tls.certificates]]", f"cert = {q(str(cert))}", f"key = {q(str(key))}"]
    lines += ["", "[backends.app]", f"servers = {q(servers)}", "", "[[routes]]", 'backend = "app"', ""]
    path.write_text("\n".join(lines))
    return path


def serve(fastlb, tmp_path, certificates, backend, *, tls=None, redirect=False, tls_host="127.0.0.1",
          tls_port=None, env=None):
    """`fastlb serve --config` with a TLS listener on tls_host:tls_port and a plain one on lb.port."""
    tls_port = tls_port or free_port()
    plain_port = free_port()
    config = write_config(
        tmp_path / f"fastlb-{tls_port}.toml", tls_address=f"{tls_host}:{tls_port}", plain_port=plain_port,
        certificates=certificates, servers=[backend.address], tls=tls, redirect=redirect,
    )
    lb = fastlb({"FASTLB_LISTEN": f"127.0.0.1:{plain_port}", **(env or {})}, ["--config", str(config)])
    lb.tls_port = tls_port
    lb.config = config
    return lb


# ---------------------------------------------------------------------------------------------------------
# Clients


def https(port, context, path="/", server_hostname="localhost", *, session=None, inspect=None):
    """One new TLS connection, one keep-alive GET; the response and the client's view of the handshake.

    `inspect(local_port)` runs while the connection is still open (to find the worker serving it).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        # As curl, browsers and http.client do (a client with Nagle on: see test_a_client_with_nagle_on_...).
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname=server_hostname, session=session) as conn:
            host = server_hostname or "127.0.0.1"
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            # TLS 1.3 tickets arrive after the handshake: reading the response processes them, so only now
            # does conn.session hold a resumable session.
            response = http.client.HTTPResponse(conn, method="GET")
            response.begin()
            body = response.read()
            der = conn.getpeercert(binary_form=True)
            return SimpleNamespace(
                status=response.status,
                http_version=response.version,
                headers=response.headers,
                body=body,
                der=der,
                names=dns_names(der),
                key=x509.load_der_x509_certificate(der).public_key(),
                serial=x509.load_der_x509_certificate(der).serial_number,
                version=conn.version(),
                session=conn.session,
                reused=conn.session_reused,
                alpn=conn.selected_alpn_protocol(),
                worker=inspect(conn.getsockname()[1]) if inspect else None,
            )


def record_header(record, name):
    """The one value of header `name` in a backend log record."""
    values = [value for key, value in record["headers"] if key.lower() == name.lower()]
    assert len(values) == 1, (name, record["headers"])
    return values[0]


def records_for(backend, target):
    return [r for r in backend.records() if r["target"] == target]


def raw_exchange(port, payload=b"", *, split=None, timeout=4.0):
    """Connect, send `payload`, and read until the server closes or `timeout` passes.

    Returns (bytes received, seconds from connect to the server's close, or None if it never closed).
    A reset counts as a close.
    """
    started = time.monotonic()
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if payload:
            sock.sendall(payload)
        while True:
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                return received, None
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, None
            except ConnectionResetError:
                return received, time.monotonic() - started
            if not chunk:
                return received, time.monotonic() - started
            received += chunk


def assert_refused_hello(port, hello, what, alert=True):
    """The server answers `hello` (bytes a client really sent) with a fatal alert and no ServerHello, or
    (alert=False: bytes that are not TLS at all) with a bare close, and closes the connection."""
    reply, closed_after = raw_exchange(port, hello)
    assert closed_after is not None, f"{what}: the server kept the connection open, got {reply[:16]!r}"
    assert closed_after < 2.5, f"{what}: closed only after {closed_after:.2f}s"
    if alert:
        # One alert record (21), TLS 1.0-1.2 framing, 2 bytes: level fatal (2), then the description.
        assert reply[:1] == b"\x15" and reply[3:5] == b"\x00\x02" and reply[5:6] == b"\x02", \
            f"{what}: got {reply[:16]!r}"
    else:
        assert reply == b"", f"{what}: got {reply[:16]!r}"


def assert_refused(port, context, what, server_hostname="localhost"):
    """A real client handshake with `context` fails because of the server (the client did offer)."""
    assert_refused_hello(port, client_hello(context, server_hostname), what)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)) as excinfo:
            with context.wrap_socket(raw, server_hostname=server_hostname) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                conn.recv(1)
    error = excinfo.value
    reason = getattr(error, "reason", None) or ""
    assert isinstance(error, ConnectionResetError | ssl.SSLEOFError) or "ALERT" in reason, (what, error)


def served_by(lb, tls_port):
    """inspect= for https(): the pid of the worker holding the server side of a client's connection."""

    def find(client_port):
        for pid in lb.worker_pids():
            try:
                connections = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.NoSuchProcess:
                continue
            for c in connections:
                if c.laddr and c.laddr.port == tls_port and c.raddr and c.raddr.port == client_port:
                    return pid
        return None

    return find


def curl(*args):
    return subprocess.run([CURL, "-sS", *args], capture_output=True, text=True, timeout=15)


# ---------------------------------------------------------------------------------------------------------
# 1. HTTPS end to end


def test_https_end_to_end_with_curl_and_python_ssl(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default], backend)
    port = lb.tls_port

    done = curl("--cacert", pems.ca, "--resolve", f"localhost:{port}:127.0.0.1",
                "-w", "\n%{http_code}", f"https://localhost:{port}/x?via=curl")
    assert done.returncode == 0, done.stderr
    body, _, code = done.stdout.rpartition("\n")
    assert code == "200"
    assert json.loads(body)["target"] == "/x?via=curl"

    result = https(port, client_context(pems), "/x?via=python")
    assert result.status == 200 and result.headers["X-Backend"] == "b1"
    assert result.version == "TLSv1.3"
    assert json.loads(result.body)["target"] == "/x?via=python"

    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", "/x?via=plain")
    assert conn.getresponse().status == 200
    conn.close()

    for target in ("/x?via=curl", "/x?via=python"):
        (record,) = records_for(backend, target)
        assert record_header(record, "X-Forwarded-Proto") == "https", record
        assert record_header(record, "X-Forwarded-Port") == str(port), record
    (record,) = records_for(backend, "/x?via=plain")
    assert record_header(record, "X-Forwarded-Proto") == "http", record
    assert record_header(record, "X-Forwarded-Port") == str(lb.port), record


# ---------------------------------------------------------------------------------------------------------
# 2. Policy: sslyze's Mozilla intermediate check, min_version 1.3


def test_sslyze_reports_mozilla_intermediate_compliance(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default, pems.rsa], backend)
    # Both certificates: the ECDSA default, and the RSA one by SNI (RSA key exchange suites such as
    # AES128-SHA could only ever be negotiated with an RSA certificate).
    targets = [f"localhost:{lb.tls_port}", f"rsa.example:{lb.tls_port}"]
    done = subprocess.run(
        [sys.executable, "-m", "sslyze", *(f"{t}{{127.0.0.1}}" for t in targets),
         "--mozilla_config=intermediate", "--certinfo_ca_file", pems.ca],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for target in targets:
        assert f"{target}: OK - Compliant." in done.stdout, done.stdout


def test_min_version_13_refuses_a_tls12_client(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default], backend, tls={"min_version": "1.3"})
    assert_refused(lb.tls_port, client_context(pems, maximum=ssl.TLSVersion.TLSv1_2), "TLS 1.2 client")
    done = s_client(lb.tls_port, "-tls1_2", "-servername", "localhost", "-msg")
    assert ">>> TLS 1.2, Handshake" in done.stdout and "ClientHello" in done.stdout, done.stdout
    assert "ServerHello" not in done.stdout and "Cipher is (NONE)" in done.stdout, done.stdout
    ok = https(lb.tls_port, client_context(pems), "/modern")
    assert (ok.status, ok.version) == (200, "TLSv1.3")


# ---------------------------------------------------------------------------------------------------------
# 3. SNI


def test_sni_selects_the_certificate(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    # ECDSA default, ECDSA wildcard, RSA with exact names (one of them under the wildcard).
    lb = serve(fastlb, tmp_path, [pems.default, pems.wildcard, pems.rsa], backend)
    port = lb.tls_port
    lenient = client_context(pems, check_hostname=False)
    cases = [
        ("localhost", DEFAULT_NAMES[:2], ec.EllipticCurvePublicKey),
        ("rsa.example", RSA_NAMES, rsa.RSAPublicKey),
        ("RSA.Example", RSA_NAMES, rsa.RSAPublicKey),
        ("a.wild.example", WILDCARD_NAMES, ec.EllipticCurvePublicKey),
        ("exact.wild.example", RSA_NAMES, rsa.RSAPublicKey),  # exact beats the wildcard listed before it
        ("a.b.wild.example", DEFAULT_NAMES[:2], ec.EllipticCurvePublicKey),  # one label only
        ("unknown.invalid", DEFAULT_NAMES[:2], ec.EllipticCurvePublicKey),
        (None, DEFAULT_NAMES[:2], ec.EllipticCurvePublicKey),  # no SNI at all
    ]
    for server_hostname, names, key_type in cases:
        result = https(port, lenient, "/sni", server_hostname)
        assert result.status == 200, server_hostname
        assert (result.names, isinstance(result.key, key_type)) == (names, True), server_hostname

    # And with hostname verification, by curl (its own SNI and checks).
    for name in ("rsa.example", "a.wild.example", "localhost"):
        done = curl("--cacert", pems.ca, "--resolve", f"{name}:{port}:127.0.0.1", "-o", "/dev/null",
                    "-w", "%{http_code}", f"https://{name}:{port}/sni")
        assert (done.returncode, done.stdout) == (0, "200"), (name, done.stderr)


# ---------------------------------------------------------------------------------------------------------
# 4. Session resumption across workers


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLSv1.3", "TLSv1.2"])
def test_session_resumption_across_workers(fastlb, backends, tmp_path, pems, version):
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default, pems.wildcard], backend, env={"FASTLB_WORKERS": "2"})
    port = lb.tls_port
    which = served_by(lb, port)
    context = client_context(pems, minimum=version, maximum=version)
    first = https(port, context, "/resume/first", inspect=which)
    assert first.status == 200 and not first.reused and first.session is not None
    workers = {first.worker}
    for i in range(20):
        result = https(port, context, f"/resume/{i}", session=first.session, inspect=which)
        assert result.status == 200
        assert result.reused, f"connection {i} (worker {result.worker}) did a full handshake"
        assert result.version == version.name.replace("_", ".")
        workers.add(result.worker)
    # SO_REUSEPORT hashes each new source port: 21 connections all on one of two workers is a 1-in-a-million.
    assert None not in workers and len(workers) == 2, workers

    if version is ssl.TLSVersion.TLSv1_3:
        session_file = tmp_path / "openssl.session"
        request = "GET /resume/openssl HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        # -ign_eof: read until fastlb closes, so the tickets that follow the handshake are saved.
        common = ("-servername", "localhost", "-CAfile", pems.ca, "-ign_eof")
        out = s_client(port, *common, "-sess_out", str(session_file), input=request)
        assert "New, TLSv1.3" in out.stdout and "HTTP/1.1 200 OK" in out.stdout, out.stdout + out.stderr
        for _ in range(3):
            again = s_client(port, *common, "-sess_in", str(session_file), input=request)
            assert "Reused, TLSv1.3" in again.stdout, again.stdout + again.stderr
            assert "HTTP/1.1 200 OK" in again.stdout


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLSv1.3", "TLSv1.2"])
def test_a_client_with_nagle_on_is_not_held_behind_its_finished(fastlb, backends, tmp_path, pems, version):
    """A client that keeps Nagle's algorithm on (no TCP_NODELAY) writes its request after its Finished, and
    holds it until that Finished is ACKed.  When fastlb sends nothing after the client's Finished (a TLS 1.3
    ticket waiting for the response, a TLS 1.2 resumption) the kernel would delay that ACK by 40 ms or more;
    fastlb ACKs it at once.  Full handshakes and resumed ones, median of 7."""
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default], backend)
    context = client_context(pems, minimum=version, maximum=version)
    session, took = None, []
    for i in range(7):
        with socket.create_connection(("127.0.0.1", lb.tls_port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost", session=session) as conn:
                start = time.monotonic()
                conn.sendall(b"GET /nagle HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                took.append(time.monotonic() - start)
                assert data.startswith(b"HTTP/1.1 200 "), data[:200]
                assert conn.session_reused == (i > 0)
                session = conn.session
    assert sorted(took)[3] < 0.025, took


# ---------------------------------------------------------------------------------------------------------
# 5. ALPN


def test_alpn_h2_only_client_gets_http11_and_http11_is_selected(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default, pems.rsa], backend)
    port = lb.tls_port
    for server_hostname in ("localhost", "rsa.example"):  # the default context and one switched to by SNI
        h2_only = https(port, client_context(pems, alpn=["h2"]), "/alpn", server_hostname)
        assert (h2_only.alpn, h2_only.status, h2_only.http_version) == (None, 200, 11), server_hostname
        both = https(port, client_context(pems, alpn=["h2", "http/1.1"]), "/alpn", server_hostname)
        assert (both.alpn, both.status, both.http_version) == ("http/1.1", 200, 11), server_hostname
        only11 = https(port, client_context(pems, alpn=["http/1.1"]), "/alpn", server_hostname)
        assert only11.alpn == "http/1.1"

    done = curl("--http2", "--cacert", pems.ca, "--resolve", f"localhost:{port}:127.0.0.1", "-o", "/dev/null",
                "-w", "%{http_code} %{http_version}", f"https://localhost:{port}/alpn")
    assert (done.returncode, done.stdout) == (0, "200 1.1"), done.stderr


# ---------------------------------------------------------------------------------------------------------
# 6. Handshake timeout


def test_handshake_timeout_closes_idle_and_stalled_clients(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default], backend, tls={"handshake_timeout": "1s"})
    hello = client_hello(client_context(pems))
    results = {}

    def run(name, payload):
        results[name] = raw_exchange(lb.tls_port, payload, timeout=5.0)

    threads = [
        threading.Thread(target=run, args=("idle", b"")),
        threading.Thread(target=run, args=("half hello", hello[: len(hello) // 2])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (reply, closed_after) in results.items():
        assert closed_after is not None, f"{name}: still open after 5s"
        assert 0.9 <= closed_after <= 2.5, f"{name}: closed after {closed_after:.2f}s"
        assert reply == b"" or reply[:1] == b"\x15", (name, reply[:16])
    # The deadline is the handshake's only: a prompt client is served.
    assert https(lb.tls_port, client_context(pems), "/after").status == 200


# ---------------------------------------------------------------------------------------------------------
# 7. Bad input on the TLS port, while good clients keep being served


class GoodClients(threading.Thread):
    """New HTTPS connections, one request each, back to back until stopped; every failure recorded."""

    def __init__(self, port, pems):
        super().__init__(daemon=True)
        self.port = port
        self.context = client_context(pems)
        self.stopping = threading.Event()
        self.ok = 0
        self.failures = []

    def run(self):
        n = 0
        while not self.stopping.is_set():
            n += 1
            try:
                result = https(self.port, self.context, f"/good/{n}")
                if result.status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"/good/{n}: {result.status}")
            except Exception as exc:  # any failure is the finding
                self.failures.append(f"/good/{n}: {exc!r}")

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.join(10)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_bad_input_is_refused_while_good_clients_are_served(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default, pems.rsa], backend, tls={"handshake_timeout": "1s"})
    port = lb.tls_port
    master = lb.proc.pid
    before = sorted(lb.worker_pids())
    hello = client_hello(client_context(pems))

    with GoodClients(port, pems) as good:
        # Plain HTTP spoken to the TLS port gets nginx's plain-HTTP 400; garbage, a bare close.
        reply, closed_after = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400 ") and closed_after is not None, reply
        assert_refused_hello(port, random.Random(1).randbytes(4096), "4 KiB of garbage", alert=False)

        # A truncated ClientHello, then a close (FIN), and then a reset.
        for linger in (False, True):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(hello[: len(hello) // 2])
                if linger:
                    # SO_LINGER with a zero timeout: close() sends a reset.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        # A client that stops mid-handshake: the ServerHello comes, then the handshake timeout ends it.
        reply, closed_after = raw_exchange(port, hello, timeout=5.0)
        assert reply[:1] == b"\x16", reply[:16]  # a handshake record: the server did answer the hello
        assert closed_after is not None and closed_after < 2.5, closed_after

        # TLS 1.0 and 1.1 only clients (SECLEVEL=0: OpenSSL 3 clients would not even offer them otherwise).
        for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
            old = client_context(pems, minimum=version, maximum=version, ciphers="DEFAULT:@SECLEVEL=0")
            assert_refused(port, old, version.name)
        for flag, label in (("-tls1", "TLS 1.0"), ("-tls1_1", "TLS 1.1")):
            done = s_client(port, flag, "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "localhost", "-msg")
            assert f">>> {label}, Handshake" in done.stdout and "ClientHello" in done.stdout, done.stdout
            assert "ServerHello" not in done.stdout and "Cipher is (NONE)" in done.stdout, done.stdout

        # Weak TLS 1.2 ciphers only (no forward secrecy, CBC/SHA-1), on the ECDSA and the RSA certificate.
        for server_hostname in ("localhost", "rsa.example"):
            done = s_client(port, "-tls1_2", "-cipher", "AES128-SHA", "-servername", server_hostname, "-msg")
            assert "ClientHello" in done.stdout, done.stdout
            assert "ServerHello" not in done.stdout and "Cipher is (NONE)" in done.stdout, done.stdout
            weak = client_context(pems, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA:AES256-SHA256",
                                  check_hostname=False)
            assert_refused(port, weak, f"weak ciphers for {server_hostname}", server_hostname)

        time.sleep(0.3)  # good clients also after the last bad one

    assert good.failures == [], good.failures
    assert good.ok >= 20, good.ok
    assert lb.proc.poll() is None and psutil.pid_exists(master)
    assert sorted(lb.worker_pids()) == before, lb.output
    assert "died" not in lb.output and "Traceback" not in lb.output, lb.output


# ---------------------------------------------------------------------------------------------------------
# 8. redirect_to_https


def _redirect(port, target, host):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.putrequest("GET", target, skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response, body


def test_redirect_to_https(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default], backend, redirect=True)
    tls = lb.tls_port
    cases = [
        ("/a/b?q=1&r=%20x", "app.example.com:8080", f"https://app.example.com:{tls}/a/b?q=1&r=%20x"),
        ("/", "app.example.com", f"https://app.example.com:{tls}/"),
        ("/p?x", "[::1]:8080", f"https://[::1]:{tls}/p?x"),
        ("/p", "127.0.0.1", f"https://127.0.0.1:{tls}/p"),
    ]
    for target, host, location in cases:
        response, body = _redirect(lb.port, target, host)
        assert response.status == 308, (target, host)
        assert response.getheader("Location") == location, (target, host)
        assert response.getheader("Content-Length") == "0" and body == b""
    assert backend.records() == []  # answered by fastlb itself
    # The redirect target works.
    assert https(tls, client_context(pems), "/a/b?q=1").status == 200


def test_redirect_to_https_on_port_443_has_no_port(fastlb, backends, tmp_path, pems):
    host = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"
    try:
        with socket.socket() as probe:
            probe.bind((host, 443))
    except OSError as exc:  # EACCES without privileges; EADDRINUSE under a wildcard listener on 443
        pytest.skip(f"cannot listen on {host}:443 ({exc.strerror})")
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default], backend, redirect=True, tls_host=host, tls_port=443)
    response, _ = _redirect(lb.port, "/a/b?c=d", f"app.example.com:{lb.port}")
    assert response.status == 308
    assert response.getheader("Location") == "https://app.example.com/a/b?c=d"


# ---------------------------------------------------------------------------------------------------------
# 9. Certificate reload on SIGHUP


def _install(pair, cert_path, key_path):
    """Copy a (cert, key) pair over the served files, each replaced atomically."""
    for source, destination in zip(pair, (cert_path, key_path), strict=True):
        tmp = f"{destination}.tmp"
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        os.replace(tmp, destination)


def _presented(port, pems):
    return https(port, client_context(pems), "/which-cert")


def test_sighup_reloads_certificates(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    start, end = days_from_now(-1), days_from_now(90)
    made = tmp_path / "made"
    made.mkdir()
    cert_a = write_certificate(str(made), "a", ["localhost", "a.example", "127.0.0.1"], start, end, ca=pems.ca_authority)
    cert_b = write_certificate(str(made), "b", ["localhost", "b.example", "127.0.0.1"], start, end, ca=pems.ca_authority)
    cert_c = write_certificate(str(made), "c", ["localhost", "c.example", "127.0.0.1"], start, end, ca=pems.ca_authority)
    serial_a, serial_b = (load_certificate(p[0]).serial_number for p in (cert_a, cert_b))
    cert_path, key_path = str(tmp_path / "site.pem"), str(tmp_path / "site.key")
    _install(cert_a, cert_path, key_path)
    lb = serve(fastlb, tmp_path, [(cert_path, key_path)], backend)
    port = lb.tls_port
    assert _presented(port, pems).serial == serial_a

    # A keep-alive connection to the old generation, with a request in flight across the reload.
    old = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=client_context(pems))
    old.request("GET", "/before")
    first = old.getresponse()
    assert first.status == 200 and first.read()
    assert dns_names(old.sock.getpeercert(binary_form=True)) == ["localhost", "a.example"]
    old.request("GET", "/sleep/1.5")
    deadline = time.monotonic() + 5
    while not records_for(backend, "/sleep/1.5"):
        assert time.monotonic() < deadline, "the in-flight request never reached the backend"
        time.sleep(0.02)

    _install(cert_b, cert_path, key_path)
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reloaded: generation 1")
    deadline = time.monotonic() + 5
    while (serial := _presented(port, pems).serial) != serial_b:
        assert serial == serial_a, serial
        assert time.monotonic() < deadline, "new handshakes still present certificate A"
        time.sleep(0.05)
    for _ in range(6):  # every worker of the new generation
        assert _presented(port, pems).serial == serial_b

    # The old connection's request completes on the old (draining) worker.
    in_flight = old.getresponse()
    assert in_flight.status == 200 and in_flight.getheader("X-Backend") == "b1"
    assert json.loads(in_flight.read())["target"] == "/sleep/1.5"
    old.close()

    # A certificate with someone else's key: the reload is refused, B is still served.
    _install((cert_c[0], cert_b[1]), cert_path, key_path)
    lb.proc.send_signal(signal.SIGHUP)
    failed = lb.wait_for("reload failed")
    time.sleep(0.3)
    assert [line for line in lb.lines if "reload failed" in line] == [failed]
    assert "reload failed, keeping the running config: " in failed
    assert "tls.certificates[0].key" in failed and key_path in failed, failed
    for _ in range(6):
        assert _presented(port, pems).serial == serial_b
    assert lb.proc.poll() is None
    assert "reloaded: generation 2" not in lb.output


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["TLSv1.3", "TLSv1.2"])
def test_sessions_resume_across_a_reload(fastlb, backends, tmp_path, pems, version):
    """The new generation's contexts get the running ticket keys: a client that comes back after a
    reload resumes instead of paying a full handshake."""
    (backend,) = backends("b1")
    lb = serve(fastlb, tmp_path, [pems.default, pems.wildcard], backend, env={"FASTLB_WORKERS": "2"})
    port = lb.tls_port
    context = client_context(pems, minimum=version, maximum=version)
    first = https(port, context, "/before-reload")
    assert first.status == 200 and not first.reused and first.session is not None
    old = set(lb.worker_pids())
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reloaded: generation 1")
    deadline = time.monotonic() + 10
    while set(lb.worker_pids()) & old:  # the old generation drains (its one connection is closed) and exits
        assert time.monotonic() < deadline, "the old generation did not exit"
        time.sleep(0.05)
    which = served_by(lb, port)
    for i in range(6):
        result = https(port, context, f"/after-reload/{i}", session=first.session, inspect=which)
        assert result.status == 200 and result.worker is not None and result.worker not in old
        assert result.reused, f"connection {i} did a full handshake after the reload"
    assert "session-ticket keys" not in lb.output


# ---------------------------------------------------------------------------------------------------------
# 10. Startup errors


def _serve_and_check(tmp_path, config):
    """`fastlb serve --config` and `fastlb check` on a broken config: (serve result, check result)."""
    env = FastLB(tmp_path, {"FASTLB_LISTEN": f"127.0.0.1:{free_port()}"}).env
    proc = subprocess.Popen([sys.executable, "-m", "fastlb", "serve", "--config", str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGQUIT)  # the master stops its children; SIGKILL would orphan them
        stdout, stderr = proc.communicate(timeout=10)
        pytest.fail(f"fastlb serve started with a broken config:\n{stderr}")
    served = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    check_env = {k: v for k, v in env.items() if not k.startswith("FASTLB_") or k == "FASTLB_NO_EXTENSIONS"}
    checked = subprocess.run([sys.executable, "-m", "fastlb", "check", str(config)], env=check_env,
                             capture_output=True, text=True, timeout=20)
    return served, checked


def test_expired_certificate_is_a_startup_error(tmp_path, pems, backends):
    (backend,) = backends("b1")
    expired = write_certificate(str(tmp_path), "expired", ["localhost"], days_from_now(-60), days_from_now(-1),
                                ca=pems.ca_authority)
    config = write_config(tmp_path / "expired.toml", tls_address=f"127.0.0.1:{free_port()}",
                          plain_port=free_port(), certificates=[expired], servers=[backend.address])
    served, checked = _serve_and_check(tmp_path, config)
    assert served.returncode == 1, served.stderr
    lines = served.stderr.splitlines()
    assert len(lines) == 1, served.stderr
    line = lines[0]
    assert line.startswith(f"{config}: tls.certificates[0].cert: "), line
    assert "expired" in line and expired[0] in line, line
    assert (checked.returncode, checked.stderr.splitlines()) == (1, [line]), checked.stderr
    assert checked.stdout == ""


def test_unreadable_key_is_a_startup_error(tmp_path, pems, backends):
    (backend,) = backends("b1")
    # Tests may run as root, for whom no mode bit makes a file unreadable: a directory cannot be read either.
    key = tmp_path / "unreadable.key"
    key.mkdir()
    config = write_config(tmp_path / "nokey.toml", tls_address=f"127.0.0.1:{free_port()}",
                          plain_port=free_port(), certificates=[(pems.default[0], key)],
                          servers=[backend.address])
    served, checked = _serve_and_check(tmp_path, config)
    assert served.returncode == 1, served.stderr
    lines = served.stderr.splitlines()
    assert len(lines) == 1, served.stderr
    line = lines[0]
    assert line.startswith(f"{config}: tls.certificates[0].key: "), line
    assert str(key) in line, line
    assert (checked.returncode, checked.stderr.splitlines()) == (1, [line]), checked.stderr


# ---------------------------------------------------------------------------------------------------------
# 11. The demo


FINGERPRINT = re.compile(r"SHA-256 fingerprint ((?:[0-9A-F]{2}:){31}[0-9A-F]{2})")


def test_demo_serves_https_with_a_reused_self_signed_certificate(fastlb, tmp_path):
    # Free ports for every address the demo would take by default (8443, 8080, 18101-18103).
    tls_port = free_port()
    env = {
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "FASTLB_TLS_LISTEN": f"127.0.0.1:{tls_port}",
        "FASTLB_BACKENDS": ",".join(f"127.0.0.1:{free_port()}" for _ in range(3)),
        "FASTLB_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "FASTLB_SERVER_PID_FILE": str(tmp_path / "demo.pid"),
    }
    cert_file = tmp_path / "cache" / "fastlb" / "demo-cert.pem"
    printed = []
    for run in range(2):
        lb = fastlb(env, ["--demo"])
        printed.append(FINGERPRINT.search(lb.wait_for("SHA-256 fingerprint")).group(1))
        if run == 0:
            mtime = cert_file.stat().st_mtime_ns
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cert_file)  # trusts exactly the demo certificate (IP SAN 127.0.0.1)
        conn = http.client.HTTPSConnection("127.0.0.1", tls_port, timeout=5, context=context)
        names = set()
        for _ in range(3):  # one keep-alive connection: one worker's round robin over the three
            conn.request("GET", "/")
            response = conn.getresponse()
            text = response.read().decode()
            assert response.status == 200, text
            match = re.match(r"hello from (demo-[123])\b", text)
            assert match, text
            names.add(match.group(1))
            assert "X-Forwarded-Proto: https" in text, text
            assert f"X-Forwarded-Port: {tls_port}\n" in text, text
        assert fingerprint(conn.sock.getpeercert(binary_form=True)) == printed[run]
        conn.close()
        assert names == {"demo-1", "demo-2", "demo-3"}
        assert lb.stop(signal.SIGINT) == 0, lb.output
    assert printed[0] == printed[1]
    assert cert_file.stat().st_mtime_ns == mtime  # reused, not rewritten

