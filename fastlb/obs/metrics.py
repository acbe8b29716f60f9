"""Metrics in shared memory: each process adds to its own float64 array, the control process sums.

Theory of operation: a `Layout` maps every (family, labels) series to an index, the same in every
area.  The master builds it from the config before forking and only ever appends to it on reload, so
an index never changes meaning and a counter never goes backwards while the master lives.  Each live
worker owns one area (a respawned or reloaded worker takes over a free one and keeps adding to it);
recording is `area[index] += 1` with indices resolved at config load, never a dict lookup or string
formatting per request.  Gauges are written by their owner on its tick and zeroed by the master when
the owner exits.  The control process sums all areas on scrape and prints Prometheus text 0.0.4.
"""

import mmap

from fastlb.net.upstream_tls import TLS_FAILURES as UPSTREAM_TLS_FAILURES

# Latency buckets in seconds (upper bounds; +Inf is implicit).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# buckets, +Inf, sum; the count is the +Inf bucket's cumulative value, derived on scrape.  The data
# path records an observation (http/protocol_py.py `_observe`) as one bucket += 1 and the sum += value.
_HIST_SIZE = len(BUCKETS) + 2
HIST_SUM = _HIST_SIZE - 1
CODE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# "tls": certificate verification or the handshake failed (net/upstream_tls.py).
UPSTREAM_ERRORS = ("connect", "timeout", "reset", "invalid", "tls")
BAD_STATUSES = (400, 405, 408, 413, 414, 417, 431, 500, 501, 505)
# Why a TLS handshake failed (net/tls.py handshake_failure_reason, http/front_py.py); "other" is what
# OpenSSL refused for a reason none of these names (a malformed ClientHello, say).
TLS_FAILURES = ("unsupported_version", "no_shared_cipher", "unknown_sni", "bad_client_certificate", "not_tls",
                "timeout", "reset", "other")
# Why a connection on a proxy_protocol listener was cut before HTTP or TLS started.
PROXY_FAILURES = ("untrusted", "bad_header", "timeout")

ACME_RESULTS = ("success", "failure", "rate_limited")

MAX_SERIES = 16384
AREAS = 64                 # worker processes alive at once (all generations), + the master's area
AREA_HEADER = 4            # pid, started (unix time), live flag, worker slot
PID, STARTED, LIVE, SLOT = range(AREA_HEADER)
_AREA_BYTES = (AREA_HEADER + MAX_SERIES) * 8

HELP = {
    "fastlb_requests_total": ("counter", "Requests answered, by route, backend and status class."),
    "fastlb_request_duration_seconds": ("histogram", "Client head received to response completed."),
    "fastlb_upstream_response_seconds": ("histogram", "Request sent to upstream response head."),
    "fastlb_backend_server_up": ("gauge", "1 when the active health check says the server is up."),
    "fastlb_backend_server_active_requests": ("gauge", "Requests in flight to the server."),
    "fastlb_upstream_errors_total": ("counter", "Failed upstream attempts, by kind."),
    "fastlb_retries_total": ("counter", "Requests sent to another server after a failed attempt."),
    "fastlb_upstream_tls_handshakes_total": ("counter", "TLS handshakes to backend servers, full or resumed."),
    "fastlb_upstream_tls_errors_total": ("counter", "Failed TLS handshakes to backend servers, by reason."),
    "fastlb_hook_errors_total": ("counter", "Python hooks that raised (each answered 500), by hook."),
    "fastlb_rate_limited_total": ("counter", "Requests refused by a route's rate_limit (429), by route."),
    "fastlb_connections_open": ("gauge", "Client connections open."),
    "fastlb_connections_total": ("counter", "Client connections accepted."),
    "fastlb_tls_handshakes_total": ("counter", "Completed TLS handshakes."),
    "fastlb_tls_handshake_errors_total": ("counter", "TLS handshakes that failed or timed out, by reason."),
    "fastlb_tls_client_certificates_total": ("counter", "Client certificates verified or refused (mTLS)."),
    "fastlb_proxy_protocol_errors_total": ("counter", "Connections cut for a missing, bad or untrusted PROXY header."),
    "fastlb_passthrough_connections_total": ("counter", "Connections spliced to a backend by SNI, undecrypted."),
    "fastlb_passthrough_bytes_total": ("counter", "Bytes relayed by SNI passthrough (in: from clients)."),
    "fastlb_tls_certificate_expiry_seconds": ("gauge", "Unix time of the certificate's notAfter."),
    "fastlb_acme_orders_total": ("counter", "ACME certificate orders, by result (success, failure, rate_limited)."),
    "fastlb_acme_next_renewal_seconds": ("gauge", "Unix time of the next ACME order for the certificate (renewal or retry)."),
    "fastlb_bad_requests_total": ("counter", "Requests refused as malformed or over a limit."),
    "fastlb_worker_restarts_total": ("counter", "Workers respawned after dying."),
    "fastlb_config_reloads_total": ("counter", "Reloads, by result."),
    "fastlb_access_log_dropped_total": ("counter", "Access log lines dropped because the disk was slow."),
    "fastlb_build_info": ("gauge", "Version and whether the compiled extension is in use."),
    "fastlb_process_resident_memory_bytes": ("gauge", "RSS per process."),
    "fastlb_process_cpu_seconds_total": ("counter", "User + system CPU per process."),
    "fastlb_process_open_fds": ("gauge", "Open file descriptors per process."),
}


