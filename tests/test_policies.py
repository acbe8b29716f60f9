"""Per-route policies (issue 17) through the real server on plain and TLS listeners; the host-wide rate
limit across workers against the real clock; the shared bucket table; the Ingress annotations."""

import importlib
import mmap
import multiprocessing
import os
import random
import threading
import time

import bcrypt
import pytest
from policyutil import Client, get, header, metric, serve
from tlsutil import make_pems

from fastlb import _core_py, config, core
from fastlb.heads import Head, field_name, field_value
from fastlb.lb import ingress
from fastlb.policy.headers import rewrite_path
from fastlb.policy.ratelimit import RateLimiter

SCHEMES = ["http", "https"]


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    return make_pems(tmp_path_factory.mktemp("pems"))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_header_rules_and_rewrite_prefix(fastlb, backends, tmp_path, pems, scheme):
    (app,) = backends("app")
    routes = '''
[[routes]]
path = "/api"
backend = "app"
rewrite_prefix = "/v2/"
request_headers = { set = { "X-Env" = "prod", "User-Agent" = "fastlb-test" }, remove = ["X-Debug"] }
response_headers = { set = { "Strict-Transport-Security" = "max-age=63072000" }, remove = ["X-Backend"] }

[[routes]]
path = "/plain"
backend = "app"
'''
    lb = serve(fastlb, tmp_path, pems, routes, {"app": [app]})
    client = Client(lb, scheme)
    r = client.get("/api/users?x=1", {"X-Debug": "1", "User-Agent": "curl"})
    assert r.status == 200
    assert r.headers["Strict-Transport-Security"] == "max-age=63072000"
    assert r.headers["X-Backend"] is None
    record = app.records()[-1]
    assert record["target"] == "/v2/users?x=1"
    assert (header(record, "X-Env"), header(record, "User-Agent"), header(record, "X-Debug")) == (
        "prod", "fastlb-test", None)
    assert [k for k, _ in record["headers"]].count("User-Agent") == 1
    assert header(record, "X-Forwarded-For") == "127.0.0.1"  # fastlb's own fields are kept

    assert client.get("/api").status == 200
    assert app.records()[-1]["target"] == "/v2/"
    r = client.get("/plain/x", {"X-Debug": "1"})  # another route: untouched
    assert r.headers["X-Backend"] == "app"
    assert (app.records()[-1]["target"], header(app.records()[-1], "X-Debug")) == ("/plain/x", "1")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_allow_and_deny_answer_403_on_the_real_client_address(fastlb, backends, tmp_path, pems, scheme):
    (app,) = backends("app")
    routes = '''
[[routes]]
path = "/denied"
backend = "app"
deny = ["127.0.0.0/8"]

[[routes]]
path = "/only-ten"
backend = "app"
allow = ["10.0.0.0/8"]

[[routes]]
path = "/local"
backend = "app"
allow = ["127.0.0.1/32", "::1/128"]
deny = ["10.9.0.0/16"]
'''
    lb = serve(fastlb, tmp_path, pems, routes, {"app": [app]})
    client = Client(lb, scheme)
    r = client.get("/denied")
    assert r.status == 403 and r.headers["X-Request-ID"]
    assert client.get("/only-ten").status == 403
    assert client.get("/local").status == 200  # and the connection was kept through the 403s
    assert [r["target"] for r in app.records()] == ["/local"]
    # The client-sent X-Forwarded-For is not trusted: 127.0.0.1 is still who asks.
    assert client.get("/only-ten", {"X-Forwarded-For": "10.1.2.3"}).status == 403


