"""The admin listener's endpoints: `/metrics` (Prometheus), `/status` (JSON), `/healthz`, `/` (page).

Served by the control process only, on the admin address (127.0.0.1:9900 by default), never on a
public listener.  Everything is computed on request from shared memory: the per-worker metric areas,
the server state bytes and the health checker's last results.
"""

import importlib.resources
import time

import orjson
import psutil

from fastlb import __version__, core
from fastlb.obs import metrics

_PAGE = importlib.resources.files("fastlb.obs").joinpath("status.html")


class Admin:
    def __init__(self, cfg, layout, store, shm, health, master_pid: int, certificate_facts, acme=None):
        self.cfg = cfg
        self.layout = layout
        self.store = store
        self.shm = shm            # server states, and whether the master is draining the host
        self.states = shm.states
        self.health = health
        self.master_pid = master_pid
        self.certificate_facts = certificate_facts  # [(name, notAfter unix time)]
        self.acme = acme          # the ACME manager (fastlb/acme/manager.py), or None
        try:
            self.started = psutil.Process(master_pid).create_time()
        except psutil.Error:
            self.started = time.time()

    def handle(self, method, path, headers):
        path = path.split("?", 1)[0]
        if path == "/healthz":
            # From SIGTERM on, while the listeners still serve for [server] drain_delay: an L4
            # balancer's health check takes this node out before anything is refused.
            if self.shm.draining:
                return 503, "text/plain", b"draining\n"
            return 200, "text/plain", b"ok\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics().encode()
        if path == "/status":
            return 200, "application/json", orjson.dumps(self.status())
        if path == "/":
            return 200, "text/html; charset=utf-8", _PAGE.read_bytes()
        return 404, "text/plain", b"not found\n"

    # -- /metrics -----------------------------------------------------------------------------------
    def metrics(self) -> str:
        extra = [("fastlb_build_info", (("version", __version__), ("extension", str(core.EXTENSION).lower())),
                  1.0)]
        gid = 0
        for name, spec in self.cfg.backends.items():
            for server in spec.servers:
                labels = (("backend", name), ("server", str(server.address)))
                extra.append(("fastlb_backend_server_up", labels, float(self.states[gid] == 1)))
                gid += 1
        for name, not_after in self.certificate_facts:
            extra.append(("fastlb_tls_certificate_expiry_seconds", (("name", name),), not_after))
        for managed in self.acme.certificates if self.acme is not None else ():
            extra.append(("fastlb_acme_next_renewal_seconds", (("name", managed.name),), managed.next_try))
        for role, proc in self._processes():
            try:
                with proc.oneshot():
                    cpu = proc.cpu_times()
                    values = (proc.memory_info().rss, cpu.user + cpu.system, proc.num_fds())
            except psutil.Error:
                continue
            labels = (("process", role), ("pid", str(proc.pid)))
            extra.append(("fastlb_process_resident_memory_bytes", labels, values[0]))
            extra.append(("fastlb_process_cpu_seconds_total", labels, values[1]))
            extra.append(("fastlb_process_open_fds", labels, values[2]))
        return metrics.render(self.layout, self.store, extra)

    def _processes(self):
        try:
            master = psutil.Process(self.master_pid)
        except psutil.Error:
            return []
        workers = {int(self.store.header(a)[metrics.PID]): a for a in range(metrics.AREAS)
                   if self.store.header(a)[metrics.LIVE]}
        out = [("master", master)]
        for child in master.children():
            area = workers.get(child.pid)
            role = "control" if area is None else f"worker-{int(self.store.header(area)[metrics.SLOT])}"
            out.append((role, child))
        return out

    # -- /status ------------------------------------------------------------------------------------
    def status(self) -> dict:
        store, layout = self.store, self.layout
        requests = [i for fam, _, _, i in layout.series if fam == "fastlb_requests_total"]
        opened = {dict(labels)["listener"]: i for fam, labels, _, i in layout.series
                  if fam == "fastlb_connections_open"}
        accepted = {dict(labels)["listener"]: i for fam, labels, _, i in layout.series
                    if fam == "fastlb_connections_total"}
        live = [a for a in range(metrics.AREAS) if store.header(a)[metrics.LIVE]]
        areas = range(metrics.AREAS)

        def total(index, among=areas):
            return int(sum(store.area(a)[index] for a in among))

        workers = []
        for a in live:
            header, area = store.header(a), store.area(a)
            workers.append({
                "slot": int(header[metrics.SLOT]), "pid": int(header[metrics.PID]),
                "started": header[metrics.STARTED], "requests": int(sum(area[i] for i in requests)),
                "connections_open": int(sum(area[i] for i in opened.values())),
            })
        listeners = [{
            "address": str(spec.address), "tls": spec.tls, "redirect_to_https": spec.redirect_to_https,
            "connections_open": total(opened[str(spec.address)], live),
            "connections_total": total(accepted[str(spec.address)]),
        } for spec in self.cfg.listeners]
        return {
            "version": __version__,
            "extension": core.EXTENSION,
            "started": self.started,
            "uptime_seconds": round(time.time() - self.started, 3),
            "workers": sorted(workers, key=lambda w: w["slot"]),
            "listeners": listeners,
            "backends": self._backends(total, live),
            "acme": self.acme.status() if self.acme is not None else [],
        }

    def _backends(self, total, live) -> dict:
        checks = self.health.results()
        find = self.layout.find
        out = {}
        gid = 0
        for name, spec in self.cfg.backends.items():
            servers = []
            for server in spec.servers:
                address = str(server.address)
                labels = {"backend": name, "server": address}
                base = find("fastlb_upstream_response_seconds", **labels)
                entry = {
                    "address": address, "weight": server.weight, "up": self.states[gid] == 1,
                    "checked": spec.health is not None,
                    "active_requests": total(find("fastlb_backend_server_active_requests", **labels), live),
                    "requests": sum(total(base + j) for j in range(metrics.HIST_SUM)),
                }
                entry.update(checks.get(gid, {}))
                servers.append(entry)
                gid += 1
            out[name] = {"balance": spec.balance, "servers": servers}
        return out