class Layout:
    """Series -> index; append-only.  A series is (family, ((label, value), ...), kind)."""

    def __init__(self):
        self.index: dict[tuple, int] = {}
        self.series: list[tuple] = []   # (family, labels, kind, index)
        self.size = 0
        self.gauges: list[int] = []

    def _add(self, family: str, labels: tuple, kind: str, width: int) -> int:
        key = (family, tuple(sorted(labels)))
        found = self.index.get(key)
        if found is not None:
            return found
        if self.size + width > MAX_SERIES:
            raise OverflowError("too many metric series")
        index = self.index[key] = self.size
        self.size += width
        self.series.append((family, labels, kind, index))
        if kind == "gauge":
            self.gauges.append(index)
        return index

    def counter(self, family: str, **labels) -> int:
        return self._add(family, tuple(labels.items()), "counter", 1)

    def gauge(self, family: str, **labels) -> int:
        return self._add(family, tuple(labels.items()), "gauge", 1)

    def histogram(self, family: str, **labels) -> int:
        return self._add(family, tuple(labels.items()), "histogram", _HIST_SIZE)

    def find(self, family: str, **labels) -> int:
        """The index of a series the master declared.  Children only look series up: one added
        after fork would exist in that process's copy of the layout alone, unseen by the scrape."""
        return self.index[(family, tuple(sorted(labels.items())))]

    def extend(self, cfg, tls_suites) -> None:
        """Every series cfg can produce (idempotent: existing series keep their index)."""
        for route in route_names(cfg):
            backend = route_backend(cfg, route)
            for cls in CODE_CLASSES:
                self.counter("fastlb_requests_total", route=route, backend=backend, code_class=cls)
            self.histogram("fastlb_request_duration_seconds", route=route)
        for spec in cfg.routes:
            if spec.rate_limit is not None:
                self.counter("fastlb_rate_limited_total", route=f"{spec.host or '*'}{spec.path}")
        from fastlb import policy  # the hook modules, imported at config load, name these series

        for hook in policy.hook_names(cfg):
            self.counter("fastlb_hook_errors_total", hook=hook)
        for name, spec in cfg.backends.items():
            self.counter("fastlb_retries_total", backend=name)
            if spec.tls is not None and spec.tls.enabled:
                for resumed in ("false", "true"):
                    self.counter("fastlb_upstream_tls_handshakes_total", backend=name, resumed=resumed)
                for reason in UPSTREAM_TLS_FAILURES:
                    self.counter("fastlb_upstream_tls_errors_total", backend=name, reason=reason)
            for server in spec.servers:
                s = str(server.address)
                self.histogram("fastlb_upstream_response_seconds", backend=name, server=s)
                self.gauge("fastlb_backend_server_active_requests", backend=name, server=s)
                for kind in UPSTREAM_ERRORS:
                    self.counter("fastlb_upstream_errors_total", backend=name, server=s, kind=kind)
        for spec in cfg.listeners:
            listener = str(spec.address)
            self.gauge("fastlb_connections_open", listener=listener)
            self.counter("fastlb_connections_total", listener=listener)
            if spec.proxy_protocol:
                for reason in PROXY_FAILURES:
                    self.counter("fastlb_proxy_protocol_errors_total", listener=listener, reason=reason)
            for entry in spec.passthrough:
                self.counter("fastlb_passthrough_connections_total", listener=listener, backend=entry.backend)
                for direction in ("in", "out"):
                    self.counter("fastlb_passthrough_bytes_total", listener=listener, backend=entry.backend,
                                 direction=direction)
            if spec.tls:
                for result in ("verified", "failed"):
                    self.counter("fastlb_tls_client_certificates_total", listener=listener, result=result)
                for reason in TLS_FAILURES:
                    self.counter("fastlb_tls_handshake_errors_total", listener=listener, reason=reason)
                for version, cipher in tls_suites:
                    for resumed in ("false", "true"):
                        self.counter("fastlb_tls_handshakes_total", listener=listener, version=version,
                                     cipher=cipher, resumed=resumed)
        for status in BAD_STATUSES:
            self.counter("fastlb_bad_requests_total", status=str(status))
        self.counter("fastlb_access_log_dropped_total")
        self.counter("fastlb_worker_restarts_total")
        for result in ("success", "failure"):
            self.counter("fastlb_config_reloads_total", result=result)
        if any(spec.acme for spec in cfg.tls.certificates):
            for result in ACME_RESULTS:
                self.counter("fastlb_acme_orders_total", result=result)


