"""A route's `rate_limit`: one token bucket per key, shared by every worker of the host.

The buckets live in an anonymous MAP_SHARED mapping the master creates before forking, one 64-bit word
per key, updated by `core.rate_take` with a compare-and-swap (the algorithm, GCRA, and the table's
layout are described there).  So N workers take from the same bucket and the host allows the
configured rate, not N times it, with no lock and no process in between.  Memory is max_keys x 8 bytes
whatever the number of clients; the least recently seen keys are evicted first.  The tables belong to
a generation: a reload starts with full buckets.
"""

import mmap
from time import monotonic

from fastlb import core

_rate_take = core.rate_take
_hash64 = core.hash64
_find_field = core.find_field


class RateLimiter:
    __slots__ = ("_map", "table", "interval_us", "burst_us", "epoch", "header", "cookie")

    def __init__(self, spec):
        size = core.RATE_WAYS
        while size < spec.max_keys:
            size *= 2
        self._map = mmap.mmap(-1, size * 8)  # anonymous, MAP_SHARED: inherited by every worker
        self.table = memoryview(self._map).cast("Q")
        self.interval_us = max(1, round(1_000_000 / spec.rate))
        self.burst_us = spec.burst * self.interval_us
        # The clock the TATs count from: CLOCK_MONOTONIC is one clock for every process of the host.
        self.epoch = monotonic()
        kind, _, name = spec.key.partition(":")
        self.header = name.lower().encode() if kind == "header" else None
        self.cookie = name.encode() if kind == "cookie" else None

    def key(self, client_ip: bytes, head: bytes) -> bytes:
        """What the bucket is kept per.  A request without the header or cookie is counted by its
        address, so leaving it out is no way around the limit."""
        if self.header is not None:
            value = _find_field(head, 0, len(head), self.header)
            if value is not None:
                return b"h" + value
        elif self.cookie is not None:
            value = _cookie(_find_field(head, 0, len(head), b"cookie"), self.cookie)
            if value is not None:
                return b"c" + value
        return b"i" + client_ip

    def take(self, key: bytes, now: float) -> int:
        """0 if allowed, else microseconds until it would be."""
        return _rate_take(self.table, _hash64(key), int((now - self.epoch) * 1e6), self.interval_us,
                          self.burst_us)


def _cookie(header, name: bytes):
    """The value of cookie `name` in a Cookie field value (RFC 6265 §4.2.1: pairs joined by "; ")."""
    if header is None:
        return None
    for pair in header.split(b";"):
        key, eq, value = pair.strip().partition(b"=")
        if eq and key == name:
            return value
    return None