@pytest.mark.parametrize("scheme", SCHEMES)
def test_behind_trusted_proxies_the_forwarded_client_is_checked(fastlb, backends, tmp_path, pems, scheme):
    (app,) = backends("app")
    routes = '''
[[routes]]
path = "/only-ten"
backend = "app"
allow = ["10.0.0.0/8"]
deny = ["10.9.0.0/16"]
'''
    lb = serve(fastlb, tmp_path, pems, routes, {"app": [app]},
               env={"FASTLB_SERVER_TRUSTED_PROXIES": "127.0.0.0/8,192.168.0.0/16"})
    client = Client(lb, scheme)
    assert client.get("/only-ten", {"X-Forwarded-For": "10.1.2.3"}).status == 200
    # The rightmost hop that is not a trusted proxy is the client; what is left of it may be forged.
    assert client.get("/only-ten", {"X-Forwarded-For": "10.1.2.3, 192.168.1.1"}).status == 200
    assert client.get("/only-ten", {"X-Forwarded-For": "10.1.2.3, 8.8.8.8"}).status == 403
    assert client.get("/only-ten", {"X-Forwarded-For": "10.9.0.1"}).status == 403
    assert client.get("/only-ten").status == 403  # no header: the connection's address


@pytest.mark.parametrize("scheme", SCHEMES)
def test_basic_auth_with_bcrypt(fastlb, backends, tmp_path, pems, scheme):
    (app,) = backends("app")
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    (tmp_path / "users.htpasswd").write_text(f"# users\nalice:{hashed}\n")
    routes = '''
[[routes]]
path = "/private"
backend = "app"
basic_auth = "users.htpasswd"
'''
    lb = serve(fastlb, tmp_path, pems, routes, {"app": [app]})
    client = Client(lb, scheme)
    r = client.get("/private")
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="/private", charset="UTF-8"'
    assert client.get("/private", {"Authorization": "Basic YWxpY2U6d3Jvbmc="}).status == 401  # alice:wrong
    assert client.get("/private", {"Authorization": "Basic Ym9iOnMzY3JldA=="}).status == 401  # bob:s3cret
    assert client.get("/private", {"Authorization": "Basic !!!"}).status == 401
    good = {"Authorization": "Basic YWxpY2U6czNjcmV0"}  # alice:s3cret
    assert client.get("/private/x", good).status == 200
    assert client.get("/private/x", good).status == 200
    assert len(app.records()) == 2


def test_bcrypt_runs_off_the_event_loop(fastlb, backends, tmp_path, pems):
    """A wrong password costs a full bcrypt hash (cost 13 here: about half a second); the worker's other
    clients are served meanwhile, because the hash runs in a thread while the request waits."""
    (app,) = backends("app")
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=13)).decode()
    (tmp_path / "users.htpasswd").write_text(f"alice:{hashed}\n")
    routes = '[[routes]]\npath = "/private"\nbackend = "app"\nbasic_auth = "users.htpasswd"\n\n' \
             '[[routes]]\npath = "/open"\nbackend = "app"\n'
    lb = serve(fastlb, tmp_path, pems, routes, {"app": [app]})
    wrong = {"Authorization": "Basic YWxpY2U6d3Jvbmc="}
    start = time.monotonic()
    guesses = [threading.Thread(target=get, args=(lb, "http", "/private", wrong))]
    for t in guesses:
        t.start()
    time.sleep(0.05)
    served = []
    while any(t.is_alive() for t in guesses):
        before = time.monotonic()
        assert get(lb, "http", "/open").status == 200
        served.append(time.monotonic() - before)
    hashing = time.monotonic() - start
    # In the loop, the hash would let no /open request through until it is done.
    assert hashing > 0.3 and len(served) >= 20, (hashing, len(served))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rate_limit_answers_429_with_retry_after_per_key(fastlb, backends, tmp_path, pems, scheme):
    (app,) = backends("app")
    routes = '''
[[routes]]
path = "/by-ip"
backend = "app"
rate_limit = { rate = "1/m", burst = 2 }

[[routes]]
path = "/by-user"
backend = "app"
rate_limit = { rate = "1/m", burst = 1, key = "header:X-User" }
'''
    lb = serve(fastlb, tmp_path, pems, routes, {"app": [app]}, workers=2)
    client = Client(lb, scheme)
    assert [client.get("/by-ip").status for _ in range(3)] == [200, 200, 429]
    r = client.get("/by-ip")
    assert r.status == 429
    assert 50 <= int(r.headers["Retry-After"]) <= 60
    assert metric(lb, "fastlb_rate_limited_total", route="*/by-ip") == 2
    # One bucket per header value; without the header, the client address is the key.
    assert client.get("/by-user", {"X-User": "a"}).status == 200
    assert client.get("/by-user", {"X-User": "a"}).status == 429
    assert client.get("/by-user", {"X-User": "b"}).status == 200
    assert client.get("/by-user").status == 200
    assert client.get("/by-user").status == 429


