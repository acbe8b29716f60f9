"""Checks that make the numbers trustworthy.

* `check_proxy`: before a proxy is measured, prove it proxies correctly (bodies, round robin,
  X-Forwarded-For/-Proto/-Port) and that it resumes TLS 1.3 and TLS 1.2 sessions.
* `tool_handshakes`: prove what the load tools do on the wire, against a local TLS server that counts
  full vs resumed handshakes: `ab` (https-full) must never resume, `wrk -H "Connection: close"`
  (https-resume) must resume (nearly) every reconnect.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import threading
from pathlib import Path

from proxies import BACKEND_PORTS, BIG_SIZE, HOST, HTTP_PORT, SMALL_BODY, TLS_PORT


def client_context(cafile: Path, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))  # verifies that the proxy serves the bench cert
    if max_version:
        ctx.maximum_version = max_version
    return ctx


def get(port: int, path: str = "/", ctx: ssl.SSLContext | None = None, session: ssl.SSLSession | None = None):
    """One `Connection: close` request; returns (status, body, TLS facts: session, reused, version)."""
    raw = socket.create_connection((HOST, port), timeout=5)
    sock = ctx.wrap_socket(raw, server_hostname="localhost", session=session) if ctx else raw
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        data = b""
        # Reading to EOF also consumes TLS 1.3 session tickets, so sock.session is resumable afterwards.
        while chunk := sock.recv(65536):
            data += chunk
        tls = (
            {"session": sock.session, "reused": sock.session_reused, "version": sock.version()} if ctx else {}
        )
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else 0
    return status, body, tls


def check_proxy(cafile: Path, tls: bool = True) -> tuple[list[str], list[str], dict]:
    """Returns (problems with plain HTTP, problems with TLS, facts: resumes_tls1.3/1.2, versions)."""
    plain: list[str] = []
    secure: list[str] = []
    facts: dict = {}
    _probe(plain, HTTP_PORT, None, "http")
    if not tls:
        return plain, ["TLS listener not available"], facts
    ctx = client_context(cafile)
    _probe(secure, TLS_PORT, ctx, "https")
    for label, version in (("tls1.3", None), ("tls1.2", ssl.TLSVersion.TLSv1_2)):
        try:
            c = client_context(cafile, version)
            _, _, first = get(TLS_PORT, "/", c)
            _, _, second = get(TLS_PORT, "/", c, session=first["session"])
            facts[f"resumes_{label}"] = second["reused"]
            facts[f"version_{label}"] = second["version"]
        except (OSError, ssl.SSLError, TypeError) as e:
            facts[f"resumes_{label}"] = False
            facts[f"resume_error_{label}"] = repr(e)
    return plain, secure, facts


def _probe(problems: list[str], port: int, ctx: ssl.SSLContext | None, scheme: str) -> None:
    try:
        status, body, _ = get(port, "/", ctx)
        if (status, body) != (200, SMALL_BODY):
            problems.append(f"GET / -> {status} {body[:60]!r}")
        status, body, _ = get(port, "/big", ctx)
        if status != 200 or len(body) != BIG_SIZE:
            problems.append(f"GET /big -> {status}, {len(body)} bytes")
        seen = set()
        for _ in range(4):
            _, body, _ = get(port, "/headers", ctx)
            fields = dict(f.split("=", 1) for f in body.decode().split())
            seen.add(fields.get("port"))
            want = {"xff": HOST, "proto": scheme, "port_hdr": str(port)}
            bad = {k: fields.get(k) for k, v in want.items() if fields.get(k) != v}
            if bad:
                problems.append(f"X-Forwarded-* wrong or missing: got {bad}, want {want}")
                break
        if seen != {str(p) for p in BACKEND_PORTS}:
            problems.append(f"not round robin: 4 requests reached backend port(s) {sorted(seen)}")
    except (OSError, ssl.SSLError, ValueError, IndexError) as e:
        problems.append(f"{scheme} request failed: {e!r}")


class _CountingTLSServer:
    """Minimal HTTPS server (own thread + loop) that counts full vs resumed handshakes."""

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.handshakes = self.resumed = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        self.resumed += bool(writer.get_extra_info("ssl_object").session_reused)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\n" + SMALL_BODY)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, HOST, 0, ssl=self.ctx, backlog=1024)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        # Connections cut by a load tool at exit are expected; do not print their tracebacks.
        self.loop.set_exception_handler(lambda loop, context: None)
        self.ready.set()
        self.loop.run_forever()
        self.server.close()
        tasks = asyncio.all_tasks(self.loop)
        for t in tasks:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(5)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def take(self) -> dict:
        counts = {"handshakes": self.handshakes, "resumed": self.resumed}
        self.handshakes = self.resumed = 0
        return counts


def tool_handshakes(cert: Path, key: Path, commands: dict[str, list[str]]) -> dict[str, dict]:
    """Run each load command (URL placeholder `{url}`) against the counting server; returns counts."""
    out = {}
    with _CountingTLSServer(cert, key) as server:
        url = f"https://{HOST}:{server.port}/"
        for label, cmd in commands.items():
            subprocess.run([a.replace("{url}", url) for a in cmd], capture_output=True, timeout=60)
            out[label] = server.take()
    return out
