"""Compare fastlb with nginx and HAProxy on the same loopback topology; print one table with ratios to nginx.

    python bench/compare.py                       # all scenarios, all proxies, 10 s windows, 1 round
    python bench/compare.py --quick --proxies nginx,haproxy
    python bench/compare.py --repeat 3 --scenarios https-ka,https-full --json

Topology (identical for every proxy): load tool -> proxy with ONE worker on 127.0.0.1:8080 (plain) and
:8443 (TLS, one shared ECDSA P-256 cert) -> one separate backend nginx on 127.0.0.1:9101 and :9102.
Proxies run one after another, each stopped (ports verified free) before the next starts. The key figure is
the proxy's CPU time per request (utime+stime of all its processes over the measured window / requests):
unlike req/s it does not depend on who wins the fight for the machine's few cores.
See `--help` and the module docstrings of proxies.py, load.py and checks.py for the details.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import checks
import load
from proxies import (
    ADMIN_PORT,
    BACKEND_PORTS,
    HOST,
    HTTP_PORT,
    PROXIES,
    REENCRYPT_PATH,
    TLS_PORT,
    Backend,
    Service,
    StartError,
    make_cert,
    nofile_limit,
    port_free,
)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
IDLE_CONNS = 2000
TOOL_SATURATED = 0.90  # load tool busier than this share of one core: its req/s is bounded by the tool


@dataclass(frozen=True)
class Scenario:
    name: str
    tls: bool
    target: float | None  # fastlb/nginx ratio to meet (CPU µs/req; KiB/conn for idle)
    how: str  # one line for the reader: tool and flags

    def run(self, duration: float) -> load.LoadResult:
        https, http = f"https://{HOST}:{TLS_PORT}", f"http://{HOST}:{HTTP_PORT}"
        match self.name:
            case "direct":
                return load.wrk(f"http://{HOST}:{BACKEND_PORTS[0]}/", duration)
            case "http-ka":
                return load.wrk(f"{http}/", duration)
            case "https-ka":
                return load.wrk(f"{https}/", duration)
            case "https-headers":
                return load.wrk(f"{https}/", duration, load.BROWSER_HEADERS)
            case "https-big":
                return load.wrk(f"{https}/big", duration)
            case "https-full":
                return load.ab(f"{https}/", duration)
            case "https-resume":
                return load.wrk(f"{https}/", duration, ["Connection: close"])
            case "https-reencrypt":
                return load.wrk(f"{https}{REENCRYPT_PATH}", duration)
        raise ValueError(self.name)


WRK = f"wrk -t{load.THREADS} -c{load.CONNECTIONS} -s wrk_report.lua"
SCENARIOS = {
    s.name: s
    for s in [
        Scenario(
            "direct", False, None, f"{WRK} http://{HOST}:{BACKEND_PORTS[0]}/ (no proxy: machine ceiling)"
        ),
        Scenario("http-ka", False, 1.0, f"{WRK} http://{HOST}:{HTTP_PORT}/"),
        Scenario("https-ka", True, 1.0, f"{WRK} https://{HOST}:{TLS_PORT}/"),
        Scenario(
            "https-headers",
            True,
            1.0,
            f"{WRK} -H <{len(load.BROWSER_HEADERS)} browser headers, ~700 B "
            f"request> https://{HOST}:{TLS_PORT}/",
        ),
        Scenario("https-big", True, 0.8, f"{WRK} https://{HOST}:{TLS_PORT}/big (64 KiB)"),
        Scenario(
            "https-full",
            True,
            1.1,
            f"ab -r -c{load.CONNECTIONS} -t S (no -k: new connection + full handshake per request, HTTP/1.0)",
        ),
        Scenario(
            "https-resume",
            True,
            1.1,
            f"{WRK} -H 'Connection: close' (reconnect per request, wrk resumes the TLS session)",
        ),
        Scenario(
            "https-reencrypt",
            True,
            1.0,
            f"{WRK} https://{HOST}:{TLS_PORT}{REENCRYPT_PATH} (verified TLS to the backends too, "
            "pooled, sessions resumed: nginx proxy_ssl_session_reuse on)",
        ),
        Scenario(
            "idle",
            True,
            1.0,
            f"asyncio client holds {IDLE_CONNS} TLS keep-alive connections (1 request "
            "each); RSS delta summed over the proxy's processes",
        ),
    ]
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(scenario: Scenario, svc: Service, backend: Backend, args) -> dict:
    """Warm up, then one measured window; CPU of the proxy tree, backend and load tool over that window."""
    if args.warmup > 0:
        scenario.run(args.warmup)
    counter = SyscallCounter([p.pid for p in svc.processes()])
    accepted0 = backend_accepts()
    (user0, sys0), backend0, t0 = svc.cpu_split(), backend.cpu_seconds(), time.monotonic()
    res = scenario.run(args.duration)
    (user1, sys1), backend1, wall = svc.cpu_split(), backend.cpu_seconds(), time.monotonic() - t0
    syscalls = counter.stop()
    accepted1 = backend_accepts()
    proxy0, proxy1 = user0 + sys0, user1 + sys1
    n = max(res.requests, 1)
    return {
        "requests": res.requests,
        "seconds": res.seconds,
        "rps": res.rps,
        "mbps": res.bytes / res.seconds / 1e6 if res.seconds else 0.0,
        "p50_ms": res.p50_ms,
        "p99_ms": res.p99_ms,
        "errors": res.errors,
        "proxy_cpu_us": (proxy1 - proxy0) / n * 1e6,
        "proxy_user_us": (user1 - user0) / n * 1e6,
        "proxy_sys_us": (sys1 - sys0) / n * 1e6,
        "syscalls_per_req": syscalls / n if syscalls is not None else None,
        "tool_cpu_us": res.tool_cpu_s / n * 1e6,
        # Shares of one core over the window: tell whether proxy, load tool or backend was the limit.
        "proxy_util": (proxy1 - proxy0) / wall,
        "tool_util": res.tool_cpu_s / wall,
        "backend_util": (backend1 - backend0) / wall,
        # Connections the backends accepted per request: for https-reencrypt each is a TLS handshake
        # the proxy made upstream (keep-alive pooling makes it ~0; nothing else talks to them then).
        # (-1: the stub_status request that read accepted1 is one of them.)
        "upstream_conns_per_req": (accepted1 - accepted0 - 1) / n if accepted0 is not None and accepted1 else None,
        "detail": res.detail,
    }


def backend_accepts() -> int | None:
    """nginx stub_status on the backend: connections accepted so far (plain and TLS ports together)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{BACKEND_PORTS[0]}/stub", timeout=5) as r:
            return int(r.read().decode().splitlines()[2].split()[0])
    except (OSError, ValueError, IndexError):
        return None


