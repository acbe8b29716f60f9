"""The control process: active health checks, the admin listener, ACME and, with --demo, the demo backends.

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
                 cert_facts, upstream=None):
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
        self.upstream = upstream or {}  # {backend: client SSLContext}: health checks over TLS
        self.loop = None

    def run(self) -> int:
        import uvloop

        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        health = HealthChecker(self.cfg, self.shm.states, self.log, self.upstream)
        health.start(loop)
        acme = self._acme()
        if self.admin_socket is not None:
            admin = Admin(self.cfg, self.layout, self.store, self.shm, health, self.master_pid,
                          self.cert_facts, acme=acme)
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
        if acme is not None:
            acme.start()
        loop.run_forever()
        if acme is not None:
            acme.close()
        return 0

    def _acme(self):
        """The ACME manager (fastlb/acme/manager.py) when a certificate says acme = true: one per host,
        here, so that workers never race for an order."""
        if not any(spec.acme for spec in self.cfg.tls.certificates):
            return None
        from fastlb.acme.manager import Manager  # requests and the acme library: only when used

        area, layout = self.store.master_area(), self.layout

        def count(result: str) -> None:
            # One control process counts at a time, except while a reload overlaps two (an increment
            # might then be lost; a value is never torn: aligned 8-byte stores).
            area[layout.find("fastlb_acme_orders_total", result=result)] += 1

        return Manager(self.cfg, self.cert_facts, self.log, count, self.shm.request_reload)

    def _tick(self) -> None:
        self.shm.beat(self.slot)
        if os.getppid() != self.master_pid:
            self.loop.stop()
            return
        self.loop.call_later(TICK, self._tick)
