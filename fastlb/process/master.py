"""The master: holds the listening sockets, forks workers and the control process, handles signals.

It runs no event loop (as gunicorn's arbiter): signal handlers only append to a queue and wake the main
loop through a self-pipe; the loop dispatches to `handle_<signal>()`, reaps children, respawns crashed
ones with back-off and kills workers whose heartbeat in shared memory went stale.  A child that fails
while booting exits with BOOT_ERROR, and the master then stops everything and exits non-zero with the
child's reason instead of respawning it forever.
"""

import errno
import grp
import json
import logging
import os
import pwd
import select
import signal
import socket
import sys
import time
import traceback

from fastlb.net.sockets import open_listener
from fastlb.obs import metrics
from fastlb.process import shm as shm_mod

BOOT_ERROR = 3
MAX_SLOTS = 256            # shared-memory records: workers of every generation + control
_RESPAWN_WINDOW = 30.0     # a slot dying this often within the window is respawned with back-off
_RESPAWN_BURST = 5
_SIGNALS = {
    signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit", signal.SIGHUP: "hup",
    signal.SIGCHLD: "chld", signal.SIGUSR1: "usr1", signal.SIGUSR2: "usr2",
}
# Binary upgrade (SIGUSR2): the old master passes its listening sockets to the new one through
# inherited file descriptors, named in this variable as {key: fd}; the new master stops the old one
# (SIGTERM, graceful) once its own workers are ready.
_INHERIT = "_FASTLB_INHERIT_FDS"  # leading _: not a setting, config.load ignores it
_UPGRADE_FROM = "_FASTLB_UPGRADE_FROM"


class _Child:
    __slots__ = ("pid", "kind", "slot", "generation", "started", "stopping", "area")

    def __init__(self, pid, kind, slot, generation, area):
        self.pid = pid
        self.kind = kind          # "worker" | "control"
        self.slot = slot
        self.generation = generation
        self.area = area          # its metrics area (workers), or None
        self.started = time.monotonic()
        self.stopping = False


