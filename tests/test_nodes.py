"""One fastlb node among many behind an L4 balancer: sd_notify to systemd, draining that the balancer's
health check sees first, a watched (Kubernetes-mounted) config, and hash routing that agrees across
nodes.  Real processes, real sockets, loopback only."""

import http.client
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request

from conftest import free_port
from test_health import request

from fastlb.process.notify import Notifier


def healthz(lb):
    try:
        with urllib.request.urlopen(f"http://{lb.env['FASTLB_ADMIN_LISTEN']}/healthz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def settles_on(answer, expected, timeout=5.0) -> None:
    """answer() gives expected, and then five times in a row.  Right after a reload the old generation
    may still accept a connection or two from the shared sockets before its SIGTERM stops it."""
    deadline = time.monotonic() + timeout
    while answer() != expected:
        assert time.monotonic() < deadline, f"never {expected!r}"
        time.sleep(0.05)
    assert [answer() for _ in range(5)] == [expected] * 5


def admin_status(lb):
    with urllib.request.urlopen(f"http://{lb.env['FASTLB_ADMIN_LISTEN']}/status", timeout=5) as r:
        return json.loads(r.read())


# -- sd_notify -------------------------------------------------------------------------------------------

class NotifySocket:
    """The service manager's end: a datagram socket this test owns, as systemd's $NOTIFY_SOCKET."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = str(path)

    def next(self, timeout=15.0) -> dict:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self):
        self.sock.close()


def test_notify_ready_reloading_stopping(backends, fastlb, tmp_path):
    """Type=notify: READY=1 only once the workers serve, RELOADING=1 then READY=1 around a reload (also
    a refused one), STOPPING=1 on TERM."""
    (b1,) = backends("b1")
    cfg = tmp_path / "fastlb.toml"
    cfg.write_text(f'[backends.b]\nservers = ["{b1.address}"]\n[[routes]]\nbackend = "b"\n')
    notify = NotifySocket(tmp_path / "notify")
    try:
        lb = fastlb({"NOTIFY_SOCKET": notify.path}, args=["--config", str(cfg)], wait_ready=False)
        ready = notify.next()
        assert ready.get("READY") == "1" and "MAINPID" not in ready, (ready, lb.output)
        assert request(lb.port)[:2] == (200, "b1"), "READY=1 before the workers serve"
        lb.wait_for("ready:")

        lb.proc.send_signal(signal.SIGHUP)
        reloading = notify.next()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        done = notify.next()
        assert done["READY"] == "1" and done["STATUS"] == "reloaded: generation 1"

        cfg.write_text("[backends.b\n")  # broken: refused, the running config stays
        lb.proc.send_signal(signal.SIGHUP)
        assert notify.next()["RELOADING"] == "1"
        refused = notify.next()
        assert refused["READY"] == "1"
        assert refused["STATUS"].startswith("reload failed, keeping the running config: ")

        lb.proc.send_signal(signal.SIGTERM)
        assert notify.next()["STOPPING"] == "1"
        assert lb.proc.wait(15) == 0
    finally:
        notify.close()


def test_notifier_abstract_socket_and_no_socket():
    """An abstract $NOTIFY_SOCKET (`@name`) is reached; without one, nothing is sent and nothing fails."""
    name = f"fastlb-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        manager.settimeout(5)
        notifier = Notifier("@" + name)
        notifier.ready("serving", mainpid=4242)
        assert manager.recv(4096) == b"MAINPID=4242\nREADY=1\nSTATUS=serving"
        notifier.close()
    silent = Notifier("")
    silent.stopping()
    assert silent.sock is None
    gone = Notifier("@" + name)  # the manager went away: logged, never raised
    gone.stopping()
    gone.close()


# -- drain_delay ------------------------------------------------------------------------------------------

def test_term_answers_503_on_healthz_through_drain_delay_and_the_drain(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_DRAIN_DELAY": "1500ms"})
    assert healthz(lb) == 200
    slow = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    slow.request("GET", "/sleep/2.5")  # in flight across the delay and into the drain
    deadline = time.monotonic() + 2
    while not any(w["connections_open"] for w in admin_status(lb)["workers"]):  # the 250 ms tick
        assert time.monotonic() < deadline
        time.sleep(0.05)
    idle = [w["pid"] for w in admin_status(lb)["workers"] if not w["connections_open"]]
    lb.proc.send_signal(signal.SIGTERM)
    term = time.monotonic()
    lb.wait_for("serving for drain_delay")
    assert healthz(lb) == 503
    assert time.monotonic() - term < 0.5
    # A worker that dies in the delay is replaced: its socket's accept queue must still be served.
    os.kill(idle[0], signal.SIGKILL)  # not the one with the slow request
    assert "died with signal 9; respawning" in lb.wait_for(f"worker {idle[0]} (slot ")
    served = 0
    while time.monotonic() - term < 1.3:
        # New connections and requests are still served while the L4 balancer catches up.
        assert request(lb.port, timeout=2)[:2] == (200, "b1")
        served += 1
        time.sleep(0.02)
    time.sleep(max(0.0, term + 1.8 - time.monotonic()))
    # The workers are draining now; the control process outlives them, so /healthz still says 503.
    assert healthz(lb) == 503
    resp = slow.getresponse()
    assert resp.status == 200 and resp.getheader("Connection") == "close"
    assert lb.proc.wait(15) == 0
    print(f"\ndrain_delay 1.5 s: /healthz 503 at once, {served} requests served during the delay")


# -- [server] watch ---------------------------------------------------------------------------------------

class MountedConfigMap:
    """A directory laid out as the kubelet mounts a ConfigMap: FILE -> ..data/FILE, ..data -> a
    timestamped directory, each update a new directory and a rename(2) of ..data (AtomicWriter)."""

    def __init__(self, root):
        self.root = root
        self.root.mkdir()
        self.version = 0

    def update(self, files: dict[str, str]) -> None:
        self.version += 1
        data = self.root / f"..2026_12_05_00_00_{self.version:02d}.000000001"
        data.mkdir()
        for name, text in files.items():
            (data / name).write_text(text)
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(data.name)
        os.rename(tmp, self.root / "..data")


def test_watch_reloads_on_a_configmap_swap_debounced_and_refuses_a_broken_one(backends, fastlb, tmp_path):
    b1, b2, b3 = backends("b1", "b2", "b3")
    mount = MountedConfigMap(tmp_path / "config")

    def config(server):
        return f'[server]\nwatch = true\n[backends.b]\nservers = ["{server}"]\n[[routes]]\nbackend = "b"\n'

    mount.update({"fastlb.toml": config(b1.address)})
    lb = fastlb({"FASTLB_WORKERS": "1"}, args=["--config", str(mount.root / "fastlb.toml")])
    lb.wait_for("watch: reloading on changes in " + str(mount.root))
    assert request(lb.port)[1] == "b1"

    changed = time.monotonic()
    mount.update({"fastlb.toml": config(b2.address)})
    lb.wait_for("reloaded: generation 1")
    took = time.monotonic() - changed
    assert "watch: ..data changed; reloading" in lb.output
    settles_on(lambda: request(lb.port)[1], "b2")

    # Three updates within the debounce (the kubelet syncing a ConfigMap and a Secret one after the
    # other, say) and a file that is not an input: one reload, of the last update.
    (mount.root / "unrelated.txt").write_text("not an input")
    for server in (b1, b2, b3):
        mount.update({"fastlb.toml": config(server.address)})
        time.sleep(0.2)
    lb.wait_for("reloaded: generation 2")
    time.sleep(1.2)  # a second reload would come 1 s (DEBOUNCE) after a late event
    assert lb.output.count("; reloading") == 2, lb.output
    assert "unrelated.txt" not in lb.output
    settles_on(lambda: request(lb.port)[1], "b3")

    mount.update({"fastlb.toml": config(b1.address).replace("servers", "servres")})
    lb.wait_for("reload failed, keeping the running config: ")
    settles_on(lambda: request(lb.port)[1], "b3")
    print(f"\nwatch: a ConfigMap swap served {took:.2f} s later (debounce 1 s)")


def test_watch_follows_the_certificates_too(tmp_path):
    """The watched files are the config's inputs: config file, certificates and keys, htpasswd files
    (nginx reads auth_basic_user_file per request, so an edit there is expected to count), Ingress files."""
    from tlsutil import make_pems

    from fastlb import config
    from fastlb.process.watch import input_files

    cert, key = make_pems(tmp_path).default
    users = tmp_path / "users.htpasswd"
    users.write_text("alice:$2b$04$" + "a" * 53 + "\n")
    cfg_file = tmp_path / "fastlb.toml"
    cfg_file.write_text(f'[[listeners]]\naddress = "127.0.0.1:{free_port()}"\ntls = true\n'
                        f'[[tls.certificates]]\ncert = "{cert}"\nkey = "{key}"\n'
                        '[backends.b]\nservers = ["127.0.0.1:1"]\n'
                        '[[routes]]\nbackend = "b"\nbasic_auth = "users.htpasswd"\n')
    cfg = config.load(str(cfg_file), {}, {})
    assert input_files(cfg, ["ingress.yaml"]) == [
        str(cfg_file), os.path.abspath("ingress.yaml"), str(cert), str(key), str(users)]


def test_watch_sees_an_edit_behind_a_symlink_and_ignores_other_files(tmp_path):
    """A file the config names through a symlink is watched where it lives; Kubernetes' ..data
    directories are not (they are replaced on every update, and ..data itself is watched)."""
    import logging

    from fastlb.process.watch import Watcher

    (tmp_path / "etc").mkdir()
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "site.pem").write_text("one")
    (tmp_path / "etc" / "site.pem").symlink_to(tmp_path / "srv" / "site.pem")
    watcher = Watcher([str(tmp_path / "etc" / "site.pem")], logging.getLogger("test"))
    try:
        assert watcher.directories == [str(tmp_path / "etc"), str(tmp_path / "srv")]
        (tmp_path / "srv" / "other.pem").write_text("not an input")
        time.sleep(0.05)
        watcher.read(100.0)
        assert watcher.due is None
        (tmp_path / "srv" / "site.pem").write_text("two")
        time.sleep(0.05)
        watcher.read(100.0)
        assert watcher.take(100.5) is None  # debounced
        assert watcher.take(101.0) == ["site.pem"]
    finally:
        watcher.close()


# -- hashing across nodes ---------------------------------------------------------------------------------

def test_maglev_table_does_not_depend_on_the_order_servers_are_listed():
    """Maglev's build order decides contested slots (13 of 65,537 for four servers here): the servers
    are taken in name order, so configs listing them differently (generated from Kubernetes endpoints,
    say) still agree on every slot."""
    from fastlb.config import Address, BackendSpec, ServerSpec
    from fastlb.lb.backend import UP, Backend

    specs = [ServerSpec(Address(f"10.0.0.{i}", 8080), weight) for i, weight in ((1, 3), (2, 1), (3, 2), (4, 1))]

    def table(listed):
        spec = BackendSpec(name="b", servers=tuple(listed), balance="hash")
        balancer = Backend(spec, 0, bytearray([UP]) * len(listed)).balancer
        return [balancer.servers[i].name for i in balancer.table]

    assert table(specs) == table(specs[::-1]) == table(specs[1:] + specs[:1])



def test_two_nodes_hash_every_key_to_the_same_server_also_after_one_goes_down(backends, fastlb, tmp_path):
    """Maglev's table depends only on the servers and their weights, so two nodes (their own masters,
    one of them on the uncompiled twin, their configs listing the servers in opposite orders) agree on
    every key, and still agree after a server goes down."""
    servers = backends("s1", "s2", "s3", "s4")

    def config(name, listed):
        path = tmp_path / name
        names = ", ".join(f'"{s.address}"' for s in listed)
        path.write_text(f"""
