"""Reloads and binary upgrades under load, bigger than the test suite's run: count what fails.

    python bench/reload.py                    # 10 SIGHUPs 1 s apart, then one SIGUSR2, per scenario
    python bench/reload.py --reloads 30 --workers 2

For each of plain/TLS x keep-alive/new-connection-per-request, wrk runs against fastlb (the bench
topology: nginx backends on 9101/9102) while the master is sent SIGHUP every second, then SIGUSR2
(binary upgrade; the new master's pid is followed through the pid file).  Every socket error and
every non-2xx response wrk sees is a failure; the target is zero.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import load
from proxies import HOST, HTTP_PORT, TLS_PORT, Backend, Fastlb, make_cert, nofile_limit

SCENARIOS = [
    ("http keep-alive", f"http://{HOST}:{HTTP_PORT}/", []),
    ("http new connection", f"http://{HOST}:{HTTP_PORT}/", ["Connection: close"]),
    ("https keep-alive", f"https://{HOST}:{TLS_PORT}/", []),
    ("https new connection", f"https://{HOST}:{TLS_PORT}/", ["Connection: close"]),
]


class ReloadingFastlb(Fastlb):
    def __init__(self, *args, workers: int, pid_file: Path):
        super().__init__(*args)
        self.workers = workers
        self.pid_file = pid_file

    def env(self):
        env = super().env()
        env.update(FASTLB_WORKERS=str(self.workers), FASTLB_SERVER_PID_FILE=str(self.pid_file))
        return env

    def master_pid(self) -> int:
        return int(self.pid_file.read_text().strip())


def signal_master(lb: ReloadingFastlb, reloads: int, done: threading.Event) -> None:
    time.sleep(1.0)
    for _ in range(reloads):
        os.kill(lb.master_pid(), signal.SIGHUP)
        time.sleep(1.0)
    old = lb.master_pid()
    os.kill(old, signal.SIGUSR2)
    deadline = time.monotonic() + 15
    while lb.master_pid() == old and time.monotonic() < deadline:
        time.sleep(0.1)
    done.set()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reloads", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cert, key, pem = make_cert(work)
        backend = Backend(work, cert, key, pem, nofile_limit())
        backend.start()
        try:
            print(f"{'scenario':<22} {'requests':>9} {'failed':>7}  detail")
            for name, url, headers in SCENARIOS:
                lb = ReloadingFastlb(work, cert, key, pem, nofile_limit(), workers=args.workers,
                                     pid_file=work / "fastlb.pid")
                lb.start()
                done = threading.Event()
                signaller = threading.Thread(target=signal_master, args=(lb, args.reloads, done))
                signaller.start()
                result = load.wrk(url, args.reloads + 5.0, headers)
                signaller.join()
                try:
                    os.kill(lb.master_pid(), signal.SIGTERM)  # the upgraded master left our tree
                except ProcessLookupError:
                    pass
                lb.stop()
                failures += result.errors
                upgraded = "upgrade done" if done.is_set() else "UPGRADE DID NOT COMPLETE"
                print(f"{name:<22} {result.requests:>9} {result.errors:>7}  {result.detail or '-'}; "
                      f"{args.reloads} reloads, {upgraded}")
                time.sleep(0.5)
        finally:
            backend.stop()
    print("PASS: nothing failed" if failures == 0 else f"MISS: {failures} failed requests")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
