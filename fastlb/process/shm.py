"""The shared-memory block the master creates before forking (an anonymous MAP_SHARED mapping).

Each child process (worker or control) owns one record that only it writes: a heartbeat timestamp, a
boot state and, when booting failed, the reason.  The master gives a child a record no live child
has, not one per worker slot: during a reload two generations run side by side, and the new one must
report READY or FAILED without the old one overwriting it.  After the records comes
one state byte per backend server (numbered in config order), written only by the control process's
health checks and read by workers at pick time.  Every area has a single writer, so no lock is
needed: aligned stores of 8 bytes or less are atomic on every platform Linux runs on.
"""

import mmap
import struct
import time

_RECORD = struct.Struct("=dB247s")  # 256 bytes: heartbeat, state, boot failure reason (UTF-8)
BOOTING, READY, FAILED = 0, 1, 2


MAX_SERVERS = 65536


class SharedBlock:
    def __init__(self, slots: int):
        self._map = mmap.mmap(-1, _RECORD.size * slots + MAX_SERVERS)
        self.states = memoryview(self._map)[_RECORD.size * slots:]
        self.states[:] = b"\x01" * MAX_SERVERS  # servers start up (as nginx and HAProxy assume)

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
