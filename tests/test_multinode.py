"""Two fastlb nodes, each its own master, behind HAProxy standing in for a cloud L4 balancer: `mode tcp`,
`send-proxy-v2`, `option httpchk` on each node's admin /healthz.  Clients connect from distinct
loopback addresses (127.0.0.2-5).  One test walks the four claims of issue 19 in order, on the same
processes (starting them is most of the cost):

1. backends see each client's own address in X-Forwarded-For;
2. `hash` on client_ip sends each client to the same server through either node;
3. a rolling restart (TERM, then a new start, one node at a time) under keep-alive and new-connection
   load fails no request;
4. a node killed with SIGKILL loses only what it held when it died (requests in flight, and connections
   its kernel had completed but nobody accepted: a client can have one of each), and HAProxy routes
   around it from the moment its port refuses connections.
"""

import http.client
import json
import shutil
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest
from conftest import free_port, wait_port

HAPROXY = shutil.which("haproxy")
SOURCES = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]


class HAProxy:
    def __init__(self, tmp_path, nodes):
        """nodes: [(name, listener port, admin port)]."""
        self.port = free_port()
        self.stats = str(tmp_path / "haproxy.sock")
        servers = "\n".join(f"    server {name} 127.0.0.1:{port} check port {admin}" for name, port, admin in nodes)
        config = f"""
global
    maxconn 1000
    stats socket {self.stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # A refused connect (a node that died) is retried on the other node.
    retries 3
    option redispatch 1
frontend fe
    bind 127.0.0.1:{self.port}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server inter 200ms fall 2 rise 2 send-proxy-v2
{servers}
"""
        path = tmp_path / "haproxy.cfg"
        path.write_text(config)
        check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def status(self) -> dict[str, str]:
        """Each node's state as HAProxy's health checks see it: UP, DOWN, ..."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(self.stats)
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "nodes" and r["svname"] not in
                ("FRONTEND", "BACKEND")}

    def wait(self, name, state, timeout=10.0) -> float:
        start = time.monotonic()
        while not self.status()[name].startswith(state):
            assert time.monotonic() - start < timeout, f"{name} never {state}: {self.status()}"
            time.sleep(0.02)
        return time.monotonic() - start

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class Load:
    """A client per source address, in threads: keep-alive ones and one-connection-per-request ones.
    Every answer is checked: 200, X-Forwarded-For = the client's own address (the backends echo the
    request they got), and the server it came from is recorded."""

    def __init__(self, port):
        self.port = port
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[tuple[float, str]] = []  # (time.monotonic(), what went wrong)
        self.servers: dict[str, set[str]] = {s: set() for s in SOURCES}
        self.threads = [threading.Thread(target=self._run, args=(source, i % 2 == 0), daemon=True)
                        for i, source in enumerate(SOURCES)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(20)

    def count(self) -> int:
        with self.lock:
            return self.ok

    def _run(self, source, keep_alive):
        conn = None
        while not self.stop_event.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10,
                                                      source_address=(source, 0))
                conn.request("GET", f"/{source}", headers={} if keep_alive else {"Connection": "close"})
                resp = conn.getresponse()
                body = resp.read()
                forwarded = dict((k.lower(), v) for k, v in json.loads(body)["headers"]).get("x-forwarded-for")
                with self.lock:
                    if resp.status != 200 or forwarded != source:
                        self.failures.append((time.monotonic(), f"{source}: {resp.status} X-Forwarded-For {forwarded}"))
                    else:
                        self.ok += 1
                        self.servers[source].add(resp.getheader("X-Backend"))
                if not keep_alive or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with self.lock:
                    self.failures.append((time.monotonic(), f"{source}: {exc!r}"))
                if conn is not None:
                    conn.close()
                conn = None


def node_config(tmp_path, name, port, admin, servers):
    path = tmp_path / f"{name}.toml"
    listed = ", ".join(f'"{s.address}"' for s in servers)
    path.write_text(f"""
