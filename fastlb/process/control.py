"""The control process: active health checks, the admin listener and, with --demo, the demo backends.

One control process per host (not one per worker): it is where host-wide work lives.  It serves on
sockets the master opened and holds, so a respawned or reloaded control process binds nothing itself.
"""

import asyncio
import os
import signal
import time

import orjson

from fastlb import __version__, core
from fastlb.http.tiny import serve
from fastlb.lb.health import HealthChecker
from fastlb.process import shm as shm_mod

TICK = 0.5


class Control:
    def __init__(self, cfg, admin_socket, demo_sockets, shm, slot, master_pid, log):
        self.cfg = cfg
        self.admin_socket = admin_socket
        self.demo_sockets = demo_sockets
        self.shm = shm
        self.slot = slot
        self.master_pid = master_pid
        self.log = log
        self.started = time.time()
        self.loop = None

    def run(self) -> int:
        import uvloop

        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        servers = []
        if self.admin_socket is not None:
            servers.append(loop.run_until_complete(serve(loop, self.admin_socket, self.admin)))
        if self.demo_sockets:
            from fastlb.demo import handler

            for name, sock in self.demo_sockets:
                servers.append(loop.run_until_complete(serve(loop, sock, handler(name))))
        self.health = HealthChecker(self.cfg, self.shm.states, self.log)
        self.health.start(loop)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(signum, loop.stop)
        loop.call_later(TICK, self._tick)
        self.shm.set_state(self.slot, shm_mod.READY)
        loop.run_forever()
        return 0

    def _tick(self) -> None:
        self.shm.beat(self.slot)
        if os.getppid() != self.master_pid:
            self.loop.stop()
            return
        self.loop.call_later(TICK, self._tick)

    def admin(self, method, path, headers):
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/status":
            return 200, "application/json", orjson.dumps(self.status())
        return 404, "text/plain", b"not found\n"

    def status(self) -> dict:
        cfg = self.cfg
        return {
            "version": __version__,
            "extension": core.EXTENSION,
            "uptime_seconds": round(time.time() - self.started, 3),
            "workers": cfg.workers_effective(),
            "listeners": [
                {"address": str(spec.address), "tls": spec.tls} for spec in cfg.listeners
            ],
            "backends": self._backends_status(),
        }

    def _backends_status(self) -> dict:
        checks = self.health.results()
        states = self.shm.states
        out = {}
        gid = 0
        for name, spec in self.cfg.backends.items():
            servers = []
            for server in spec.servers:
                entry = {"address": str(server.address), "weight": server.weight,
                         "up": states[gid] == 1, "checked": spec.health is not None}
                entry.update(checks.get(gid, {}))
                servers.append(entry)
                gid += 1
            out[name] = {"balance": spec.balance, "servers": servers}
        return out
