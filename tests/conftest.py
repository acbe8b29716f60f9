"""Fixtures that run the real thing: `fastlb serve` as a subprocess, real backends, loopback sockets."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).parent


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in one test run: the kernel readily hands
    a just-closed ephemeral port out again, which made two 'free' ports collide."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port}")


class Backend:
    """tests/backend.py in its own process; `records()` is every request it received."""

    def __init__(self, tmp: Path, name: str, port: int | None = None, args: tuple[str, ...] = ()):
        self.name = name
        self.port = port or free_port()
        self.log = tmp / f"backend-{name}-{self.port}.jsonl"
        self.health_file = tmp / f"health-{name}-{self.port}"
        self.args = args
        self.proc = None

    def start(self) -> "Backend":
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "backend.py"), "--port", str(self.port), "--name", self.name,
             "--log", str(self.log), "--health-file", str(self.health_file), *self.args],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout.readline().strip() == b"ready"
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def set_health(self, status: int) -> None:
        self.health_file.write_text(str(status))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class FastLB:
    """A `fastlb serve` master process with its stderr collected; stop() checks nothing is left."""

    def __init__(self, tmp: Path, env: dict[str, str], args: list[str] = ()):
        self.tmp = tmp
        listen = env.get("FASTLB_LISTEN")
        self.port = int(listen.rsplit(":", 1)[1]) if listen else None
        base = {k: v for k, v in os.environ.items() if not k.startswith("FASTLB_") or
                k == "FASTLB_NO_EXTENSIONS"}
        base.setdefault("FASTLB_ADMIN_LISTEN", f"127.0.0.1:{free_port()}")
        base["FASTLB_SERVER_PID_FILE"] = str(tmp / f"fastlb-{id(self)}.pid")
        base.update(env)
        self.env = base
        self.args = list(args)
        self.proc = None
        self.lines: list[str] = []
        self.children: list[psutil.Process] = []

    def start(self, wait_ready: bool = True) -> "FastLB":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastlb", "serve", *self.args], env=self.env,
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if wait_ready:
            self.wait_for("ready:")
            self.children = psutil.Process(self.proc.pid).children(recursive=True)
        return self

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if text in line:
                    return line
            if self.proc.poll() is not None and not any(text in line for line in self.lines):
                time.sleep(0.1)
                if not any(text in line for line in self.lines):
                    raise AssertionError(f"fastlb exited {self.proc.returncode}:\n" + "\n".join(self.lines))
            time.sleep(0.02)
        raise TimeoutError(f"no {text!r} in fastlb output:\n" + "\n".join(self.lines))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def live_children(self) -> set[int]:
        """The master's children that are alive now; one that exits while we look is not one of them
        (psutil raises NoSuchProcess from status() when a child is reaped between the two calls)."""
        live = set()
        for child in psutil.Process(self.proc.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    live.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return live

    def worker_pids(self) -> list[int]:
        """Live worker pids (children whose command line is the master's; control is one of them)."""
        return [p.pid for p in psutil.Process(self.proc.pid).children()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("fastlb did not stop in time:\n" + self.output) from None
        return self.proc.returncode


@pytest.fixture
def backends(tmp_path):
    started: list[Backend] = []

    def make(*names: str, args: tuple[str, ...] = ()) -> list[Backend]:
        made = [Backend(tmp_path, name, args=args).start() for name in names]
        started.extend(made)
        return made

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def fastlb(tmp_path):
    started: list[FastLB] = []

    def make(env: dict[str, str] | None = None, args: list[str] = (), wait_ready: bool = True) -> FastLB:
        env = dict(env or {})
        env.setdefault("FASTLB_LISTEN", f"127.0.0.1:{free_port()}")
        env.setdefault("FASTLB_WORKERS", "2")
        env = {k: v for k, v in env.items() if v is not None}  # None: leave the variable unset
        lb = FastLB(tmp_path, env, args).start(wait_ready=wait_ready)
        started.append(lb)
        return lb

    yield make
    for lb in started:
        if lb.proc.poll() is None:
            lb.stop(signal.SIGQUIT)
        for child in lb.children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, (
                f"child {child.pid} survived the master")
