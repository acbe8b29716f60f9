"""The process model: signals, respawn, boot failure, heartbeat, no orphans."""

import http.client
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import free_port, wait_port


def get(port, path="/", timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def children(lb) -> list[psutil.Process]:
    return psutil.Process(lb.proc.pid).children(recursive=True)


def assert_all_gone(procs, timeout=3.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"still running: {[p.pid for p in alive]}")


def test_term_finishes_in_flight_requests_then_exits_0(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address})
    procs = children(lb)
    assert len(procs) == 3  # two workers and the control process
    result = {}

    def slow():
        result["r"] = get(lb.port, "/sleep/1")

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.3)
    assert lb.stop(signal.SIGTERM) == 0
    t.join()
    assert result["r"][0] == 200
    assert_all_gone(procs)
    with pytest.raises(OSError):
        wait_port(lb.port, timeout=0.3)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGQUIT])
def test_fast_stop(backends, fastlb, sig):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address})
    procs = children(lb)
    started = time.monotonic()
    assert lb.stop(sig) == 0
    assert time.monotonic() - started < 3
    assert_all_gone(procs)


def test_killed_worker_is_respawned_on_its_slot_while_others_serve(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address})
    before = set(lb.worker_pids())
    victim = next(p for p in children(lb) if p.pid in before)
    # find a worker (not control): control serves the admin port, workers don't
    admin_port = int(lb.env["FASTLB_ADMIN_LISTEN"].rsplit(":", 1)[1])
    for p in children(lb):
        if not any(c.laddr.port == admin_port for c in p.net_connections("tcp")):
            victim = p
            break
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()

    while victim.pid in lb.live_children() or len(lb.live_children()) < 3:
        assert time.monotonic() - killed_at < 1.0, "no respawn within 1 s"
        assert get(lb.port)[0] == 200  # the other worker keeps serving meanwhile
        time.sleep(0.02)
    for _ in range(20):
        assert get(lb.port)[0] == 200
    assert "died with signal 9; respawning" in lb.wait_for("respawning")


def test_stuck_worker_is_replaced_by_heartbeat(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address, "FASTLB_SERVER_HEARTBEAT_TIMEOUT": "1s",
                 "FASTLB_WORKERS": "1"})
    pids = set(lb.worker_pids())
    stuck = psutil.Process(max(pids))
    stuck.suspend()  # SIGSTOP: alive but never beats again
    try:
        lb.wait_for("missed its heartbeat", timeout=5)
        deadline = time.monotonic() + 3
        while stuck.pid in lb.worker_pids() or len(lb.worker_pids()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        if stuck.is_running():
            stuck.kill()
    assert get(lb.port)[0] == 200


def test_worker_that_cannot_boot_stops_the_master_with_the_reason(backends, fastlb, tmp_path):
    (b1,) = backends("b1")
    broken = tmp_path / "broken"
    broken.mkdir()
    # The master needs no event loop, so it boots; every child imports uvloop and fails.
    (broken / "uvloop.py").write_text("raise ImportError('uvloop is broken on purpose')\n")
    env = {"FASTLB_BACKENDS": b1.address, "PYTHONPATH": f"{broken}:{os.environ.get('PYTHONPATH', '')}"}
    lb = fastlb(env, wait_ready=False)
    code = lb.proc.wait(15)
    time.sleep(0.2)
    assert code != 0
    assert "failed to boot: ImportError: uvloop is broken on purpose" in lb.output
    assert lb.output.count("failed to boot") <= 6  # reported, not respawned in a loop


def test_workers_exit_when_the_master_is_killed(backends, fastlb):
    (b1,) = backends("b1")
    lb = fastlb({"FASTLB_BACKENDS": b1.address})
    procs = children(lb)
    lb.proc.kill()
    lb.proc.wait()
    assert_all_gone(procs, timeout=2.0)


def test_cli_version_and_check(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastlb", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("fastlb ")
    good = tmp_path / "good.toml"
    good.write_text('[backends.a]\nservers = ["127.0.0.1:9101"]\n[[routes]]\nbackend = "a"\n')
    out = subprocess.run([sys.executable, "-m", "fastlb", "check", str(good)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[backends.a]\nservers = ["127.0.0.1:9101"]\n[[routes]]\nbackend = "nope"\n')
    out = subprocess.run([sys.executable, "-m", "fastlb", "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(bad) in lines[0] and "routes[0].backend" in lines[0] and "nope" in lines[0]


def test_serve_with_a_bad_config_exits_1_with_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nworkers = "many"\n')
    out = subprocess.run([sys.executable, "-m", "fastlb", "serve", "--config", str(bad)],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "server.workers" in out.stderr


def test_demo_serves_out_of_the_box(tmp_path):
    # Every address the demo would take by default (8080, 8443, 18101-18103) moved to free ports
    # through the environment, so the test runs while a demo, or anything else, holds those.
    port = free_port()
    demo_backends = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_") or k == "FASTLB_NO_EXTENSIONS"}
    env["FASTLB_SERVER_PID_FILE"] = str(tmp_path / "demo.pid")
    env["FASTLB_ADMIN_LISTEN"] = f"127.0.0.1:{free_port()}"
    env["FASTLB_LISTEN"] = f"127.0.0.1:{port}"
    env["FASTLB_TLS_LISTEN"] = f"127.0.0.1:{free_port()}"
    env["FASTLB_BACKENDS"] = ",".join(demo_backends)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.Popen([sys.executable, "-m", "fastlb", "serve", "--demo"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 15
        while not any("stop with Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline, "\n".join(lines)
            lines.append(proc.stderr.readline())
        assert any(f"curl -s http://127.0.0.1:{port}/" in line for line in lines), lines
        answers = [get(port)[1].decode() for _ in range(6)]
        assert {a.split(":")[0] for a in answers} == {"hello from demo-1", "hello from demo-2", "hello from demo-3"}
        # The demo shows every X-Forwarded-* header fastlb sets.
        assert f"  X-Forwarded-Port: {port}\n" in answers[0], answers[0]
        assert f"  X-Forwarded-Host: 127.0.0.1:{port}\n" in answers[0], answers[0]
        assert "  X-Forwarded-Proto: http\n" in answers[0], answers[0]
        # The built-in backends serve on the addresses given.
        assert get(int(demo_backends[0].rsplit(":", 1)[1]))[1].startswith(b"hello from demo-1:")
        procs = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(10) == 0
        assert_all_gone(procs)
    finally:
        if proc.poll() is None:
            proc.kill()