@pytest.mark.parametrize("key,head,expected", [
    ("cookie:sid", b"Cookie: a=1; sid=xyz; b=2\r\n", b"cxyz"),
    ("cookie:sid", b"Cookie: xsid=1; sidx=2\r\n", b"i10.0.0.1"),
    ("cookie:sid", b"", b"i10.0.0.1"),
    ("header:X-User", b"x-user:  alice \r\n", b"halice"),
    ("header:X-User", b"X-Other: alice\r\n", b"i10.0.0.1"),
    ("client_ip", b"X-User: alice\r\n", b"i10.0.0.1"),
])
def test_rate_limit_keys(key, head, expected):
    limiter = RateLimiter(config.RateLimitSpec(rate=1.0, burst=1, key=config._check_rate_key(key), max_keys=9))
    assert len(limiter.table) == 16  # max_keys rounded up to a power of two
    assert limiter.key(b"10.0.0.1", b"GET / HTTP/1.1\r\nHost: h\r\n" + head + b"\r\n") == expected


def _hammer(lb, seconds: float, connections: int) -> tuple[int, float]:
    """Requests from `connections` keep-alive clients (spread over the workers by SO_REUSEPORT) for
    `seconds`: how many were allowed, and over how long."""
    allowed = []
    start = time.monotonic()
    stop = start + seconds

    def run():
        client = Client(lb, "http")
        ok = 0
        while time.monotonic() < stop:
            ok += client.get("/limited").status == 200
        client.close()
        allowed.append(ok)

    threads = [threading.Thread(target=run) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(allowed), time.monotonic() - start


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_rate_limit_holds_for_the_host_not_per_worker(fastlb, backends, tmp_path, pems, workers):
    (app,) = backends("app")
    routes = '''
[[routes]]
path = "/limited"
backend = "app"
rate_limit = { rate = "100/s", burst = 20 }
'''
    lb = serve(fastlb, tmp_path, pems, routes, {"app": [app]}, workers=workers)
    allowed, elapsed = _hammer(lb, 1.5, 8)
    expected = 20 + 100 * elapsed
    # Per worker buckets would allow up to `workers` times this.
    assert abs(allowed - expected) <= 0.1 * expected, (allowed, expected)
    assert len(app.records()) == allowed


@pytest.mark.parametrize("route,replacement,target,expected", [
    ("/api", "/v2/", "/api/users?x=1", "/v2/users?x=1"),
    ("/api", "/v2/", "/api", "/v2/"),
    ("/api", "/v2/", "/api/", "/v2/"),
    ("/api", "/v2", "/api", "/v2"),
    ("/api", "/v2", "/api/", "/v2/"),
    ("/api/", "/v2", "/api/a/b/", "/v2/a/b/"),
    ("/api", "/", "/api/x?q", "/x?q"),
    ("/api", "/", "/api", "/"),
    ("/", "/v2/", "/api/x", "/v2/api/x"),
    ("/", "/v2/", "/", "/v2/"),
    ("/exact/file", "/other", "/exact/file?a", "/other?a"),
])
def test_rewrite_prefix_replaces_the_matched_segments(route, replacement, target, expected):
    assert rewrite_path(target.encode(), route.encode(), replacement.encode()) == expected.encode()


def test_head_edits_keep_every_other_field_and_its_order():
    head = Head(b"GET /a HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nX-B:  spaced \r\n\r\n")
    assert (head.get(b"x-a"), head.get_all(b"x-a"), head.get(b"x-b")) == (b"1", [b"1", b"2"], b"spaced")
    head.remove(b"X-A")
    head.set(b"X-C", b"3")
    head.set_target(b"/b?q")
    assert head.bytes() == b"GET /b?q HTTP/1.1\r\nHost: h\r\nX-B:  spaced \r\nX-C: 3\r\n\r\n"
    for name in ("Content-Length", "transfer-encoding", "Connection", "Upgrade", "TE", "bad name"):
        with pytest.raises(ValueError):
            field_name(name)
    with pytest.raises(ValueError):
        field_value("a\r\nX-Injected: 1")


# -- the shared table -------------------------------------------------------------------------------------

def _implementations():
    impls = [pytest.param(_core_py, id="py")]
    if os.environ.get("FASTLB_NO_EXTENSIONS") != "1":
        impls.append(pytest.param(importlib.import_module("fastlb._core"), id="c"))
    return impls


def _table(words: int):
    return memoryview(mmap.mmap(-1, words * 8)).cast("Q")


@pytest.mark.parametrize("impl", _implementations())
def test_rate_take_is_a_token_bucket_with_least_recently_seen_eviction(impl):
    table = _table(impl.RATE_WAYS)  # one set: 8 keys fit
    second = 1_000_000
    take = impl.rate_take
    # burst 3 at 1/s: three at once, the fourth waits a second, then one per second
    assert [take(table, 7, 10 * second, second, 3 * second) for _ in range(4)] == [0, 0, 0, second]
    assert take(table, 7, 11 * second, second, 3 * second) == 0
    assert take(table, 7, 11 * second, second, 3 * second) == second
    # Key 7 was seen last at 11 s; eight newer keys fill the set: 7 is evicted (its bucket forgotten,
    # so it may burst again), while a key seen more recently than the others survives.
    for key in range(1, 9):
        key_hash = key << 48
        assert take(table, key_hash, (20 + key) * second, second, 1 * second) == 0
    assert take(table, 8 << 48, 29 * second, second, 1 * second) == 0  # newest: its word is still there
    assert take(table, 8 << 48, 29 * second, second, 1 * second) == second
    assert take(table, 7, 29 * second, second, 3 * second) == 0
    assert len(table) == impl.RATE_WAYS  # the memory never grows


def _take_many(impl, table, n, conn):
    conn.send(sum(impl.rate_take(table, 0x9E3779B97F4A7C15, 5_000_000, 1000, 10_000_000) == 0
                  for _ in range(n)))


@pytest.mark.parametrize("impl", _implementations())
def test_rate_take_loses_no_update_between_processes(impl):
    """Four processes take 5000 tokens each from one bucket of 10000 with the clock frozen: exactly
    10000 are granted however the updates interleave; a lost update would grant more."""
    table = _table(64)
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe(duplex=False) for _ in range(4)]
    procs = [ctx.Process(target=_take_many, args=(impl, table, 5000, w)) for _, w in pipes]
    for p in procs:
        p.start()
    granted = sum(r.recv() for r, _ in pipes)
    for p in procs:
        p.join()
    assert granted == 10_000