def measure_idle(svc: Service, cafile: Path) -> dict:
    before = svc.rss_bytes()
    held, failures, after = load.idle_connections(
        TLS_PORT, checks.client_context(cafile), IDLE_CONNS, svc.rss_bytes
    )
    if held == 0:
        raise load.LoadError(f"no idle connection could be opened ({failures} failures)")
    return {
        "conns": held,
        "errors": failures,
        "rss_before_kib": before / 1024,
        "rss_after_kib": after / 1024,
        "kib_per_conn": (after - before) / 1024 / held,
    }


def run_proxy(
    name: str, scenarios: list[Scenario], backend: Backend, tls_files, args, nofile
) -> tuple[list[dict], dict]:
    """Start one proxy, sanity-check it, measure every scenario, stop it. Failures become rows, not crashes."""
    cert, key, pem = tls_files
    svc = PROXIES[name](args.workdir, cert, key, pem, nofile)
    rows: list[dict] = []
    facts: dict = {}

    def fail(sc: Scenario, why: str) -> None:
        rows.append({"scenario": sc.name, "proxy": name, "ok": False, "error": why})
        log(f"  {name:8} {sc.name:14} FAILED: {why.splitlines()[0]}")

    try:
        svc.start()
    except StartError as e:
        for sc in scenarios:
            fail(sc, f"did not start: {e}")
        return rows, facts
    try:
        tls_missing = svc.missing.get(TLS_PORT)
        plain_bad, tls_bad, facts = checks.check_proxy(cert, tls=not tls_missing)
        if tls_missing:
            tls_bad = [f"{tls_missing} (TLS listener missing)"]
        for sc in scenarios:
            bad = tls_bad if sc.tls else plain_bad
            if bad:
                fail(
                    sc, "; ".join(bad) if tls_missing and sc.tls else "sanity check failed: " + "; ".join(bad)
                )
                continue
            if sc.name == "https-resume" and not facts.get("resumes_tls1.3"):
                # Without resumption wrk would silently measure full handshakes under the wrong name.
                fail(
                    sc, "proxy does not resume TLS 1.3 sessions (tickets), so https-resume is not measurable"
                )
                continue
            try:
                row = measure_idle(svc, cert) if sc.name == "idle" else measure(sc, svc, backend, args)
            except load.LoadError as e:
                fail(sc, str(e))
                continue
            rows.append({"scenario": sc.name, "proxy": name, "ok": True, **row})
            log(
                f"  {name:8} {sc.name:14} "
                + (
                    f"{row['kib_per_conn']:.1f} KiB/conn"
                    if sc.name == "idle"
                    else f"{row['rps']:9.0f} req/s  {row['proxy_cpu_us']:6.1f} µs/req"
                )
                + (
                    f"  {row['upstream_conns_per_req']:.5f} upstream TLS handshakes/req"
                    if sc.name == "https-reencrypt" and row.get("upstream_conns_per_req") is not None
                    else ""
                )
            )
    finally:
        svc.stop()
    return rows, facts


