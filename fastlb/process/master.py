"""The master: holds the listening sockets, forks workers and the control process, handles signals.

It runs no event loop (as gunicorn's arbiter): signal handlers only append to a queue and wake the main
loop through a self-pipe; the loop dispatches to `handle_<signal>()`, reaps children, respawns crashed
ones with back-off and kills workers whose heartbeat in shared memory went stale.  A child that fails
while booting exits with BOOT_ERROR, and the master then stops everything and exits non-zero with the
child's reason instead of respawning it forever.

A reload (SIGHUP) moves from one generation (a config, its TLS contexts and sockets, the children
forked with them) to the next:

1. Re-read the config and build the new contexts and sockets; an error ends the reload here.
2. Fork the new generation (workers and control) next to the running one, which keeps serving.
3. Wait until every new child's shared-memory record says READY.
4. All ready: the new generation becomes current and the old one drains (SIGTERM).  A new child
   failed, died or was not ready within BOOT_TIMEOUT: the new generation drains instead and the old
   one goes on, as if the reload had never been asked for.

Each outcome is logged, counted in fastlb_config_reloads_total and written to the reload status file
next to the pid file, where `fastlb reload` waits for it (see write_reload_status).
"""

import errno
import fcntl
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

from fastlb import policy
from fastlb.net.sockets import claim_address, open_listener
from fastlb.obs import metrics
from fastlb.process import shm as shm_mod
from fastlb.process.notify import Notifier
from fastlb.process.watch import Watcher, input_files

BOOT_ERROR = 3
MAX_RECORDS = 256          # shared-memory records: workers and control of every generation alive
# How long a reload waits for its new generation to be ready.  A child is ready once it serves its
# sockets (imports, routes, Maglev tables done): 1.1-2.6 s after the SIGHUP on this project's 2-core VM
# at a load average of 8, so this only bounds a child that hangs while booting.
BOOT_TIMEOUT = 30.0
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
# ... and the pid file's open file description, whose flock(2) lock the new master thereby shares:
# the lock never lapses during the handover (flock locks belong to the description, not the process).
_PID_FD = "_FASTLB_PID_FD"


class _Generation:
    """A config and what the master built from it; the children forked with it point to it."""

    __slots__ = ("number", "cfg", "contexts", "cert_facts", "sockets", "deadline", "failure", "states",
                 "policies", "upstream")

    def __init__(self, number, cfg, contexts, cert_facts, sockets):
        self.number = number
        self.cfg = cfg
        self.contexts = contexts      # {listener index: SSLContext}
        self.cert_facts = cert_facts
        self.sockets = sockets        # (address, tls) -> one socket per slot
        self.deadline = 0.0           # while booting in a reload: when it must be ready
        self.failure = None           # while booting in a reload: why it cannot become current
        self.states = None            # server states from before the reload, when it reset them
        self.upstream = {}            # {backend name: client SSLContext} (fastlb/net/upstream_tls.py)
        # Route policies and hooks (fastlb/policy), built before forking: the rate-limit tables in
        # them are shared memory every worker of the generation updates.
        self.policies = policy.build(cfg)


class _Child:
    __slots__ = ("pid", "kind", "slot", "record", "generation", "started", "stopping", "area")

    def __init__(self, pid, kind, slot, record, generation, area):
        self.pid = pid
        self.kind = kind          # "worker" | "control"
        self.slot = slot          # which of the generation's sockets a worker serves
        self.record = record      # its shared-memory record: two generations run side by side
        self.generation = generation
        self.area = area          # its metrics area (workers), or None
        self.started = time.monotonic()
        self.stopping = False


