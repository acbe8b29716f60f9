"""Balancing algorithms, one class each behind one small interface (as HAProxy's src/lb_*.c):

    pick(exclude=(), key=None) -> Server | None

`exclude` holds the servers this request already tried, so a retry falls through to the next
candidate instead of the same one (Pingora's selection iterators, HAProxy's redispatch).  `key` is the
request's hash key (only the `hash` algorithm uses it).  Servers that are down or have weight 0 are
never picked, nor are servers at their `max_connections` cap.  Everything is per worker: no shared state, so no locks.
"""

import random

from fastlb import core


def _usable(server, exclude) -> bool:
    return server.weight > 0 and server.active < server.cap and server.up and server not in exclude


class SmoothRoundRobin:
    """nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, never a burst of a's."""

    __slots__ = ("servers", "current")

    def __init__(self, servers):
        self.servers = servers
        self.current = [0] * len(servers)

    def pick(self, exclude=(), key=None, among=None):
        servers = self.servers
        current = self.current
        best = -1
        total = 0
        for i, server in enumerate(servers):
            # _usable inlined: this loop runs for every request
            weight = server.weight
            if (not weight or server.active >= server.cap or not server.up or server in exclude
                    or (among is not None and server not in among)):
                continue
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return servers[best]


class LeastConn:
    """Fewest in-flight requests per unit of weight (this worker's view); ties by weighted round robin."""

    __slots__ = ("servers", "rr")

    def __init__(self, servers):
        self.servers = servers
        self.rr = SmoothRoundRobin(servers)

    def pick(self, exclude=(), key=None):
        best = None
        ties = []
        for server in self.servers:
            if not _usable(server, exclude):
                continue
            load = server.active / server.weight
            if best is None or load < best:
                best = load
                ties = [server]
            elif load == best:
                ties.append(server)
        if len(ties) <= 1:
            return ties[0] if ties else None
        return self.rr.pick(exclude, among=ties)


class PowerOfTwo:
    """Power of two random choices (Mitzenmacher): two weighted-random candidates, the less loaded wins."""

    __slots__ = ("servers", "random")

    def __init__(self, servers):
        self.servers = servers
        self.random = WeightedRandom(servers)

    def pick(self, exclude=(), key=None):
        a = self.random.pick(exclude)
        if a is None:
            return None
        b = self.random.pick(exclude + (a,))
        if b is None:
            return a
        return a if a.active / a.weight <= b.active / b.weight else b


class WeightedRandom:
    __slots__ = ("servers", "_random")

    def __init__(self, servers):
        self.servers = servers
        self._random = random.random

    def pick(self, exclude=(), key=None):
        usable = [s for s in self.servers if _usable(s, exclude)]
        if not usable:
            return None
        point = self._random() * sum(s.weight for s in usable)
        for server in usable:
            point -= server.weight
            if point < 0:
                return server
        return usable[-1]


class MaglevHash:
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016): O(1) lookups in a prime-sized table.

    The table depends only on the server names, weights and which are up, so every worker and every
    fastlb instance with the same server list maps a key to the same server.  A table per set of up
    servers is built on first need (in _core, ~ms) and cached, so a server going down moves only the
    keys it owned and coming back restores the old mapping exactly.  A missing key falls back to
    round robin; a retry walks the table from the key's slot to the next different server.
    """

    __slots__ = ("servers", "size", "names", "tables", "rr")

    def __init__(self, servers, size: int = 65537):
        self.servers = servers
        self.size = size
        self.names = [s.name.encode() for s in servers]
        self.tables: dict[tuple, list[int]] = {}
        self.rr = SmoothRoundRobin(servers)

    def table(self) -> list[int]:
        up = tuple(s.up for s in self.servers)
        table = self.tables.get(up)
        if table is None:
            weights = [s.weight if s.up else 0 for s in self.servers]
            table = self.tables[up] = core.maglev_table(self.names, weights, self.size)
        return table

    def pick(self, exclude=(), key=None):
        if key is None:
            return self.rr.pick(exclude)
        servers = self.servers
        if not any(_usable(s, exclude) for s in servers):
            return None
        table = self.table()
        slot = core.hash64(key) % len(table)
        while True:  # ends: every usable server has entries in the table
            server = servers[table[slot]]
            if server not in exclude:
                return server
            slot = (slot + 1) % len(table)


ALGORITHMS = {
    "roundrobin": SmoothRoundRobin,
    "leastconn": LeastConn,
    "p2c": PowerOfTwo,
    "random": WeightedRandom,
    "hash": MaglevHash,
}


def make_balancer(name: str, servers):
    return ALGORITHMS[name](servers)


def hash_key_getter(hash_on: str):
    """A function (headers, client_ip, target) -> bytes | None for `hash_on`, made at config load."""
    if hash_on == "client_ip":
        return lambda headers, client_ip, target: client_ip or None
    if hash_on == "uri":
        return lambda headers, client_ip, target: target
    kind, _, name = hash_on.partition(":")
    wanted = name.lower().encode()
    if kind == "header":
        def header(headers, client_ip, target):
            for field, value in headers:
                if field.lower() == wanted:
                    return value
            return None
        return header
    cookie_name = name.encode() + b"="

    def cookie(headers, client_ip, target):
        for field, value in headers:
            if field.lower() == b"cookie":
                for pair in value.split(b";"):
                    pair = pair.strip()
                    if pair.startswith(cookie_name):
                        return pair[len(cookie_name):]
        return None
    return cookie
