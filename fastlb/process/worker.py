"""A worker: one uvloop event loop serving its slot's listening sockets until told to stop.

The worker owns everything per-request: the router and backends built from the config it was forked
with, the upstream pools, and the deadline sweep.  Deadlines (header, idle, response) are checked by one
timer every TICK seconds instead of a timer per request, which keeps the per-request path free of
TimerHandle allocations; a deadline may fire up to TICK late, never early (deadlines are computed from
a fresh monotonic clock, while `now` is only the tick's).
"""

import asyncio
import functools
import ipaddress
import logging
import os
import signal
import time
from email.utils import formatdate

from fastlb import policy
from fastlb.acme.challenges import Http01Responder, challenge_context
from fastlb.acme.storage import Storage
from fastlb.http.front import Front
from fastlb.http.protocol import ClientConnection, Shared
from fastlb.lb.backend import build_backends
from fastlb.lb.router import Route, Router
from fastlb.net.upstream_tls import link_servers
from fastlb.obs import metrics
from fastlb.obs.accesslog import AccessLog
from fastlb.process import shm as shm_mod

TICK = 0.25


class ListenerInfo:
    """What a connection needs to know about the listener that accepted it, pre-encoded."""

    __slots__ = (
        "spec", "name", "proto", "port", "authority", "redirect_to_https", "https_port", "open",
        "proxy_protocol", "passthrough", "front_timeout", "client_auth",
        "m_open", "m_total", "m_tls", "m_tls_errors", "m_client_certs", "m_proxy_errors", "m_passthrough",
        "m_passthrough_total",
    )

    def __init__(self, spec, https_port: int | None, cfg, backends):
        self.spec = spec
        self.name = str(spec.address)
        self.proto = b"https" if spec.tls else b"http"
        self.port = str(spec.address.port).encode()
        self.authority = str(spec.address).encode()
        self.redirect_to_https = spec.redirect_to_https and not spec.tls
        self.https_port = b"" if https_port in (None, 443) else b":%d" % https_port
        self.open = 0             # connections open now
        self.proxy_protocol = spec.proxy_protocol
        # SNI (exact or "*.parent") -> Backend, for [[listeners.passthrough]]; None when there is none.
        self.passthrough = {p.sni.lower(): backends[p.backend] for p in spec.passthrough} or None
        # How long a connection may take before HTTP starts: the TLS handshake, or a PROXY header alone.
        self.front_timeout = cfg.tls.handshake_timeout if spec.tls else cfg.limits.header_timeout
        self.client_auth = spec.tls and cfg.tls.client_auth is not None
        self.m_client_certs = self.m_proxy_errors = self.m_passthrough = self.m_passthrough_total = None
        self.m_open = self.m_total = 0
        self.m_tls_errors = None  # reason -> series index, for TLS listeners
        self.m_tls = None         # (version, cipher, resumed) -> series index, for TLS listeners

    def https_location(self, host: bytes | None, target: bytes) -> bytes:
        name = (host or self.spec.address.host.encode())
        if name.startswith(b"["):
            name = name[: name.find(b"]") + 1]
        else:
            name = name.split(b":", 1)[0]
        return b"https://" + name + self.https_port + target


