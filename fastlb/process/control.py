"""The control process: active health checks, the admin listener and, with --demo, the demo backends.

One control process per host (not one per worker): it is where host-wide work lives.  It serves on
sockets the master opened and holds, so a respawned or reloaded control process binds nothing itself.
"""

import asyncio
import os
import signal

from fastlb.http.tiny import serve
from fastlb.lb.health import HealthChecker
from fastlb.obs.admin import Admin
from fastlb.process import shm as shm_mod

TICK = 0.5


class Control:
    def __init__(self, cfg, admin_socket, demo_sockets, shm, slot, master_pid, log, layout, store,
                 cert_facts):
        self.cfg = cfg
        self.admin_socket = admin_socket
        self.demo_sockets = demo_sockets
        self.shm = shm
        self.slot = slot
        self.master_pid = master_pid
        self.log = log
        self.layout = layout
        self.store = store
        self.cert_facts = cert_facts
        self.loop = None

    def run(self) -> int:
        import uvloop

        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        health = HealthChecker(self.cfg, self.shm.states, self.log)
        health.start(loop)
        if self.admin_socket is not None:
            admin = Admin(self.cfg, self.layout, self.store, self.shm.states, health, self.master_pid,
                          self.cert_facts)
            loop.run_until_complete(serve(loop, self.admin_socket, admin.handle))
        if self.demo_sockets:
            from fastlb.demo import handler

            for name, sock in self.demo_sockets:
                loop.run_until_complete(serve(loop, sock, handler(name)))
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(signum, loop.stop)
        loop.add_signal_handler(signal.SIGUSR1, lambda: None)  # no log files of its own
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
