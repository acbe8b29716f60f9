"""Balancing algorithms, one class each behind one small interface (as HAProxy's src/lb_*.c):

    pick(exclude=(), key=None) -> Server | None
    server_changed(server)     # told: server's usability or effective weight changed

`exclude` holds the servers this request already tried, so a retry falls through to the next
candidate instead of the same one (Pingora's selection iterators, HAProxy's redispatch).  `key` is the
request's hash key (only the `hash` algorithm uses it).

A balancer does not look at health: like HAProxy's lb_fwrr.c (set_server_status_up/down,
update_server_weight), it is told.  `Server.tick` (the worker's 250 ms tick reads the shared-memory
state byte there, once per server) and `Server.failed` (passive ejection) call `server_changed` when
the server's `usable` flag (up, not ejected, weight > 0) or its slow-start weight changes; the
balancer then recomputes `usable`, its own list of those servers, and whatever it derives from it (the
Maglev table).  A pick walks only that list and reads per server only what changes per request:
`active` against `cap` (max_connections).  Everything is per worker: no shared state, no locks.

This file is the one source of two builds: run as is (`FASTLB_NO_EXTENSIONS=1`), and compiled by
Cython through the `balance_c.py` symlink with `balance_c.pxd` typing the classes (`fastlb.lb.balance`
chooses).  So it sticks to what both run the same way.
"""

from array import array
from random import random

from fastlb.core import MAGLEV_SIZE, hash64, maglev_lookup, maglev_table

# Maglev tables kept per set of usable servers.  Rebuilding one is deterministic (same names and
# weights, same table), so the cache only saves the build (1 ms compiled, 19 ms pure Python for 10
# servers, bench/micro_core.py); bounded because a flapping pool could otherwise visit 2**n sets,
# at 512 KiB a table.
_MAX_TABLES = 16


class Balancer:
    """The interface, and the list of usable servers every algorithm picks from."""

    __slots__ = ("servers", "usable")

    def __init__(self, servers):
        self.servers = list(servers)
        self.usable = []
        self.server_changed(None)

    def server_changed(self, server):
        """`server` (None: at construction) changed usability or weight: recompute what picks use."""
        self.usable = [s for s in self.servers if s.usable]

    def pick(self, exclude=(), key=None):
        raise NotImplementedError


class SmoothRoundRobin(Balancer):
    """nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, never a burst of a's."""

    __slots__ = ("current",)

    def __init__(self, servers):
        self.current = array("q")
        Balancer.__init__(self, servers)

    def server_changed(self, server):
        # Servers that stay usable keep their position in the cycle (a slow-start server changes
        # weight on every tick: restarting everyone's cycle each time would skew the sequence).
        kept = dict(zip(self.usable, self.current, strict=True))
        Balancer.server_changed(self, server)
        self.current = array("q", [kept.get(s, 0) for s in self.usable])

    def pick(self, exclude=(), key=None):
        return self.next_of(exclude, 0, 0)

    def next_of(self, exclude, tie_active, tie_weight):
        """The next server in the cycle; with tie_weight > 0 only among servers whose load
        active/weight equals tie_active/tie_weight (LeastConn's ties)."""
        usable = self.usable
        current = self.current
        best = -1
        total = 0
        for i in range(len(usable)):
            server = usable[i]
            if server.active >= server.cap or (exclude and server in exclude):
                continue
            weight = server.weight
            if tie_weight and server.active * tie_weight != tie_active * weight:
                continue
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return usable[best]


class LeastConn(SmoothRoundRobin):
    """Fewest in-flight requests per unit of weight (this worker's view); ties by weighted round robin."""

    __slots__ = ()

    def pick(self, exclude=(), key=None):
        best_active = 0
        best_weight = 0
        for server in self.usable:
            if server.active >= server.cap or (exclude and server in exclude):
                continue
            # active/weight < best_active/best_weight, without a division (weights are > 0)
            if not best_weight or server.active * best_weight < best_active * server.weight:
                best_active = server.active
                best_weight = server.weight
        if not best_weight:
            return None
        return self.next_of(exclude, best_active, best_weight)


class WeightedRandom(Balancer):
    __slots__ = ("total",)

    def __init__(self, servers):
        self.total = 0
        Balancer.__init__(self, servers)

    def server_changed(self, server):
        Balancer.server_changed(self, server)
        total = 0
        for s in self.usable:
            total += s.weight
        self.total = total

    def pick(self, exclude=(), key=None):
        return self.draw(exclude, None)

    def draw(self, exclude, other):
        """A weighted-random usable server, not in `exclude`, not `other`, under its cap."""
        usable = self.usable
        if not usable:
            return None
        # One draw over every usable server; only if it lands on one that is excluded or at its cap,
        # a second over the remaining ones.  Still exactly weight / remaining weight each:
        # w/T + (F/T) * w/(T-F) = w/(T-F), F the weight filtered out.
        point = random() * self.total
        for server in usable:
            point -= server.weight
            if point < 0:
                break
        if server.active < server.cap and server is not other and not (exclude and server in exclude):
            return server
        total = 0
        for server in usable:
            if server.active < server.cap and server is not other and not (exclude and server in exclude):
                total += server.weight
        if not total:
            return None
        point = random() * total
        for server in usable:
            if server.active < server.cap and server is not other and not (exclude and server in exclude):
                chosen = server
                point -= server.weight
                if point < 0:
                    break
        return chosen