def summarize(rows: list[dict]) -> list[dict]:
    """Median of every numeric figure over the successful rounds, per (scenario, proxy); ratios to nginx."""
    keys: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        keys.setdefault((r["scenario"], r["proxy"]), []).append(r)
    summary = []
    for (scenario, proxy), group in keys.items():
        ok = [r for r in group if r["ok"]]
        s = {"scenario": scenario, "proxy": proxy, "rounds": len(group), "rounds_ok": len(ok)}
        if ok:
            for k, v in ok[0].items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "round":
                    s[k] = statistics.median(r[k] for r in ok)
        else:
            s["error"] = group[-1]["error"]
        summary.append(s)
    ref = {s["scenario"]: s for s in summary if s["proxy"] == "nginx"}
    for s in summary:
        metric = "kib_per_conn" if s["scenario"] == "idle" else "proxy_cpu_us"
        base = ref.get(s["scenario"], {}).get(metric)
        if metric in s and base:
            s["ratio"] = s[metric] / base
    order = list(SCENARIOS)
    proxies = ["backend", *PROXIES]
    return sorted(summary, key=lambda s: (order.index(s["scenario"]), proxies.index(s["proxy"])))


def targets(summary: list[dict], scenarios: list[Scenario]) -> list[dict]:
    by = {(s["scenario"], s["proxy"]): s for s in summary}
    out = []
    for sc in scenarios:
        if sc.target is None:
            continue
        fast, ref = by.get((sc.name, "fastlb")), by.get((sc.name, "nginx"))
        ratio = fast.get("ratio") if fast else None
        if ratio is None:
            why = "fastlb not measured" if not fast or not fast["rounds_ok"] else "nginx not measured"
            if ref is None or not ref["rounds_ok"]:
                why = "nginx not measured"
            out.append(
                {"scenario": sc.name, "max_ratio": sc.target, "ratio": None, "verdict": "n/a", "why": why}
            )
        else:
            out.append(
                {
                    "scenario": sc.name,
                    "max_ratio": sc.target,
                    "ratio": ratio,
                    "verdict": "PASS" if ratio <= sc.target else "MISS",
                }
            )
    return out


# ---------------------------------------------------------------- output


