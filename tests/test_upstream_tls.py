"""TLS (and mTLS) from fastlb to its backends, and the PROXY protocol header it sends them: real fastlb,
real TLS servers (Python's ssl, counting handshakes and resumptions themselves), certificates from
trustme, HAProxy with `accept-proxy` as a real PROXY-protocol peer."""

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.request

import pytest
import trustme
from conftest import free_port, wait_port
from tlsutil import days_from_now, write_certificate

from fastlb import core

NAME = "backend.test"


class TlsBackend:
    """A keep-alive HTTPS server in a thread of the test process: answers every request with its name,
    and records each connection's SNI, whether its session was resumed, the client certificate and
    the PROXY header that came before the TLS handshake (`proxy=True`)."""

    def __init__(self, name, cert, key, client_ca=None, close=False, proxy=False):
        self.name = name
        self.close = close          # answer with Connection: close: each request a new connection
        self.proxy = proxy
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        if client_ca:
            self.context.load_verify_locations(client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.sni_callback = self._sni
        self.connections = []       # dicts: sni, resumed, client_cert, proxy, requests
        self.failures = []
        self._sni_seen = None
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def _sni(self, sslobj, name, context):
        sslobj.sni = name

    def _accept(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw):
        record = {"requests": 0}
        conn = None
        try:
            if self.proxy:
                data = b""
                while True:
                    status, consumed, src, sport, dst, dport, _ = core.parse_proxy_header(data)
                    if status != core.PROXY_MORE:
                        break
                    data += raw.recv(1) or b"!"  # one byte at a time: nothing of the TLS record is eaten
                record["proxy"] = (src, sport, dst, dport) if status == core.PROXY_OK else status
            conn = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            conn.do_handshake()
        except (OSError, ValueError) as exc:
            self.failures.append(repr(exc))
            if conn is not None:
                raw = socket.socket(fileno=conn.detach())
            # Read what the client sent after its Finished (its request, in TLS 1.3) before closing, as
            # nginx's lingering close does: closing with unread bytes would send an RST, which may
            # overtake the alert the handshake failure wrote.
            raw.settimeout(1)
            try:
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(65536):
                    pass
            except OSError:
                pass
            raw.close()
            return
        record.update(sni=getattr(conn, "sni", None), resumed=conn.session_reused,
                      client_cert=conn.getpeercert() or None)
        self.connections.append(record)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                record["requests"] += 1
                record.setdefault("heads", []).append(head.decode())
                body = self.name.encode()
                extra = b"Connection: close\r\n" if self.close else b""
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))
                if self.close:
                    return
        except OSError as exc:
            self.failures.append(repr(exc))
        finally:
            conn.close()

    def stop(self):
        self.sock.close()


@pytest.fixture
def pki(tmp_path):
    """A CA that signs the backends' certificates, another one fastlb does not know, a client CA."""
    ca, other, client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    paths = {"dir": tmp_path, "ca": str(tmp_path / "ca.pem"), "other_ca": str(tmp_path / "other-ca.pem"),
             "client_ca": str(tmp_path / "client-ca.pem")}
    ca.cert_pem.write_to_path(paths["ca"])
    other.cert_pem.write_to_path(paths["other_ca"])
    client_ca.cert_pem.write_to_path(paths["client_ca"])
    start, end = days_from_now(-1), days_from_now(90)
    paths["good"] = write_certificate(str(tmp_path), "good", [NAME, "127.0.0.1"], start, end, ca=ca)
    paths["wrong_name"] = write_certificate(str(tmp_path), "wrong", ["elsewhere.test"], start, end, ca=ca)
    paths["expired"] = write_certificate(str(tmp_path), "expired", [NAME], days_from_now(-30),
                                         days_from_now(-1), ca=ca)
    paths["unknown_ca"] = write_certificate(str(tmp_path), "unknown", [NAME], start, end, ca=other)
    paths["other_good"] = paths["unknown_ca"]
    client = client_ca.issue_cert("fastlb.client.test")
    paths["client"] = (str(tmp_path / "client.pem"), str(tmp_path / "client.key"))
    client.cert_chain_pems[0].write_to_path(paths["client"][0])
    client.private_key_pem.write_to_path(paths["client"][1])
    return paths


@pytest.fixture
def tls_backends():
    started = []

    def make(*args, **kwargs):
        backend = TlsBackend(*args, **kwargs)
        started.append(backend)
        return backend

    yield make
    for backend in started:
        backend.stop()