@pytest.mark.skipif(os.environ.get("FASTLB_NO_EXTENSIONS") == "1", reason="the compiled twin is not built")
def test_rate_take_twins_agree():
    compiled = importlib.import_module("fastlb._core")
    rng = random.Random(17)
    a, b = _table(64), _table(64)
    now = 1_000_000
    for _ in range(20_000):
        now += rng.randrange(0, 3000)
        key = rng.choice((rng.randrange(1 << 64), rng.randrange(40) * 0x9E3779B97F4A7C15 % (1 << 64)))
        interval, burst = rng.randrange(1, 5000), rng.randrange(0, 20_000)
        assert _core_py.rate_take(a, key, now, interval, burst) == compiled.rate_take(b, key, now, interval, burst)
    assert a.tobytes() == b.tobytes()
    with pytest.raises(TypeError):
        compiled.rate_take(b.cast("B"), 1, 1, 1, 1)
    with pytest.raises(ValueError):
        compiled.rate_take(_table(12), 1, 1, 1, 1)
    assert core.rate_take is compiled.rate_take


# -- configuration and Ingress ----------------------------------------------------------------------------

def _load(tmp_path, routes: str):
    path = tmp_path / "p.toml"
    path.write_text(routes + '\n[backends.app]\nservers = ["127.0.0.1:9"]\n')
    return config.load(str(path), {})