class SyscallCounter:
    """Counts the proxy's system calls over a window with `perf stat -e raw_syscalls:sys_enter` (the
    kernel's syscall tracepoint, per process).  Every proxy pays the same tracepoint cost; None where
    perf or the tracepoint is unavailable (then the column shows "-")."""

    def __init__(self, pids: list[int]):
        self.proc = None
        if not pids or shutil.which("perf") is None:
            return
        self.out = tempfile.NamedTemporaryFile("r", suffix=".perf")
        self.proc = subprocess.Popen(
            ["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter", "-o", self.out.name,
             "-p", ",".join(map(str, pids))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def stop(self) -> float | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        for line in self.out.read().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2].startswith("raw_syscalls:sys_enter"):
                return float(fields[0]) if fields[0].replace(".", "").isdigit() else None
        return None


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table_rows(summary: list[dict]) -> tuple[list[list[str]], list[list[str]], list[str]]:
    """(throughput rows, idle rows, footnotes) as strings, shared by the text and markdown renderers."""
    main, idle, notes = [], [], []
    failures: dict[str, int] = {}
    for s in summary:
        if not s["rounds_ok"]:
            msg = s["error"]
            n = failures.setdefault(msg, len(failures) + 1)
            cell = f"FAILED [{n}]"
            if s["scenario"] == "idle":
                idle.append([s["proxy"], cell, "", "", "", ""])
            else:
                main.append([s["scenario"], s["proxy"], cell] + [""] * 10)
            continue
        partial = f" ({s['rounds_ok']}/{s['rounds']} rounds)" if s["rounds_ok"] < s["rounds"] else ""
        if s["scenario"] == "idle":
            idle.append(
                [
                    s["proxy"] + partial,
                    fmt(s["conns"], ".0f"),
                    fmt(s["rss_before_kib"] / 1024, ".1f"),
                    fmt(s["rss_after_kib"] / 1024, ".1f"),
                    fmt(s["kib_per_conn"], ".1f"),
                    fmt(s.get("ratio"), ".2f"),
                ]
            )
            continue
        mark = " †" if s["tool_util"] >= TOOL_SATURATED else ""
        main.append(
            [
                s["scenario"],
                s["proxy"] + partial,
                fmt(s["rps"], ",.0f") + mark,
                fmt(s["mbps"], ".1f"),
                fmt(s["p50_ms"], ".2f"),
                fmt(s["p99_ms"], ".2f"),
                fmt(s["errors"], ".0f"),
                fmt(s["proxy_cpu_us"], ".1f"),
                fmt(s.get("proxy_user_us"), ".1f"),
                fmt(s.get("proxy_sys_us"), ".1f"),
                fmt(s.get("syscalls_per_req"), ".1f"),
                fmt(s.get("ratio"), ".2f"),
                fmt(s["tool_cpu_us"], ".1f"),
            ]
        )
    busy_backend = [
        f"{s['scenario']}/{s['proxy']}"
        for s in summary
        if s["rounds_ok"] and s["scenario"] != "direct" and s.get("backend_util", 0) >= TOOL_SATURATED
    ]
    if busy_backend:
        notes.append(
            f"backend nginx used ≥{TOOL_SATURATED:.0%} of a core (may be the limit) in: {', '.join(busy_backend)}"
        )
    if any("†" in r[2] for r in main):
        notes.append(
            f"† load tool used ≥{TOOL_SATURATED:.0%} of a core: req/s is bounded by the load tool; "
            "compare proxy CPU µs/req instead"
        )
    notes.append("ratio to nginx = proxy CPU µs/req ÷ nginx's (idle: KiB/conn ÷ nginx's); lower is better")
    scenarios = {s["scenario"] for s in summary}
    if "direct" in scenarios:
        notes.append("direct: wrk straight to one backend; its CPU column is that backend nginx itself")
    if scenarios & {"https-full", "https-resume"}:
        # The two tools clock different things; compare these latencies only between proxies.
        notes.append(
            "latency: https-full (ab) in whole ms incl. connect + handshake; wrk (all other rows) "
            "starts the clock at the request write, i.e. https-resume excludes connect + handshake"
        )
    for scenario in ("https-full", "https-resume"):
        # One connection per request there: 1e6 / proxy CPU µs is how many handshakes a core can do.
        rates = [f"{x['proxy']} {1e6 / x['proxy_cpu_us']:,.0f}" for x in summary
                 if x["scenario"] == scenario and x["rounds_ok"] and x.get("proxy_cpu_us")]
        if rates:
            notes.append(f"{scenario}: handshakes per second per core (1e6 ÷ proxy CPU µs per connection): "
                         + ", ".join(rates))
    for msg, n in failures.items():
        notes.append(f"[{n}] {msg}")
    return main, idle, notes


MAIN_HEAD = (
    ("scenario|proxy|req/s|MB/s|p50 ms|p99 ms|errors|proxy CPU µs/req|user µs|system µs|syscalls/req|"
     "ratio to nginx|load-tool µs/req").split(
        "|"
    )
)
IDLE_HEAD = ["proxy", "conns", "RSS before MiB", "RSS after MiB", "KiB/conn", "ratio to nginx"]


def render_text(rows: list[list[str]], head: list[str]) -> str:
    rows = [r[: len(head)] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]

    def line(cells: list[str]) -> str:  # first two columns are names (left), the rest numbers (right)
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(r).rstrip() for r in [head, ["-" * w for w in widths], *rows])