class Master:
    def __init__(self, cfg, reload_config, demo: str | None = None, log: logging.Logger | None = None,
                 allow_shared_ports: bool = False, ingress_files=()):
        """demo: the demo certificate's fingerprint when serving --demo, else None.
        allow_shared_ports: join another process's SO_REUSEPORT group instead of refusing its port.
        ingress_files: the --ingress manifests, watched with the config under [server] watch."""
        self.current = _Generation(0, cfg, {}, [], {})
        self.pending: _Generation | None = None   # the generation a reload is booting
        self.reload_again = False     # a SIGHUP came while a reload was under way
        self.reload_config = reload_config   # () -> Config, raises ConfigError
        self.demo = demo
        self.allow_shared_ports = allow_shared_ports
        self.log = log or logging.getLogger("fastlb")
        self.children: dict[int, _Child] = {}
        self.admin_socket = None
        self.demo_sockets = []   # held here so a reloaded control process can serve them at once
        self.signals: list[int] = []
        self.deaths: dict[int, list[float]] = {}
        self.pending_spawns: list[tuple[float, str, int, _Generation]] = []
        self.stopping = None          # None | "graceful" | "fast"
        self.stop_deadline = 0.0
        self.drain_at = None          # graceful stop: when [server] drain_delay ends and workers drain
        self.notifier = Notifier()    # sd_notify, for a systemd Type=notify unit
        self.ingress_files = tuple(ingress_files)
        self.watcher = None           # [server] watch: the inotify watcher of the config's files
        self.exit_code = 0
        self.shm = shm_mod.SharedBlock(MAX_RECORDS)
        self.reload_requests = 0      # the shared-memory reload counter as last acted upon
        self.store = metrics.Store()
        self.layout = metrics.Layout()
        self.slot_areas: dict[int, int] = {}   # worker slot -> the metrics area it used last
        self.pid_file = None
        self.pid_fd = None            # the pid file, flock()ed for the master's life
        self.ids = None               # (uid, gid) children switch to, from [server] user/group
        self.upgrade_pid = None       # the new master of a binary upgrade in progress
        self.reload_started = 0.0     # time.monotonic() when the latest reload began
        self.inherited = {
            key: socket.socket(fileno=fd) for key, fd in json.loads(os.environ.pop(_INHERIT, "{}")).items()
        }
        self.upgrade_from = int(os.environ.pop(_UPGRADE_FROM, "0"))
        self.inherited_pid_fd = int(os.environ.pop(_PID_FD, "-1"))

    @property
    def cfg(self):
        return self.current.cfg

    # -- setup --------------------------------------------------------------------------------------
    def _workers(self, cfg) -> int:
        return cfg.workers_effective()

    def _open_sockets(self, cfg) -> dict:
        """Sockets for cfg's listeners, reusing those already open for the same address and slot."""
        wanted = {}
        try:
            for i, spec in enumerate(cfg.listeners):
                key = (str(spec.address), spec.tls)
                count = self._workers(cfg)
                socks = self.current.sockets.get(key, [])[:count]
                wanted[key] = socks
                name = f"listeners[{i}].address"
                if not self.allow_shared_ports and not self._holds(key[0]):
                    claim_address(spec.address, name)
                while len(socks) < count:
                    socks.append(self._socket(f"{key[0]} tls={key[1]} slot={len(socks)}", spec.address,
                                              name=name))
        except OSError:
            self._close_unused(wanted, self.current.sockets)  # a reload that fails leaves nothing bound
            raise
        return wanted

    def _holds(self, address: str) -> bool:
        """Whether this master already has a socket on address (its own, or inherited in an upgrade):
        then the address is ours to add slots to, and the kernel would refuse a probe anyway."""
        return (any(key[0] == address for key in self.current.sockets)
                or any(key.startswith(address + " tls=") for key in self.inherited))

    def _socket(self, key: str, address, reuseport: bool = True, name: str = "") -> socket.socket:
        """The listening socket named key: inherited from the previous master, or opened now."""
        sock = self.inherited.pop(key, None)
        return sock if sock is not None else open_listener(address, reuseport, name=name)

    def _named_sockets(self) -> dict[str, socket.socket]:
        named = {f"{key[0]} tls={key[1]} slot={i}": sock
                 for key, socks in self.current.sockets.items() for i, sock in enumerate(socks)}
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
        from fastlb.acme import tls_to_serve
        from fastlb.net.tls import build_server_context, carry_ticket_keys, certificate_facts

        tls = tls_to_serve(cfg, self.log, self.ids)  # acme = true: the certificate in storage, or a stand-in
        ctx = build_server_context(tls, cfg.source or "environment")
        running = next(iter(self.current.contexts.values()), None)
        if running is not None and not carry_ticket_keys(running, ctx):
            self.log.warning("reload: OpenSSL refused to copy the session-ticket keys; "
                             "TLS sessions from before this reload will do a full handshake")
        return {i: ctx for i, spec in enumerate(cfg.listeners) if spec.tls}, certificate_facts(tls)

    def _upstream_contexts(self, cfg) -> dict:
        """Client contexts for TLS to backends, built here for the reasons the listeners' are: a bad CA
        or client certificate refuses the config, and the client key is read while it can be."""
        from fastlb.net import upstream_tls

        contexts = upstream_tls.build_contexts(cfg)
        for name in upstream_tls.unverified(cfg):
            self.log.warning("backends.%s.tls.verify = false: the servers' certificates are not verified", name)
        return contexts

    def _slot_sockets(self, gen: _Generation, slot: int):
        return [(spec, gen.sockets[(str(spec.address), spec.tls)][slot]) for spec in gen.cfg.listeners]

    # -- run ----------------------------------------------------------------------------------------
    def run(self) -> int:
        gen = self.current
        cfg = gen.cfg
        self.ids = _resolve_ids(cfg)
        # Before any socket: a second instance started by mistake is told about the first one, not
        # about the ports they both want.
        self._lock_pid_file()
        try:
            gen.contexts, gen.cert_facts = self._build_contexts(cfg)
            gen.upstream = self._upstream_contexts(cfg)
            self.layout.extend(cfg, metrics.tls_suites(gen.contexts))
            gen.sockets = self._open_sockets(cfg)
            if cfg.admin.address is not None:
                self.admin_socket = self._socket("admin", cfg.admin.address, reuseport=False,
                                                 name="admin.address")
            if self.demo is not None:
                from fastlb.demo import DEMO_SERVERS

                self.demo_sockets = [(name, self._socket(f"demo {name}", addr, reuseport=False,
                                                         name=f"demo backend {name}"))
                                     for name, addr in DEMO_SERVERS]
        except BaseException:
            self._cleanup(quiet=True)
            raise
        for sock in self.inherited.values():  # listeners the new config no longer has
            sock.close()
        self.inherited = {}
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self._wake = (wake_r, wake_w)
        signal.set_wakeup_fd(wake_w)
        for signum in _SIGNALS:
            signal.signal(signum, self._on_signal)
        try:
            self._spawn_generation(gen)
            self._announce()
            self._watch()
            self._loop()
        finally:
            self._cleanup()
        return self.exit_code

    def _spawn_generation(self, gen: _Generation) -> None:
        self._spawn("control", 0, gen)
        for slot in range(self._workers(gen.cfg)):
            self._spawn("worker", slot, gen)

    def _announce(self) -> None:
        deadline = time.monotonic() + 10
        records = [c.record for c in self.children.values()]
        while time.monotonic() < deadline and self.stopping is None:
            states = [self.shm.read(r)[1] for r in records]
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
        workers = self._workers(self.cfg)
        self.log.info("ready: %d worker%s, pid %d", workers, "" if workers == 1 else "s", os.getpid())
        # After a binary upgrade this master replaces the one systemd started: MAINPID says so.
        self.notifier.ready(f"serving with {workers} workers",
                            mainpid=os.getpid() if self.upgrade_from else None)
        if self.demo is not None:
            from fastlb.demo import announce

            announce(self.cfg, self.demo)
        if self.upgrade_from:
            # Only now does the pid file name us: had we failed to boot, the old master goes on
            # serving and `fastlb stop` must still find it.
            self._write_pid()
            self.log.info("upgrade: new master ready; stopping the old master %d", self.upgrade_from)
            self._kill(self.upgrade_from, signal.SIGTERM)

    def _on_signal(self, signum, frame):
        self.signals.append(signum)

    def _wait(self, timeout: float) -> None:
        fds = [self._wake[0]]
        if self.watcher is not None:
            fds.append(self.watcher.fileno())
            if self.watcher.due is not None:
                timeout = max(0.0, min(timeout, self.watcher.due - time.monotonic()))
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            ready = []
        if self.watcher is not None and self.watcher.fileno() in ready:
            self.watcher.read(time.monotonic())
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
            if self.stopping == "graceful":
                self._drain_step(now)
            self._check_watch(now)
            self._check_reload_requests()
            self._check_heartbeats(now)
            self._run_pending_spawns(now)
            self._check_pending_generation(now)
            self._wait(0.05 if self.pending is not None else 0.2)

    def _dispatch(self) -> None:
        self._reap()
        while self.signals:
            name = _SIGNALS[self.signals.pop(0)]
            getattr(self, "handle_" + name)()

    # -- signal handlers -----------------------------------------------------------------------------
    def handle_term(self) -> None:
        """Graceful stop.  On its own (not a binary upgrade's handover): /healthz answers 503 at once,
        the workers go on serving for drain_delay so that an L4 balancer's health check takes this
        node out before anything is refused, then drain; the control process (/healthz, the health
        checks the draining workers still use) stops once they are gone."""
        if self.stopping is not None:
            return
        now = time.monotonic()
        graceful = self.cfg.server.graceful_timeout
        self.stopping = "graceful"
        if self._handing_over():
            self.log.info("SIGTERM from the new master: graceful stop (up to %ss)", graceful)
            self.stop_deadline = now + graceful + 2
            for child in self.children.values():
                self._kill(child.pid, signal.SIGTERM)
            return
        self.shm.draining = True
        self.notifier.stopping()
        delay = self.cfg.server.drain_delay
        if delay:
            self.log.info("SIGTERM: /healthz answers 503; serving for drain_delay %ss, then a graceful "
                          "stop (up to %ss)", delay, graceful)
        else:
            self.log.info("SIGTERM: graceful stop (up to %ss)", graceful)
        self.drain_at = now + delay
        self.stop_deadline = self.drain_at + graceful + 2
        self._drain_step(now)

    def _handing_over(self) -> bool:
        """Whether the new master of a binary upgrade is running: its TERM hands the host over, and
        the host is not draining (both masters serve the same sockets, the admin one included)."""
        if self.upgrade_pid is None:
            return False
        try:
            os.kill(self.upgrade_pid, 0)
        except ProcessLookupError:
            return False
        return True

    def _serving_drain_delay(self) -> bool:
        """Whether a graceful stop is still in drain_delay, where the listeners must go on serving: a
        worker that dies then is respawned, or its slot's connections would wait unanswered."""
        return self.stopping == "graceful" and self.drain_at is not None and time.monotonic() < self.drain_at

    def _drain_step(self, now: float) -> None:
        """Graceful stop after handle_term: the workers drain once drain_delay is over, the control
        processes once no worker is left."""
        if self.drain_at is None:
            return
        if now < self.drain_at:
            return
        workers = [c for c in self.children.values() if c.kind == "worker"]
        for child in workers:
            if not child.stopping:
                child.stopping = True
                self._kill(child.pid, signal.SIGTERM)
        if workers:
            return
        self.drain_at = None
        for child in self.children.values():
            self._kill(child.pid, signal.SIGTERM)

    def handle_int(self) -> None:
        self.handle_quit()

    def handle_quit(self) -> None:
        if self.stopping != "fast":
            self.log.info("fast stop")
            if self.stopping is None and not self._handing_over():
                self.notifier.stopping()
            self.stopping = "fast"
            self.drain_at = None
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
        if self.pending is not None:
            self.log.warning("upgrade: a reload is under way; send USR2 again once it is over")
            return
        named = self._named_sockets()
        fds = [sock.fileno() for sock in named.values()]
        if self.pid_fd is not None:
            fds.append(self.pid_fd)
        for fd in fds:
            os.set_inheritable(fd, True)
        env = dict(os.environ)
        env[_INHERIT] = json.dumps({key: sock.fileno() for key, sock in named.items()})
        env[_UPGRADE_FROM] = str(os.getpid())
        if self.pid_fd is not None:
            env[_PID_FD] = str(self.pid_fd)
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
        for fd in fds:
            os.set_inheritable(fd, False)
        self.upgrade_pid = pid
        self.log.info("upgrade: started new master %d (%s)", pid, " ".join(argv))

    def handle_hup(self) -> None:
        if self.stopping is not None:
            return
        if self.pending is not None:
            self.reload_again = True   # re-read once this one is decided: the file may have changed since
            return
        self._reload()

    def _reload(self) -> None:
        """Steps 1 and 2 of a reload (module docstring); _check_pending_generation does 3 and 4."""
        self.reload_started = time.monotonic()
        self.notifier.reloading()
        try:
            cfg = self.reload_config()
            contexts, cert_facts = self._build_contexts(cfg)
            upstream = self._upstream_contexts(cfg)
            sockets = self._open_sockets(cfg)
        except Exception as exc:  # ConfigError, or an OSError binding a new listener
            self._reload_failed(str(exc))
            return
        gen = _Generation(self.current.number + 1, cfg, contexts, cert_facts, sockets)
        gen.upstream = upstream
        self.layout.extend(cfg, metrics.tls_suites(contexts))
        if _server_layout(cfg) != _server_layout(self.cfg):
            # State bytes are numbered by position: a changed server list starts everyone up again.
            # The running control process writes a state only when it changes, so keep the old ones
            # in case the new generation fails.
            gen.states = bytes(self.shm.states)
            self.shm.states[:] = b"\x01" * len(self.shm.states)
        gen.deadline = time.monotonic() + BOOT_TIMEOUT
        self.pending = gen
        try:
            self._spawn_generation(gen)
        except OSError as exc:  # fork: EAGAIN, ENOMEM
            gen.failure = f"cannot start the new generation: {exc}"

    def _check_pending_generation(self, now: float) -> None:
        gen = self.pending
        if gen is None:
            return
        if self.stopping is not None:
            gen.failure = gen.failure or "the master is stopping"
        kids = [c for c in self.children.values() if c.generation is gen]
        states = [self.shm.read(c.record) for c in kids]
        for child, (_, state, reason) in zip(kids, states, strict=True):
            if state == shm_mod.FAILED and gen.failure is None:
                gen.failure = f"{child.kind} (slot {child.slot}) failed to boot: {reason}"
        if gen.failure is None and now > gen.deadline:
            gen.failure = f"the new generation was not ready within {BOOT_TIMEOUT:g}s"
        if gen.failure is not None:
            self._abandon(gen, kids)
        elif len(kids) == self._workers(gen.cfg) + 1 and all(s[1] == shm_mod.READY for s in states):
            self._commit(gen)
        else:
            return
        if self.reload_again and self.stopping is None:
            self.reload_again = False
            self._reload()

    def _abandon(self, gen: _Generation, kids: list[_Child]) -> None:
        """The new generation failed: stop it (those already serving drain what they accepted) and go
        on with the running one."""
        self.pending = None
        if self.stopping is None:
            for child in kids:
                child.stopping = True
                self._kill(child.pid, signal.SIGTERM)
        self._close_unused(gen.sockets, self.current.sockets)
        if gen.states is not None:
            self.shm.states[:] = gen.states
        self._reload_failed(gen.failure)

    def _commit(self, gen: _Generation) -> None:
        old = self.current
        self._close_unused(old.sockets, gen.sockets)
        self.current, self.pending = gen, None
        for child in self.children.values():
            if child.generation is not gen and not child.stopping:
                child.stopping = True
                self._kill(child.pid, signal.SIGTERM)
        self.pending_spawns = [p for p in self.pending_spawns if p[3] is gen]
        self._count("fastlb_config_reloads_total", result="success")
        self.log.info("reloaded: generation %d", gen.number)
        self._write_reload_status("success", f"generation {gen.number}")
        if self.stopping is None:
            self.notifier.ready(f"reloaded: generation {gen.number}")
        self._watch()

    def _reload_failed(self, reason: str) -> None:
        self.log.error("reload failed, keeping the running config: %s", reason)
        self._count("fastlb_config_reloads_total", result="failure")
        self._write_reload_status("failure", reason)
        if self.stopping is None:
            self.notifier.ready(f"reload failed, keeping the running config: {reason}")

    # -- [server] watch ------------------------------------------------------------------------------
    def _watch(self) -> None:
        """Watch the current config's files: after a reload the config may name other files, or no
        longer ask for watching.  A change already seen but not yet reloaded carries over."""
        old = self.watcher
        files = input_files(self.cfg, self.ingress_files) if self.cfg.server.watch else None
        if old is not None and files == old.files:
            return
        if files == []:
            self.log.warning("watch: nothing to watch (no config file, certificate or --ingress manifest)")
            files = None
        self.watcher = Watcher(files, self.log) if files is not None else None
        if old is not None:
            old.read(time.monotonic())
            if self.watcher is not None:
                self.watcher.changed, self.watcher.due = old.changed, old.due
            old.close()
        if self.watcher is not None and (old is None or old.directories != self.watcher.directories):
            self.log.info("watch: reloading on changes in %s", ", ".join(self.watcher.directories))

    def _check_watch(self, now: float) -> None:
        if self.watcher is None or self.stopping is not None:
            return
        changed = self.watcher.take(now)
        if changed:
            self.log.info("watch: %s changed; reloading", ", ".join(changed))
            self.handle_hup()

    def _check_reload_requests(self) -> None:
        """The control process found a new ACME certificate in storage (fastlb/acme/manager.py): the
        reload serves it, carrying the session-ticket keys over, without dropping a connection."""
        requests = self.shm.reload_requests()
        if requests != self.reload_requests and self.stopping is None:
            self.reload_requests = requests
            self.log.info("acme: a new certificate is in storage; reloading")
            self.handle_hup()

    def _close_unused(self, sockets: dict, kept: dict) -> None:
        """Close the sockets of one generation that the other does not use (a listener one has and the
        other not, or slots beyond the other's worker count)."""
        keep = {id(sock) for socks in kept.values() for sock in socks}
        for socks in sockets.values():
            for sock in socks:
                if id(sock) not in keep:
                    sock.close()

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

    def _take_record(self, kind: str) -> int:
        """A shared-memory record no live child writes: workers from the bottom (so that a first
        generation's worker N has record N), control processes from the top."""
        busy = {c.record for c in self.children.values()}
        order = range(MAX_RECORDS) if kind == "worker" else range(MAX_RECORDS - 1, -1, -1)
        for record in order:
            if record not in busy:
                return record
        raise OSError(errno.EAGAIN, f"all {MAX_RECORDS} shared-memory records are in use")

    def _spawn(self, kind: str, slot: int, gen: _Generation) -> None:
        record = self._take_record(kind)
        self.shm.reset(record)
        area = self._take_area(slot) if kind == "worker" else None
        pid = os.fork()
        if pid == 0:
            os._exit(self._child_main(kind, slot, record, gen, area))
        if area is not None:
            header = self.store.header(area)
            header[metrics.PID], header[metrics.STARTED] = pid, time.time()
            header[metrics.LIVE], header[metrics.SLOT] = 1, slot
        self.children[pid] = _Child(pid, kind, slot, record, gen, area)

    def _child_main(self, kind: str, slot: int, record: int, gen: _Generation, area: int | None) -> int:
        cfg = gen.cfg
        master_pid = os.getppid()
        signal.set_wakeup_fd(-1)
        for signum in _SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        # The master handles reload and log reopening; a child only reacts to what its parent sends.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        os.close(self._wake[0])
        os.close(self._wake[1])
        if self.watcher is not None:
            self.watcher.close()
        self.notifier.close()
        if self.pid_fd is not None:
            # The flock belongs to the open file description: a copy here would keep the pid file
            # locked after the master died, until this child noticed and exited.
            os.close(self.pid_fd)
        self._close_foreign_sockets(kind, slot, gen)
        ready = False
        try:
            # Everything a child runs is imported while it is still root: the new user may not be
            # able to read the Python installation (a home directory of mode 0700, say).
            import uvloop  # noqa: F401

            from fastlb.process.control import Control
            from fastlb.process.worker import Worker

            if self.demo is not None:
                import fastlb.demo  # noqa: F401
            if kind == "control" and any(spec.acme for spec in cfg.tls.certificates):
                import fastlb.acme.manager  # noqa: F401 - requests and the acme library
            _drop_privileges(self.ids)
            # Worker and Control know their shared-memory record as their "slot": it is all they
            # use it for, and the record differs from the socket slot while generations overlap.
            if kind == "worker":
                worker = Worker(cfg, record, self._slot_sockets(gen, slot), gen.contexts, self.shm,
                                master_pid, self.log, self.layout, self.store.area(area), gen.policies,
                                upstream=gen.upstream)
                return worker.run()
            return Control(cfg, self.admin_socket, self.demo_sockets, self.shm, record, master_pid,
                           self.log, self.layout, self.store, gen.cert_facts, upstream=gen.upstream).run()
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the master must hear why
            ready = self.shm.read(record)[1] == shm_mod.READY
            reason = "".join(traceback.format_exception_only(exc)).strip()
            if not ready:
                self.shm.set_state(record, shm_mod.FAILED, reason)
                print(f"fastlb: {kind} failed to boot: {reason}", file=sys.stderr, flush=True)
                return BOOT_ERROR
            traceback.print_exc()
            return 1
        finally:
            sys.stderr.flush()

    def _close_foreign_sockets(self, kind: str, slot: int, gen: _Generation) -> None:
        """A child keeps only the sockets it serves: a listener must not stay bound (after a reload
        removed it) nor look served because some other process happens to hold a copy."""
        keep = {id(sock) for _, sock in self._slot_sockets(gen, slot)} if kind == "worker" else set()
        for g in (self.current, self.pending):
            for socks in (g.sockets.values() if g is not None else ()):
                for sock in socks:
                    if id(sock) not in keep:
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
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        if child.generation is self.pending and not child.stopping:
            # Not respawned: a new generation that loses a child while booting is not what was tested.
            why = f"failed to boot: {self.shm.read(child.record)[2]}" if code == BOOT_ERROR else f"died with {how}"
            self.pending.failure = self.pending.failure or f"{child.kind} (slot {child.slot}) {why}"
            return
        if child.stopping or (self.stopping is not None and not self._serving_drain_delay()):
            return
        if code == BOOT_ERROR:
            reason = self.shm.read(child.record)[2]
            self.log.error("%s (slot %d) failed to boot: %s; stopping", child.kind, child.slot, reason)
            self.exit_code = BOOT_ERROR
            self.handle_quit()
            return
        self.log.warning("%s %d (slot %d) died with %s; respawning", child.kind, child.pid, child.slot, how)
        if child.kind == "worker":
            self._count("fastlb_worker_restarts_total")
        now = time.monotonic()
        recent = [t for t in self.deaths.get(child.slot, []) if now - t < _RESPAWN_WINDOW] + [now]
        self.deaths[child.slot] = recent
        delay = 0.0 if len(recent) <= _RESPAWN_BURST else min(2.0 ** (len(recent) - _RESPAWN_BURST), 30.0)
        self.pending_spawns.append((now + delay, child.kind, child.slot, child.generation))

    def _run_pending_spawns(self, now: float) -> None:
        due = [p for p in self.pending_spawns if p[0] <= now]
        if not due or (self.stopping is not None and not self._serving_drain_delay()):
            return
        self.pending_spawns = [p for p in self.pending_spawns if p[0] > now]
        for _, kind, slot, gen in due:
            self._spawn(kind, slot, gen)

    def _check_heartbeats(self, now: float) -> None:
        limit = self.cfg.server.heartbeat_timeout
        for child in list(self.children.values()):
            if child.stopping or child.generation is not self.current:
                continue
            beat, state, _ = self.shm.read(child.record)
            if state == shm_mod.READY and now - beat > limit:
                self.log.error("%s %d (slot %d) missed its heartbeat for %.1fs; killing it",
                               child.kind, child.pid, child.slot, now - beat)
                self._kill(child.pid, signal.SIGKILL)

    # -- files ---------------------------------------------------------------------------------------
    def _lock_pid_file(self) -> None:
        """Hold an exclusive flock(2) on the pid file for the master's whole life.  The lock, not the
        pid written in the file, says whether a master is running: a pid outlives its process and may
        name someone else's by the time it is read; a lock goes when the last descriptor of its open
        file description closes, however the master died."""
        path = self.cfg.server.pid_file or default_pid_file()
        if self.inherited_pid_fd >= 0:
            fd, self.inherited_pid_fd = self.inherited_pid_fd, -1
            if _same_file(fd, path):  # binary upgrade: the old master's description, lock included
                self.pid_file, self.pid_fd = path, fd
                return
            os.close(fd)  # the new config names another pid file
        # Retried briefly: `fastlb reload`/`stop` take a shared lock for an instant to test it.
        for attempt in range(10, -1, -1):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EROFS, errno.ENOENT):
                    raise
                self.log.warning("cannot write pid file %s: %s", path, exc)
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                if attempt:
                    time.sleep(0.05)
                    continue
                raise OSError(f"pid file {path} is locked by the running master {holder}: stop it "
                              f"first, or give this instance its own [server] pid_file") from None
            # A master that was stopping may have unlinked the file between our open and our lock.
            if _same_file(fd, path):
                break
            os.close(fd)
        self.pid_file, self.pid_fd = path, fd
        if not self.upgrade_from:
            self._write_pid()

    def _write_pid(self) -> None:
        if self.pid_fd is not None:
            os.ftruncate(self.pid_fd, 0)
            os.pwrite(self.pid_fd, f"{os.getpid()}\n".encode(), 0)

    def _write_reload_status(self, result: str, reason: str) -> None:
        """Tell `fastlb reload` how its reload went: it sends SIGHUP, which carries no reply address,
        then waits for this file (next to the pid file) to name this master and a reload that started
        after its signal.  `started` is CLOCK_MONOTONIC, which all processes of the host share."""
        if self.pid_file is None:
            return
        path = reload_status_file(self.pid_file)
        status = {"pid": os.getpid(), "started": self.reload_started, "result": result, "reason": reason}
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(status, f)
            os.replace(path + ".tmp", path)
        except OSError as exc:
            self.log.warning("cannot write the reload status file %s: %s", path, exc)

    def _cleanup(self, quiet: bool = False) -> None:
        if self.watcher is not None:
            self.watcher.close()
            self.watcher = None
        self.notifier.close()
        if self.pid_fd is not None:
            # Ours to remove only if the file still names us: after an upgrade it names the new master
            # (which shares our lock), and a file someone replaced is theirs.
            if _same_file(self.pid_fd, self.pid_file) and _read_pid(self.pid_fd) == os.getpid():
                for path in (reload_status_file(self.pid_file), self.pid_file):
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
            os.close(self.pid_fd)
            self.pid_fd = None
        for g in (self.current, self.pending):
            for socks in (g.sockets.values() if g is not None else ()):
                for sock in socks:
                    sock.close()
        if self.admin_socket is not None:
            self.admin_socket.close()
        for _, sock in self.demo_sockets:
            sock.close()
        if not quiet:
            self.log.info("stopped")


def _same_file(fd: int, path: str) -> bool:
    try:
        st, here = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 64, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def reload_status_file(pid_file: str) -> str:
    return pid_file + ".reload"


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