@pytest.mark.parametrize("route,message", [
    ('rate_limit = { rate = "fast" }', "routes[0].rate_limit.rate: expected a rate such as"),
    ('rate_limit = { burst = 3 }', "routes[0].rate_limit.rate: missing required key"),
    ('rate_limit = { rate = "1/s", key = "uri" }', "routes[0].rate_limit.key: must be client_ip"),
    ('request_headers = { set = { "Content-Length" = "0" } }',
     "routes[0].request_headers.set.Content-Length: 'Content-Length' frames the message"),
    ('response_headers = { remove = ["Transfer-Encoding"] }', "frames the message or the connection"),
    ('allow = ["10.0.0.0/33"]', "routes[0].allow[0]: invalid CIDR"),
    ('rewrite_prefix = "v2"', "routes[0].rewrite_prefix: must start with '/'"),
    ('basic_auth = "missing.htpasswd"', "routes[0].basic_auth: cannot read"),
    ('basic_auth = "md5.htpasswd"', "is not a bcrypt hash (create it with htpasswd -B)"),
    ('hook = "not a hook"', 'routes[0].hook: \'not a hook\': expected "module:function"'),
    ('hook = "on_request"', "names no module and [hooks] module is not set"),
])
def test_bad_policies_are_one_line_config_errors(tmp_path, route, message):
    (tmp_path / "md5.htpasswd").write_text("bob:$apr1$abc$0123456789abcdefghijkl\n")
    with pytest.raises(config.ConfigError) as e:
        _load(tmp_path, f'[[routes]]\nbackend = "app"\n{route}\n')
    assert message in str(e.value)
    assert "\n" not in str(e.value)


MANIFEST = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
  annotations:
    nginx.ingress.kubernetes.io/rewrite-target: /v1/
    nginx.ingress.kubernetes.io/whitelist-source-range: "10.0.0.0/8, 192.168.1.0/24"
    nginx.ingress.kubernetes.io/denylist-source-range: 10.9.0.0/16
    nginx.ingress.kubernetes.io/limit-rps: "10"
    nginx.ingress.kubernetes.io/limit-burst-multiplier: "3"
    kubectl.kubernetes.io/last-applied-configuration: "{}"
spec:
  rules:
  - host: shop.example.com
    http:
      paths:
      - path: /api
        pathType: Prefix
        backend:
          service: {name: api, port: {number: 80}}
"""


def _ingress(tmp_path, manifest: str):
    cfg = _load(tmp_path, '[services]\napi = ["127.0.0.1:9101"]')
    path = tmp_path / "ingress.yaml"
    path.write_text(manifest)
    return ingress.apply(cfg, [str(path)])


def test_ingress_nginx_annotations_become_route_policies(tmp_path):
    (route,) = _ingress(tmp_path, MANIFEST).routes
    assert (route.host, route.path, route.rewrite_prefix) == ("shop.example.com", "/api", "/v1/")
    assert route.allow == ("10.0.0.0/8", "192.168.1.0/24")
    assert route.deny == ("10.9.0.0/16",)
    assert route.rate_limit == config.RateLimitSpec(rate=10.0, burst=30, key="client_ip")


@pytest.mark.parametrize("annotation,message", [
    ("nginx.ingress.kubernetes.io/rewrite-target: /$2", "not implemented by fastlb: capture groups ($1...) need regex paths"),
    ("nginx.ingress.kubernetes.io/whitelist-source-range: 10.0.0.0/99", "invalid CIDR '10.0.0.0/99'"),
    ("nginx.ingress.kubernetes.io/limit-burst-multiplier: '2'", "give one of limit-rps and limit-rpm"),
    ("nginx.ingress.kubernetes.io/auth-type: basic",
     "annotations['nginx.ingress.kubernetes.io/auth-type']: not implemented by fastlb"),
    ("traefik.ingress.kubernetes.io/router.middlewares: x", "not implemented by fastlb"),
])
def test_other_controller_annotations_are_refused_by_name(tmp_path, annotation, message):
    manifest = MANIFEST.split("  annotations:\n")[0] + f"  annotations:\n    {annotation}\n" + \
        MANIFEST.split('"{}"\n')[1]
    with pytest.raises(config.ConfigError) as e:
        _ingress(tmp_path, manifest)
    assert message in str(e.value)