def render_markdown(rows: list[list[str]], head: list[str]) -> str:
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|",
    ]
    out += ["| " + " | ".join(r[: len(head)]) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()}, {model}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def report(data: dict, markdown: bool) -> str:
    meta = data["meta"]
    main, idle, notes = table_rows(data["summary"])
    render = render_markdown if markdown else render_text
    header = (
        f"fastlb vs nginx vs HAProxy — {meta['date']} — {meta['machine']}\n"
        f"one proxy worker; wrk/ab {load.THREADS} thread × {load.CONNECTIONS} connections; "
        f"{meta['duration']:g} s windows after {meta['warmup']:g} s warm-up; median of {meta['repeat']} round(s)"
    )
    parts = [header.replace("\n", "  \n") if markdown else header]
    if main:
        parts.append(render(main, MAIN_HEAD))
    if idle:
        parts.append(
            f"idle: {IDLE_CONNS} idle TLS keep-alive connections, RSS summed over the proxy's processes"
            + ("\n\n" if markdown else "\n")
            + render(idle, IDLE_HEAD)
        )
    # Markdown stays short: first line of each note (failure notes carry the proxy's log tail).
    parts.append("\n".join(f"- {n.splitlines()[0]}" if markdown else n for n in notes))
    if data["targets"]:
        t = ["targets for fastlb (ratio to nginx, lower is better):"]
        for x in data["targets"]:
            got = fmt(x["ratio"], ".2f") if x["ratio"] is not None else "-"
            why = f"  ({x['why']})" if x.get("why") else ""
            t.append(f"  {x['scenario']:14} ≤ {x['max_ratio']:.2f}  got {got:>5}  {x['verdict']}{why}")
        parts.append("\n".join(t) if not markdown else "```\n" + "\n".join(t) + "\n```")
    if not markdown:
        c = ["checks (load tools against a local TLS server counting handshakes; proxies via Python ssl):"]
        for label, counts in data["tool_handshakes"].items():
            c.append(
                f"  {label} {counts['tool']}: {counts['handshakes']} handshakes, {counts['resumed']} resumed "
                f"-> {counts['verdict']}"
            )
        for name, f in data["proxy_checks"].items():
            # What ab negotiated in https-full, so differing TLS choices between proxies are visible.
            ab_tls = {
                r["detail"]
                for r in data["rows"]
                if r["proxy"] == name and r["scenario"] == "https-full" and r["ok"]
            }
            c.append(
                f"  {name}: resumes TLS1.3={f.get('resumes_tls1.3')} TLS1.2={f.get('resumes_tls1.2')}"
                + (f"; https-full negotiated {', '.join(sorted(ab_tls))}" if ab_tls else "")
            )
        parts.append("\n".join(c))
        parts.append(
            "how each scenario is driven:\n"
            + "\n".join(f"  {s.name:14} {s.how}" for s in SCENARIOS.values() if s.name in meta["scenarios"])
        )
    return "\n\n".join(parts)


# ---------------------------------------------------------------- main


def tool_checks(cert: Path, key: Path) -> dict:
    """Prove on the wire that ab never resumes (https-full) and wrk with `Connection: close` reconnects
    with a resumed session (https-resume); only each connection's first handshake may be full."""
    conns = 4
    counts = checks.tool_handshakes(
        cert,
        key,
        {
            "https-full": ["ab", "-q", "-r", "-n", "200", "-c", str(conns), "{url}"],
            "https-resume": ["wrk", "-t1", f"-c{conns}", "-d1s", "-H", "Connection: close", "{url}"],
        },
    )
    full, resume = counts["https-full"], counts["https-resume"]
    full["tool"], resume["tool"] = "ab (no -k)", "wrk -H 'Connection: close'"
    full["verdict"] = (
        "OK: every handshake full" if full["handshakes"] and not full["resumed"] else "UNEXPECTED"
    )
    ok = resume["handshakes"] > 10 * conns and resume["resumed"] >= resume["handshakes"] - conns
    resume["verdict"] = f"OK: all but the first per connection ({conns}) resumed" if ok else "UNEXPECTED"
    return counts