class PowerOfTwo(WeightedRandom):
    """Power of two random choices (Mitzenmacher): two weighted-random candidates, the less loaded wins."""

    __slots__ = ()

    def pick(self, exclude=(), key=None):
        a = self.draw(exclude, None)
        if a is None:
            return None
        b = self.draw(exclude, a)
        if b is None:
            return a
        # a.active/a.weight <= b.active/b.weight, without a division
        return a if a.active * b.weight <= b.active * a.weight else b


class MaglevHash(SmoothRoundRobin):
    """Maglev consistent hashing (Eisenbud et al., NSDI 2016): O(1) lookups in a prime-sized table.

    The table depends only on the server names, configured weights and which servers are usable, so
    every worker and every fastlb instance with the same servers maps a key to the same server (in
    whatever order each config lists them: the servers are taken in name order, because the order of
    the build decides which server gets a contested slot);
    it is built (in _core) when that set changes, not per pick.  A server going down moves the keys
    it owned and very few others (Maglev's disruption is minimal, not nil: about 0.05% of the table
    for four servers), and coming back restores the old mapping exactly.  Slow start does not reshape the
    table (keys would move back and forth on every tick of the ramp): only the round robin used for
    requests without a key follows it.  A retry, or a server at its cap, walks the table from the
    key's slot to the next server that can take the request.
    """

    __slots__ = ("size", "names", "tables", "table")

    def __init__(self, servers, size=MAGLEV_SIZE):
        servers = sorted(servers, key=_server_name)
        self.size = size
        self.names = [s.name.encode() for s in servers]
        self.tables = {}
        self.table = []
        SmoothRoundRobin.__init__(self, servers)

    def server_changed(self, server):
        SmoothRoundRobin.server_changed(self, server)
        up = tuple([s.usable for s in self.servers])
        table = self.tables.get(up)
        if table is None:
            if len(self.tables) >= _MAX_TABLES:
                del self.tables[next(iter(self.tables))]
            weights = [s.base_weight if s.usable else 0 for s in self.servers]
            table = self.tables[up] = maglev_table(self.names, weights, self.size)
        self.table = table

    def pick(self, exclude=(), key=None):
        if key is None:
            return self.next_of(exclude, 0, 0)
        table = self.table
        if not table:
            return None
        key_hash = hash64(key)
        servers = self.servers
        server = servers[maglev_lookup(table, key_hash)]
        if server.active < server.cap and not (exclude and server in exclude):
            return server
        for server in self.usable:
            if server.active < server.cap and not (exclude and server in exclude):
                break
        else:
            return None
        # Ends: the server just found owns slots of the table (every usable server does).
        size = len(table)
        slot = key_hash % size
        while True:
            slot += 1
            if slot == size:
                slot = 0
            server = servers[table[slot]]
            if server.active < server.cap and not (exclude and server in exclude):
                return server


def _server_name(server):
    return server.name


ALGORITHMS = {
    "roundrobin": SmoothRoundRobin,
    "leastconn": LeastConn,
    "p2c": PowerOfTwo,
    "random": WeightedRandom,
    "hash": MaglevHash,
}


def make_balancer(name, servers):
    return ALGORITHMS[name](servers)


def hash_key_getter(hash_on):
    """A function (head, client_ip, target) -> bytes | None for `hash_on`, made at config load.

    `head` is the upstream request head as it goes out (request line, fields in the client's case,
    CRLF-terminated, ending in an empty line).  A field is found by its name, case-insensitively
    (RFC 9110 §5.1), first occurrence, value without surrounding whitespace (RFC 9110 §5.5).
    """
    if hash_on == "client_ip":
        return lambda head, client_ip, target: client_ip or None
    if hash_on == "uri":
        return lambda head, client_ip, target: target
    kind, _, name = hash_on.partition(":")
    if kind == "header":
        # CRLF before: a field line, never the request line; no space before ':' (RFC 9112 §5.1).
        field = b"\r\n" + name.lower().encode() + b":"

        def header(head, client_ip, target):
            start = head.lower().find(field)
            if start < 0:
                return None
            start += len(field)
            return head[start:head.index(b"\r\n", start)].strip(b" \t")
        return header
    cookie_name = name.encode() + b"="

    def cookie(head, client_ip, target):
        lowered = head.lower()
        start = lowered.find(b"\r\ncookie:")
        while start >= 0:
            start += 9
            end = head.index(b"\r\n", start)
            for pair in head[start:end].split(b";"):
                pair = pair.strip()
                if pair.startswith(cookie_name):
                    return pair[len(cookie_name):]
            start = lowered.find(b"\r\ncookie:", end)
        return None
    return cookie
