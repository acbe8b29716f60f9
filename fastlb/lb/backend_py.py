"""A worker's runtime view of backends and their servers (built from config at load, never per request).

A server is usable when the control process's active check says so (one byte in shared memory), this
worker's passive check has not ejected it and its weight is above 0.  The worker's 250 ms tick reads
the byte (`Server.tick`: once per server per tick, not once per pick) and the server tells its
backend's balancer when `usable` or its effective weight changes, so a pick never rescans health.
Passive ejection (`max_fails` consecutive failures of the kinds in `fail_on`) lasts `fail_timeout`,
doubling on each repeat up to 32 times; slow start ramps a recovered server's weight over
`slow_start`.  Both are driven by the worker's tick, so the per-request path only counts.

This file is the one source of two builds, like balance_py.py: compiled through the `backend_c.py`
symlink with `backend_c.pxd` (typed fields the compiled balancers read directly), chosen by
`fastlb.lb.backend`.
"""

from collections import deque

# The module, not its names: the compiled balance_c imports backend_c (for the Server type) while it
# initialises, so whichever of the two is imported first finds the other one half-initialised.
from fastlb.lb import balance

UP, DOWN = 1, 0
_MAX_BACKOFF = 32
# No cap: max_connections = 0.  Any count of in-flight requests stays below it.
_NO_CAP = 1 << 62


class Server:
    """One backend server as this worker sees it: address, weight, health and its idle upstream pool."""

    __slots__ = (
        "backend", "gid", "name", "host", "port", "weight", "base_weight", "states", "ejected",
        "ejected_until", "ejections", "fails", "recovering_since", "was_up", "usable", "active", "cap",
        "idle", "m_upstream", "m_active", "m_errors", "link",
    )

    def __init__(self, backend, gid, spec, states):
        self.backend = backend
        self.gid = gid                # index of this server's state byte in shared memory
        self.name = str(spec.address)
        self.host = spec.address.host
        self.port = spec.address.port
        self.weight = spec.weight     # effective weight (slow start lowers it for a while)
        self.base_weight = spec.weight
        self.states = states
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0
        self.fails = 0
        self.recovering_since = None
        self.was_up = self.up
        self.usable = self.was_up and self.weight > 0  # what the balancer was last told
        self.active = 0               # requests in flight from this worker
        self.cap = backend.spec.max_connections or _NO_CAP
        self.idle = []                # idle keep-alive UpstreamConnections, used LIFO (warmest first)
        self.m_upstream = self.m_active = 0
        self.m_errors = {}
        # How a connection to it is opened beyond plain TCP (TLS, PROXY header), or None:
        # fastlb/net/upstream_tls.py ServerLink, set by the worker.
        self.link = None

    @property
    def up(self):
        """The active check's verdict in shared memory, and not passively ejected (read on the tick)."""
        return self.states[self.gid] == UP and not self.ejected

    @up.setter
    def up(self, value):
        # What the control process does; this worker's balancer learns it on the next tick.
        self.states[self.gid] = UP if value else DOWN

    # -- passive health (a response below 500 resets `fails`: see http/upstream.py) ----------------
    def failed(self, kind, now):
        """Count a failure; True when it ejects the server."""
        spec = self.backend.spec
        if not spec.max_fails or kind not in spec.fail_on:
            return False
        self.fails += 1
        if self.fails < spec.max_fails or self.ejected:
            return False
        self.ejected = True
        self.ejections = min(self.ejections + 1, 6)
        self.ejected_until = now + spec.fail_timeout * min(2 ** (self.ejections - 1), _MAX_BACKOFF)
        self.fails = 0
        self._tell(self.weight)
        return True

    def tick(self, now):
        """Per-tick upkeep: health byte, ejection expiry, slow start.  Returns a log line on a state change."""
        event = None
        if self.ejected and now >= self.ejected_until:
            self.ejected = False
            event = f"{self.backend.name}/{self.name} back from passive ejection"
        up = self.up
        if up and not self.was_up:
            self.recovering_since = now
        elif not up:
            self.recovering_since = None
        # A server that stays healthy through a whole fail_timeout is forgiven its ejections.
        if not self.ejected and self.ejections and now - self.ejected_until > self.backend.spec.fail_timeout:
            self.ejections = 0
        self.was_up = up
        weight = self.weight
        ramp = self.backend.spec.slow_start
        if self.recovering_since is not None:
            elapsed = now - self.recovering_since
            if ramp and elapsed < ramp:
                self.weight = max(1, int(self.base_weight * elapsed / ramp)) if self.base_weight else 0
            else:
                self.weight = self.base_weight
                self.recovering_since = None
        self._tell(weight)
        return event

    def _tell(self, old_weight):
        """Tell the balancer if usability or weight changed since it was last told."""
        usable = self.was_up and not self.ejected and self.weight > 0
        if usable != self.usable or self.weight != old_weight:
            self.usable = usable
            self.backend.balancer.server_changed(self)


class Backend:
    __slots__ = ("name", "spec", "servers", "balancer", "hash_key", "waiting", "m_retries", "response_timeout")

    def __init__(self, spec, first_gid, states):
        self.name = spec.name
        self.spec = spec
        self.servers = [Server(self, first_gid + i, s, states) for i, s in enumerate(spec.servers)]
        self.balancer = balance.make_balancer(spec.balance, self.servers)
        # (head, client_ip, target) -> bytes | None, only for `balance = "hash"`
        self.hash_key = balance.hash_key_getter(spec.hash_on) if spec.balance == "hash" else None
        self.waiting = deque()        # exchanges waiting for a server under max_connections
        self.m_retries = 0
        # Read on every request (UpstreamConnection.attach): a typed copy, not an attribute of `spec`.
        self.response_timeout = spec.response_timeout

    def saturated(self):
        """Some server is usable but every usable server is at its max_connections."""
        usable = self.balancer.usable
        for server in usable:
            if server.active < server.cap:
                return False
        return bool(usable)


def build_backends(cfg, states):
    """Backends in config order; server state bytes are numbered in that order by every process."""
    backends = {}
    gid = 0
    for name, spec in cfg.backends.items():
        backends[name] = Backend(spec, gid, states)
        gid += len(spec.servers)
    return backends
