"""/metrics and /status after known sequences of requests, parsed with prometheus_client's parser."""

import http.client
import json
import signal
import socket
import ssl
import time
import urllib.request

import psutil
import pytest
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from tlsutil import load_certificate, make_pems


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    return make_pems(tmp_path_factory.mktemp("pki"))


def scrape(lb) -> dict:
    """{(sample name, frozenset(labels)): value} of one /metrics scrape."""
    with urllib.request.urlopen(f"http://{lb.env['FASTLB_ADMIN_LISTEN']}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def total(samples, name, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def status(lb) -> dict:
    with urllib.request.urlopen(f"http://{lb.env['FASTLB_ADMIN_LISTEN']}/status", timeout=5) as r:
        return json.loads(r.read())


def get(port, path="/", conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    if own:
        conn.close()
    return resp.status


def settle():
    time.sleep(0.6)  # gauges and handshake failures are published on the workers' 250 ms tick


def test_exactly_100_requests_across_two_workers(backends, fastlb):
    b1, b2 = backends("b1", "b2")
    lb = fastlb({"FASTLB_BACKENDS": f"{b1.address},{b2.address}", "FASTLB_WORKERS": "2"})
    for _ in range(100):
        assert get(lb.port) == 200
    settle()
    m = scrape(lb)
    assert total(m, "fastlb_requests_total", code_class="2xx") == 100
    assert total(m, "fastlb_requests_total", route="*/", backend="default", code_class="2xx") == 100
    assert total(m, "fastlb_request_duration_seconds_count", route="*/") == 100
    assert total(m, "fastlb_request_duration_seconds_bucket", route="*/", le="+Inf") == 100
    assert 0 < total(m, "fastlb_request_duration_seconds_sum", route="*/") < 100
    assert total(m, "fastlb_upstream_response_seconds_count") == 100
    assert total(m, "fastlb_upstream_response_seconds_count", server=b1.address) == len(b1.records())
    listener = lb.env["FASTLB_LISTEN"]
    assert total(m, "fastlb_connections_total", listener=listener) == 100
    assert total(m, "fastlb_connections_open", listener=listener) == 0
    assert total(m, "fastlb_backend_server_up", backend="default") == 2
    assert total(m, "fastlb_build_info", version="0.1.0") == 1
    workers = status(lb)["workers"]
    assert len(workers) == 2 and sum(w["requests"] for w in workers) == 100
    assert all(w["requests"] > 0 for w in workers)  # the kernel spread the connections over both
    roles = {dict(ls)["process"] for (n, ls) in m if n == "fastlb_process_resident_memory_bytes"}
    assert roles == {"master", "control", "worker-0", "worker-1"}


def test_errors_retries_and_bad_requests_are_counted(backends, fastlb):
    (b1,) = backends("b1")
    dead = f"127.0.0.1:{free_port()}"
    lb = fastlb({"FASTLB_BACKENDS": f"{dead},{b1.address}", "FASTLB_WORKERS": "1"})
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for _ in range(4):
        assert get(lb.port, conn=conn) == 200
    assert get(lb.port, "/status/503", conn=conn) == 503
    with socket.create_connection(("127.0.0.1", lb.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    m = scrape(lb)
    connects = total(m, "fastlb_upstream_errors_total", server=dead, kind="connect")
    assert connects >= 2  # round robin sent some requests to the dead server first
    assert total(m, "fastlb_retries_total", backend="default") == connects
    assert total(m, "fastlb_requests_total", code_class="2xx") == 4
    assert total(m, "fastlb_requests_total", code_class="5xx") == 1
    assert total(m, "fastlb_bad_requests_total", status="400") == 1


@pytest.mark.parametrize("default_backend", [False, True])
def test_requests_are_counted_under_real_routes_only(fastlb, tmp_path, backends, default_backend):
    """A series per configured route with its backend, route "default" only when there is a
    default_backend, and route "-" (no route matched: the 404s)."""
    (b1,) = backends("b1")
    cfg = tmp_path / "r.toml"
    top = 'default_backend = "a"\n' if default_backend else ""
    cfg.write_text(top + f'[[routes]]\nhost = "a.example"\nbackend = "a"\n'
                         f'[backends.a]\nservers = ["{b1.address}"]\n')
    lb = fastlb(args=["--config", str(cfg)])
    assert get(lb.port) == (200 if default_backend else 404)
    m = scrape(lb)
    pairs = {(dict(ls)["route"], dict(ls)["backend"]) for (n, ls) in m if n == "fastlb_requests_total"}
    if default_backend:
        assert pairs == {("a.example/", "a"), ("default", "a"), ("-", "-")}
        assert total(m, "fastlb_requests_total", route="default", backend="a", code_class="2xx") == 1
    else:
        assert pairs == {("a.example/", "a"), ("-", "-")}
        assert total(m, "fastlb_requests_total", route="-", backend="-", code_class="4xx") == 1


def test_tls_handshakes_errors_and_certificate_expiry(backends, fastlb, pems):
    (b1,) = backends("b1")
    tls_port = free_port()
    cert, key = pems.default
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_WORKERS": "1", "FASTLB_TLS_HANDSHAKE_TIMEOUT": "1s",
                 "FASTLB_TLS_LISTEN": f"127.0.0.1:{tls_port}", "FASTLB_TLS_CERT": cert, "FASTLB_TLS_KEY": key})
    ctx = ssl.create_default_context(cafile=pems.ca)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    session = None
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", tls_port)) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
                session = s.session
                cipher = s.cipher()[0]
    for payload in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello"):
        with socket.create_connection(("127.0.0.1", tls_port)) as s:
            s.sendall(payload)
            s.settimeout(3)
            try:
                while s.recv(100):
                    pass
            except OSError:
                pass
    settle()
    m = scrape(lb)
    listener = f"127.0.0.1:{tls_port}"
    assert total(m, "fastlb_tls_handshakes_total", listener=listener, version="TLSv1.2", cipher=cipher,
                 resumed="false") == 1
    assert total(m, "fastlb_tls_handshakes_total", listener=listener, resumed="true") == 2
    # plain HTTP on the TLS port; a handshake record that is no ClientHello (unexpected_message)
    assert total(m, "fastlb_tls_handshake_errors_total", listener=listener, reason="not_tls") == 1
    assert total(m, "fastlb_tls_handshake_errors_total", listener=listener, reason="other") == 1
    # a client that connects and says nothing is cut by handshake_timeout (1 s here)
    with socket.create_connection(("127.0.0.1", tls_port)) as s:
        s.settimeout(5)
        assert s.recv(100) == b""
    settle()
    m = scrape(lb)
    assert total(m, "fastlb_tls_handshake_errors_total", listener=listener, reason="timeout") == 1
    assert total(m, "fastlb_tls_handshake_errors_total", listener=listener) == 3
    not_after = load_certificate(cert).not_valid_after_utc.timestamp()
    assert total(m, "fastlb_tls_certificate_expiry_seconds") == pytest.approx(not_after)


def test_counters_survive_a_worker_restart_and_reloads_are_counted(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    cfg = tmp_path / "m.toml"
    cfg.write_text(f'[[routes]]\nbackend = "a"\n[backends.a]\nservers = ["{b1.address}"]\n')
    lb = fastlb({"FASTLB_WORKERS": "1"}, args=["--config", str(cfg)])
    for _ in range(10):
        get(lb.port)
    admin_port = int(lb.env["FASTLB_ADMIN_LISTEN"].rsplit(":", 1)[1])
    worker = next(p for p in psutil.Process(lb.proc.pid).children()
                  if not any(c.laddr.port == admin_port for c in p.net_connections("tcp")))
    worker.send_signal(signal.SIGKILL)
    lb.wait_for("respawning")
    time.sleep(0.5)
    for _ in range(5):
        assert get(lb.port) == 200
    m = scrape(lb)
    assert total(m, "fastlb_requests_total", code_class="2xx") == 15  # never backwards
    assert total(m, "fastlb_worker_restarts_total") == 1
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reloaded: generation 1")
    cfg.write_text("[[routes]]\nbackend = 'nope'\n")
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reload failed")
    time.sleep(0.5)
    get(lb.port)
    m = scrape(lb)
    assert total(m, "fastlb_config_reloads_total", result="success") == 1
    assert total(m, "fastlb_config_reloads_total", result="failure") == 1
    assert total(m, "fastlb_requests_total", code_class="2xx") == 16


def test_status_json_and_server_state(backends, fastlb, tmp_path):
    b1, b2 = backends("b1", "b2")
    cfg = tmp_path / "s.toml"
    cfg.write_text(f"""
[[routes]]
backend = "b"
[backends.b]
servers = ["{b1.address}", {{ address = "{b2.address}", weight = 3 }}]
[backends.b.health]
path = "/health"
interval = "100ms"
fall = 1
""")
    lb = fastlb(args=["--config", str(cfg)])
    b2.set_health(503)
    lb.wait_for("is DOWN")
    m = scrape(lb)
    assert total(m, "fastlb_backend_server_up", server=b2.address) == 0
    assert total(m, "fastlb_backend_server_up", server=b1.address) == 1
    s = status(lb)
    assert s["version"] == "0.1.0" and s["uptime_seconds"] > 0
    assert [w["slot"] for w in s["workers"]] == [0, 1]
    assert s["listeners"][0]["address"] == lb.env["FASTLB_LISTEN"]
    servers = s["backends"]["b"]["servers"]
    assert [(x["address"], x["weight"], x["up"]) for x in servers] == [
        (b1.address, 1, True), (b2.address, 3, False)]
    assert servers[1]["last_check"] == "status 503"