def route_names(cfg) -> list[str]:
    names = [f"{r.host or '*'}{r.path}" for r in cfg.routes]
    if cfg.default_backend:
        names.append("default")  # the router's Route("default") exists only with a default_backend
    return names + ["-"]  # "-": no route matched (404)


def route_backend(cfg, route: str) -> str:
    for r in cfg.routes:
        if f"{r.host or '*'}{r.path}" == route:
            return r.backend
    if route == "default":
        return cfg.default_backend
    return "-"


class Store:
    """The mmap'd areas; created by the master before forking."""

    def __init__(self):
        self._map = mmap.mmap(-1, _AREA_BYTES * (AREAS + 1))
        self.all = memoryview(self._map).cast("d")

    def header(self, n: int) -> memoryview:
        start = n * (AREA_HEADER + MAX_SERIES)
        return self.all[start:start + AREA_HEADER]

    def area(self, n: int) -> memoryview:
        """Area n's series (index 0 = the layout's first series)."""
        start = n * (AREA_HEADER + MAX_SERIES) + AREA_HEADER
        return self.all[start:start + MAX_SERIES]

    def master_area(self) -> memoryview:
        return self.area(AREAS)


def tls_suites(contexts) -> list[tuple[str, str]]:
    """(version, cipher) pairs the server contexts can negotiate, named as ssl.SSLObject reports them."""
    suites = []
    for ctx in {id(c): c for c in contexts.values()}.values():
        for cipher in ctx.get_ciphers():
            pair = ("TLSv1.3" if cipher["protocol"] == "TLSv1.3" else "TLSv1.2", cipher["name"])
            if pair not in suites:
                suites.append(pair)
    return suites


