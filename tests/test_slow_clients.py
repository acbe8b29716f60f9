"""Slow-client attacks with slowhttptest against the real fastlb: a normal client keeps being served.

Each mode opens ~200 slow connections for ~10 s against one worker while a prober sends a normal
request every 100 ms: every probe must succeed. slowhttptest's own CSV (`-g -o`) must also show the
service available all along, and that fastlb shed the slow connections (header/body/send timeouts set
to 2 s, below the attack's 3 s pace), instead of holding them open for the attacker.

slowhttptest is a Debian package (`apt-get install slowhttptest`); .ci/run is expected to provide it.
"""

import csv
import http.client
import shutil
import subprocess
import threading
import time

import psutil
import pytest
from test_hardening import h11_backend, serving

CONNECTIONS = 200
SECONDS = 10
ENV = {
    "FASTLB_WORKERS": "1",
    "FASTLB_LIMITS_HEADER_TIMEOUT": "2s",
    "FASTLB_LIMITS_BODY_TIMEOUT": "2s",
    "FASTLB_LIMITS_SEND_TIMEOUT": "2s",
}
# The attack's pace (-i/-n 3 s) is slower than the timeouts above, so each slow connection is due to be
# closed by fastlb; slow read asks for a response far bigger than the socket buffers.
MODES = {
    "slow-headers": (["-H", "-i", "3"], "/"),
    "slow-body": (["-B", "-i", "3", "-s", "65536"], "/upload"),
    "slow-read": (["-X", "-n", "3", "-w", "16", "-y", "64", "-z", "32", "-k", "2"], "/big/4000000"),
}


class Prober(threading.Thread):
    """A well-behaved client: one GET every 100 ms, each on a new connection, 2 s to answer."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self.server_side: list[int] = []   # fastlb's established client sockets, sampled

    def run(self) -> None:
        began = time.monotonic()
        while not self.stopping.wait(0.1):
            started = time.monotonic()
            if started - began > 5:  # past the 2 s timeouts: how many sockets does fastlb still hold?
                self.server_side.append(sum(
                    1 for c in psutil.net_connections("tcp")
                    if c.laddr and c.laddr.port == self.port and c.status == psutil.CONN_ESTABLISHED))
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/probe")
                resp = conn.getresponse()
                resp.read()
                conn.close()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"status {resp.status}")
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc} after {time.monotonic() - started:.2f} s")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slow")
    with h11_backend(tmp, "b1") as backend, serving(tmp, {"FASTLB_BACKENDS": backend.address, **ENV}) as lb:
        yield lb


@pytest.mark.parametrize("mode", MODES)
def test_normal_client_is_served_during_a_slow_client_attack(target, tmp_path, mode):
    tool = shutil.which("slowhttptest")
    if tool is None:
        pytest.fail("slowhttptest is not installed (Debian package slowhttptest; .ci/run must install it)")
    flags, path = MODES[mode]
    prefix = tmp_path / mode
    prober = Prober(target.port)
    prober.start()
    started = time.monotonic()
    try:
        run = subprocess.run(
            [tool, *flags, "-c", str(CONNECTIONS), "-r", str(CONNECTIONS), "-l", str(SECONDS), "-p", "2",
             "-u", f"http://127.0.0.1:{target.port}{path}", "-g", "-o", str(prefix)],
            capture_output=True, text=True, timeout=SECONDS + 30,
        )
    finally:
        elapsed = time.monotonic() - started
        prober.stopping.set()
        prober.join(5)
    report = prefix.with_suffix(".csv")
    assert report.exists(), f"slowhttptest wrote no CSV (exit {run.returncode}):\n{run.stdout[-2000:]}"
    with report.open() as f:
        rows = [{k.strip(): int(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert len(rows) >= 3, f"slowhttptest ran {len(rows)} s:\n{run.stdout[-2000:]}"

    assert prober.failures == [], f"{len(prober.failures)} of {prober.ok + len(prober.failures)} probes failed"
    # slowhttptest stops early once fastlb has closed all its connections; 10 probes/s nominal.
    assert prober.ok >= elapsed * 5, f"only {prober.ok} probes in {elapsed:.1f} s: probes are being delayed"
    # slowhttptest probes too: "Service Available" is 0 in the seconds its probe got no answer.
    down = [row["Seconds"] for row in rows[1:] if row["Service Available"] == 0]
    assert down == [], f"slowhttptest saw the service down at seconds {down}: {rows}"
    peak = max(row["Connected"] for row in rows)
    closed = rows[-1]["Closed"]
    assert peak >= CONNECTIONS // 2, f"the attack never got going (peak {peak} connected): {rows}"
    # The CSV has one row a second; when fastlb closes the last slow connection slowhttptest stops at
    # once and says so, without a final row.
    # A slow reader is reset (RST, SO_LINGER 0) after send_timeout; slowhttptest, reading 32 bytes
    # every 3 s through its tiny window, may go on counting such a socket as connected, so fastlb's
    # own side of the sockets is the other witness.
    shed = ("No open connections left" in run.stdout or closed >= CONNECTIONS // 2
            or (prober.server_side and min(prober.server_side) < CONNECTIONS // 2))
    assert shed, (f"fastlb held the slow connections open (only {closed} of {CONNECTIONS} closed by the end; "
                  f"fastlb's side: {prober.server_side}): {rows}")
