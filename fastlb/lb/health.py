"""Active health checks, run once per host in the control process (not once per worker).

Each checked server has its own task: probe, then sleep `interval`.  A server goes down after `fall`
consecutive failures and up after `rise` consecutive successes; the verdict is one byte in shared
memory that every worker reads when it picks a server, and each change is logged once with its reason.

A backend with `[backends.NAME.tls]` is checked over TLS with the context and server name its requests
use (fastlb/net/upstream_tls.py), so a certificate that fails verification takes the server down and
/status says why (`tls: certificate has expired`).  With `send_proxy` a check starts with a PROXY header
carrying the check connection's own addresses, as HAProxy's `check-send-proxy` does: a server that
requires the header would refuse a check without one.
"""

import asyncio
import logging
import ssl
import time

from fastlb import core
from fastlb.lb.backend import DOWN, UP
from fastlb.net import upstream_tls


class ServerCheck:
    __slots__ = ("backend", "name", "gid", "spec", "host", "port", "up", "streak", "last", "checked_at",
                 "context", "server_name", "proxy")

    def __init__(self, backend: str, server, gid: int, spec, context=None, server_name=None, proxy=""):
        self.backend = backend
        self.name = str(server.address)
        self.gid = gid
        self.spec = spec
        self.host = server.address.host
        self.port = server.address.port
        self.up = True
        self.streak = 0       # consecutive results contradicting the current state
        self.last = "not checked yet"
        self.checked_at = 0.0
        self.context = context            # the backend's client context: check over TLS
        self.server_name = server_name    # SNI and the name verified
        self.proxy = proxy                # "", "v1" or "v2": send a PROXY header first


class HealthChecker:
    def __init__(self, cfg, states, log, upstream=None):
        self.states = states
        self.log = log
        self.checks: list[ServerCheck] = []
        gid = 0
        for name, backend in cfg.backends.items():
            for server in backend.servers:
                if backend.health is not None:
                    context = (upstream or {}).get(name)
                    tls = backend.tls
                    server_name = None
                    if context is not None:
                        server_name = server.server_name or tls.server_name or server.address.host
                    check = ServerCheck(name, server, gid, backend.health, context, server_name,
                                        backend.send_proxy)
                    check.up = states[gid] == UP
                    self.checks.append(check)
                gid += 1
        self.tasks = []

    def start(self, loop) -> None:
        self.tasks = [loop.create_task(self._run(check)) for check in self.checks]

    async def _run(self, check: ServerCheck) -> None:
        spec = check.spec
        while True:
            try:
                ok, result = await asyncio.wait_for(self._probe(check), spec.timeout)
            except TimeoutError:
                ok, result = False, "timeout"
            except ssl.SSLError as exc:
                ok, result = False, "tls: " + upstream_tls.failure(exc)[1]
            except OSError as exc:
                ok, result = False, _os_reason(exc)
            check.last = result
            check.checked_at = time.time()
            self._record(check, ok, result)
            await asyncio.sleep(spec.interval)

    def _record(self, check: ServerCheck, ok: bool, result: str) -> None:
        if ok == check.up:
            check.streak = 0
            return
        check.streak += 1
        if check.streak < (check.spec.rise if ok else check.spec.fall):
            return
        check.up = ok
        check.streak = 0
        self.states[check.gid] = UP if ok else DOWN
        # Coming back is good news (INFO); going down is what an operator must see (WARNING).
        self.log.log(logging.INFO if ok else logging.WARNING, "health: %s/%s is %s (%s)",
                     check.backend, check.name, "UP" if ok else "DOWN", result)

    async def _probe(self, check: ServerCheck) -> tuple[bool, str]:
        if check.proxy:
            reader, writer = await asyncio.open_connection(check.host, check.port)
            src = writer.get_extra_info("sockname")
            dst = writer.get_extra_info("peername")
            build = core.proxy_header_v2 if check.proxy == "v2" else core.proxy_header_v1
            writer.write(build(src[0], src[1], dst[0], dst[1]))
            if check.context is not None:
                await writer.start_tls(check.context, server_hostname=check.server_name)
        else:
            reader, writer = await asyncio.open_connection(check.host, check.port, ssl=check.context,
                                                           server_hostname=check.server_name)
        try:
            spec = check.spec
            if spec.type == "tcp":
                return True, "connected"
            host = spec.host or f"{check.host}:{check.port}"
            writer.write(f"GET {spec.path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                         f"User-Agent: fastlb-health\r\n\r\n".encode())
            line = await reader.readline()
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                return False, "invalid response"
            status = int(parts[1])
            lo, hi = spec.expect
            return lo <= status <= hi, f"status {status}"
        finally:
            writer.close()

    def results(self) -> dict[int, dict]:
        return {c.gid: {"up": c.up, "last_check": c.last, "checked_at": c.checked_at} for c in self.checks}


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return exc.strerror or type(exc).__name__
