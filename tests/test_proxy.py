"""The data path end to end: real fastlb, real backends, real sockets."""

import hashlib
import http.client
import json
import os
import socket
import time

import psutil
import pytest
from conftest import free_port


def get(port, path="/", method="GET", headers=None, body=None, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    if own:
        conn.close()
    return resp, data


def raw(port, payload: bytes, timeout=5.0) -> bytes:
    """Send bytes, read until the server closes (or the timeout passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


@pytest.fixture
def two(backends, fastlb):
    b1, b2 = backends("b1", "b2")
    lb = fastlb({"FASTLB_BACKENDS": f"{b1.address},{b2.address}"})
    return lb, b1, b2


def test_round_robin_over_a_keepalive_connection(two):
    lb, b1, b2 = two
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    seen = [get(lb.port, "/rr", conn=conn)[0].getheader("X-Backend") for _ in range(6)]
    assert seen in (["b1", "b2"] * 3, ["b2", "b1"] * 3)


def test_every_request_reaches_one_backend_across_workers(two):
    lb, b1, b2 = two
    for i in range(40):
        resp, _ = get(lb.port, f"/n/{i}")
        assert resp.status == 200
    targets = sorted(r["target"] for r in b1.records() + b2.records())
    assert targets == sorted(f"/n/{i}" for i in range(40))
    assert len(b1.records()) >= 10 and len(b2.records()) >= 10


def test_forwarded_headers_and_hop_by_hop(two):
    lb, b1, b2 = two
    resp, data = get(lb.port, "/h?q=1", headers={
        "Host": "app.example.com:8443",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Port": "1",
        "X-Forwarded-Host": "evil",
        "Connection": "keep-alive, X-Secret",
        "X-Secret": "dropped",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Connection": "keep-alive",
        "X-Custom": "kept",
    })
    got = json.loads(data)
    headers = {k.lower(): v for k, v in got["headers"]}
    assert got["target"] == "/h?q=1"
    assert headers["host"] == "app.example.com:8443"
    # an untrusted client's X-Forwarded-For is not kept (DESIGN.md: only from trusted_proxies)
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-port"] == str(lb.port)
    assert headers["x-forwarded-host"] == "app.example.com:8443"
    assert headers["x-custom"] == "kept"
    for gone in ("x-secret", "keep-alive", "te", "proxy-connection", "connection"):
        assert gone not in headers, gone
    assert headers["x-request-id"]
    assert len([k for k, _ in got["headers"] if k.lower() == "x-forwarded-for"]) == 1


def test_request_id_kept_when_sent(two):
    lb, b1, b2 = two
    _, data = get(lb.port, "/rid", headers={"X-Request-ID": "abc-123"})
    headers = {k.lower(): v for k, v in json.loads(data)["headers"]}
    assert headers["x-request-id"] == "abc-123"


def test_trusted_proxy_xff_is_appended(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_TRUSTED_PROXIES": "127.0.0.0/8"})
    _, data = get(lb.port, "/", headers={"X-Forwarded-For": "203.0.113.7"})
    headers = {k.lower(): v for k, v in json.loads(data)["headers"]}
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"


@pytest.mark.parametrize("size", [0, 1, 100_000, 3_000_000])
def test_request_body_content_length(two, size):
    lb, b1, b2 = two
    body = os.urandom(size)
    resp, data = get(lb.port, "/up", method="POST", body=body, headers={"Content-Length": str(size)})
    got = json.loads(data)
    assert got["body_len"] == size
    assert got["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_request_body_chunked_is_rechunked(two):
    lb, b1, b2 = two
    parts = [os.urandom(n) for n in (1, 1000, 70_000, 5)]
    payload = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nTrailer-X: y\r\n\r\n"
    head = b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    out = raw(lb.port, head + payload)
    assert out.startswith(b"HTTP/1.1 200")
    got = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert got["body_sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    headers = {k.lower(): v for k, v in got["headers"]}
    assert headers["transfer-encoding"] == "chunked"
    assert "trailer-x" not in headers


@pytest.mark.parametrize("mode", ["cl", "chunked", "close"])
def test_response_framings(two, mode):
    lb, b1, b2 = two
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for _ in range(2):  # the client connection stays usable whatever the backend's framing
        resp, data = get(lb.port, f"/big/200000?mode={mode}", conn=conn)
        assert resp.status == 200 and data == b"x" * 200000
        if mode != "cl":
            assert resp.getheader("Transfer-Encoding") == "chunked"


def test_http10_client_gets_close_delimited_body_and_close(two):
    lb, b1, b2 = two
    out = raw(lb.port, b"GET /big/1000?mode=chunked HTTP/1.0\r\n\r\n")
    head, body = out.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"connection: close" in head.lower()
    assert b"transfer-encoding" not in head.lower()
    assert body == b"x" * 1000


def test_head_and_bodyless_statuses_keep_the_connection_in_sync(two):
    lb, b1, b2 = two
    out = raw(lb.port, (
        b"HEAD /big/5000 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/304 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /big/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    ))
    responses = out.split(b"HTTP/1.1 ")[1:]
    assert [r[:3] for r in responses] == [b"200", b"204", b"304", b"200"]
    assert b"Content-Length: 5000" in responses[0]
    assert responses[0].endswith(b"\r\n\r\n")
    assert responses[3].endswith(b"\r\n\r\nxxx")


def test_pipelined_requests_answered_in_order(two):
    lb, b1, b2 = two
    reqs = b"".join(b"GET /sleep/%s?i=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (d, i)
                    for i, d in enumerate([b"0.3", b"0", b"0.1", b"0"]))
    out = raw(lb.port, reqs + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    order = [json.loads(part.split(b"\r\n\r\n", 1)[1])["target"]
             for part in out.split(b"HTTP/1.1 ")[1:]]
    assert order == ["/sleep/0.3?i=0", "/sleep/0?i=1", "/sleep/0.1?i=2", "/sleep/0?i=3", "/last"]


def test_upstream_connections_are_reused(two):
    lb, b1, b2 = two
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for i in range(20):
        get(lb.port, f"/ka/{i}", conn=conn)
    peers = {r["peer_port"] for r in b1.records() + b2.records()}
    assert len(peers) == 2  # one pooled connection per server, reused 10 times each


def test_502_when_every_server_refuses(backends, fastlb):
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    lb = fastlb({"FASTLB_BACKENDS": ",".join(dead)})
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for _ in range(2):
        resp, data = get(lb.port, "/", conn=conn)  # kept alive: the table says "keep"
        assert resp.status == 502
        assert resp.getheader("X-Request-ID")
        assert data == b"502 Bad Gateway\n"


def test_retry_reaches_the_live_server(backends, fastlb):
    (b1,) = backends("b1")
    dead = f"127.0.0.1:{free_port()}"
    lb = fastlb({"FASTLB_BACKENDS": f"{dead},{b1.address}", "FASTLB_WORKERS": "1"})
    for _ in range(6):
        resp, _ = get(lb.port, "/")
        assert resp.status == 200
    assert len(b1.records()) == 6


def test_503_without_servers(fastlb, tmp_path):
    lb = fastlb()
    resp, _ = get(lb.port, "/")
    assert resp.status == 404  # no route at all without backends
    cfg = tmp_path / "w0.toml"
    cfg.write_text('[backends.empty]\nservers = [{ address = "127.0.0.1:1", weight = 0 }]\n'
                   '[[routes]]\nbackend = "empty"\n')
    lb2 = fastlb(args=["--config", str(cfg)])
    resp, data = get(lb2.port, "/")
    assert resp.status == 503 and resp.getheader("X-Request-ID")


def test_504_on_response_timeout(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[backends.slow]\nservers = ["{b1.address}"]\nresponse_timeout = "500ms"\n'
                   '[[routes]]\nbackend = "slow"\n')
    lb = fastlb(args=["--config", str(cfg)])
    started = time.monotonic()
    resp, _ = get(lb.port, "/sleep/5")
    assert resp.status == 504
    assert time.monotonic() - started < 2.5
    resp, _ = get(lb.port, "/sleep/0")
    assert resp.status == 200


def test_config_file_routes(backends, fastlb, tmp_path):
    api, web = backends("api", "web")
    cfg = tmp_path / "fastlb.toml"
    cfg.write_text(f"""
[[routes]]
host = "app.example.com"
path = "/api"
backend = "api"
[[routes]]
backend = "web"
[backends.api]
servers = ["{api.address}"]
[backends.web]
servers = ["{web.address}"]
""")
    lb = fastlb(args=["--config", str(cfg)])
    assert get(lb.port, "/api/x", headers={"Host": "app.example.com"})[0].getheader("X-Backend") == "api"
    assert get(lb.port, "/apix", headers={"Host": "app.example.com"})[0].getheader("X-Backend") == "web"
    assert get(lb.port, "/api", headers={"Host": "other"})[0].getheader("X-Backend") == "web"


def _worker_rss(lb) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in lb.worker_pids())


def test_backpressure_slow_reader_of_a_1gib_response(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_WORKERS": "1"})
    get(lb.port, "/warm")
    size = 1 << 30
    before = _worker_rss(lb)
    with socket.create_connection(("127.0.0.1", lb.port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        first = b""
        while b"\r\n\r\n" not in first:
            first += s.recv(65536)
        head, body = first.split(b"\r\n\r\n", 1)
        assert b"Content-Length: %d" % size in head
        got = len(body)
        peak = before
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # a slow reader: 64 KiB every 20 ms
            got += len(s.recv(65536))
            time.sleep(0.02)
            peak = max(peak, _worker_rss(lb))
        assert peak - before < 16 << 20, f"worker RSS grew by {(peak - before) >> 20} MiB"
        while got < size:
            chunk = s.recv(1 << 20)
            assert chunk, f"connection closed after {got} of {size} bytes"
            got += len(chunk)
    assert got == size


def test_backpressure_1gib_upload(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_WORKERS": "1"})
    get(lb.port, "/warm")
    before = _worker_rss(lb)
    size = 1 << 30
    block = b"y" * (1 << 20)
    peak = before
    with socket.create_connection(("127.0.0.1", lb.port)) as s:
        s.sendall(b"PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        for i in range(size // len(block)):
            s.sendall(block)
            if i % 64 == 0:
                peak = max(peak, _worker_rss(lb))
        resp = b""
        while not resp.endswith(b"}"):
            resp += s.recv(65536)
    assert resp.startswith(b"HTTP/1.1 200")
    assert b'"body_len": %d' % size in resp
    assert peak - before < 16 << 20, f"worker RSS grew by {(peak - before) >> 20} MiB"
