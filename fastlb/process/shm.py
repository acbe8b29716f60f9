"""The shared-memory block the master creates before forking (an anonymous MAP_SHARED mapping).

Each child process (worker or control) owns one record that only it writes: a heartbeat timestamp, a
boot state and, when booting failed, the reason.  The master gives a child a record no live child
has, not one per worker slot: during a reload two generations run side by side, and the new one must
report READY or FAILED without the old one overwriting it.  After the records comes
one state byte per backend server (numbered in config order), written only by the control process's
health checks and read by workers at pick time.  The last byte says the host is draining (written by
the master on SIGTERM, read by the control process's /healthz).  Every area has a single writer, so
no lock is needed: aligned stores of 8 bytes or less are atomic on every platform Linux runs on.
"""

import mmap
import struct
import time

_RECORD = struct.Struct("=dB247s")  # 256 bytes: heartbeat, state, boot failure reason (UTF-8)
BOOTING, READY, FAILED = 0, 1, 2


MAX_SERVERS = 65536


class SharedBlock:
    def __init__(self, slots: int):
        start = _RECORD.size * slots
        self._map = mmap.mmap(-1, start + MAX_SERVERS + 16)
        self.states = memoryview(self._map)[start:start + MAX_SERVERS]
        self.states[:] = b"\x01" * MAX_SERVERS  # servers start up (as nginx and HAProxy assume)
        self._draining = start + MAX_SERVERS
        # How many reloads the control process asked for (ACME: a new certificate in storage); a
        # counter in memory, not a signal: a child that dropped privileges may not signal the master.
        self._reloads = start + MAX_SERVERS + 8

    def request_reload(self) -> None:
        struct.pack_into("=Q", self._map, self._reloads, self.reload_requests() + 1)

    def reload_requests(self) -> int:
        return struct.unpack_from("=Q", self._map, self._reloads)[0]

    @property
    def draining(self) -> bool:
        return self._map[self._draining] == 1

    @draining.setter
    def draining(self, value: bool) -> None:
        self._map[self._draining] = int(value)

    def _offset(self, slot: int) -> int:
        return slot * _RECORD.size

    def reset(self, slot: int) -> None:
        _RECORD.pack_into(self._map, self._offset(slot), time.monotonic(), BOOTING, b"")

    def beat(self, slot: int) -> None:
        struct.pack_into("=d", self._map, self._offset(slot), time.monotonic())

    def set_state(self, slot: int, state: int, reason: str = "") -> None:
        _RECORD.pack_into(self._map, self._offset(slot), time.monotonic(), state,
                          reason.encode("utf-8", "replace")[:247])

    def read(self, slot: int) -> tuple[float, int, str]:
        beat, state, reason = _RECORD.unpack_from(self._map, self._offset(slot))
        return beat, state, reason.rstrip(b"\0").decode("utf-8", "replace")
