"""ACME (issue 18) against a real CA: Debian's pebble, Let's Encrypt's test server, with
pebble-challtestsrv as its DNS server resolving every test name to 127.0.0.1.  Pebble's httpPort and
tlsPort are fastlb's listeners and pebble really fetches the challenges (PEBBLE_VA_ALWAYS_VALID is never
set).  A rate limit pebble 2.4 cannot send is scripted by a small ACME server of our own.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest
import trustme
from conftest import free_port, wait_port
from cryptography import x509
from tlsutil import days_from_now, write_certificate

from fastlb.acme.challenges import ACME_IDENTIFIER, challenge_context, tls_alpn01_certificate
from fastlb.acme.storage import Storage
from fastlb.config import AcmeSpec, ConfigError, load

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")


class Pebble:
    """pebble + pebble-challtestsrv; the directory's own HTTPS is a trustme CA's (directory_ca)."""

    def __init__(self, tmp, http_port: int, tls_port: int, validity: int = 3600, port: int | None = None,
                 env: dict | None = None, eab: dict | None = None):
        assert PEBBLE and CHALLTESTSRV, "pebble is missing: run tests/system-deps.sh"
        self.dir = tmp / f"pebble-{http_port}"
        self.dir.mkdir(exist_ok=True)
        self.port = port or free_port()
        self.management = free_port()
        self.dns = free_port()
        self.dns_management = free_port()
        self.ca_file = str(self.dir / "directory-ca.pem")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(self.ca_file)
        leaf = ca.issue_cert("127.0.0.1", "localhost")
        leaf.private_key_pem.write_to_path(str(self.dir / "key.pem"))
        leaf.cert_chain_pems[0].write_to_path(str(self.dir / "cert.pem"))
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.management}",
            "certificate": str(self.dir / "cert.pem"), "privateKey": str(self.dir / "key.pem"),
            "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(eab), "externalAccountMACKeys": eab or {},
            "certificateValidityPeriod": validity,
        }}
        (self.dir / "pebble.json").write_text(json.dumps(config))
        # No random validation delay, no refused nonces, no reused authorizations: every order makes
        # pebble fetch its challenges again.
        self.env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        self.env.update(env or {})
        self.env = {k: v for k, v in self.env.items() if v is not None and k != "PEBBLE_VA_ALWAYS_VALID"}
        self.procs = []

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> Pebble:
        log = open(self.dir / "pebble.log", "ab")
        self.procs.append(subprocess.Popen(
            [CHALLTESTSRV, "-dns01", f"127.0.0.1:{self.dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{self.dns_management}", "-defaultIPv6", ""],
            stdout=log, stderr=subprocess.STDOUT))
        self.procs.append(subprocess.Popen(
            [PEBBLE, "-config", str(self.dir / "pebble.json"), "-dnsserver", f"127.0.0.1:{self.dns}"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT))
        wait_port(self.port)
        wait_port(self.dns_management)
        return self

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs = []

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
            return response.read()

    def root(self) -> str:
        """Pebble's issuing root (made anew at each start), for clients to verify fastlb with."""
        path = self.dir / "root.pem"
        path.write_bytes(self._get(f"https://127.0.0.1:{self.management}/roots/0"))
        return str(path)

    def resolve(self, host: str, address: str) -> None:
        body = json.dumps({"host": host, "addresses": [address]}).encode()
        urllib.request.urlopen(f"http://127.0.0.1:{self.dns_management}/add-a", body, timeout=5).read()


