"""fastlb's own TLS and PROXY layer (fastlb/http/front_py.py) through the real server and real clients.

- every refused handshake sends its RFC 8446 / RFC 5246 alert and is counted by reason;
- client certificates (mTLS): required, optional with a per-route requirement, and the verified identity
  sent upstream in X-Forwarded-Client-Cert;
- SNI passthrough: the ClientHello read without consuming it, the connection spliced to a TLS backend
  that fastlb holds no key for, with the PROXY header it asked for;
- the PROXY protocol in front of fastlb, from a real HAProxy (`mode tcp`, `send-proxy-v2`), and refused
  from anyone not in trusted_proxies.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
import subprocess
import threading
import time

import pytest
import trustme
from conftest import free_port, wait_port
from test_metrics import scrape, total
from test_tls import raw_exchange, record_header, records_for
from tlsutil import client_context, client_hello, make_pems, s_client

from fastlb import core

q = json.dumps  # a JSON string is a valid TOML basic string


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    return make_pems(tmp_path_factory.mktemp("front-pems"))


def start(fastlb, tmp_path, pems, backend, *, tls=None, client_auth=None, listener=None, routes=None,
          extra="", env=None):
    """fastlb with one TLS listener (lb.tls_port) and one plain one (lb.port), backend "app" as default."""
    tls_port, plain_port = free_port(), free_port()
    # Top-level keys before any table.
    lines = [] if routes else ['default_backend = "app"']
    lines += ["[[listeners]]", f"address = {q(f'127.0.0.1:{tls_port}')}", "tls = true", *(listener or []), "",
             "[[listeners]]", f"address = {q(f'127.0.0.1:{plain_port}')}", "",
             "[tls]", *(f"{k} = {v}" for k, v in (tls or {}).items()), "",
             "[[tls.certificates]]", f"cert = {q(pems.default[0])}", f"key = {q(pems.default[1])}", ""]
    if client_auth:
        lines += ["[tls.client_auth]", *(f"{k} = {q(v)}" for k, v in client_auth.items()), ""]
    lines += ["[backends.app]", f"servers = {q([backend.address])}", "", *(routes or []), extra, ""]
    config = tmp_path / f"front-{tls_port}.toml"
    config.write_text("\n".join(lines))
    # FASTLB_LISTEN unset: the fixture's default would replace the config's plain listener.
    lb = fastlb({"FASTLB_LISTEN": None, **(env or {})}, ["--config", str(config)])
    lb.tls_port, lb.port = tls_port, plain_port
    return lb


def handshake_error(port, context, server_hostname="localhost") -> ssl.SSLError:
    """The error a real client handshake ends with; the server's alert is in its reason."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError) as excinfo:
            with context.wrap_socket(raw, server_hostname=server_hostname) as conn:
                # TLS 1.3: the server checks the client's certificate after its own Finished, so the
                # alert arrives on the first read.
                conn.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                conn.recv(1)
    return excinfo.value


def get(port, context, path="/", server_hostname="localhost", headers=()):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as conn:
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n".encode())
            response = http.client.HTTPResponse(conn)
            response.begin()
            return response.status, response.read(), conn.getpeercert(binary_form=True)


def tls_errors(lb) -> dict:
    samples = scrape(lb)
    port = str(lb.tls_port)
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "fastlb_tls_handshake_errors_total" and dict(labels)["listener"].endswith(port)}