def write_config(path, backends, extra=""):
    """backends: {name: (servers, tls table or None, more backend keys)}, all TOML; a route /NAME each."""
    text = [extra]
    for name, (servers, tls, more) in backends.items():
        text.append(f'[[routes]]\npath = "/{name}"\nbackend = "{name}"\n')
        text.append(f"[backends.{name}]\nservers = {servers}\nretries = 1\n{more}\n")
        if tls is not None:
            text.append(f"[backends.{name}.tls]\n{tls}\n")
    path.write_text("\n".join(text))


def get(port, path, source="127.0.0.1", conn=None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    conn.request("GET", path, headers={"Host": NAME})
    response = conn.getresponse()
    return response.status, response.read().decode(), conn


def scrape(admin, family):
    """{frozenset(labels): value} of one metric family."""
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            labels, value = line[len(family) + 1:].rsplit("} ", 1)
            found[frozenset(part.replace('"', "") for part in labels.split(","))] = float(value)
    return found


def metric(admin, family, **labels):
    want = {f"{k}={v}" for k, v in labels.items()}
    return sum(v for k, v in scrape(admin, family).items() if want <= k)


def start(fastlb, tmp_path, backends, extra="", workers="1"):
    listen, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    path = tmp_path / "fastlb.toml"
    write_config(path, backends, extra)
    lb = fastlb({"FASTLB_CONFIG": str(path), "FASTLB_WORKERS": workers, "FASTLB_LISTEN": listen,
                 "FASTLB_ADMIN_LISTEN": admin})
    lb.port, lb.admin, lb.config = int(listen.rsplit(":", 1)[1]), admin, path
    return lb


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_verified_backend_resumes_its_sessions(fastlb, tmp_path, pki, tls_backends, version):
    # Every request is a new upstream connection (the backend closes it): after the first full
    # handshake each one resumes the session the previous one brought (a TLS 1.3 or 1.2 ticket).
    good = tls_backends("good", *pki["good"], close=True)
    if version == "1.2":
        good.context.maximum_version = ssl.TLSVersion.TLSv1_2
    lb = start(fastlb, tmp_path, {"app": (f'["{good.address}"]', f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"', "")})
    for _ in range(6):
        status, body, conn = get(lb.port, "/app")
        assert (status, body) == (200, "good")
        conn.close()
    assert [c["sni"] for c in good.connections] == [NAME] * 6
    assert [c["resumed"] for c in good.connections] == [False] + [True] * 5
    assert metric(lb.admin, "fastlb_upstream_tls_handshakes_total", backend="app", resumed="true") == 5
    assert metric(lb.admin, "fastlb_upstream_tls_handshakes_total", backend="app", resumed="false") == 1


def test_pooled_tls_connection_is_reused(fastlb, tmp_path, pki, tls_backends):
    good = tls_backends("good", *pki["good"])
    lb = start(fastlb, tmp_path, {"app": (f'["{good.address}"]', f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"', "")})
    for _ in range(5):
        status, body, conn = get(lb.port, "/app")
        assert (status, body) == (200, "good")
        conn.close()
    assert len(good.connections) == 1 and good.connections[0]["requests"] == 5


@pytest.mark.parametrize("case, reason, words", [
    ("wrong_name", "wrong_name", "Hostname mismatch"),
    ("expired", "expired", "certificate has expired"),
    ("unknown_ca", "unknown_ca", "unable to get local issuer certificate"),
])
def test_certificate_that_fails_verification_is_a_connect_failure(fastlb, tmp_path, pki, tls_backends,
                                                                  case, reason, words):
    # The bad server is tried first (weight), fails, and the good one answers; then the bad one is
    # the only one: 502.
    bad = tls_backends("bad", *pki[case])
    good = tls_backends("good", *pki["good"])
    servers = f'[{{ address = "{bad.address}", weight = 256 }}, {{ address = "{good.address}", weight = 1 }}]'
    lb = start(fastlb, tmp_path, {
        "app": (servers, f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"', "balance = \"roundrobin\""),
        "only": (f'["{bad.address}"]', f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"', ""),
    })
    status, body, _ = get(lb.port, "/app")
    assert (status, body) == (200, "good")
    assert get(lb.port, "/only")[0] == 502
    assert not bad.connections  # no request ever reached it
    line = lb.wait_for("TLS to the server failed")
    assert f"({reason})" in line and words in line and bad.address in line
    assert metric(lb.admin, "fastlb_upstream_tls_errors_total", reason=reason) >= 2
    assert metric(lb.admin, "fastlb_upstream_errors_total", server=bad.address, kind="tls") >= 2


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_mutual_tls(fastlb, tmp_path, pki, tls_backends, version):
    # A server that requires a client certificate: fastlb with one gets through; fastlb without one is
    # refused, in TLS 1.3 after its handshake (the alert comes in place of the response), 502 either way.
    secure = tls_backends("secure", *pki["good"], client_ca=pki["client_ca"])
    tls = f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"\nmin_version = "{version}"'
    if version == "1.2":
        secure.context.maximum_version = ssl.TLSVersion.TLSv1_2
    cert, key = pki["client"]
    lb = start(fastlb, tmp_path, {
        "with": (f'["{secure.address}"]', f'{tls}\ncert = "{cert}"\nkey = "{key}"', ""),
        "without": (f'["{secure.address}"]', tls, ""),
    })
    assert get(lb.port, "/with")[:2] == (200, "secure")
    assert secure.connections[0]["client_cert"]["subject"] is not None
    assert get(lb.port, "/without")[0] == 502
    line = lb.wait_for("TLS to the server failed")
    assert "(client_certificate)" in line or "(handshake)" in line
    assert metric(lb.admin, "fastlb_upstream_errors_total", backend="without", kind="tls") >= 1


def test_server_name_sni_from_host_and_server_override(fastlb, tmp_path, pki, tls_backends):
    good = tls_backends("good", *pki["good"])
    other = tls_backends("other", *pki["good"])
    servers = f'["{good.address}"]'
    lb = start(fastlb, tmp_path, {
        "byhost": (servers, f'ca = "{pki["ca"]}"\nsni_from_host = true', ""),
        "override": (f'[{{ address = "{other.address}", server_name = "{NAME}" }}]',
                     f'ca = "{pki["ca"]}"\nserver_name = "elsewhere.test"', ""),
        "byip": (servers, f'ca = "{pki["ca"]}"', ""),
    })
    assert get(lb.port, "/byhost")[:2] == (200, "good")       # Host: backend.test
    assert get(lb.port, "/override")[:2] == (200, "other")
    assert get(lb.port, "/byip")[:2] == (200, "good")         # verified against the IP address SAN
    assert [c["sni"] for c in good.connections] == [NAME, None]  # an IP literal is never sent as SNI
    assert [c["sni"] for c in other.connections] == [NAME]


def test_unverified_backend_is_asked_for_and_logged(fastlb, tmp_path, pki, tls_backends):
    bad = tls_backends("bad", *pki["unknown_ca"])
    lb = start(fastlb, tmp_path, {"app": (f'["{bad.address}"]', "verify = false", "")})
    assert "backends.app.tls.verify = false" in lb.output
    assert get(lb.port, "/app")[:2] == (200, "bad")


def status_of(admin, address):
    data = json.loads(urllib.request.urlopen(f"http://{admin}/status", timeout=5).read())
    backends = data["backends"]
    for backend in backends.values() if isinstance(backends, dict) else backends:
        for server in backend["servers"]:
            if server["address"] == address:
                return server
    raise AssertionError(address)


def test_health_checks_over_tls(fastlb, tmp_path, pki, tls_backends):
    good = tls_backends("good", *pki["good"])
    expired = tls_backends("expired", *pki["expired"])
    health = '[backends.app.health]\npath = "/health"\ninterval = "200ms"\ntimeout = "1s"\nrise = 1\nfall = 1'
    lb = start(fastlb, tmp_path, {"app": (f'["{good.address}", "{expired.address}"]',
                                          f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"', "")},
               extra="")
    lb.config.write_text(lb.config.read_text() + "\n" + health + "\n")
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reload")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        down = status_of(lb.admin, expired.address)
        if not down["up"] and status_of(lb.admin, good.address)["up"]:
            break
        time.sleep(0.1)
    assert not down["up"] and "certificate has expired" in down["last_check"], down
    assert any("/health" in h for c in good.connections for h in c.get("heads", []))
    for _ in range(4):
        assert get(lb.port, "/app")[:2] == (200, "good")


def test_reload_swaps_the_ca_and_refuses_a_broken_one(fastlb, tmp_path, pki, tls_backends):
    other = tls_backends("other", *pki["other_good"])  # signed by the CA fastlb does not know yet
    ca_file = tmp_path / "trusted.pem"
    shutil.copy(pki["ca"], ca_file)
    lb = start(fastlb, tmp_path, {"app": (f'["{other.address}"]', f'ca = "{ca_file}"\nserver_name = "{NAME}"', "")})
    assert get(lb.port, "/app")[0] == 502
    ca_file.write_text("not a certificate\n")
    result = subprocess.run(["python", "-m", "fastlb", "reload"], env=lb.env, capture_output=True, text=True)
    assert result.returncode == 1 and "backends.app.tls.ca" in result.stderr, result.stderr
    assert get(lb.port, "/app")[0] == 502  # still the old config
    shutil.copy(pki["other_ca"], ca_file)
    result = subprocess.run(["python", "-m", "fastlb", "reload"], env=lb.env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert get(lb.port, "/app")[:2] == (200, "other")


def test_send_proxy_v2_before_tls_private_to_its_client(fastlb, tmp_path, pki, tls_backends):
    # The header comes before the ClientHello and carries each client's own address; a connection made
    # for one client never carries another's request.
    good = tls_backends("good", *pki["good"], proxy=True)
    lb = start(fastlb, tmp_path, {"app": (f'["{good.address}"]', f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"',
                                          'send_proxy = "v2"')})
    conns = {}
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"):
        status, body, conns[source] = get(lb.port, "/app", source, conns.get(source))
        assert (status, body) == (200, "good")
    seen = sorted((c["proxy"][0], c["proxy"][2], c["proxy"][3], c["requests"]) for c in good.connections)
    assert seen == [("127.0.0.2", "127.0.0.1", lb.port, 2), ("127.0.0.3", "127.0.0.1", lb.port, 2)]


HAPROXY = shutil.which("haproxy")


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (tests/system-deps.sh installs it)")
@pytest.mark.parametrize("version, tls", [("v1", False), ("v2", True)])
def test_send_proxy_to_haproxy_accept_proxy(fastlb, backends, tmp_path, pki, version, tls):
    # HAProxy behind fastlb reads the header (accept-proxy) and passes the client's address on in
    # X-Forwarded-For: the backend behind it sees the real client, not fastlb.
    (backend,) = backends("b1")
    port = free_port()
    bind = f"bind 127.0.0.1:{port} accept-proxy"
    if tls:
        cert, key = pki["good"]
        bundle = tmp_path / "haproxy.pem"
        bundle.write_text(open(cert).read() + open(key).read())
        bind += f" ssl crt {bundle}"
    (tmp_path / "haproxy.cfg").write_text(
        "global\n  maxconn 100\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 10s\n"
        f"  timeout server 10s\nfrontend fe\n  {bind}\n  option forwardfor\n  default_backend be\n"
        f"backend be\n  server b1 {backend.address}\n")
    proxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        tls_table = f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"' if tls else None
        # Health checks send a header too (the check's own addresses), or HAProxy would refuse them.
        more = f'send_proxy = "{version}"\n[backends.app.health]\npath = "/health"\ninterval = "100ms"'
        lb = start(fastlb, tmp_path, {"app": (f'["127.0.0.1:{port}"]', tls_table, more)})
        deadline = time.monotonic() + 5
        while status_of(lb.admin, f"127.0.0.1:{port}")["last_check"] != "status 200":
            assert time.monotonic() < deadline, status_of(lb.admin, f"127.0.0.1:{port}")
            time.sleep(0.05)
        for source in ("127.0.0.2", "127.0.0.3"):
            status, _, conn = get(lb.port, "/app", source)
            assert status == 200
            conn.close()
        # HAProxy adds its own X-Forwarded-For field, last, from the address the PROXY header gave it.
        forwarded = [[v for k, v in r["headers"] if k.lower() == "x-forwarded-for"] for r in backend.records()
                     if r["target"] == "/app"]
        assert [f[-1] for f in forwarded] == ["127.0.0.2", "127.0.0.3"], forwarded
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(5)


def load(tmp_path, tls, server='"127.0.0.1:9"'):
    from fastlb import config

    path = tmp_path / "check.toml"
    path.write_text(f"[backends.app]\nservers = [{server}]\n[backends.app.tls]\n{tls}\n"
                    '[[routes]]\npath = "/"\nbackend = "app"\n')
    return config.load(str(path), {})


@pytest.mark.parametrize("tls, key, reason", [
    ('cert = "{cert}"', "backends.app.tls.key", "key is required with cert"),
    ('alpn = ["h2"]', "backends.app.tls.alpn[0]", "fastlb speaks HTTP/1.x"),
    ('ca = "{missing}"', "backends.app.tls.ca", "cannot read CA bundle"),
    ('server_name = "bad name"', "backends.app.tls.server_name", "not a valid host name"),
])
def test_config_errors_name_the_key(tmp_path, pki, tls, key, reason):
    from fastlb import config

    with pytest.raises(config.ConfigError) as info:
        load(tmp_path, tls.format(cert=pki["client"][0], missing=tmp_path / "none.pem"))
    assert info.value.key == key and reason in info.value.reason, str(info.value)


@pytest.mark.parametrize("tls, key", [
    ('ca = "{garbage}"', "backends.app.tls.ca"),
    ('cert = "{cert}"\nkey = "{wrong_key}"', "backends.app.tls.key"),
    ('cert = "{expired}"\nkey = "{expired_key}"', "backends.app.tls.cert"),
])
def test_broken_files_refuse_the_config(tmp_path, pki, tls, key):
    # What only OpenSSL can tell (not PEM, a key that does not match, an expired client certificate)
    # is found when the master builds the contexts: `fastlb check`, start and reload all refuse it.
    from fastlb import config
    from fastlb.net import upstream_tls

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cfg = load(tmp_path, tls.format(garbage=garbage, cert=pki["client"][0], wrong_key=pki["good"][1],
                                    expired=pki["expired"][0], expired_key=pki["expired"][1]))
    with pytest.raises(config.ConfigError) as info:
        upstream_tls.build_contexts(cfg)
    assert info.value.key == key, str(info.value)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_") or k == "FASTLB_NO_EXTENSIONS"}
    result = subprocess.run(["python", "-m", "fastlb", "check", str(tmp_path / "check.toml")],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 1 and key in result.stderr, result.stderr


def test_system_store_is_the_hashed_directory(tmp_path):
    # 18 KiB per context instead of 850 with the bundle file.
    from fastlb.net import upstream_tls

    context = upstream_tls.build_contexts(load(tmp_path, ""))["app"]
    if os.path.isdir(ssl.get_default_verify_paths().capath or ""):
        assert context.cert_store_stats()["x509_ca"] == 0  # nothing parsed up front
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_sni_from_host_pools_by_name(fastlb, tmp_path, pki, tls_backends):
    # A pooled connection verified for one Host never carries a request for another.
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "multi-ca.pem"))
    cert = write_certificate(str(tmp_path), "multi", ["a.test", "b.test"], days_from_now(-1),
                             days_from_now(30), ca=ca)
    multi = tls_backends("multi", *cert)
    lb = start(fastlb, tmp_path, {"app": (f'["{multi.address}"]', f'ca = "{tmp_path / "multi-ca.pem"}"\n'
                                          "sni_from_host = true", "")})
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for host in ("a.test", "b.test", "a.test:8080", "b.test"):
        conn.request("GET", "/app", headers={"Host": host})
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"multi")
    assert sorted((c["sni"], c["requests"]) for c in multi.connections) == [("a.test", 2), ("b.test", 2)]


def test_send_proxy_keeps_one_private_connection_per_server(fastlb, tmp_path, pki, tls_backends):
    # Round robin over two servers: the client's connection keeps one idle private connection to each.
    first = tls_backends("first", *pki["good"], proxy=True)
    second = tls_backends("second", *pki["good"], proxy=True)
    lb = start(fastlb, tmp_path, {"app": (f'["{first.address}", "{second.address}"]',
                                          f'ca = "{pki["ca"]}"\nserver_name = "{NAME}"', 'send_proxy = "v1"')})
    conn = None
    bodies = []
    for _ in range(6):
        status, body, conn = get(lb.port, "/app", "127.0.0.4", conn)
        bodies.append(body)
    assert sorted(bodies) == ["first"] * 3 + ["second"] * 3
    for backend in (first, second):
        assert [(c["proxy"][0], c["requests"]) for c in backend.connections] == [("127.0.0.4", 3)]


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_drops_an_ipv6_zone(version):
    # A link-local client (fe80::1%eth0 as the socket reports it): the header has no field for a zone,
    # and core's generators refuse one; the server must still get the address.
    from fastlb.net.upstream_tls import ServerLink

    link = ServerLink("b", None, None, "b", False, version)
    header = link.proxy_header(("fe80::1%eth0", 4000, 0, 2), ("fe80::2%eth0", 443, 0, 2))
    status, used, src, sport, dst, dport, _ = core.parse_proxy_header(header)
    assert (status, used, src, sport, dst, dport) == (core.PROXY_OK, len(header), "fe80::1", 4000, "fe80::2", 443)
