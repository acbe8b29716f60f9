"""Balancing algorithms behind one small interface: `pick(exclude) -> Server | None`.

`exclude` holds the servers a request already tried, so a retry falls through to the next candidate
instead of the same one (as Pingora's selection iterators and HAProxy's redispatch do).
"""


class SmoothRoundRobin:
    """nginx's smooth weighted round robin: weights 5,1,1 give a a b a c a a, never a burst of a's."""

    __slots__ = ("servers", "current")

    def __init__(self, servers):
        self.servers = servers
        self.current = [0] * len(servers)

    def pick(self, exclude=()):
        servers = self.servers
        current = self.current
        best = -1
        total = 0
        for i, server in enumerate(servers):
            weight = server.weight
            if not weight or not server.up or server in exclude:
                continue
            current[i] += weight
            total += weight
            if best < 0 or current[i] > current[best]:
                best = i
        if best < 0:
            return None
        current[best] -= total
        return servers[best]


_ALGORITHMS = {"roundrobin": SmoothRoundRobin}


def make_balancer(name: str, servers):
    return _ALGORITHMS[name](servers)
