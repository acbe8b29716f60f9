"""Host and path routing with Kubernetes Ingress semantics, compiled into dicts at config load.

Theory of operation: the host picks a path table (exact name ▸ one-label wildcard ▸ any host); within a
table an exact path is one dict lookup and a prefix match walks the request path's segment boundaries
from the longest down, so the cost of a match depends on the path's depth, never on the number of
routes.  When the chosen host's table has no matching path the next less specific host table is tried,
then `default_backend`; with none of those the answer is 404.
"""

import re
from typing import Any

# RFC 3986 §3.2.2 host (IP-literal or reg-name) with an optional port (RFC 9110 §7.2).
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(?::[0-9]*)?")


class InvalidHost(ValueError):
    """The Host header is not a valid host[:port]: the request must be refused (400)."""


class Route:
    __slots__ = ("name", "backend", "require_client_cert", "policy", "m_requests", "m_duration")

    def __init__(self, name: str, backend: Any, require_client_cert: bool = False):
        self.name = name
        self.backend = backend
        self.require_client_cert = require_client_cert  # 403 without a verified client certificate
        # fastlb/policy: the route's policies and hooks, bound by the worker; None for a plain route,
        # which is all the data path tests (one `is None` per request).
        self.policy = None


class _PathTable:
    __slots__ = ("exact", "prefix")

    def __init__(self):
        self.exact: dict[bytes, Route] = {}
        self.prefix: dict[bytes, Route] = {}

    def add(self, path: bytes, match: str, route: Route) -> None:
        if match == "exact":
            self.exact.setdefault(path, route)
        else:
            # Ingress: a trailing slash on a Prefix path is ignored ("/foo/" and "/foo" are the same
            # rule) and "/" matches every path; store both without the slash, "/" as b"".
            self.prefix.setdefault(path.rstrip(b"/"), route)

    def match(self, path):
        route = self.exact.get(path)
        if route is not None:
            # An exact hit covers the whole path: no prefix can be longer, and on a tie exact wins.
            return route
        prefix = self.prefix
        if not prefix:
            return None
        p = path.rstrip(b"/")
        while True:
            route = prefix.get(p)
            if route is not None:
                return route
            cut = p.rfind(b"/")
            if cut < 0:
                return None
            p = p[:cut]


class Router:
    """Maps (Host header, path) to a Route; built once per config generation."""

    __slots__ = ("routes", "_exact", "_wildcard", "_any", "_default", "_hosts")

    def __init__(self, routes, default_backend: Any | None, backends: dict[str, Any]):
        self._exact: dict[bytes, _PathTable] = {}
        self._wildcard: dict[bytes, _PathTable] = {}
        self._any: _PathTable | None = None
        # Host header as received -> (exact table, wildcard table): most clients send a handful of
        # Host values, so normalising and looking them up happens once per value, not per request.
        self._hosts: dict[bytes, tuple] = {}
        self.routes: list[Route] = []
        for spec in routes:
            route = Route(f"{spec.host or '*'}{spec.path}", backends[spec.backend], spec.require_client_cert)
            self.routes.append(route)
            if spec.host is None:
                if self._any is None:
                    self._any = _PathTable()
                table = self._any
            elif spec.host.startswith("*."):
                table = self._wildcard.setdefault(spec.host[2:].encode(), _PathTable())
            else:
                table = self._exact.setdefault(spec.host.encode(), _PathTable())
            table.add(spec.path.encode(), spec.match, route)
        self._default = (
            Route("default", backends[default_backend]) if default_backend else None
        )
        if self._default is not None:
            self.routes.append(self._default)

    def match(self, host, target):
        # `in` first: bytes.find parses its arguments as a varargs method, a cost most targets skip.
        path = target if b"?" not in target else target[:target.find(b"?")]
        if host:
            tables = self._hosts.get(host)
            if tables is None:
                tables = self._tables_for(host)
            for table in tables:
                route = table.match(path)
                if route is not None:
                    return route
        if self._any is not None:
            route = self._any.match(path)
            if route is not None:
                return route
        return self._default

    def _tables_for(self, host):
        """Validated and looked up once per distinct Host value (the result is cached)."""
        if not _HOST.fullmatch(host):
            raise InvalidHost(host)
        name = _host_name(host)
        dot = name.find(b".")
        tables = tuple(t for t in (self._exact.get(name), self._wildcard.get(name[dot + 1:]) if dot > 0
                                   else None) if t is not None)
        if len(self._hosts) < 4096:  # bounded: Host values are client-chosen
            self._hosts[host] = tables
        return tables


def _host_name(host: bytes) -> bytes:
    """Lower-cased host without port or trailing dot (RFC 9110 §4.2.3: host names are case-insensitive)."""
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    colon = host.find(b":")
    if colon >= 0:
        host = host[:colon]
    return host.rstrip(b".").lower()