def tool_versions() -> dict:
    def first_line(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "missing"
        return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"

    return {
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "ab": first_line(["ab", "-V"]),
        "openssl": first_line(["openssl", "version"]),
        "python": sys.version.split()[0],
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--proxies", default="fastlb,nginx,haproxy", help="comma list of: " + ",".join(PROXIES))
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of: " + ",".join(SCENARIOS))
    # Defaults are applied after parsing so that --quick only fills in what was not given explicitly.
    p.add_argument("--duration", type=float, help="measured seconds per scenario (default 10; --quick 3)")
    p.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each window (default 2; --quick 1)"
    )
    p.add_argument("--repeat", type=int, help="rounds, proxies alternate, medians reported (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke run: --duration 3 --warmup 1 --repeat 1")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print all raw rows, medians and targets as JSON")
    out.add_argument("--markdown", action="store_true", help="print a short table for the project README")
    p.add_argument("--keep", action="store_true", help="keep the temp dir with generated configs and logs")
    args = p.parse_args(argv)
    for name, normal, quick in (("duration", 10.0, 3.0), ("warmup", 2.0, 1.0), ("repeat", 1, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    if args.duration < 1 or args.repeat < 1 or args.warmup < 0:
        p.error("--duration must be >= 1, --repeat >= 1, --warmup >= 0")
    args.proxies = [x for x in args.proxies.split(",") if x]
    wanted = [x for x in args.scenarios.split(",") if x]
    for kind, names, known in (("proxy", args.proxies, PROXIES), ("scenario", wanted, SCENARIOS)):
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"unknown {kind} {unknown}; choose from {','.join(known)}")
    args.scenarios = [s for s in SCENARIOS.values() if s.name in wanted]
    return args


def preflight(args) -> None:
    needed = {"nginx", "openssl"} | {"haproxy"} & set(args.proxies)
    names = {s.name for s in args.scenarios}
    if names - {"https-full", "idle"}:
        needed.add("wrk")
    if "https-full" in names:
        needed.add("ab")
    missing = sorted(t for t in needed if shutil.which(t) is None)
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} -- run bench/setup.sh")
    busy = [p for p in (HTTP_PORT, TLS_PORT, ADMIN_PORT, *BACKEND_PORTS) if not port_free(p)]
    if busy:
        sys.exit(f"ports {busy} on {HOST} are in use (a system nginx/haproxy service?); free them first")


def main(argv=None) -> int:
    args = parse_args(argv)
    preflight(args)
    nofile = nofile_limit()
    args.workdir = Path(tempfile.mkdtemp(prefix="fastlb-bench-"))
    args.workdir.chmod(0o755)  # nginx workers run as an unprivileged user and read /big from here
    tls_files = make_cert(RESULTS / "tls")
    cert, key, _ = tls_files
    names = {s.name for s in args.scenarios}
    proxy_scenarios = [s for s in args.scenarios if s.name != "direct"]
    rows: list[dict] = []
    data = {
        "meta": {
            "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine(),
            "duration": args.duration,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "proxies": args.proxies,
            "scenarios": [s.name for s in args.scenarios],
            "threads": load.THREADS,
            "connections": load.CONNECTIONS,
            "idle_conns": IDLE_CONNS,
            "versions": tool_versions(),
            "workdir": str(args.workdir),
        },
        "tool_handshakes": {},
        "proxy_checks": {},
    }
    backend = Backend(args.workdir, *tls_files, nofile)
    try:
        backend.start()
        if names & {"https-full", "https-resume"}:
            # Proof that the load tools do what the scenario names claim (see checks.py).
            data["tool_handshakes"] = tool_checks(cert, key)
            for label, c in data["tool_handshakes"].items():
                log(f"check {label}: {c['handshakes']} handshakes, {c['resumed']} resumed -> {c['verdict']}")
        for rnd in range(args.repeat):
            log(f"round {rnd + 1}/{args.repeat}")
            if "direct" in names:
                try:
                    row = measure(SCENARIOS["direct"], backend, backend, args)
                    rows.append({"scenario": "direct", "proxy": "backend", "ok": True, "round": rnd, **row})
                    log(f"  {'-':8} {'direct':14} {row['rps']:9.0f} req/s  {row['proxy_cpu_us']:6.1f} µs/req")
                except load.LoadError as e:
                    rows.append(
                        {"scenario": "direct", "proxy": "backend", "ok": False, "round": rnd, "error": str(e)}
                    )
            # Rotate the order every round so slow drift (thermal, page cache) does not favour one proxy.
            order = args.proxies[rnd % len(args.proxies) :] + args.proxies[: rnd % len(args.proxies)]
            for name in order:
                if not proxy_scenarios:
                    break
                proxy_rows, facts = run_proxy(name, proxy_scenarios, backend, tls_files, args, nofile)
                rows += [{**r, "round": rnd} for r in proxy_rows]
                if facts:
                    data["proxy_checks"][name] = facts
    finally:
        backend.stop()
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    data["rows"] = rows
    data["summary"] = summarize(rows)
    data["targets"] = targets(data["summary"], args.scenarios) if "fastlb" in args.proxies else []
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "last.json").write_text(json.dumps(data, indent=2))
    log(f"raw results: {RESULTS / 'last.json'}")
    print(json.dumps(data, indent=2) if args.json else report(data, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