@pytest.fixture
def pebbles(tmp_path):
    made = []

    def make(*args, **kwargs) -> Pebble:
        made.append(Pebble(tmp_path, *args, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.stop()


def write_config(tmp, http_port, tls_port, directory, ca_file, *, names=("app.test", "www.app.test"),
                 challenge="http-01", renew_before="10m", backend=None, workers=2, extra="", storage=None) -> str:
    backend = backend or f"127.0.0.1:{free_port()}"
    names_toml = ", ".join(f'"{n}"' for n in names)
    text = f"""
[server]
workers = {workers}
[[listeners]]
address = "127.0.0.1:{http_port}"
redirect_to_https = true
[[listeners]]
address = "127.0.0.1:{tls_port}"
tls = true
[acme]
directory = "{directory}"
directory_ca = "{ca_file}"
storage = "{storage or tmp / 'acme'}"
email = "ops@example.com"
challenge = "{challenge}"
renew_before = "{renew_before}"
{extra}
[[tls.certificates]]
acme = true
names = [{names_toml}]
[backends.web]
servers = ["{backend}"]
[[routes]]
path = "/"
backend = "web"
"""
    path = tmp / "fastlb.toml"
    path.write_text(text)
    return str(path)


def start(fastlb, config: str, http_port: int, **env):
    return fastlb({"FASTLB_CONFIG": config, "FASTLB_LISTEN": f"127.0.0.1:{http_port}", "FASTLB_WORKERS": None,
                   **env})


def admin_get(lb, path: str) -> bytes:
    with urllib.request.urlopen(f"http://{lb.env['FASTLB_ADMIN_LISTEN']}{path}", timeout=5) as response:
        return response.read()


def acme_status(lb) -> dict:
    return json.loads(admin_get(lb, "/status"))["acme"][0]


def metric(lb, line_start: str) -> float | None:
    for line in admin_get(lb, "/metrics").decode().splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_until(predicate, timeout: float, what: str, lb=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:  # the admin listener between two control processes
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not {what} within {timeout}s" + (f":\n{lb.output}" if lb else ""))


def served_certificate(port: int, sni: str, cafile: str | None = None) -> x509.Certificate:
    """The leaf fastlb serves for sni; verified against cafile when given."""
    if cafile:
        ctx = ssl.create_default_context(cafile=cafile)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


def issued(lb, tls_port, root, sni="app.test"):
    """The CA-issued certificate once fastlb serves it (verified with pebble's root), else None."""
    try:
        return served_certificate(tls_port, sni, root)
    except ssl.SSLCertVerificationError:
        return None


# -- end to end against pebble ------------------------------------------------------------------------


def test_http01_first_issuance_served_and_verified(tmp_path, fastlb, pebbles):
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port).start()
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, pebble.ca_file)
    lb = start(fastlb, config, http_port)
    # At once, before the CA answers: a temporary self-signed certificate for the names, logged.
    first = served_certificate(tls_port, "www.app.test")
    assert "temporary" in first.subject.rfc4514_string()
    assert "no certificate yet; serving a temporary self-signed one" in lb.output
    root = pebble.root()
    leaf = wait_until(lambda: issued(lb, tls_port, root, "www.app.test"), 20, "issued", lb)
    assert {"app.test", "www.app.test"} <= set(
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    assert "Pebble" in leaf.issuer.rfc4514_string()
    state = wait_until(lambda: acme_status(lb)["serving"] == "issued" and acme_status(lb), 10, "shown", lb)
    assert state["state"] == "valid" and state["failures"] == 0
    assert state["next_try"] == pytest.approx(state["not_after"] - 600)
    assert metric(lb, 'fastlb_acme_orders_total{result="success"}') == 1
    assert metric(lb, 'fastlb_acme_next_renewal_seconds{name="app.test"}') == state["next_try"]
    assert "acme: app.test: certificate issued, valid until" in lb.output
    for path in (tmp_path / "acme").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        else:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert not list((tmp_path / "acme" / "challenges" / "http-01").iterdir())  # withdrawn after the order


def test_every_worker_answers_http01_even_under_redirect(tmp_path, fastlb, pebbles):
    """The challenge answer comes from storage, so every worker has it; and it is answered where
    everything else is redirected to https."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port)  # never started: no order gets anywhere
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, pebble.ca_file)
    start(fastlb, config, http_port)
    token = "tok_" + "A" * 40
    Storage(AcmeSpec(storage=str(tmp_path / "acme"))).publish_http01(token, token + ".thumbprint")
    prefixes = set()
    for _ in range(60):
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as s:
            s.sendall(f"GET /.well-known/acme-challenge/{token} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode())
            response = b""
            while chunk := s.recv(4096):
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), response
        assert body == (token + ".thumbprint").encode()
        request_id = next(line for line in head.split(b"\r\n") if line.startswith(b"X-Request-ID: "))
        prefixes.add(request_id.split(b" ")[1].split(b"-")[0])  # a random prefix per worker
        if len(prefixes) == 2:
            break
    assert len(prefixes) == 2, "one worker never answered"
    with socket.create_connection(("127.0.0.1", http_port), timeout=5) as s:
        s.sendall(b"GET /.well-known/acme-challenge/unknown HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 404 ")
    with socket.create_connection(("127.0.0.1", http_port), timeout=5) as s:
        s.sendall(b"GET /other HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 308 ")


def test_renewal_drops_no_request(tmp_path, fastlb, pebbles, backends):
    """A 60 s certificate renewed 55 s before its end: a new one every ~5 s, each installed by a
    reload, while a client that trusts only pebble's root keeps making requests over new connections;
    a session ticket from before the renewal still resumes after it."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port, validity=60).start()
    (web,) = backends("web")
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, pebble.ca_file, renew_before="55s",
                          backend=web.address)
    lb = start(fastlb, config, http_port)
    root = pebble.root()
    first = wait_until(lambda: issued(lb, tls_port, root), 20, "issued", lb)
    # Until the generation serving the temporary certificate has stopped accepting, a connection may
    # still get it: that is the first issuance, not a renewal.
    lb.wait_for("reloaded: generation 1")
    time.sleep(0.5)
    ctx = ssl.create_default_context(cafile=root)
    serials, failures, done = {first.serial_number}, [], threading.Event()

    def get(session=None):
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="app.test", session=session) as tls:
                leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
                tls.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
                response = b""
                while chunk := tls.recv(65536):
                    response += chunk
                return response, leaf, tls.session, tls.session_reused

    def client():
        while not done.is_set():
            try:
                response, leaf, _, _ = get()
                serials.add(leaf.serial_number)
                if not response.startswith(b"HTTP/1.1 200 "):
                    failures.append(response[:80])
            except (OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))

    _, _, session, _ = get()  # a session ticket from before the renewal

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: len(serials) >= 2, 30, "renewed", lb)
    finally:
        done.set()
        thread.join()
    assert failures == [], lb.output
    assert "acme: app.test: renewing a certificate" in lb.output
    # The reload carried the session-ticket keys over: the old ticket still resumes.
    response, _, _, resumed = get(session)
    assert response.startswith(b"HTTP/1.1 200 ") and resumed
    assert metric(lb, 'fastlb_acme_orders_total{result="success"}') >= 2  # kept by the master across reloads