[backends.b]
servers = [{names}]
balance = "hash"
hash_on = "header:X-Key"
[backends.b.health]
path = "/health"
interval = "200ms"
fall = 1
rise = 1
[[routes]]
backend = "b"
""")
        return str(path)

    one = fastlb(args=["--config", config("one.toml", servers)])
    two = fastlb({"FASTLB_NO_EXTENSIONS": "1"}, args=["--config", config("two.toml", servers[::-1])])
    keys = [f"user-{i}" for i in range(120)]

    def mapping(lb):
        out = {}
        conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
        for key in keys:
            conn.request("GET", "/", headers={"X-Key": key})
            resp = conn.getresponse()
            resp.read()
            out[key] = resp.getheader("X-Backend")
        conn.close()
        return out

    before = mapping(one)
    assert before == mapping(two)
    assert set(before.values()) == {"s1", "s2", "s3", "s4"}

    servers[2].set_health(503)
    deadline = time.monotonic() + 10
    while any(s["up"] for lb in (one, two) for s in admin_status(lb)["backends"]["b"]["servers"]
              if s["address"] == servers[2].address):
        assert time.monotonic() < deadline, "s3 never went down"
        time.sleep(0.1)
    time.sleep(0.6)  # every worker reads the state byte on its 250 ms tick
    after = mapping(one)
    assert after == mapping(two)
    assert "s3" not in after.values()
    # Maglev's disruption is minimal, not nil: rebuilt without s3, the table gives about 0.05% of its
    # slots (measured for four servers) from one healthy server to another.  Both nodes agree on those.
    owned = {k for k in keys if before[k] == "s3"}
    others = {k for k in keys if before[k] != after[k]} - owned
    assert len(others) <= 3, f"{len(others)} keys of healthy servers moved"
    print(f"\nhash across nodes: {len(keys)} keys agree; s3 down moved its {len(owned)} keys "
          f"and {len(others)} other")