def _labels(labels: tuple, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(layout: Layout, store: Store, extra: list[tuple[str, tuple, float]]) -> str:
    """Prometheus text exposition format 0.0.4: every layout series summed over all areas, plus
    `extra` gauges (family, labels, value) computed at scrape time."""
    stride = AREA_HEADER + MAX_SERIES
    values = store.all
    areas = [a * stride + AREA_HEADER for a in range(AREAS + 1)]

    def total(i: int) -> float:
        return sum(values[a + i] for a in areas)

    by_family: dict[str, list[str]] = {}
    for family, labels, kind, index in layout.series:
        lines = by_family.setdefault(family, [])
        if kind == "histogram":
            cumulative = 0.0
            for j, bound in enumerate(BUCKETS + (float("inf"),)):
                cumulative += total(index + j)
                le = 'le="+Inf"' if bound == float("inf") else f'le="{bound!r}"'
                lines.append(f"{family}_bucket{_labels(labels, le)} {_num(cumulative)}")
            lines.append(f"{family}_sum{_labels(labels)} {_num(total(index + HIST_SUM))}")
            lines.append(f"{family}_count{_labels(labels)} {_num(cumulative)}")
        else:
            lines.append(f"{family}{_labels(labels)} {_num(total(index))}")
    for family, labels, value in extra:
        by_family.setdefault(family, []).append(f"{family}{_labels(labels)} {_num(value)}")
    out = []
    for family, lines in by_family.items():
        kind, text = HELP[family]
        out.append(f"# HELP {family} {text}\n# TYPE {family} {kind}\n")
        out.append("\n".join(lines) + "\n")
    return "".join(out)


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) and abs(value) < 2**53 else repr(value)


def bind(layout: Layout, worker) -> None:
    """Resolve every series a worker records into indices on its runtime objects, at config load."""
    for route in worker.router.routes + [worker.no_route]:
        backend = route.backend.name if route.backend is not None else "-"
        route.m_requests = tuple(
            layout.find("fastlb_requests_total", route=route.name, backend=backend, code_class=c)
            for c in CODE_CLASSES)
        route.m_duration = layout.find("fastlb_request_duration_seconds", route=route.name)
    for backend in worker.backends.values():
        backend.m_retries = layout.find("fastlb_retries_total", backend=backend.name)
        for server in backend.servers:
            labels = {"backend": backend.name, "server": server.name}
            server.m_upstream = layout.find("fastlb_upstream_response_seconds", **labels)
            server.m_active = layout.find("fastlb_backend_server_active_requests", **labels)
            server.m_errors = {kind: layout.find("fastlb_upstream_errors_total", kind=kind, **labels)
                               for kind in UPSTREAM_ERRORS}
            link = server.link
            if link is not None and link.context is not None:
                link.m_handshakes = tuple(layout.find("fastlb_upstream_tls_handshakes_total", backend=backend.name,
                                                      resumed=resumed) for resumed in ("false", "true"))
                link.m_errors = {reason: layout.find("fastlb_upstream_tls_errors_total", backend=backend.name,
                                                     reason=reason) for reason in UPSTREAM_TLS_FAILURES}
    worker.m_bad = {status: layout.find("fastlb_bad_requests_total", status=str(status))
                    for status in BAD_STATUSES}
    for info in worker.listeners:
        name = str(info.spec.address)
        info.m_open = layout.find("fastlb_connections_open", listener=name)
        info.m_total = layout.find("fastlb_connections_total", listener=name)
        if info.spec.proxy_protocol:
            info.m_proxy_errors = {reason: layout.find("fastlb_proxy_protocol_errors_total", listener=name,
                                                       reason=reason) for reason in PROXY_FAILURES}
        if info.spec.passthrough:
            info.m_passthrough_total = {p.backend: layout.find(
                "fastlb_passthrough_connections_total", listener=name, backend=p.backend)
                for p in info.spec.passthrough}
            info.m_passthrough = {p.backend: tuple(layout.find(
                "fastlb_passthrough_bytes_total", listener=name, backend=p.backend, direction=d)
                for d in ("in", "out")) for p in info.spec.passthrough}
        if info.spec.tls:
            info.m_client_certs = {result: layout.find("fastlb_tls_client_certificates_total", listener=name,
                                                       result=result) for result in ("verified", "failed")}
            info.m_tls_errors = {reason: layout.find("fastlb_tls_handshake_errors_total", listener=name,
                                                     reason=reason) for reason in TLS_FAILURES}
            info.m_tls = {(version, cipher, resumed == "true"): layout.find(
                "fastlb_tls_handshakes_total", listener=name, version=version, cipher=cipher, resumed=resumed)
                for version, cipher in tls_suites(worker.contexts) for resumed in ("false", "true")}
