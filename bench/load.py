"""Load tools and their parsers: wrk (keep-alive and resumed reconnects), ab (full handshakes), and an
asyncio client that holds idle TLS keep-alive connections.

Every run reports the load tool's own CPU time (rusage of exactly that child, via os.wait4) so a reader can
tell whether the load tool, not the proxy, was the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
# One wrk/ab thread: on a 2-core machine it leaves the other core to the single proxy worker (+ backend).
# 50 connections keep one worker saturated without turning latency into pure queueing time.
THREADS = 1
CONNECTIONS = 50

# A realistic browser request (~700 bytes on the wire with wrk's own request line and Host header).
BROWSER_HEADERS = [
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,image/apng,"
    "*/*;q=0.8,application/signed-exchange;v=b3;q=0.7",
    "Accept-Language: en-US,en;q=0.9,de;q=0.8",
    "Accept-Encoding: gzip, deflate, br",
    "Referer: https://shop.example.com/catalog",
    "Cookie: sessionid=8f14e45fceea167a5a36dedd4bea2543; csrftoken=Xq9Tz3kLmN0pQr7sUvWx1yZa4bCd6eFg; "
    "_ga=GA1.1.1234567890.1700000000; theme=dark; cart=3",
    'sec-ch-ua-platform: "Linux"',
    "Sec-Fetch-Dest: document",
    "Sec-Fetch-Mode: navigate",
    "Sec-Fetch-Site: same-origin",
    "Upgrade-Insecure-Requests: 1",
]


@dataclass
class LoadResult:
    requests: int
    bytes: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool_cpu_s: float  # user+system CPU of the load tool process itself
    detail: str = ""  # tool-specific facts (error breakdown, negotiated TLS)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


class LoadError(RuntimeError):
    pass


def run_tool(cmd: list[str], timeout: float) -> tuple[str, float]:
    """Run a load tool to completion; returns (combined output, the tool's user+system CPU seconds)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # A wedged proxy must not hang the run. os.kill, not proc.kill: Popen would reap the child itself.
        killer = threading.Timer(timeout, os.kill, (proc.pid, signal.SIGKILL))
        killer.start()
        try:
            # os.wait4 gives the rusage of exactly this child (RUSAGE_CHILDREN would mix in other children).
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise LoadError(f"`{' '.join(cmd)}` exited with {proc.returncode}: {text.strip()[-400:]}")
    return text, usage.ru_utime + usage.ru_stime


def wrk_command(url: str, duration: float, headers: list[str] = ()) -> list[str]:
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(duration))}s", "-s", str(WRK_SCRIPT)]
    for h in headers:
        cmd += ["-H", h]
    return cmd + [url]


def wrk(url: str, duration: float, headers: list[str] = ()) -> LoadResult:
    text, cpu = run_tool(wrk_command(url, duration, headers), timeout=duration + 30)
    m = re.search(r"^WRK_JSON (\{.*\})$", text, re.M)
    if not m:
        raise LoadError(f"wrk printed no report: {text.strip()[-400:]}")
    r = json.loads(m.group(1))
    # wrk's "status" errors are responses with status >= 400; the others are socket-level failures.
    kinds = ("connect", "read", "write", "timeout", "status")
    return LoadResult(
        requests=r["requests"],
        bytes=r["bytes"],
        seconds=r["duration_us"] / 1e6,
        p50_ms=r["p50_us"] / 1e3,
        p99_ms=r["p99_us"] / 1e3,
        errors=sum(r[k] for k in kinds),
        tool_cpu_s=cpu,
        detail=", ".join(f"{k}={r[k]}" for k in kinds if r[k]),
    )


def ab_command(url: str, duration: float) -> list[str]:
    # -t before -n: `-t` alone caps requests at 50,000; the explicit -n lifts that cap (ab preallocates
    # per-request stats, 2M entries is ~64 MB). -r: count receive errors instead of aborting the run.
    # No -k: every request opens a new connection, and ab never offers a session -> full handshake each.
    secs = max(1, round(duration))
    return f"ab -q -r -t {secs} -n 2000000 -c {CONNECTIONS}".split() + [url]


def ab(url: str, duration: float) -> LoadResult:
    text, cpu = run_tool(ab_command(url, duration), timeout=duration + 60)

    def field(name: str, default: str | None = None) -> str:
        m = re.search(rf"^{re.escape(name)}:\s+(\S+)", text, re.M)
        if m is None:
            if default is None:
                raise LoadError(f"ab output lacks {name!r}: {text.strip()[-400:]}")
            return default
        return m.group(1)

    def pct(p: int) -> float:
        m = re.search(rf"^\s*{p}%\s+(\d+)", text, re.M)
        return float(m.group(1)) if m else float("nan")

    failed, non2xx, write_err = (
        int(field("Failed requests")),
        int(field("Non-2xx responses", "0")),
        int(field("Write errors", "0")),
    )
    return LoadResult(
        requests=int(field("Complete requests")),
        bytes=int(field("Total transferred")),
        seconds=float(field("Time taken for tests")),
        p50_ms=pct(50),
        p99_ms=pct(99),
        errors=failed + non2xx + write_err,
        tool_cpu_s=cpu,
        detail=f"tls={field('SSL/TLS Protocol', '-')}"
        + (f" failed={failed} non2xx={non2xx} write={write_err}" if failed + non2xx + write_err else ""),
    )


async def _open_idle(port: int, ctx: ssl.SSLContext, count: int) -> tuple[list, int]:
    """Open `count` TLS connections, each doing one keep-alive request, and leave them open (idle)."""
    gate = asyncio.Semaphore(64)  # bounded concurrency: handshake bursts must not trip accept backlogs
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 10
                )
                writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
                await reader.readexactly(length)
                conns.append((reader, writer))
            except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError, AttributeError):
                failures += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return conns, failures


def idle_connections(port: int, ctx: ssl.SSLContext, count: int, measure, settle: float = 1.0):
    """Hold `count` idle keep-alive TLS connections, call measure() while they are open; returns
    (connections still open at measure time, failures incl. ones the proxy closed early, measure()'s result)."""

    async def main():
        conns, failures = await _open_idle(port, ctx, count)
        await asyncio.sleep(settle)  # let the proxy finish per-connection allocations
        result = measure()
        # A proxy that already dropped idle connections would make the RSS delta meaningless.
        closed = sum(reader.at_eof() for reader, _ in conns)
        for _, w in conns:
            w.close()
        await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
        return len(conns) - closed, failures + closed, result

    return asyncio.run(main())