def test_ca_down_then_back(tmp_path, fastlb, pebbles):
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port)
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, pebble.ca_file)
    lb = start(fastlb, config, http_port)
    state = wait_until(lambda: acme_status(lb)["failures"] >= 1 and acme_status(lb), 10, "failed", lb)
    assert state["state"] == "waiting" and state["serving"] == "temporary"
    assert state["last_error"].startswith("unreachable: cannot reach the CA")
    assert 1.5 <= state["next_try"] - state["last_order"] <= 2.5   # first back-off: 2 s, then 4, 8...
    line = lb.wait_for("acme: app.test: order failed (unreachable")
    assert "next try at" in line
    assert metric(lb, 'fastlb_acme_orders_total{result="failure"}') >= 1
    pebble.start()
    root = pebble.root()
    wait_until(lambda: issued(lb, tls_port, root), 25, "issued after the CA came back", lb)


def test_failed_challenge_is_reported_and_backed_off(tmp_path, fastlb, pebbles):
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port).start()
    pebble.resolve("app.test", "127.0.0.2")  # pebble fetches the challenge where nothing listens
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, pebble.ca_file, names=("app.test",))
    lb = start(fastlb, config, http_port)
    state = wait_until(lambda: acme_status(lb)["failures"] >= 1 and acme_status(lb), 20, "failed", lb)
    assert state["last_error"].startswith("refused: validation failed: app.test: connection"), state
    assert state["next_try"] - state["last_order"] == pytest.approx(60, abs=1)
    assert state["serving"] == "temporary"
    assert metric(lb, 'fastlb_acme_orders_total{result="failure"}') == 1
    assert "temporary" in served_certificate(tls_port, "app.test").subject.rfc4514_string()
    assert not list((tmp_path / "acme" / "challenges" / "http-01").iterdir())


