"""A worker's runtime view of backends and their servers (built from config at load, never per request).

A server is usable when the control process's active check says so (one byte in shared memory, read
at pick time: no syscall) and this worker's passive check has not ejected it.  Passive ejection
(`max_fails` consecutive failures of the kinds in `fail_on`) lasts `fail_timeout`, doubling on each
repeat up to 32 times; slow start ramps a recovered server's weight over `slow_start`.  Both are
driven by the worker's tick, so the per-request path only counts.
"""

from collections import deque

from fastlb.lb.balance import hash_key_getter, make_balancer

UP, DOWN = 1, 0
_MAX_BACKOFF = 32


class Server:
    """One backend server as this worker sees it: address, weight, health and its idle upstream pool."""

    __slots__ = (
        "backend", "gid", "name", "host", "port", "weight", "base_weight", "states", "ejected",
        "ejected_until", "ejections", "fails", "recovering_since", "was_up", "active", "cap", "idle",
        "m_upstream", "m_active", "m_errors",
    )

    def __init__(self, backend: "Backend", gid: int, spec, states):
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
        self.was_up = True
        self.active = 0               # requests in flight from this worker
        self.cap = backend.spec.max_connections or 1 << 62
        self.idle: list = []          # idle keep-alive UpstreamConnections, used LIFO (warmest first)

    @property
    def up(self) -> bool:
        return self.states[self.gid] == UP and not self.ejected

    @up.setter
    def up(self, value: bool) -> None:
        self.states[self.gid] = UP if value else DOWN

    # -- passive health (a response below 500 resets `fails`: see http/upstream.py) ----------------
    def failed(self, kind: str, now: float) -> bool:
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
        return True

    def tick(self, now: float) -> str | None:
        """Per-tick upkeep: ejection expiry, slow start.  Returns a log line on a state change."""
        event = None
        if self.ejected and now >= self.ejected_until:
            self.ejected = False
            event = f"{self.backend.name}/{self.name} back from passive ejection"
        up = self.up
        if up and not self.was_up:
            self.recovering_since = now
        elif not up:
            # A server that stays healthy through a whole fail_timeout is forgiven its ejections.
            self.recovering_since = None
        if not self.ejected and self.ejections and now - self.ejected_until > self.backend.spec.fail_timeout:
            self.ejections = 0
        self.was_up = up
        ramp = self.backend.spec.slow_start
        if self.recovering_since is not None:
            elapsed = now - self.recovering_since
            if ramp and elapsed < ramp:
                self.weight = max(1, int(self.base_weight * elapsed / ramp)) if self.base_weight else 0
            else:
                self.weight = self.base_weight
                self.recovering_since = None
        return event


class Backend:
    __slots__ = ("name", "spec", "servers", "balancer", "hash_key", "waiting", "m_retries")

    def __init__(self, spec, first_gid: int, states):
        self.name = spec.name
        self.spec = spec
        self.servers = [Server(self, first_gid + i, s, states) for i, s in enumerate(spec.servers)]
        self.balancer = make_balancer(spec.balance, self.servers)
        # (headers, client_ip, target) -> bytes | None, only for `balance = "hash"`
        self.hash_key = hash_key_getter(spec.hash_on) if spec.balance == "hash" else None
        self.waiting: deque = deque()  # exchanges waiting for a server under max_connections

    def saturated(self) -> bool:
        """Some server is up but every up server is at its max_connections."""
        ups = [s for s in self.servers if s.weight and s.up]
        return bool(ups) and all(s.active >= s.cap for s in ups)


def build_backends(cfg, states) -> dict[str, Backend]:
    """Backends in config order; server state bytes are numbered in that order by every process."""
    backends = {}
    gid = 0
    for name, spec in cfg.backends.items():
        backends[name] = Backend(spec, gid, states)
        gid += len(spec.servers)
    return backends