class Master:
    def __init__(self, cfg, reload_config, demo: str | None = None, log: logging.Logger | None = None):
        """demo: the demo certificate's fingerprint when serving --demo, else None."""
        self.cfg = cfg
        self.reload_config = reload_config   # () -> Config, raises ConfigError
        self.demo = demo
        self.log = log or logging.getLogger("fastlb")
        self.children: dict[int, _Child] = {}
        self.generation = 0
        self.sockets: dict[tuple, list] = {}   # (address, tls) -> one socket per slot
        self.admin_socket = None
        self.demo_sockets = []   # held here so a reloaded control process can serve them at once
        self.contexts = {}
        self.cert_facts = []
        self.signals: list[int] = []
        self.deaths: dict[int, list[float]] = {}
        self.pending_spawns: list[tuple[float, str, int]] = []
        self.stopping = None          # None | "graceful" | "fast"
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.shm = shm_mod.SharedBlock(MAX_SLOTS)
        self.store = metrics.Store()
        self.layout = metrics.Layout()
        self.slot_areas: dict[int, int] = {}   # worker slot -> the metrics area it used last
        self.pid_file = None
        self.ids = None               # (uid, gid) children switch to, from [server] user/group
        self.upgrade_pid = None       # the new master of a binary upgrade in progress
        self.inherited = {
            key: socket.socket(fileno=fd) for key, fd in json.loads(os.environ.pop(_INHERIT, "{}")).items()
        }
        self.upgrade_from = int(os.environ.pop(_UPGRADE_FROM, "0"))

    # -- setup --------------------------------------------------------------------------------------
    def _workers(self, cfg) -> int:
        return cfg.workers_effective()

    def _open_sockets(self, cfg) -> dict:
        """Sockets for cfg's listeners, reusing those already open for the same address and slot."""
        wanted = {}
        for spec in cfg.listeners:
            key = (str(spec.address), spec.tls)
            count = self._workers(cfg)
            socks = self.sockets.get(key, [])[:count]
            while len(socks) < count:
                socks = socks + [self._socket(f"{key[0]} tls={key[1]} slot={len(socks)}", spec.address)]
            wanted[key] = socks
        return wanted

    def _socket(self, key: str, address, reuseport: bool = True) -> socket.socket:
        """The listening socket named key: inherited from the previous master, or opened now."""
        sock = self.inherited.pop(key, None)
        return sock if sock is not None else open_listener(address, reuseport)

    def _named_sockets(self) -> dict[str, socket.socket]:
        named = {f"{key[0]} tls={key[1]} slot={i}": sock
                 for key, socks in self.sockets.items() for i, sock in enumerate(socks)}
        if self.admin_socket is not None:
            named["admin"] = self.admin_socket
        named.update((f"demo {name}", sock) for name, sock in self.demo_sockets)
        return named

    def _build_contexts(self, cfg) -> tuple[dict, list]:
        """SSLContexts built here, before fork, so all workers share one session-ticket key (on a
        reload, the running generation's key); and the certificates' (name, notAfter) for the expiry
        metric, read while we can read the files."""
        if not any(spec.tls for spec in cfg.listeners):
            return {}, []
        from fastlb.net.tls import build_server_context, carry_ticket_keys, certificate_facts

        ctx = build_server_context(cfg.tls, cfg.source or "environment")
        running = next(iter(self.contexts.values()), None)
        if running is not None and not carry_ticket_keys(running, ctx):
            self.log.warning("reload: OpenSSL refused to copy the session-ticket keys; "
                             "TLS sessions from before this reload will do a full handshake")
        return {i: ctx for i, spec in enumerate(cfg.listeners) if spec.tls}, certificate_facts(cfg.tls)

    def _slot_sockets(self, cfg, slot: int):
        return [(spec, self.sockets[(str(spec.address), spec.tls)][slot]) for spec in cfg.listeners]

    # -- run ----------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        self.ids = _resolve_ids(cfg)
        self.contexts, self.cert_facts = self._build_contexts(cfg)
        self.layout.extend(cfg, metrics.tls_suites(self.contexts))
        self.sockets = self._open_sockets(cfg)
        if cfg.admin.address is not None:
            self.admin_socket = self._socket("admin", cfg.admin.address, reuseport=False)
        if self.demo is not None:
            from fastlb.demo import DEMO_SERVERS

            self.demo_sockets = [(name, self._socket(f"demo {name}", addr, reuseport=False))
                                 for name, addr in DEMO_SERVERS]
        for sock in self.inherited.values():  # listeners the new config no longer has
            sock.close()
        self.inherited = {}
        self._write_pid_file()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake = (wake_r, wake_w)
        signal.set_wakeup_fd(wake_w)
        for signum in _SIGNALS:
            signal.signal(signum, self._on_signal)
        self._spawn("control", self._control_slot())
        for slot in range(self._workers(cfg)):
            self._spawn("worker", slot)
        self._announce()
        try:
            self._loop()
        finally:
            self._cleanup()
        return self.exit_code

    def _control_slot(self) -> int:
        return MAX_SLOTS - 1

    def _announce(self) -> None:
        deadline = time.monotonic() + 10
        slots = [c.slot for c in self.children.values()]
        while time.monotonic() < deadline and self.stopping is None:
            states = [self.shm.read(s)[1] for s in slots]
            if all(s == shm_mod.READY for s in states):
                break
            if any(s == shm_mod.FAILED for s in states):
                return  # _loop reports it when the child exits
            self._wait(0.02)
            self._dispatch()
        if self.stopping is not None:
            return
        for spec in self.cfg.listeners:
            scheme = "https" if spec.tls else "http"
            self.log.info("listening on %s://%s", scheme, spec.address)
        self.log.info("ready: %d workers, pid %d", self._workers(self.cfg), os.getpid())
        if self.demo is not None:
            from fastlb.demo import announce

            announce(self.cfg, self.demo)
        if self.upgrade_from:
            self.log.info("upgrade: new master ready; stopping the old master %d", self.upgrade_from)
            self._kill(self.upgrade_from, signal.SIGTERM)

    def _on_signal(self, signum, frame):
        self.signals.append(signum)

    def _wait(self, timeout: float) -> None:
        try:
            select.select([self._wake[0]], [], [], timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self._wake[0], 512):
                pass
        except BlockingIOError:
            pass

    def _loop(self) -> None:
        while True:
            self._dispatch()
            if self.stopping is not None and not self.children:
                return
            now = time.monotonic()
            if self.stopping is not None and now > self.stop_deadline:
                for child in self.children.values():
                    self._kill(child.pid, signal.SIGKILL)
            self._check_heartbeats(now)
            self._run_pending_spawns(now)
            self._wait(0.2)

    def _dispatch(self) -> None:
        self._reap()
        while self.signals:
            name = _SIGNALS[self.signals.pop(0)]
            getattr(self, "handle_" + name)()

    # -- signal handlers -----------------------------------------------------------------------------
    def handle_term(self) -> None:
        if self.stopping is None:
            self.log.info("SIGTERM: graceful stop (up to %ss)", self.cfg.server.graceful_timeout)
            self.stopping = "graceful"
            self.stop_deadline = time.monotonic() + self.cfg.server.graceful_timeout + 2
            for child in self.children.values():
                self._kill(child.pid, signal.SIGTERM)

    def handle_int(self) -> None:
        self.handle_quit()

    def handle_quit(self) -> None:
        if self.stopping != "fast":
            self.log.info("fast stop")
            self.stopping = "fast"
            self.stop_deadline = time.monotonic() + 3
            for child in self.children.values():
                self._kill(child.pid, signal.SIGQUIT)

    def handle_chld(self) -> None:
        self._reap()

    def handle_usr1(self) -> None:
        for child in self.children.values():
            self._kill(child.pid, signal.SIGUSR1)

    def handle_usr2(self) -> None:
        """Binary upgrade: exec a new fastlb master that inherits every listening socket."""
        if self.stopping is not None or self.upgrade_pid is not None:
            return
        named = self._named_sockets()
        for sock in named.values():
            os.set_inheritable(sock.fileno(), True)
        env = dict(os.environ)
        env[_INHERIT] = json.dumps({key: sock.fileno() for key, sock in named.items()})
        env[_UPGRADE_FROM] = str(os.getpid())
        argv = [sys.executable, "-m", "fastlb", *sys.argv[1:]]
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                for signum in _SIGNALS:
                    signal.signal(signum, signal.SIG_DFL)
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        for sock in named.values():
            os.set_inheritable(sock.fileno(), False)
        self.upgrade_pid = pid
        self.log.info("upgrade: started new master %d (%s)", pid, " ".join(argv))

    def handle_hup(self) -> None:
        """Reload: re-read config and certificates; start a new generation on the same sockets."""
        if self.stopping is not None:
            return
        try:
            cfg = self.reload_config()
            contexts, cert_facts = self._build_contexts(cfg)
            sockets = self._open_sockets(cfg)
        except Exception as exc:  # ConfigError, or an OSError binding a new listener
            self.log.error("reload failed, keeping the running config: %s", exc)
            self._count("fastlb_config_reloads_total", result="failure")
            return
        self.layout.extend(cfg, metrics.tls_suites(contexts))
        self._count("fastlb_config_reloads_total", result="success")
        for key, socks in self.sockets.items():
            for i, sock in enumerate(socks):
                if key not in sockets or i >= len(sockets[key]):
                    sock.close()
        if _server_layout(cfg) != _server_layout(self.cfg):
            # State bytes are numbered by position: a changed server list starts everyone up again.
            self.shm.states[:] = b"\x01" * len(self.shm.states)
        self.cfg, self.contexts, self.sockets, self.cert_facts = cfg, contexts, sockets, cert_facts
        old = list(self.children.values())
        self.generation += 1
        self._spawn("control", self._control_slot())
        for slot in range(self._workers(cfg)):
            self._spawn("worker", slot)
        for child in old:
            child.stopping = True
            self._kill(child.pid, signal.SIGTERM)
        self.log.info("reloaded: generation %d", self.generation)

    # -- children ------------------------------------------------------------------------------------
    def _count(self, family: str, **labels) -> None:
        self.store.master_area()[self.layout.counter(family, **labels)] += 1

    def _take_area(self, slot: int) -> int:
        """A metrics area no live worker writes: the slot's previous one if free (its counts go on)."""
        busy = {c.area for c in self.children.values()}
        preferred = self.slot_areas.get(slot)
        if preferred is not None and preferred not in busy:
            return preferred
        used = set(self.slot_areas.values())
        free = [a for a in range(metrics.AREAS) if a not in busy]
        never_used = [a for a in free if a not in used]
        area = never_used[0] if never_used else free[0]
        self.slot_areas[slot] = area
        return area

    def _spawn(self, kind: str, slot: int) -> None:
        cfg = self.cfg
        self.shm.reset(slot)
        area = self._take_area(slot) if kind == "worker" else None
        pid = os.fork()
        if pid == 0:
            os._exit(self._child_main(kind, slot, cfg, area))
        if area is not None:
            header = self.store.header(area)
            header[metrics.PID], header[metrics.STARTED] = pid, time.time()
            header[metrics.LIVE], header[metrics.SLOT] = 1, slot
        self.children[pid] = _Child(pid, kind, slot, self.generation, area)

    def _child_main(self, kind: str, slot: int, cfg, area: int | None) -> int:
        master_pid = os.getppid()
        signal.set_wakeup_fd(-1)
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        # The master handles reload and log reopening; a child only reacts to what its parent sends.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.close(self._wake[0])
        os.close(self._wake[1])
        self._close_foreign_sockets(kind, slot)
        ready = False
        try:
            # Everything a child runs is imported while it is still root: the new user may not be
            # able to read the Python installation (a home directory of mode 0700, say).
            import uvloop  # noqa: F401

            from fastlb.process.control import Control
            from fastlb.process.worker import Worker

            if self.demo is not None:
                import fastlb.demo  # noqa: F401
            _drop_privileges(self.ids)
            if kind == "worker":
                worker = Worker(cfg, slot, self._slot_sockets(cfg, slot), self.contexts, self.shm,
                                master_pid, self.log, self.layout, self.store.area(area))
                return worker.run()
            return Control(cfg, self.admin_socket, self.demo_sockets, self.shm, slot, master_pid,
                           self.log, self.layout, self.store, self.cert_facts).run()
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the master must hear why
            ready = self.shm.read(slot)[1] == shm_mod.READY
            reason = "".join(traceback.format_exception_only(exc)).strip()
            if not ready:
                self.shm.set_state(slot, shm_mod.FAILED, reason)
                print(f"fastlb: {kind} failed to boot: {reason}", file=sys.stderr, flush=True)
                return BOOT_ERROR
            traceback.print_exc()
            return 1
        finally:
            sys.stderr.flush()

    def _close_foreign_sockets(self, kind: str, slot: int) -> None:
        """A child keeps only the sockets it serves: a listener must not stay bound (after a reload
        removed it) nor look served because some other process happens to hold a copy."""
        for socks in self.sockets.values():
            for i, sock in enumerate(socks):
                if kind != "worker" or i != slot:
                    sock.close()
        if kind == "worker":
            if self.admin_socket is not None:
                self.admin_socket.close()
            for _, sock in self.demo_sockets:
                sock.close()

    def _kill(self, pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is not None:
                self._child_exited(child, status)
            elif pid == self.upgrade_pid:
                # Had it succeeded it would have stopped us; we keep serving with the old binary.
                self.log.error("upgrade failed: new master %d exited with %s", pid,
                               os.waitstatus_to_exitcode(status))
                self.upgrade_pid = None

    def _child_exited(self, child: _Child, status: int) -> None:
        if child.area is not None:
            # The area's counters stay (the next worker adds to them); its gauges die with it.
            self.store.header(child.area)[metrics.LIVE] = 0
            area = self.store.area(child.area)
            for index in self.layout.gauges:
                area[index] = 0.0
        code = os.waitstatus_to_exitcode(status)
        if self.stopping is not None or child.stopping:
            return
        if code == BOOT_ERROR:
            reason = self.shm.read(child.slot)[2]
            self.log.error("%s (slot %d) failed to boot: %s; stopping", child.kind, child.slot, reason)
            self.exit_code = BOOT_ERROR
            self.handle_quit()
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        self.log.warning("%s %d (slot %d) died with %s; respawning", child.kind, child.pid, child.slot, how)
        if child.kind == "worker":
            self._count("fastlb_worker_restarts_total")
        now = time.monotonic()
        recent = [t for t in self.deaths.get(child.slot, []) if now - t < _RESPAWN_WINDOW] + [now]
        self.deaths[child.slot] = recent
        delay = 0.0 if len(recent) <= _RESPAWN_BURST else min(2.0 ** (len(recent) - _RESPAWN_BURST), 30.0)
        self.pending_spawns.append((now + delay, child.kind, child.slot))

    def _run_pending_spawns(self, now: float) -> None:
        due = [p for p in self.pending_spawns if p[0] <= now]
        if not due or self.stopping is not None:
            return
        self.pending_spawns = [p for p in self.pending_spawns if p[0] > now]
        for _, kind, slot in due:
            self._spawn(kind, slot)

    def _check_heartbeats(self, now: float) -> None:
        limit = self.cfg.server.heartbeat_timeout
        for child in list(self.children.values()):
            if child.stopping or child.generation != self.generation:
                continue
            beat, state, _ = self.shm.read(child.slot)
            if state == shm_mod.READY and now - beat > limit:
                self.log.error("%s %d (slot %d) missed its heartbeat for %.1fs; killing it",
                               child.kind, child.pid, child.slot, now - beat)
                self._kill(child.pid, signal.SIGKILL)

    # -- files ---------------------------------------------------------------------------------------
    def _write_pid_file(self) -> None:
        path = self.cfg.server.pid_file or default_pid_file()
        try:
            with open(path + ".tmp", "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(path + ".tmp", path)
            self.pid_file = path
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.ENOENT):
                raise
            self.log.warning("cannot write pid file %s: %s", path, exc)

    def _cleanup(self) -> None:
        if self.pid_file:
            try:
                with open(self.pid_file) as f:
                    ours = f.read().strip() == str(os.getpid())
                if ours:  # after an upgrade the file names the new master: leave it
                    os.unlink(self.pid_file)
            except OSError:
                pass
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        if self.admin_socket is not None:
            self.admin_socket.close()
        for _, sock in self.demo_sockets:
            sock.close()
        self.log.info("stopped")


def _resolve_ids(cfg) -> tuple[int, int] | None:
    """(uid, gid) for [server] user/group, resolved before forking so a typo is a config error."""
    from fastlb.config import ConfigError

    user, group = cfg.server.user, cfg.server.group
    if not user and not group:
        return None
    source = cfg.source or "environment"
    try:
        entry = pwd.getpwnam(user) if user else None
    except KeyError:
        raise ConfigError(source, "server.user", f"no such user {user!r}") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise ConfigError(source, "server.group", f"no such group {group!r}") from None
    return (entry.pw_uid if entry else os.getuid(), gid)


def _drop_privileges(ids) -> None:
    """Children give up root after the master bound the ports and read the private keys."""
    if ids is None:
        return
    uid, gid = ids
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def _server_layout(cfg) -> list:
    return [(name, str(server.address)) for name, spec in cfg.backends.items() for server in spec.servers]


def default_pid_file() -> str:
    if os.geteuid() == 0:
        return "/run/fastlb.pid"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "fastlb.pid") if runtime else f"/tmp/fastlb-{os.getuid()}.pid"