[server]
workers = 1
graceful_timeout = "5s"
# HAProxy takes a node out after 2 failed checks 200 ms apart: well within this.
drain_delay = "1500ms"
trusted_proxies = ["127.0.0.1/32"]
[admin]
address = "127.0.0.1:{admin}"
[[listeners]]
address = "127.0.0.1:{port}"
proxy_protocol = true
[backends.app]
servers = [{listed}]
balance = "hash"
hash_on = "client_ip"
[[routes]]
backend = "app"
""")
    return path


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (tests/system-deps.sh installs it)")
def test_two_nodes_behind_haproxy(backends, fastlb, tmp_path):
    servers = backends("s1", "s2", "s3")
    nodes = {}
    for name in ("a", "b"):
        port, admin = free_port(), free_port()
        nodes[name] = {"port": port, "admin": admin, "config": node_config(tmp_path, name, port, admin, servers)}

    def start(name):
        node = nodes[name]
        env = {"FASTLB_LISTEN": f"127.0.0.1:{node['port']}", "FASTLB_ADMIN_LISTEN": f"127.0.0.1:{node['admin']}",
               "FASTLB_WORKERS": None}
        node["lb"] = fastlb(env, args=["--config", str(node["config"])])

    for name in nodes:
        start(name)
    haproxy = HAProxy(tmp_path, [(name, n["port"], n["admin"]) for name, n in nodes.items()])
    try:
        haproxy.wait("a", "UP")
        haproxy.wait("b", "UP")

        # 1 and 2: new connections alternate between the nodes (roundrobin); each client is answered by
        # one server whichever node it came through, and its address reaches the backend.
        with Load(haproxy.port) as load:
            while load.count() < 200:
                time.sleep(0.05)
        assert load.failures == []
        assert all(len(seen) == 1 for seen in load.servers.values()), load.servers
        served = {name: sum(int(line.split()[-1]) for line in _metrics(n["admin"])) for name, n in nodes.items()}
        assert all(count > 0 for count in served.values()), served
        mapping = {source: next(iter(seen)) for source, seen in load.servers.items()}

        # 3: rolling restart under load.
        taken_out = []
        with Load(haproxy.port) as load:
            time.sleep(0.5)
            for name in ("a", "b"):
                lb = nodes[name]["lb"]
                lb.proc.send_signal(signal.SIGTERM)
                taken_out.append(haproxy.wait(name, "DOWN"))  # while the node still serves (drain_delay)
                assert lb.proc.wait(15) == 0
                start(name)
                haproxy.wait(name, "UP")
                time.sleep(0.3)
            time.sleep(0.5)
        rolling = (load.ok, list(load.failures))
        assert load.failures == [], load.failures[:5]
        assert {source: next(iter(seen)) for source, seen in load.servers.items()} == mapping
        assert max(taken_out) < 1.5, f"HAProxy took {taken_out} s to see the drain, drain_delay is 1.5 s"

        # 4: SIGKILL a node (master and children at once: the machine died) under load.
        with Load(haproxy.port) as load:
            time.sleep(0.5)
            lb = nodes["a"]["lb"]
            victims = [lb.proc, *(psutil.Process(pid) for pid in lb.live_children())]
            before = load.count()
            killed_at = time.monotonic()
            for victim in victims:
                victim.kill()
            refused_at = wait_refused(nodes["a"]["port"])
            lb.proc.wait(5)
            haproxy.wait("a", "DOWN")
            after_down = load.count()
            time.sleep(1.0)
            recovered = load.count() - after_down
        killed = (load.ok, list(load.failures), load.count() - before)
        # Only what the node held when it died fails: once its port refuses, HAProxy's `retries` and
        # `redispatch` carry every new connection to the other node, DOWN or not.  (The 0.25 s is the
        # client thread's own delay in noting a reset it got before that moment.)
        late = [(round(at - killed_at, 3), what) for at, what in load.failures if at > refused_at + 0.25]
        assert late == [], f"failed after the port refused ({refused_at - killed_at:.3f} s after the kill): {late}"
        assert recovered > 20, "no traffic after HAProxy took the dead node out"
        assert {source: next(iter(seen)) for source, seen in load.servers.items()} == mapping
    finally:
        haproxy.stop()
    print(f"\nmulti-node: rolling restart of 2 nodes under load: {rolling[0]} requests, {len(rolling[1])} failed; "
          f"HAProxy saw each drain after {', '.join(f'{t:.2f}' for t in taken_out)} s; "
          f"SIGKILL of a node: {len(killed[1])} of {killed[0] + len(killed[1])} requests failed, "
          f"{killed[2]} answered after the kill")


def wait_refused(port, timeout=5.0) -> float:
    """The time.monotonic() at which nothing listens on the port any more: the killed node's sockets are
    all closed (the kernel closes a listener when the last process holding it is gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except ConnectionRefusedError:
            return time.monotonic()
        except OSError:
            pass
        time.sleep(0.001)
    raise TimeoutError(f"127.0.0.1:{port} still accepts {timeout} s after the kill")


def _metrics(admin_port):
    """fastlb_requests_total lines of a node's /metrics."""
    with socket.create_connection(("127.0.0.1", admin_port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [line for line in data.decode().splitlines() if line.startswith("fastlb_requests_total{")]
