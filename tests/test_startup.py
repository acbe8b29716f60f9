"""Start-up and reload safety: ports another process holds, the pid file and its lock, reloads that
report back and survive a new generation that cannot boot.  Real `fastlb serve` processes throughout."""

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from conftest import free_port


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_") or k == "FASTLB_NO_EXTENSIONS"}
    env.update(extra)
    return env


def fastlb_cli(*args, env=None, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastlb", *args], env=env or clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def get(port, path="/") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    resp.read()
    return resp.status


def reloads(lb, result: str) -> float:
    admin = lb.env["FASTLB_ADMIN_LISTEN"].rsplit(":", 1)[1]
    conn = http.client.HTTPConnection("127.0.0.1", int(admin), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    match = re.search(rf'^fastlb_config_reloads_total\{{result="{result}"\}} (\S+)$', text, re.M)
    return float(match.group(1))


def workers(lb) -> set[int]:
    return lb.live_children()


def listening_socket(port: int, reuseport: bool = False) -> socket.socket:
    sock = socket.socket()
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


# -- 1. address in use ----------------------------------------------------------------------------------

def test_address_in_use_names_the_listener_and_the_process_holding_it(tmp_path):
    me = f"pid {os.getpid()} ("
    # Its own pid file: the default one may be held by a fastlb running on this machine.
    pid_file = str(tmp_path / "fastlb.pid")
    with listening_socket(free_port()) as held:
        port = held.getsockname()[1]
        out = fastlb_cli("serve", env=clean_env(FASTLB_LISTEN=f"127.0.0.1:{free_port()}",
                                                FASTLB_ADMIN_LISTEN=f"127.0.0.1:{port}",
                                                FASTLB_SERVER_PID_FILE=pid_file), timeout=15)
        assert out.returncode == 1
        line = out.stderr.strip()
        assert line.startswith(f"fastlb: cannot start: admin.address 127.0.0.1:{port}: address already in "
                               f"use by {me}"), line
        out = fastlb_cli("serve", env=clean_env(FASTLB_LISTEN=f"127.0.0.1:{port}",
                                                FASTLB_ADMIN_LISTEN=f"127.0.0.1:{free_port()}",
                                                FASTLB_SERVER_PID_FILE=pid_file), timeout=15)
        assert out.returncode == 1
        assert f"listeners[0].address 127.0.0.1:{port}: address already in use by {me}" in out.stderr


# -- 2. a port another process holds ----------------------------------------------------------------------

def test_a_second_instance_refuses_the_port_of_the_first_unless_allowed(backends, fastlb):
    (b1,) = backends("b1")
    first = fastlb({"FASTLB_BACKENDS": b1.address})
    listen = f"127.0.0.1:{first.port}"
    second = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_LISTEN": listen}, wait_ready=False)
    assert second.proc.wait(15) == 1
    time.sleep(0.2)
    assert (f"fastlb: cannot start: listeners[0].address {listen}: address already in use by "
            f"pid {first.proc.pid} (") in second.output
    assert "pass --allow-shared-ports to share it" in second.output
    # A socket of the test's own in an SO_REUSEPORT group is refused just the same.
    with listening_socket(free_port(), reuseport=True) as held:
        port = held.getsockname()[1]
        third = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_LISTEN": f"127.0.0.1:{port}"},
                       wait_ready=False)
        assert third.proc.wait(15) == 1
    shared = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_LISTEN": listen}, args=["--allow-shared-ports"])
    assert "ready:" in shared.output
    assert get(first.port) == 200


def test_a_reload_that_adds_a_taken_address_fails_with_its_holder(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    cfg = tmp_path / "taken.toml"
    routes = f'[[routes]]\nbackend = "b"\n[backends.b]\nservers = ["{b1.address}"]\n'
    port = free_port()
    cfg.write_text(f'[[listeners]]\naddress = "127.0.0.1:{port}"\n' + routes)
    lb = fastlb({"FASTLB_LISTEN": None}, args=["--config", str(cfg)])
    with listening_socket(free_port(), reuseport=True) as held:
        taken = held.getsockname()[1]
        cfg.write_text(f'[[listeners]]\naddress = "127.0.0.1:{port}"\n'
                       f'[[listeners]]\naddress = "127.0.0.1:{taken}"\n' + routes)
        out = fastlb_cli("reload", "--pid-file", lb.env["FASTLB_SERVER_PID_FILE"])
    assert out.returncode == 1
    assert (f"listeners[1].address 127.0.0.1:{taken}: address already in use by pid {os.getpid()} ("
            in out.stderr), out.stderr
    assert get(port) == 200


def test_reload_adds_worker_slots_to_its_own_port(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    cfg = tmp_path / "slots.toml"
    text = f'[[routes]]\nbackend = "b"\n[backends.b]\nservers = ["{b1.address}"]\n'
    cfg.write_text("[server]\nworkers = 1\n" + text)
    lb = fastlb({"FASTLB_WORKERS": None}, args=["--config", str(cfg)])
    assert len(workers(lb)) == 2
    cfg.write_text("[server]\nworkers = 3\n" + text)
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reloaded: generation 1")
    assert "reload failed" not in lb.output
    deadline = time.monotonic() + 10
    while len(workers(lb)) != 4:
        assert time.monotonic() < deadline, workers(lb)
        time.sleep(0.05)
    assert get(lb.port) == 200


# -- 3. the pid file --------------------------------------------------------------------------------------

def test_a_live_masters_pid_file_is_not_taken_over(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    pid_file = tmp_path / "shared.pid"
    first = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_PID_FILE": str(pid_file)})
    assert pid_file.read_text() == f"{first.proc.pid}\n"
    second = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_PID_FILE": str(pid_file)},
                    wait_ready=False)
    assert second.proc.wait(15) == 1
    time.sleep(0.2)
    assert (f"fastlb: cannot start: pid file {pid_file} is locked by the running master {first.proc.pid}"
            in second.output)
    assert pid_file.read_text() == f"{first.proc.pid}\n"
    assert first.stop() == 0
    assert not pid_file.exists()


def test_a_stale_pid_file_is_never_signalled_and_is_replaced(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    pid_file = tmp_path / "stale.pid"
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(f"{bystander.pid}\n")  # a dead master's file, its pid since reused
        for command in ("stop", "reload"):
            out = fastlb_cli(command, "--pid-file", str(pid_file))
            assert out.returncode == 1
            assert "no running master holds its lock" in out.stderr
        time.sleep(0.2)
        assert bystander.poll() is None
        lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_PID_FILE": str(pid_file)})
        assert pid_file.read_text() == f"{lb.proc.pid}\n"
    finally:
        bystander.kill()
        bystander.wait()


def test_the_pid_file_is_removed_only_while_it_is_ours(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    pid_file = tmp_path / "mine.pid"
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_PID_FILE": str(pid_file)})
    replacement = tmp_path / "other.pid"
    replacement.write_text("12345\n")
    replacement.replace(pid_file)   # someone else's file now
    assert lb.stop() == 0
    assert pid_file.read_text() == "12345\n"


def test_binary_upgrade_hands_the_pid_file_lock_to_the_new_master(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    pid_file = tmp_path / "upgrade.pid"
    env = {"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_PID_FILE": str(pid_file)}
    lb = fastlb(env)
    lb.proc.send_signal(signal.SIGUSR2)
    assert lb.proc.wait(15) == 0
    new_pid = int(pid_file.read_text())
    new = psutil.Process(new_pid)
    try:
        assert new_pid != lb.proc.pid and get(lb.port) == 200
        other = fastlb({**env, "FASTLB_LISTEN": f"127.0.0.1:{free_port()}"}, wait_ready=False)
        assert other.proc.wait(15) == 1
        time.sleep(0.2)
        assert f"pid file {pid_file} is locked by the running master {new_pid}" in other.output
        out = fastlb_cli("reload", "--pid-file", str(pid_file))
        assert out.returncode == 0, out.stderr
    finally:
        children = new.children()
        new.send_signal(signal.SIGTERM)
        new.wait(15)
        psutil.wait_procs(children, timeout=5)
    assert not pid_file.exists()


# -- 3 and 4. reload: the command's answer, and a new generation that cannot boot -------------------------

def test_reload_command_waits_for_the_outcome_and_fails_with_the_reason(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    cfg = tmp_path / "reload.toml"
    cfg.write_text(f'[[routes]]\nbackend = "b"\n[backends.b]\nservers = ["{b1.address}"]\n')
    lb = fastlb(args=["--config", str(cfg)])
    pid_file = lb.env["FASTLB_SERVER_PID_FILE"]
    out = fastlb_cli("reload", "--pid-file", pid_file)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "reloaded: generation 1\n"
    cfg.write_text('[[routes]]\nbackend = "missing"\n')
    out = fastlb_cli("reload", "--pid-file", pid_file)
    assert out.returncode == 1
    assert out.stderr == ("fastlb: reload failed, the master keeps the running config: "
                          f"{cfg}: routes[0].backend: backend 'missing' is not defined\n")
    assert get(lb.port) == 200
    assert reloads(lb, "failure") == 1


def broken_uvloop(tmp: Path) -> tuple[Path, Path]:
    """A directory for PYTHONPATH whose uvloop.py is the real uvloop until the flag file exists, then an
    ImportError.  Only children import uvloop (the master runs no event loop), each one afresh after
    fork, so the flag breaks the boot of every child started after it, and of nothing else."""
    shim, flag = tmp / "shim", tmp / "break-uvloop"
    shim.mkdir()
    (shim / "uvloop.py").write_text(f"""
import os, sys
if os.path.exists({str(flag)!r}):
    raise ImportError("uvloop is broken on purpose")
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != {str(shim)!r}]
del sys.modules["uvloop"]
import uvloop
sys.modules["uvloop"] = uvloop
""")
    return shim, flag


def test_a_reload_whose_workers_fail_to_boot_keeps_the_old_generation(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    shim, flag = broken_uvloop(tmp_path)
    env = {"FASTLB_BACKENDS": b1.address, "PYTHONPATH": f"{shim}:{os.environ.get('PYTHONPATH', '')}"}
    lb = fastlb(env)
    pid_file = lb.env["FASTLB_SERVER_PID_FILE"]
    serving = workers(lb)
    flag.touch()
    out = fastlb_cli("reload", "--pid-file", pid_file)
    assert out.returncode == 1
    assert "failed to boot: ImportError: uvloop is broken on purpose" in out.stderr, out.stderr
    assert lb.proc.poll() is None, lb.output
    line = lb.wait_for("reload failed")
    assert "reload failed, keeping the running config: " in line and "uvloop is broken on purpose" in line
    deadline = time.monotonic() + 5
    while workers(lb) != serving:   # the new generation's children are gone, the old ones untouched
        assert time.monotonic() < deadline, (workers(lb), serving)
        time.sleep(0.05)
    assert all(get(lb.port) == 200 for _ in range(10))
    assert reloads(lb, "failure") == 1 and reloads(lb, "success") == 0
    flag.unlink()
    out = fastlb_cli("reload", "--pid-file", pid_file)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 10
    while workers(lb) & serving:    # the old generation drains once the new one is ready
        assert time.monotonic() < deadline, lb.output
        time.sleep(0.05)
    assert get(lb.port) == 200
    assert reloads(lb, "success") == 1


def test_ready_line_counts_one_worker_in_the_singular(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_WORKERS": "1"})
    assert f"ready: 1 worker, pid {lb.proc.pid}" in lb.wait_for("ready:")