def test_reload_during_issuance(tmp_path, fastlb, pebbles):
    """SIGHUP while pebble is still validating: the old control process gives the order up and
    releases its lock, the new one orders again, and the certificate is served."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port, env={"PEBBLE_VA_NOSLEEP": None, "PEBBLE_VA_SLEEPTIME": "2"}).start()
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, pebble.ca_file, names=("app.test",))
    lb = start(fastlb, config, http_port)
    lb.wait_for("acme: app.test: http-01 challenge published")
    assert (tmp_path / "acme" / "certificates" / "app.test" / "lock").exists()
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reloaded: generation 1")
    root = pebble.root()
    wait_until(lambda: issued(lb, tls_port, root), 30, "issued", lb)
    wait_until(lambda: not (tmp_path / "acme" / "certificates" / "app.test" / "lock").exists(), 5, "unlocked", lb)
    assert "Traceback" not in lb.output


class ScriptedCA:
    """An ACME server that accepts accounts and answers every newOrder with one error: by default RFC
    8555 section 6.6's rateLimited problem and a Retry-After, as Let's Encrypt does (pebble 2.4 cannot
    be told to)."""

    def __init__(self, tmp, retry_after: int, status: int = 429, problem: str = "rateLimited",
                 detail: str = "too many new orders recently"):
        ca = trustme.CA()
        self.ca_file = str(tmp / "ratelimit-ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        self.orders = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", headers=()):
                self.send_response(status)
                nonce = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
                self.send_header("Replay-Nonce", nonce)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                base = f"https://127.0.0.1:{outer.port}"
                body = json.dumps({"newNonce": base + "/nonce", "newAccount": base + "/account",
                                   "newOrder": base + "/order"}).encode()
                self._send(200, body, [("Content-Type", "application/json")])

            def do_HEAD(self):
                self._send(200)

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/account":
                    self._send(201, b'{"status": "valid"}', [("Content-Type", "application/json"),
                                                             ("Location", f"https://127.0.0.1:{outer.port}/acct/1")])
                    return
                outer.orders += 1
                body = json.dumps({"type": f"urn:ietf:params:acme:error:{problem}", "detail": detail}).encode()
                self._send(status, body, [("Content-Type", "application/problem+json"),
                                          ("Retry-After", str(retry_after))])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("127.0.0.1").configure_cert(context)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"


def test_rate_limit_retry_after_is_honoured_across_a_reload(tmp_path, fastlb):
    http_port, tls_port = free_port(), free_port()
    ca = ScriptedCA(tmp_path, retry_after=1234)
    try:
        config = write_config(tmp_path, http_port, tls_port, ca.directory, ca.ca_file, names=("app.test",))
        lb = start(fastlb, config, http_port)
        state = wait_until(lambda: acme_status(lb)["failures"] and acme_status(lb), 10, "rate limited", lb)
        assert state["last_error"] == "rate_limited: rateLimited: too many new orders recently"
        assert state["next_try"] - state["last_order"] == pytest.approx(1234, abs=1)
        assert metric(lb, 'fastlb_acme_orders_total{result="rate_limited"}') == 1
        assert "next try at" in lb.wait_for("acme: app.test: order failed (rate_limited")
        # The back-off is kept in storage: a reload (a new control process) does not order again.
        lb.proc.send_signal(signal.SIGHUP)
        lb.wait_for("reloaded: generation 1")
        after = wait_until(lambda: acme_status(lb)["state"] == "waiting" and acme_status(lb), 10, "shown", lb)
        assert after["next_try"] == pytest.approx(state["next_try"], abs=0.01)
        time.sleep(1)
        assert ca.orders == 1
    finally:
        ca.server.shutdown()


def test_ca_server_error_is_retried_like_a_ca_that_is_down(tmp_path, fastlb):
    http_port, tls_port = free_port(), free_port()
    ca = ScriptedCA(tmp_path, retry_after=7, status=503, problem="serverInternal", detail="down for maintenance")
    try:
        config = write_config(tmp_path, http_port, tls_port, ca.directory, ca.ca_file, names=("app.test",))
        lb = start(fastlb, config, http_port)
        state = wait_until(lambda: acme_status(lb)["failures"] and acme_status(lb), 10, "failed", lb)
        assert state["last_error"] == "unreachable: serverInternal: down for maintenance"
        assert state["next_try"] - state["last_order"] == pytest.approx(7, abs=0.5)  # Retry-After, not 2 s
        assert metric(lb, 'fastlb_acme_orders_total{result="failure"}') == 1
    finally:
        ca.server.shutdown()


def test_another_node_holds_the_lock_and_its_certificate_is_picked_up(tmp_path, fastlb, pebbles):
    """Storage shared with another node that is ordering the name: fastlb orders nothing, and serves
    the certificate that node puts in storage."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port)  # never started: this node must not need the CA
    storage = tmp_path / "acme" / "certificates" / "app.test"
    storage.mkdir(parents=True)
    (storage / "lock").write_text(json.dumps({"host": "other-node", "pid": 1, "expires": time.time() + 60}))
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, pebble.ca_file, names=("app.test",))
    lb = start(fastlb, config, http_port)
    wait_until(lambda: acme_status(lb)["state"] == "locked", 10, "locked", lb)
    ca = trustme.CA()
    cert, key = write_certificate(tmp_path, "other", ["app.test"], days_from_now(-1), days_from_now(80), ca=ca)
    (storage / "certificate.pem").write_bytes(open(key, "rb").read() + open(cert, "rb").read())
    ca.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    wait_until(lambda: issued(lb, tls_port, str(tmp_path / "other-ca.pem")), 15, "picked up", lb)
    for result in ("success", "failure", "rate_limited"):
        assert metric(lb, f'fastlb_acme_orders_total{{result="{result}"}}') == 0
    assert "order failed" not in lb.output


