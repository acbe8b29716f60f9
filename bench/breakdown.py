"""Where a proxy's CPU time per request goes, by whose code runs: fastlb beside nginx on one bench scenario.

    python bench/breakdown.py                                  # https-resume, fastlb and nginx, 5 s
    python bench/breakdown.py --scenario https-ka --proxies fastlb,nginx,haproxy --duration 10

compare.py says how much CPU each proxy spends per request; this says on what. Same topology, load tools
and scenarios as compare.py. For each proxy in turn: start it, warm up, then sample all its processes
with `perf record -e cpu-clock --call-graph dwarf` while the scenario's load runs, and split the window's
CPU time per request (measured as compare.py does) by the share of samples of each owner.

A sample belongs to the innermost frame of its call stack that is not the Python runtime or the C
library: those serve whoever called them. So the time of a method lookup, an object allocation or a
`malloc` goes to the code that asked for it: the kernel, OpenSSL (libssl and libcrypto), uvloop, the
stdlib `_ssl` module, one of fastlb's compiled modules, or the proxy's own binary. Without the
extensions (FASTLB_NO_EXTENSIONS=1) fastlb's code runs in the Python runtime and shows under its caller,
uvloop: profile the installed, compiled build.

Needs perf (Debian: linux-perf; bench/setup.sh installs it) and root or kernel.perf_event_paranoid <= 1.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import load
from compare import RESULTS, SCENARIOS, log, preflight
from proxies import PROXIES, Backend, Service, StartError, make_cert, nofile_limit

# Frames that work for their caller (see the module docstring); matched on the shared object's file name.
_SERVING = re.compile(
    r"^(libpython[\d.]*\.so|libc\.so|libm\.so|ld-linux|libpthread|\[unknown\]|\[vdso\]|inlined$)"
)
# One frame of `perf script -F ip,sym,dso`: address, symbol (may contain spaces), (shared object).
_FRAME = re.compile(r"^\s*([0-9a-f]+)\s+(.*)\s+\((.*)\)$")


def owner(dso: str) -> str | None:
    """Who a frame's code belongs to, from its shared object's path; None for the runtime and libc."""
    name = dso.rsplit("/", 1)[-1]
    if _SERVING.match(name):
        return None
    if name.startswith("[kernel"):
        return "kernel"
    if name.startswith(("libcrypto", "libssl")):
        return "OpenSSL"
    if "/uvloop/" in dso:
        return "uvloop"
    if name.startswith("_ssl."):
        return "stdlib _ssl"
    if "/fastlb/" in dso:
        module = dso.rsplit("/fastlb/", 1)[1].split(".", 1)[0]
        return "fastlb " + module.replace("/", ".")
    return name.split(".", 1)[0]  # the proxy's binary (nginx, haproxy) or another library


def stacks(script: str):
    """The call stacks (innermost frame first, each a shared-object path) of `perf script` output."""
    frames: list[tuple[str, str]] = []
    for line in script.splitlines() + [""]:
        m = _FRAME.match(line)
        if m:
            frames.append((m.group(1), m.group(3)))
        elif frames:
            # An inlined function has no object of its own: it is in the one of its address's real frame.
            real = {ip: dso for ip, dso in frames if dso != "inlined"}
            yield [real.get(ip, dso) for ip, dso in frames]
            frames = []


def attribute(script: str) -> collections.Counter:
    """Samples per owner."""
    counts: collections.Counter = collections.Counter()
    for stack in stacks(script):
        counts[next(filter(None, map(owner, stack)), "Python runtime, libc")] += 1
    return counts


def profile(svc: Service, scenario, args, workdir: Path) -> tuple[float, collections.Counter]:
    """(CPU µs per request over the window, samples per owner) for one started proxy."""
    scenario.run(args.warmup)
    data = workdir / f"{svc.name}.perf"
    pids = ",".join(str(p.pid) for p in svc.processes())
    record = [*"perf record -q -e cpu-clock --call-graph dwarf,16384 -F".split(), str(args.frequency)]
    perf = subprocess.Popen(
        [*record, "-o", data, "-p", pids], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(0.5)  # perf attaches to every thread before the window opens
    cpu0 = svc.cpu_seconds()
    result = scenario.run(args.duration)
    cpu1 = svc.cpu_seconds()
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate(timeout=120)
    if perf.returncode not in (0, -signal.SIGINT) or not data.exists():
        raise RuntimeError(f"perf record failed: {err.decode(errors='replace').strip()}")
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym,dso"],
        capture_output=True,
        text=True,
        errors="replace",
        check=True,
        timeout=1800,
    ).stdout
    data.unlink()
    return (cpu1 - cpu0) / max(result.requests, 1) * 1e6, attribute(script)


def table(results: dict[str, tuple[float, collections.Counter]]) -> str:
    """Rows: owners, largest first; columns: µs per request and share of samples, per proxy."""
    totals = {name: sum(counts.values()) for name, (_, counts) in results.items()}
    owners = collections.Counter()
    for name, (us, counts) in results.items():
        for who, n in counts.items():
            owners[who] += us * n / totals[name]
    rows = [["owner", *(f"{name} µs (share)" for name in results)]]
    for who, _ in owners.most_common():
        row = [who]
        for name, (us, counts) in results.items():
            n = counts.get(who, 0)
            row.append(f"{us * n / totals[name]:.1f} ({100 * n / totals[name]:.0f}%)" if n else "-")
        rows.append(row)
    rows.append(["total (CPU per request)", *(f"{us:.1f}" for us, _ in results.values())])
    rows.append(["samples", *(str(t) for t in totals.values())])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scenario", default="https-resume", choices=[s for s in SCENARIOS if s not in ("direct", "idle")]
    )
    p.add_argument("--proxies", default="fastlb,nginx", help="comma list of: " + ",".join(PROXIES))
    p.add_argument("--duration", type=float, default=5.0, help="profiled seconds per proxy (default 5)")
    p.add_argument("--warmup", type=float, default=2.0, help="unprofiled seconds before (default 2)")
    p.add_argument("--frequency", type=int, default=1000, help="samples per second and CPU (default 1000)")
    args = p.parse_args(argv)
    args.proxies = [x for x in args.proxies.split(",") if x]
    unknown = [x for x in args.proxies if x not in PROXIES]
    if unknown:
        p.error(f"unknown proxy {unknown}; choose from {','.join(PROXIES)}")
    if shutil.which("perf") is None:
        sys.exit("perf is missing -- run bench/setup.sh (Debian package linux-perf)")
    scenario = SCENARIOS[args.scenario]
    args.scenarios = [scenario]
    preflight(args)
    workdir = Path(tempfile.mkdtemp(prefix="fastlb-breakdown-"))
    workdir.chmod(0o755)  # nginx workers run as an unprivileged user and read /big from here
    tls_files = make_cert(RESULTS / "tls")
    nofile = nofile_limit()
    backend = Backend(workdir, *tls_files, nofile)
    results = {}
    try:
        backend.start()
        for name in args.proxies:
            svc = PROXIES[name](workdir, *tls_files, nofile)
            try:
                svc.start()
                log(f"profiling {name} on {scenario.name}")
                results[name] = profile(svc, scenario, args, workdir)
            except (StartError, load.LoadError, RuntimeError) as e:  # RuntimeError: perf failed
                log(f"{name}: not profiled: {e}")
            finally:
                svc.stop()
    finally:
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if not results:
        return 1
    print(f"{scenario.name} ({scenario.how}): proxy CPU µs per request by owner, {args.duration:g} s each")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
