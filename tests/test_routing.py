"""Routing with Kubernetes Ingress semantics: tables from the Ingress docs, then through the real server."""

import http.client

import pytest

from fastlb.config import RouteSpec
from fastlb.lb.router import Router

# kubernetes.io/docs/concepts/services-networking/ingress/#examples (path matching table)
INGRESS_EXAMPLES = [
    # (rules as (match, path), request path, expected matching rule index or None)
    ([("prefix", "/")], "/anything/at/all", 0),
    ([("exact", "/foo")], "/foo", 0),
    ([("exact", "/foo")], "/bar", None),
    ([("exact", "/foo")], "/foo/", None),
    ([("exact", "/foo/")], "/foo", None),
    ([("prefix", "/foo")], "/foo", 0),
    ([("prefix", "/foo")], "/foo/", 0),
    ([("prefix", "/foo/")], "/foo", 0),
    ([("prefix", "/foo/")], "/foo/", 0),
    ([("prefix", "/aaa/bb")], "/aaa/bbb", None),
    ([("prefix", "/aaa/bbb")], "/aaa/bbb", 0),
    ([("prefix", "/aaa/bbb/")], "/aaa/bbb", 0),
    ([("prefix", "/aaa/bbb")], "/aaa/bbb/", 0),
    ([("prefix", "/aaa/bbb")], "/aaa/bbb/ccc", 0),
    ([("prefix", "/aaa/bbb")], "/aaa/bbbxyz", None),
    ([("prefix", "/"), ("prefix", "/aaa")], "/aaa/ccc", 1),
    ([("prefix", "/"), ("prefix", "/aaa"), ("prefix", "/aaa/bbb")], "/aaa/bbb", 2),
    ([("prefix", "/"), ("prefix", "/aaa"), ("prefix", "/aaa/bbb")], "/ccc", 0),
    ([("prefix", "/aaa")], "/ccc", None),
    ([("prefix", "/foo"), ("exact", "/foo")], "/foo", 1),
    ([("exact", "/foo"), ("prefix", "/foo")], "/foo", 0),
    # beyond the table: the query is ignored, exact is case-sensitive, longest wins over order
    ([("exact", "/foo")], "/foo?x=1", 0),
    ([("exact", "/foo")], "/FOO", None),
    ([("prefix", "/a/b"), ("prefix", "/a")], "/a/b/c", 0),
]


def _backends(n):
    return {f"b{i}": f"backend-{i}" for i in range(n)}


@pytest.mark.parametrize("rules,path,expected", INGRESS_EXAMPLES)
def test_ingress_path_examples(rules, path, expected):
    specs = [RouteSpec(host=None, path=p, match=m, backend=f"b{i}") for i, (m, p) in enumerate(rules)]
    route = Router(specs, None, _backends(len(specs))).match(b"example.com", path.encode())
    assert (route.backend if route else None) == (None if expected is None else f"backend-{expected}")


HOST_RULES = [
    RouteSpec(host="app.example.com", path="/", match="prefix", backend="b0"),
    RouteSpec(host="*.example.com", path="/", match="prefix", backend="b1"),
    RouteSpec(host=None, path="/", match="prefix", backend="b2"),
    RouteSpec(host="only.example.com", path="/api", match="prefix", backend="b3"),
]


@pytest.mark.parametrize("host,path,expected", [
    (b"app.example.com", b"/", "backend-0"),
    (b"APP.Example.COM:8443", b"/", "backend-0"),       # case-insensitive, port ignored
    (b"app.example.com.", b"/", "backend-0"),           # trailing dot
    (b"a.example.com", b"/", "backend-1"),              # one-label wildcard
    (b"a.b.example.com", b"/", "backend-2"),            # two labels: not the wildcard
    (b"example.com", b"/", "backend-2"),                # the bare domain: not the wildcard
    (b"other.org", b"/", "backend-2"),
    (None, b"/", "backend-2"),
    (b"only.example.com", b"/api/x", "backend-3"),
    (b"only.example.com", b"/web", "backend-1"),        # no path in the exact host: wildcard next
    (b"[::1]:8080", b"/", "backend-2"),
])
def test_host_precedence(host, path, expected):
    route = Router(HOST_RULES, None, _backends(4)).match(host, path)
    assert route.backend == expected


def test_default_backend_and_404():
    specs = [RouteSpec(host="a.example", path="/x", match="exact", backend="b0")]
    assert Router(specs, None, _backends(2)).match(b"b.example", b"/") is None
    assert Router(specs, "b1", _backends(2)).match(b"b.example", b"/").backend == "backend-1"


def test_routes_through_the_server(backends, fastlb, tmp_path):
    api, web, wild, exact, default = backends("api", "web", "wild", "exact", "default")
    cfg = tmp_path / "routes.toml"
    cfg.write_text(f"""
default_backend = "default"
[[routes]]
host = "app.example.com"
path = "/api"
backend = "api"
[[routes]]
host = "app.example.com"
path = "/api/v1/login"
match = "exact"
backend = "exact"
[[routes]]
host = "*.example.com"
backend = "wild"
[[routes]]
path = "/web"
backend = "web"
[backends.api]
servers = ["{api.address}"]
[backends.web]
servers = ["{web.address}"]
[backends.wild]
servers = ["{wild.address}"]
[backends.exact]
servers = ["{exact.address}"]
[backends.default]
servers = ["{default.address}"]
""")
    lb = fastlb(args=["--config", str(cfg)])
    cases = [
        ("app.example.com", "/api/users", "api"),
        ("App.Example.com:80", "/api", "api"),
        ("app.example.com", "/api/v1/login", "exact"),
        ("app.example.com", "/api/v1/login/", "api"),
        ("app.example.com", "/apix", "wild"),
        ("x.example.com", "/anything", "wild"),
        ("x.y.example.com", "/web/a", "web"),
        ("other.org", "/", "default"),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for host, path, expected in cases:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        assert resp.getheader("X-Backend") == expected, (host, path)
    # seen from the backends' side: each got exactly its requests
    assert [r["target"] for r in api.records()] == ["/api/users", "/api", "/api/v1/login/"]
    assert [r["target"] for r in exact.records()] == ["/api/v1/login"]


def test_404_without_a_matching_route(backends, fastlb, tmp_path):
    (a,) = backends("a")
    cfg = tmp_path / "r.toml"
    cfg.write_text(f'[[routes]]\nhost = "a.example"\nbackend = "a"\n[backends.a]\nservers = ["{a.address}"]\n')
    lb = fastlb(args=["--config", str(cfg)])
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    for _ in range(2):  # kept alive
        conn.request("GET", "/", headers={"Host": "b.example"})
        resp = conn.getresponse()
        assert resp.status == 404 and resp.read() == b"404 Not Found\n"
    assert a.records() == []
