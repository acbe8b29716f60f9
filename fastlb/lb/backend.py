"""A worker's runtime view of backends and their servers (built from config at load, never per request)."""

from fastlb.lb.balance import hash_key_getter, make_balancer


class Server:
    """One backend server as this worker sees it: address, weight, health and its idle upstream pool."""

    __slots__ = ("backend", "index", "name", "host", "port", "weight", "up", "active", "idle")

    def __init__(self, backend: "Backend", index: int, spec):
        self.backend = backend
        self.index = index
        self.name = str(spec.address)
        self.host = spec.address.host
        self.port = spec.address.port
        self.weight = spec.weight
        self.up = True
        self.active = 0  # requests in flight from this worker
        self.idle: list = []  # idle keep-alive UpstreamConnections, used LIFO (warmest first)


class Backend:
    __slots__ = ("name", "spec", "servers", "balancer", "hash_key")

    def __init__(self, spec):
        self.name = spec.name
        self.spec = spec
        self.servers = [Server(self, i, s) for i, s in enumerate(spec.servers)]
        self.balancer = make_balancer(spec.balance, self.servers)
        # (headers, client_ip, target) -> bytes | None, only for `balance = "hash"`
        self.hash_key = hash_key_getter(spec.hash_on) if spec.balance == "hash" else None