def wait_metric(lb, check, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(lb)
        if check(samples) or time.monotonic() > deadline:
            break
        time.sleep(0.1)  # the workers publish their counters on a 250 ms tick
    assert check(samples), (what, {k: v for k, v in samples.items() if "tls" in k[0] or "proxy" in k[0]
                                   or "passthrough" in k[0]})
    return samples


# ---------------------------------------------------------------------------------------------------------
# 1. Refused handshakes: the alert, and the reason


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_each_refused_handshake_gets_its_alert_and_is_counted_by_reason(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    lb = start(fastlb, tmp_path, pems, backend, tls={"strict_sni": "true", "handshake_timeout": '"1s"'})
    port = lb.tls_port

    # TLS 1.1 only: protocol_version (70), from Python's ssl and from openssl s_client.
    old = client_context(pems, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1,
                         ciphers="DEFAULT:@SECLEVEL=0")
    assert handshake_error(port, old).reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    done = s_client(port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-servername", "localhost")
    assert "alert protocol version" in done.stderr, done.stderr
    # No cipher in common (TLS 1.2, RSA key exchange only): handshake_failure (40).
    weak = client_context(pems, maximum=ssl.TLSVersion.TLSv1_2, ciphers="AES128-SHA")
    assert handshake_error(port, weak).reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    # strict_sni: a name no certificate covers: unrecognized_name (112).
    assert handshake_error(port, client_context(pems, check_hostname=False),
                           "nobody.example").reason == "TLSV1_UNRECOGNIZED_NAME"
    # Plain HTTP on the TLS port: a plain-HTTP 400 that says so, then the close (nginx's answer).
    reply, closed_after = raw_exchange(port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"HTTPS port" in reply, reply
    assert closed_after is not None and closed_after < 1, closed_after
    # Silence: cut by handshake_timeout (1 s, checked on a 250 ms tick).
    reply, closed_after = raw_exchange(port, b"", timeout=4)
    assert reply == b"" and closed_after is not None and 0.9 <= closed_after <= 2.5, closed_after
    # Half a ClientHello, then a reset.
    hello = client_hello(client_context(pems))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(hello[: len(hello) // 2])
        time.sleep(0.1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    # Good clients are still served.
    assert get(port, client_context(pems))[0] == 200

    expected = {"unsupported_version": 2, "no_shared_cipher": 1, "unknown_sni": 1, "not_tls": 1,
                "timeout": 1, "reset": 1, "bad_client_certificate": 0}
    wait_metric(lb, lambda s: all(tls_errors(lb).get(k) == v for k, v in expected.items()), expected)
    assert "Traceback" not in lb.output, lb.output


# ---------------------------------------------------------------------------------------------------------
# 2. Client certificates


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """Client certificates: one from the listener's client CA, one from a CA nobody trusts."""
    directory = tmp_path_factory.mktemp("client-pki")
    ca, stranger = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "client-ca.pem"))
    good = ca.issue_cert("client.example")
    bad = stranger.issue_cert("client.example")
    for name, leaf in (("good", good), ("bad", bad)):
        leaf.private_key_and_cert_chain_pem.write_to_path(str(directory / f"{name}.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(directory / f"{name}-cert.pem"))
    return directory


def with_cert(pems, path):
    context = client_context(pems)
    context.load_cert_chain(str(path))
    return context


def test_required_client_certificate_is_verified_and_sent_upstream(fastlb, backends, tmp_path, pems, clients):
    (backend,) = backends("b1")
    lb = start(fastlb, tmp_path, pems, backend,
               client_auth={"ca": str(clients / "client-ca.pem"), "mode": "require"})
    port = lb.tls_port

    good = with_cert(pems, clients / "good.pem")
    status, _, _ = get(port, good, "/mtls", headers=[("X-Forwarded-Client-Cert", "Hash=forged")])
    assert status == 200
    (record,) = records_for(backend, "/mtls")
    xfcc = record_header(record, "X-Forwarded-Client-Cert")  # exactly one: the client's is gone
    der = ssl.PEM_cert_to_DER_cert((clients / "good-cert.pem").read_text())
    assert f"Hash={hashlib.sha256(der).hexdigest()}" in xfcc and "DNS=client.example" in xfcc, xfcc
    assert "forged" not in xfcc

    # TLS 1.3 without a certificate: certificate_required (116); TLS 1.2: handshake_failure (40).
    assert handshake_error(port, client_context(pems)).reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    tls12 = client_context(pems, maximum=ssl.TLSVersion.TLSv1_2)
    assert handshake_error(port, tls12).reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    # A certificate from a CA the listener does not trust: unknown_ca (48), as OpenSSL reports it.
    assert handshake_error(port, with_cert(pems, clients / "bad.pem")).reason == "TLSV1_ALERT_UNKNOWN_CA"
    # curl with the client certificate.
    done = subprocess.run(["curl", "-sS", "--cacert", pems.ca, "--cert", str(clients / "good.pem"),
                           "--resolve", f"localhost:{port}:127.0.0.1", f"https://localhost:{port}/curl"],
                          capture_output=True, text=True, timeout=15)
    assert done.returncode == 0, done.stderr

    port_label = str(port)

    def counted(samples):
        verified = total(samples, "fastlb_tls_client_certificates_total", result="verified")
        failed = total(samples, "fastlb_tls_client_certificates_total", result="failed")
        bad = sum(v for (n, ls), v in samples.items() if n == "fastlb_tls_handshake_errors_total"
                  and dict(ls).get("reason") == "bad_client_certificate" and dict(ls)["listener"].endswith(port_label))
        return verified == 2 and failed == 3 and bad == 3

    wait_metric(lb, counted, "2 verified, 3 refused client certificates")


def test_optional_client_certificate_with_a_route_that_requires_one(fastlb, backends, tmp_path, pems, clients):
    (backend,) = backends("b1")
    routes = ["[[routes]]", 'path = "/secure"', 'backend = "app"', "require_client_cert = true", "",
              "[[routes]]", 'path = "/"', 'backend = "app"', ""]
    lb = start(fastlb, tmp_path, pems, backend, routes=routes,
               client_auth={"ca": str(clients / "client-ca.pem"), "mode": "optional"})
    port = lb.tls_port
    anonymous, good = client_context(pems), with_cert(pems, clients / "good.pem")
    assert get(port, anonymous, "/open")[0] == 200
    assert get(port, anonymous, "/secure/a")[0] == 403
    assert get(port, good, "/secure/b")[0] == 200
    assert records_for(backend, "/secure/a") == []
    (record,) = records_for(backend, "/open")
    assert all(k.lower() != "x-forwarded-client-cert" for k, _ in record["headers"])
    # Optional still refuses a certificate that fails verification.
    assert handshake_error(port, with_cert(pems, clients / "bad.pem")).reason == "TLSV1_ALERT_UNKNOWN_CA"


# ---------------------------------------------------------------------------------------------------------
# 3. SNI passthrough


class TlsBackend(threading.Thread):
    """A TLS server fastlb has no key for: reads the PROXY header it was promised, then TLS, then answers
    one HTTP request with the client address that header carried."""

    def __init__(self, cert_pem, key_pem):
        super().__init__(daemon=True)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_pem, key_pem)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.headers = []

    def run(self):
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(sock,), daemon=True).start()

    def serve(self, sock):
        with sock:
            data = b""
            while True:
                status, used, src, sport, *_ = core.parse_proxy_header(data)
                if status != core.PROXY_MORE:
                    break
                data += sock.recv(1)  # byte by byte: nothing after the header is consumed
            self.headers.append((status, src))
            with self.context.wrap_socket(sock, server_side=True) as conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                body = f"passthrough {src}".encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))


def split_hello_get(port, context, server_hostname, pieces):
    """An HTTPS GET whose ClientHello leaves in `pieces` TCP segments, 50 ms apart."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = outgoing.read()
        step = -(-len(hello) // pieces)
        for i in range(0, len(hello), step):
            sock.sendall(hello[i:i + step])
            time.sleep(0.05)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                chunk = sock.recv(65536)
                assert chunk, "closed during the handshake"
                incoming.write(chunk)
        tls.write(b"GET / HTTP/1.1\r\nHost: pass.example\r\n\r\n")
        sock.sendall(outgoing.read())
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            incoming.write(chunk)
            try:
                reply += tls.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                pass
        return reply, tls.getpeercert(binary_form=True)


def test_sni_passthrough_splices_the_tls_stream_to_the_backend(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    ca = pems.ca_authority
    leaf = ca.issue_cert("pass.example", "x.wild.example")
    directory = tmp_path / "pass"
    directory.mkdir()
    leaf.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "key.pem"))
    tls_backend = TlsBackend(str(directory / "cert.pem"), str(directory / "key.pem"))
    tls_backend.start()
    listener = ["", "[[listeners.passthrough]]", 'sni = "pass.example"', 'backend = "secret"',
                "", "[[listeners.passthrough]]", 'sni = "*.wild.example"', 'backend = "secret"']
    # The first server refuses connections: a splice that meets it tries the next one (retries).
    dead = f"127.0.0.1:{free_port()}"
    extra = "\n".join(["[backends.secret]", f"servers = {q([dead, f'127.0.0.1:{tls_backend.port}'])}",
                       'send_proxy = "v2"', ""])
    lb = start(fastlb, tmp_path, pems, backend, listener=listener, extra=extra)
    port = lb.tls_port
    context = client_context(pems)
    try:
        status, body, der = get(port, context, "/", server_hostname="pass.example")
        assert status == 200 and body == b"passthrough 127.0.0.1", body
        assert der == ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        status, body, _ = get(port, context, "/", server_hostname="x.wild.example")
        assert body == b"passthrough 127.0.0.1"
        # A ClientHello in five TCP segments is still recognised and passed through whole.
        reply, der = split_hello_get(port, context, "pass.example", 5)
        assert reply.endswith(b"passthrough 127.0.0.1"), reply
        # Any other name is terminated by fastlb as usual.
        status, body, der = get(port, context, "/terminated", server_hostname="localhost")
        assert status == 200 and records_for(backend, "/terminated")
        assert der == ssl.PEM_cert_to_DER_cert(open(pems.default[0]).read())
        assert [h for h in tls_backend.headers] == [(core.PROXY_OK, "127.0.0.1")] * 3
        # A malformed ClientHello naming pass.example (its extensions' length one byte short) and an
        # oversized one (a record longer than any ClientHello may be, RFC 8446 section 5.1) are never
        # passed through: OpenSSL refuses them with an alert.
        hello = bytearray(client_hello(context, "pass.example"))
        at = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random (RFC 8446 §4.1.2)
        at += 1 + hello[at]  # legacy_session_id
        at += 2 + int.from_bytes(hello[at:at + 2], "big")  # cipher_suites
        at += 1 + hello[at]  # legacy_compression_methods: the extensions' length is next
        length = int.from_bytes(hello[at:at + 2], "big")
        hello[at:at + 2] = (length - 1).to_bytes(2, "big")
        oversized = b"\x16\x03\x01\x48\x01" + b"\x01" + b"\x00" * 0x4800
        for what, payload in (("malformed", bytes(hello)), ("oversized", oversized)):
            reply, closed_after = raw_exchange(port, payload)
            assert reply[:1] == b"\x15" and closed_after is not None, (what, reply[:16])
        assert len(tls_backend.headers) == 3

        def counted(samples):
            return (total(samples, "fastlb_passthrough_connections_total", backend="secret") == 3
                    and total(samples, "fastlb_passthrough_bytes_total", backend="secret", direction="in") > 600
                    and total(samples, "fastlb_passthrough_bytes_total", backend="secret", direction="out") > 600)

        wait_metric(lb, counted, "3 passthrough connections, bytes both ways")
        assert total(scrape(lb), "fastlb_upstream_errors_total", backend="secret", kind="connect") >= 1
    finally:
        tls_backend.listener.close()


# ---------------------------------------------------------------------------------------------------------
# 4. PROXY protocol behind a real HAProxy


def haproxy(tmp_path, frontends):
    """HAProxy in `mode tcp` (what a cloud L4 balancer does), one frontend per (port, server line)."""
    lines = ["global", "  maxconn 1000", "defaults", "  mode tcp", "  timeout connect 5s",
             "  timeout client 30s", "  timeout server 30s", ""]
    for i, (port, server) in enumerate(frontends):
        lines += [f"listen l{i}", f"  bind 127.0.0.1:{port}", f"  server s {server}", ""]
    path = tmp_path / "haproxy.cfg"
    path.write_text("\n".join(lines))
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "haproxy.log", "wb"))
    for port, _ in frontends:
        wait_port(port)
    return proc


def get_from(source, port, path, context=None):
    """A GET from a chosen loopback source address (127.0.0.0/8 is all local on Linux)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        response.read()
        return response.status


def test_proxy_protocol_from_haproxy_gives_the_real_client_address(fastlb, backends, tmp_path, pems):
    (backend,) = backends("b1")
    tls_port, plain_port = free_port(), free_port()
    front_tls, front_plain = free_port(), free_port()
    config = tmp_path / "proxied.toml"
    config.write_text("\n".join([
        'default_backend = "app"',
        "[server]", 'trusted_proxies = ["127.0.0.1/32"]',
        "[[listeners]]", f"address = {q(f'127.0.0.1:{tls_port}')}", "tls = true", "proxy_protocol = true",
        "[[listeners]]", f"address = {q(f'127.0.0.1:{plain_port}')}", "proxy_protocol = true",
        "[[tls.certificates]]", f"cert = {q(pems.default[0])}", f"key = {q(pems.default[1])}",
        "[backends.app]", f"servers = {q([backend.address])}", "",
    ]))
    lb = fastlb({"FASTLB_LISTEN": None}, ["--config", str(config)])
    lb.tls_port = tls_port
    proxy = haproxy(tmp_path, [(front_tls, f"127.0.0.1:{tls_port} send-proxy-v2"),
                               (front_plain, f"127.0.0.1:{plain_port} send-proxy")])
    try:
        assert get_from("127.0.0.2", front_tls, "/via-v2", client_context(pems)) == 200
        assert get_from("127.0.0.3", front_plain, "/via-v1") == 200
        assert record_header(records_for(backend, "/via-v2")[0], "X-Forwarded-For") == "127.0.0.2"
        assert record_header(records_for(backend, "/via-v1")[0], "X-Forwarded-For") == "127.0.0.3"
        # From a trusted peer without a header, and from a peer that is not trusted: cut at once.
        reply, closed_after = raw_exchange(plain_port, b"GET /bare HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply == b"" and closed_after is not None and closed_after < 1
        assert get_from_untrusted(plain_port) == b""
        assert records_for(backend, "/bare") == [] and records_for(backend, "/untrusted") == []
        # A trusted peer that closes before any header: a missing header too, not a TLS handshake reset
        # (HAProxy's own relayed connections, wait_port's among them, send the header and may count so).
        time.sleep(0.3)  # the workers' 250 ms tick publishes what came before
        resets = total(scrape(lb), "fastlb_tls_handshake_errors_total", reason="reset")
        socket.create_connection(("127.0.0.1", tls_port), timeout=5).close()

        def counted(samples):
            return (total(samples, "fastlb_proxy_protocol_errors_total", reason="bad_header") == 2
                    and total(samples, "fastlb_proxy_protocol_errors_total", reason="untrusted") == 1)

        samples = wait_metric(lb, counted, "two missing headers, one untrusted peer")
        assert total(samples, "fastlb_tls_handshake_errors_total", reason="reset") == resets
    finally:
        proxy.terminate()
        proxy.wait(5)


def get_from_untrusted(port) -> bytes:
    header = core.proxy_header_v1("203.0.113.9", 4000, "127.0.0.1", port)
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.9", 0)) as sock:
        sock.sendall(header + b"GET /untrusted HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return b""