class Worker:
    def __init__(self, cfg, slot: int, sockets, contexts, shm, master_pid: int, log: logging.Logger,
                 layout, area, policies=None, upstream=None):
        self.cfg = cfg
        self.slot = slot
        self.sockets = sockets          # [(ListenerSpec, socket)] for this slot
        self.contexts = contexts        # {listener index: SSLContext}
        self.shm = shm
        self.master_pid = master_pid
        self.log = log
        self.limits = cfg.limits
        self.backends = build_backends(cfg, shm.states)
        # TLS and PROXY headers to servers: each server's ServerLink, over the master's contexts.
        link_servers(self.backends, cfg, upstream or {})
        self.router = Router(cfg.routes, cfg.default_backend, self.backends)
        self.no_route = Route("-", None)   # what 404s are counted under
        https_port = next((s.address.port for s in cfg.listeners if s.tls), None)
        self.listeners = [ListenerInfo(spec, https_port, cfg, self.backends) for spec, _ in sockets]
        self.area = area                # this worker's metrics area (float64 memoryview)
        self.m_bad = {}
        metrics.bind(layout, self)
        if policies:
            policy.attach(self, policies, layout)  # built by the master: see fastlb/policy
        # Connections of TLS and PROXY listeners before HTTP starts (their deadline is checked on the
        # tick), and passthrough connections (kept until graceful_timeout on drain, like tunnels).
        self.fronts: set = set()
        self.splices: set = set()
        # ACME TLS-ALPN-01 (RFC 8737): whether a ClientHello offering acme-tls/1 is worth a look.
        self.acme_alpn = False
        self.access_log = AccessLog(cfg.log.access, cfg.log.access_buffer) if cfg.log.access else None
        self.m_dropped = layout.find("fastlb_access_log_dropped_total")
        self._dropped_seen = 0
        self._trusted = [ipaddress.ip_network(n, strict=False) for n in cfg.server.trusted_proxies]
        self.connections: set[ClientConnection] = set()
        self.loop = None
        self.servers = []
        self._second = 0
        # What the data path reads per request, typed (the clock, Date, draining and the request-id
        # counter live there; the properties below are the worker's view of them).  Request ids are
        # <random prefix>-<counter in hex>; core.parse_request formats one only for a request that
        # did not bring its own X-Request-ID.
        self.shared = Shared(cfg.limits, self.router, self.no_route, os.urandom(6).hex().encode(),
                             self.access_log, area)
        # ACME: every worker answers the CA's checks from what the control process published.
        self.acme_storage = None
        if any(spec.acme for spec in cfg.tls.certificates):
            self.acme_storage = Storage(cfg.acme)
            self.shared.acme = Http01Responder(self.acme_storage.http01)
            self.acme_alpn = cfg.acme.challenge == "tls-alpn-01"
        self._update_clock()

    # -- per-request helpers ----------------------------------------------------------------------
    def next_request_id(self) -> bytes:
        return self.shared.next_request_id()

    @property
    def now(self) -> float:
        return self.shared.now

    @now.setter
    def now(self, value: float) -> None:
        self.shared.now = value

    @property
    def draining(self) -> bool:
        return self.shared.draining

    @property
    def date(self) -> bytes:
        return self.shared.date

    def is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        addr = ipaddress.ip_address(ip)
        return any(addr in net for net in self._trusted)

    # -- lifecycle ---------------------------------------------------------------------------------
    def run(self) -> int:
        import uvloop  # imported here: the master runs no event loop and must not need it to boot

        self.loop = loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        for index, (info, (_, sock)) in enumerate(zip(self.listeners, self.sockets, strict=True)):
            ctx = self.contexts.get(index)
            if ctx is not None or info.proxy_protocol:
                # fastlb's own TLS and PROXY layer (http/front_py.py), never uvloop's SSL.
                factory = functools.partial(Front, self, info, ctx)
            else:
                factory = functools.partial(ClientConnection, self, info)
            server = loop.run_until_complete(loop.create_server(factory, sock=sock, backlog=4096))
            self.servers.append(server)
        loop.add_signal_handler(signal.SIGTERM, self.drain)
        loop.add_signal_handler(signal.SIGINT, loop.stop)
        loop.add_signal_handler(signal.SIGQUIT, loop.stop)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        self._stop_at = None
        loop.call_later(TICK, self._tick)
        self.shm.set_state(self.slot, shm_mod.READY)
        try:
            loop.run_forever()
        finally:
            for conn in list(self.connections):
                conn.transport.abort()
            for splice in list(self.splices):
                splice.abort()
            if self.access_log is not None:
                self.access_log.close()
        return 0

    def drain(self) -> None:
        """Graceful stop: stop accepting, finish what is in flight, close idle connections (after a
        short grace, see ClientConnection.drain), keep tunnels until graceful_timeout."""
        if self.draining:
            return
        self.shared.draining = True
        self._stop_at = time.monotonic() + self.cfg.server.graceful_timeout
        for server in self.servers:
            server.close()
        now = time.monotonic()
        for conn in list(self.connections):
            conn.drain(now)

    def _update_clock(self) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            # RFC 9110 §6.6.1: IMF-fixdate; refreshed once a second, not per response.
            self.shared.date = formatdate(now, usegmt=True).encode()
            self.shared.iso_time = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now))

    def tls_alpn_challenge(self, sni: str | None):
        """The SSLContext answering the CA's TLS-ALPN-01 check for sni (RFC 8737), or None; the TLS
        front layer asks when a ClientHello offers acme-tls/1."""
        return challenge_context(self.acme_storage.tls_alpn01, sni)

    def reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def _publish_gauges(self) -> None:
        area = self.area
        log = self.access_log
        if log is not None:
            log.flush()
            dropped = log.dropped + log.failed
            area[self.m_dropped] += dropped - self._dropped_seen
            self._dropped_seen = dropped
        for info in self.listeners:
            area[info.m_open] = info.open
        for backend in self.backends.values():
            for server in backend.servers:
                area[server.m_active] = server.active

    def _tick(self) -> None:
        self.now = now = time.monotonic()
        self._update_clock()
        self.shm.beat(self.slot)
        if os.getppid() != self.master_pid:
            self.log.error("master is gone; worker %d exits", self.slot)
            self.loop.stop()
            return
        for conn in [c for c in self.connections if c.deadline_kind and c.deadline < now]:
            conn.on_deadline()
        for conn in [c for c in self.connections if c.send_deadline and c.send_deadline < now]:
            conn.abort()  # send_timeout: the client stopped reading what we send
        for front in [f for f in self.fronts if f.deadline < now]:
            front.timed_out()  # handshake_timeout, or header_timeout for a PROXY header
        for conn in [c for c in self.connections if c.active is not None]:
            conn.upstream_deadline(now)  # response_timeout
        for conn in self.connections:
            conn.on_tick(now)  # BIO buffers of idle TLS connections, send_proxy connections' idle_timeout
        self._publish_gauges()
        for backend in self.backends.values():
            for server in backend.servers:
                server.idle[:] = [conn for conn in server.idle if not conn.idle_tick(now)]
                event = server.tick(now)
                if event:
                    self.log.info("%s", event)
            waiting = backend.waiting
            while waiting and now - waiting[0].queued_at > backend.spec.queue_timeout:
                ex = waiting.popleft()
                if not ex.client.closed:
                    ex.respond_local(503)
        if self.draining and ((not self.connections and not self.splices) or now > self._stop_at):
            self.loop.stop()
            return
        self.loop.call_later(TICK, self._tick)
