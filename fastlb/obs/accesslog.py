"""The JSON access log: one orjson line per request, written by a thread so the event loop never waits.

The loop thread only appends the encoded line to a list; the worker's tick hands the batch to the
writer thread.  When the disk falls behind and `[log] access_buffer` bytes are waiting, new lines are dropped
and counted (fastlb_access_log_dropped_total) instead of slowing requests.  SIGUSR1 makes the writer
reopen the file (logrotate's copy-less rotation).
"""

import os
import sys
import threading

import orjson


class AccessLog:
    def __init__(self, target: str, max_pending: int):
        self.target = target
        self.max_pending = max_pending
        self.lines: list[bytes] = []
        # Each counter has one writing thread, so no lock is needed for them.
        self.queued_bytes = 0             # loop thread: bytes accepted
        self.dropped = 0                  # loop thread: lines refused because the writer is behind
        self.written_bytes = 0            # writer thread: bytes written (or lost to a write error)
        self.failed = 0                   # writer thread: lines lost to write errors
        self._batches: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._reopen = True
        self._file = None
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fastlb-access-log", daemon=True)
        self._thread.start()

    # -- loop thread --------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        if self.queued_bytes - self.written_bytes > self.max_pending:
            self.dropped += 1
            return
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        self.queued_bytes += len(line)
        self.lines.append(line)

    def flush(self) -> None:
        """Called on the worker's tick: hand what accumulated to the writer."""
        if self.lines:
            with self._lock:
                self._batches.append(self.lines)
            self.lines = []
            self._wake.set()

    def reopen(self) -> None:
        self._reopen = True
        self._wake.set()

    def close(self) -> None:
        self.flush()
        self._stopped = True
        self._wake.set()
        self._thread.join(2)

    # -- writer thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            if self._reopen:
                self._reopen = False
                self._open()
            with self._lock:
                batches, self._batches = self._batches, []
            for batch in batches:
                data = b"".join(batch)
                try:
                    self._file.write(data)
                    self._file.flush()
                except (OSError, ValueError):
                    self.failed += len(batch)
                self.written_bytes += len(data)
            if self._stopped and not self._batches:
                return

    def _open(self) -> None:
        if self.target == "stdout":
            self._file = sys.stdout.buffer
            return
        if self._file is not None:
            self._file.close()
        self._file = open(self.target, "ab")  # noqa: SIM115 - lives as long as the worker
        os.chmod(self.target, 0o640)


def record(ex, now: float, iso_time: str) -> dict:
    """The access log fields of a finished exchange."""
    client = ex.client
    server = ex.last_server
    route = ex.route
    return {
        "time": iso_time,
        "request_id": ex.request_id.decode("latin-1"),
        "client": client.client_ip.decode(),
        "listener": client.listener.name,
        "tls": client.tls_version,
        "method": ex.method.decode("latin-1"),
        "host": ex.host.decode("latin-1") if ex.host is not None else None,
        "path": ex.target.decode("latin-1"),
        "status": ex.status,
        "bytes_in": ex.bytes_in,
        "bytes_out": ex.bytes_out,
        "route": route.name if route is not None else None,
        "backend": route.backend.name if route is not None else None,
        "server": server.name if server is not None else None,
        "upstream_time": round(ex.upstream_time, 6) if server is not None else None,
        "total_time": round(now - ex.t0, 6),
        "retries": max(0, ex.attempts - 1),
    }
