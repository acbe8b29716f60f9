"""Zero-downtime operations under load: reload, worker crash, binary upgrade, privilege drop."""

import asyncio
import collections
import http.client
import os
import pwd
import signal
import ssl
import threading
import time
import uuid

import psutil
import pytest
import websockets
from conftest import free_port
from tlsutil import make_pems
from websockets.sync.client import connect as ws_connect


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    return make_pems(tmp_path_factory.mktemp("pki"))


class Load:
    """Client threads sending requests with unique X-Request-IDs until stopped; every outcome kept."""

    def __init__(self, port, tls_port=None, ca=None):
        self.targets = [("http", port, True), ("http", port, False)]
        if tls_port:
            self.targets += [("https", tls_port, True), ("https", tls_port, False)]
        self.ca = ca
        self.outcomes = collections.Counter()
        self.sent_ids = []
        self.errors = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=t, daemon=True) for t in self.targets]

    def _conn(self, scheme, port):
        if scheme == "https":
            ctx = ssl.create_default_context(cafile=self.ca)
            return http.client.HTTPSConnection("localhost", port, timeout=10, context=ctx)
        return http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def _run(self, scheme, port, keep_alive):
        conn = self._conn(scheme, port)
        while not self.stop.is_set():
            rid = uuid.uuid4().hex
            try:
                if not keep_alive:
                    conn = self._conn(scheme, port)
                conn.request("GET", "/load", headers={"X-Request-ID": rid})
                resp = conn.getresponse()
                resp.read()
                outcome = resp.status
                if resp.getheader("Connection", "").lower() == "close" or not keep_alive:
                    conn.close()
                    conn = self._conn(scheme, port)
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                outcome = type(exc).__name__
                with self.lock:
                    self.errors.append(f"{scheme} ka={keep_alive}: {exc!r}")
                conn.close()
                conn = self._conn(scheme, port)
            with self.lock:
                self.outcomes[outcome] += 1
                self.sent_ids.append(rid)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(15)


def received_ids(*backends):
    ids = collections.Counter()
    for b in backends:
        for r in b.records():
            for k, v in r["headers"]:
                if k.lower() == "x-request-id":
                    ids[v] += 1
    return ids


def start_ws_echo():
    """A websockets echo server on its own loop thread; returns its address."""
    port = free_port()
    ready = threading.Event()

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    def run():
        async def main():
            async with websockets.serve(echo, "127.0.0.1", port):
                ready.set()
                await asyncio.Future()
        asyncio.run(main())

    threading.Thread(target=run, daemon=True).start()
    ready.wait(5)
    return f"127.0.0.1:{port}"


def test_ten_reloads_under_load_lose_nothing(backends, fastlb, tmp_path, pems):
    b1, b2 = backends("b1", "b2")
    ws_backend = start_ws_echo()
    tls_port = free_port()
    cfg = tmp_path / "reload.toml"
    cfg.write_text(f"""
[[listeners]]
address = "127.0.0.1:{tls_port}"
tls = true
[[tls.certificates]]
cert = "{pems.default[0]}"
key = "{pems.default[1]}"
[[routes]]
path = "/ws"
backend = "ws"
[[routes]]
backend = "b"
[backends.b]
servers = ["{b1.address}", "{b2.address}"]
[backends.ws]
servers = ["{ws_backend}"]
""")
    lb = fastlb({"FASTLB_WORKERS": "2"}, args=["--config", str(cfg)])
    ws = ws_connect(f"ws://127.0.0.1:{lb.port}/ws", legacy=True)
    ws.send("before")
    assert ws.recv(timeout=5) == "before"
    with Load(lb.port, tls_port, pems.ca) as load:
        time.sleep(0.5)
        for generation in range(1, 11):
            # A reload now ends when the new generation is ready; SIGHUPs sent while one is under way
            # are folded into one more reload, so wait for each to count ten.
            lb.proc.send_signal(signal.SIGHUP)
            lb.wait_for(f"reloaded: generation {generation}")
            time.sleep(0.5)
    assert lb.output.count("reloaded: generation") == 10
    total = sum(load.outcomes.values())
    assert total > 200
    assert load.outcomes == {200: total}, (load.outcomes, load.errors[:5])
    got = received_ids(b1, b2)
    assert sorted(got) == sorted(load.sent_ids)          # every request reached a backend ...
    assert set(got.values()) == {1}                      # ... exactly once
    ws.send("after")
    assert ws.recv(timeout=5) == "after"                 # the tunnel survived ten generations
    ws.close()
    print(f"\nreload x10 under load: {total} requests, 0 failed")


def test_killed_worker_under_load_fails_only_in_flight_requests(backends, fastlb):
    b1, b2 = backends("b1", "b2")
    lb = fastlb({"FASTLB_BACKENDS": f"{b1.address},{b2.address}", "FASTLB_WORKERS": "2"})
    admin_port = int(lb.env["FASTLB_ADMIN_LISTEN"].rsplit(":", 1)[1])
    workers = [p for p in psutil.Process(lb.proc.pid).children()
               if not any(c.laddr.port == admin_port for c in p.net_connections("tcp"))]
    with Load(lb.port) as load:
        time.sleep(1.0)
        workers[0].send_signal(signal.SIGKILL)
        time.sleep(1.5)
    total = sum(load.outcomes.values())
    failed = total - load.outcomes[200]
    # Only requests in flight on the killed worker can fail: at most one per client thread.
    assert failed <= len(load.targets), (load.outcomes, load.errors)
    print(f"\nSIGKILL of a worker under load: {failed} of {total} requests failed")