def test_external_account_binding_and_short_lived_renewal_time(tmp_path, fastlb, pebbles):
    """A CA that requires EAB (RFC 8555 section 7.3.4), as ZeroSSL does: pebble refuses accounts
    without it, so the certificate is proof the binding was sent and accepted."""
    http_port, tls_port = free_port(), free_port()
    hmac_key = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()
    pebble = pebbles(http_port, tls_port, eab={"kid-1": hmac_key}).start()
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, pebble.ca_file, names=("app.test",),
                          extra=f'eab_kid = "kid-1"\neab_hmac_key = "{hmac_key}"', renew_before="2h")
    lb = start(fastlb, config, http_port)
    root = pebble.root()
    wait_until(lambda: issued(lb, tls_port, root), 20, "issued", lb)
    # renew_before (2 h) is longer than the certificate's life (1 h): renewal at half its life.
    state = wait_until(lambda: acme_status(lb)["serving"] == "issued" and acme_status(lb), 10, "shown", lb)
    assert state["next_try"] == pytest.approx(state["not_after"] - 1800, abs=2)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_issuance_with_workers_and_control_unprivileged(tmp_path, fastlb, pebbles):
    """[server] user: the master (root) makes the storage and the stand-in certificate for the user
    the control process orders as and the workers answer challenges as."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port).start()
    shared = tempfile.mkdtemp(prefix="fastlb-acme-")  # tmp_path's parents are root's alone
    try:
        os.chmod(shared, 0o755)
        ca_file = shutil.copy(pebble.ca_file, shared)
        os.chmod(ca_file, 0o644)
        storage = os.path.join(shared, "acme")
        config = write_config(tmp_path, http_port, tls_port, pebble.directory, ca_file, names=("app.test",),
                              storage=storage)
        lb = start(fastlb, config, http_port, FASTLB_SERVER_USER="nobody")
        root = pebble.root()
        wait_until(lambda: issued(lb, tls_port, root), 20, "issued", lb)
        nobody = pwd.getpwnam("nobody").pw_uid
        for path in [storage, *(os.path.join(d, n) for d, ds, fs in os.walk(storage) for n in ds + fs)]:
            assert os.stat(path).st_uid == nobody, path
    finally:
        shutil.rmtree(shared)


# -- TLS-ALPN-01: the challenge certificate over a real handshake ----------------------------------


def test_tls_alpn01_challenge_context(tmp_path):
    storage = Storage(AcmeSpec(storage=str(tmp_path / "acme")))
    key_authorization = "token123.thumbprint456"
    storage.publish_tls_alpn01("app.test", tls_alpn01_certificate("app.test", key_authorization))
    context = challenge_context(storage.tls_alpn01, "App.Test")
    assert context is not None
    assert challenge_context(storage.tls_alpn01, "other.test") is None
    assert challenge_context(storage.tls_alpn01, "../../acme") is None
    assert challenge_context(storage.tls_alpn01, None) is None
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    client.set_alpn_protocols(["acme-tls/1"])
    with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw, server_hostname="app.test") as tls:
        assert tls.selected_alpn_protocol() == "acme-tls/1"
        leaf = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    thread.join()
    listener.close()
    extension = leaf.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(key_authorization.encode()).digest()
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["app.test"]


# -- configuration ---------------------------------------------------------------------------------------


BASE = """
[[listeners]]
address = "127.0.0.1:8080"
[[listeners]]
address = "127.0.0.1:8443"
tls = true
"""


@pytest.mark.parametrize(("text", "key", "reason"), [
    ('[acme]\ndirectory = "https://ca/dir"\n[[tls.certificates]]\nacme = true\n', "tls.certificates[0].names",
     "acme = true needs the names"),
    ('[acme]\ndirectory = "https://ca/dir"\n[[tls.certificates]]\nacme = true\nnames = ["*.a.test"]\n',
     "tls.certificates[0].names[0]", "wildcard names need the DNS-01 challenge"),
    ('[acme]\ndirectory = "https://ca/dir"\n[[tls.certificates]]\nacme = true\nnames = ["10.0.0.1"]\n',
     "tls.certificates[0].names[0]", "not a DNS name"),
    ('[[tls.certificates]]\nacme = true\nnames = ["a.test"]\n', "tls.certificates[0].acme",
     "needs [acme] directory"),
    ('[acme]\ndirectory = "https://ca/dir"\n[[tls.certificates]]\nacme = true\nnames = ["a.test"]\ncert = "x.pem"\n',
     "tls.certificates[0].cert", "not allowed with acme = true"),
    ('[acme]\ndirectory = "ftp://ca/dir"\n', "acme.directory", "is not an http(s) URL"),
    ('[acme]\ndirectory = "https://ca/dir"\neab_kid = "k"\n[[tls.certificates]]\nacme = true\nnames = ["a.test"]\n',
     "acme.eab_hmac_key", "eab_kid and eab_hmac_key go together"),
    ('[acme]\ndirectory = "https://ca/dir"\nchallenge = "dns-01"\n', "acme.challenge", "must be one of"),
])
def test_config_errors(tmp_path, text, key, reason):
    path = tmp_path / "fastlb.toml"
    path.write_text(BASE + text)
    (tmp_path / "x.pem").write_text("a readable file")
    with pytest.raises(ConfigError) as info:
        load(str(path), {})
    message = str(info.value)
    assert f"{path}: {key}: " in message and reason in message, message
    assert "\n" not in message


def test_config_needs_the_challenge_listener(tmp_path):
    path = tmp_path / "fastlb.toml"
    path.write_text('[[listeners]]\naddress = "127.0.0.1:8443"\ntls = true\n[acme]\ndirectory = "https://ca/dir"\n'
                    '[[tls.certificates]]\nacme = true\nnames = ["a.test"]\n')
    with pytest.raises(ConfigError, match=r"acme\.challenge: http-01 needs a plain listener"):
        load(str(path), {})
    path.write_text(path.read_text().replace("[acme]\n", '[acme]\nchallenge = "tls-alpn-01"\n'))
    cfg = load(str(path), {"FASTLB_ACME_RENEW_BEFORE": "48h"})
    assert cfg.acme.challenge == "tls-alpn-01" and cfg.acme.renew_before == 48 * 3600
    assert cfg.tls.certificates[0].names == ("a.test",)


def test_tls_alpn01_first_issuance(tmp_path, fastlb, pebbles):
    """Also: without directory_ca the directory is verified with the system store (SSL_CERT_FILE here),
    not with certifi's bundle, which would refuse pebble's."""
    http_port, tls_port = free_port(), free_port()
    pebble = pebbles(http_port, tls_port).start()
    config = write_config(tmp_path, http_port, tls_port, pebble.directory, "", challenge="tls-alpn-01")
    lb = start(fastlb, config, http_port, SSL_CERT_FILE=pebble.ca_file)
    root = pebble.root()
    wait_until(lambda: issued(lb, tls_port, root, "www.app.test"), 20, "issued", lb)
    assert "tls-alpn-01 challenge published" in lb.output
    assert not list((tmp_path / "acme" / "challenges" / "tls-alpn-01").iterdir())


def test_check_takes_a_managed_certificate_without_touching_storage(tmp_path):
    config = write_config(tmp_path, free_port(), free_port(), "https://127.0.0.1:1/dir", "")
    result = subprocess.run([sys.executable, "-m", "fastlb", "check", config], capture_output=True, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("FASTLB_")
                                 or k == "FASTLB_NO_EXTENSIONS"})
    assert result.returncode == 0 and result.stdout.strip() == f"{config}: ok", result.stderr
    assert not (tmp_path / "acme").exists()


# -- storage: the lock ---------------------------------------------------------------------------------


def test_storage_lock(tmp_path):
    storage = Storage(AcmeSpec(storage=str(tmp_path / "acme")))
    lock = tmp_path / "acme" / "certificates" / "a.test" / "lock"
    now = time.time()
    assert storage.lock("a.test", now)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert not storage.lock("a.test", now)  # held by this live process
    storage.unlock("a.test")
    assert not lock.exists()
    # Another node's lock holds until it expires; unlock never removes someone else's.
    lock.write_text(json.dumps({"host": "other-node", "pid": os.getpid(), "expires": now + 10}))
    assert not storage.lock("a.test", now)
    storage.unlock("a.test")
    assert lock.exists()
    assert storage.lock("a.test", now + 11)
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
    # A lock of this host whose process is gone is broken at once.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "expires": now + 300}))
    assert storage.lock("a.test", now)