def test_binary_upgrade_under_load(backends, fastlb, tmp_path):
    b1, b2 = backends("b1", "b2")
    lb = fastlb({"FASTLB_BACKENDS": f"{b1.address},{b2.address}"})
    pid_file = lb.env["FASTLB_SERVER_PID_FILE"]
    old_pid = lb.proc.pid
    assert open(pid_file).read().strip() == str(old_pid)
    with Load(lb.port) as load:
        time.sleep(0.5)
        lb.proc.send_signal(signal.SIGUSR2)
        assert lb.proc.wait(15) == 0     # the old master hands over, drains and exits
        time.sleep(1.0)
    new_pid = int(open(pid_file).read().strip())
    assert new_pid != old_pid and psutil.pid_exists(new_pid)
    total = sum(load.outcomes.values())
    assert load.outcomes == {200: total}, (load.outcomes, load.errors[:5])
    got = received_ids(b1, b2)
    assert sorted(got) == sorted(load.sent_ids) and set(got.values()) == {1}
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    new = psutil.Process(new_pid)
    children = new.children(recursive=True)
    new.send_signal(signal.SIGTERM)
    new.wait(15)
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    print(f"\nbinary upgrade under load: {total} requests, 0 failed")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_workers_run_unprivileged_and_keys_stay_root_only(backends, fastlb, tmp_path, pems):
    (b1,) = backends("b1")
    key = tmp_path / "root-only.key"
    key.write_bytes(open(pems.default[1], "rb").read())
    key.chmod(0o600)
    tls_port = free_port()
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_USER": "nobody",
                 "FASTLB_TLS_LISTEN": f"127.0.0.1:{tls_port}", "FASTLB_TLS_CERT": pems.default[0],
                 "FASTLB_TLS_KEY": str(key)})
    nobody = pwd.getpwnam("nobody").pw_uid
    assert psutil.Process(lb.proc.pid).uids().effective == 0
    for child in psutil.Process(lb.proc.pid).children():
        assert child.uids().real == child.uids().effective == nobody
    ctx = ssl.create_default_context(cafile=pems.ca)
    conn = http.client.HTTPSConnection("localhost", tls_port, timeout=5, context=ctx)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    # the key file itself is not readable by the workers' user
    pid = os.fork()
    if pid == 0:
        os.setgid(pwd.getpwnam("nobody").pw_gid)
        os.setuid(nobody)
        try:
            open(key).close()
            os._exit(1)
        except PermissionError:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0


def test_unknown_user_is_a_config_error(fastlb, tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_") or k == "FASTLB_NO_EXTENSIONS"}
    env.update(FASTLB_SERVER_USER="no-such-user-x", FASTLB_LISTEN=f"127.0.0.1:{free_port()}",
               FASTLB_ADMIN_LISTEN=f"127.0.0.1:{free_port()}")
    out = subprocess.run([sys.executable, "-m", "fastlb", "serve"], env=env, capture_output=True,
                         text=True, timeout=10)
    assert out.returncode == 1
    assert out.stderr.strip() == "environment: server.user: no such user 'no-such-user-x'"


def test_reload_opens_added_and_closes_removed_listeners(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    first, second = free_port(), free_port()
    cfg = tmp_path / "listeners.toml"

    def write(port):
        cfg.write_text(f'[[listeners]]\naddress = "127.0.0.1:{port}"\n[[routes]]\nbackend = "b"\n'
                       f'[backends.b]\nservers = ["{b1.address}"]\n')

    write(first)
    lb = fastlb({"FASTLB_LISTEN": None}, args=["--config", str(cfg)])
    conn = http.client.HTTPConnection("127.0.0.1", first, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
    write(second)
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reloaded: generation 1")
    deadline = time.monotonic() + 5
    while True:
        try:
            socket_closed = False
            http.client.HTTPConnection("127.0.0.1", first, timeout=1).request("GET", "/")
        except ConnectionRefusedError:
            socket_closed = True
        if socket_closed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert socket_closed, "the removed listener still accepts connections"
    conn = http.client.HTTPConnection("127.0.0.1", second, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200


def test_invalid_reload_keeps_the_running_config(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    cfg = tmp_path / "keep.toml"
    cfg.write_text(f'[[routes]]\nbackend = "b"\n[backends.b]\nservers = ["{b1.address}"]\n')
    lb = fastlb(args=["--config", str(cfg)])
    cfg.write_text('[[routes]]\nbackend = "missing"\n')
    lb.proc.send_signal(signal.SIGHUP)
    line = lb.wait_for("reload failed")
    assert f"{cfg}: routes[0].backend: backend 'missing' is not defined" in line
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=5)
    conn.request("GET", "/")
    assert conn.getresponse().status == 200
