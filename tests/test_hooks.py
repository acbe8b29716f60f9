"""Python hooks (issue 17): real hook modules loaded by the real server, on plain and TLS listeners."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from policyutil import Client, get, header, metric, serve
from tlsutil import make_pems

from fastlb import config, policy

HOOKS = '''
import asyncio
from fastlb.hooks import Response

def on_request(req):
    req.set_header("X-Hooked", f"{req.method} {req.path} q={req.query} host={req.host} "
                               f"ip={req.client_ip} tls={req.tls_version} sni={req.sni} via={req.backend}")
    if req.headers.get("x-deny") == "yes":
        return Response(403, b"denied by a hook\\n", {"X-Why": "hook"})
    return None

def rewrite(req):
    req.path = "/rewritten" + req.path
    req.remove_header("X-Secret")
    req.backend = "other"

def boom(req):
    raise RuntimeError("boom in a hook")

def misuse(req):
    case = req.headers.get("X-Case")
    if case == "status":
        return Response(99)
    if case == "no-content-body":
        return Response(204, b"a body")
    if case == "backend":
        req.backend = "nope"
    if case == "framing":
        req.set_header("Content-Length", "1")
    if case == "value":
        req.set_header("X-Ok", "a\\r\\nInjected: 1")
    if case == "return":
        return 200

async def slow(req):
    await asyncio.sleep(5)

async def auth(req):
    await asyncio.sleep(0.05)  # an outside check, as nginx's auth_request
    if req.headers.get("Authorization") != "Bearer ok":
        return Response(401, b"who are you\\n", {"WWW-Authenticate": "Bearer"})
    req.set_header("X-User", "alice")

def on_response(req, resp):
    resp.set_header("X-Status-Seen", str(resp.status))
    resp.remove_header("X-Backend")
    if req.path == "/resp-boom":
        raise ValueError("boom in on_response")
'''

ROUTES = '''
[hooks]
module = "lbhooks"
timeout = "300ms"

[[routes]]
backend = "app"

[[routes]]
path = "/rw"
backend = "app"
hook = "lbhooks:rewrite"

[[routes]]
path = "/boom"
backend = "app"
hook = "boom"

[[routes]]
path = "/misuse"
backend = "app"
hook = "misuse"

[[routes]]
path = "/slow"
backend = "app"
hook = "slow"

[[routes]]
path = "/auth"
backend = "app"
hook = "auth"
'''


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    return make_pems(tmp_path_factory.mktemp("pems"))


@pytest.fixture
def hooked(fastlb, backends, tmp_path, pems):
    (tmp_path / "lbhooks.py").write_text(HOOKS)
    app, other = backends("app", "other")
    lb = serve(fastlb, tmp_path, pems, ROUTES, {"app": [app], "other": [other]}, extra="")
    return lb, app, other


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_request_and_response_hooks_see_and_change_the_request(hooked, scheme):
    lb, app, other = hooked
    r = get(lb, scheme, "/x?a=1")
    assert r.status == 200
    tls, sni = ("TLSv1.3", "localhost") if scheme == "https" else ("None", "None")
    port = lb.tls_port if scheme == "https" else lb.port
    assert header(app.records()[-1], "X-Hooked") == (
        f"GET /x q=a=1 host=localhost:{port} ip=127.0.0.1 tls={tls} sni={sni} via=app")
    assert r.headers["X-Status-Seen"] == "200"
    assert r.headers["X-Backend"] is None  # removed by on_response

    r = get(lb, scheme, "/x", {"X-Deny": "yes"})
    assert (r.status, r.body, r.headers["X-Why"]) == (403, b"denied by a hook\n", "hook")
    assert r.headers["X-Request-ID"]
    assert len(app.records()) == 1

    r = get(lb, scheme, "/rw/a?b=2", {"X-Secret": "s3cret"})
    assert r.status == 200
    assert len(app.records()) == 1  # the route hook sent it to "other"
    record = other.records()[-1]
    assert record["target"] == "/rewritten/rw/a?b=2"
    assert header(record, "X-Secret") is None


def test_a_hook_that_raises_answers_500_with_the_request_id_and_is_counted(hooked):
    lb, app, _ = hooked
    workers = set(lb.worker_pids())
    client = Client(lb, "http")
    for _ in range(3):
        r = client.get("/boom", {"X-Request-ID": "trace-me"})
        assert r.status == 500
        assert r.headers["X-Request-ID"] == "trace-me"
    assert client.get("/fine").status == 200  # same connection, same worker: it did not die
    assert metric(lb, "fastlb_hook_errors_total", hook="lbhooks:boom") == 3
    lb.wait_for("RuntimeError: boom in a hook")
    time.sleep(0.2)
    # The traceback is logged once, not once per request (rate-limited).
    assert sum("hook lbhooks:boom raised" in line for line in lb.lines) == 1
    assert set(lb.worker_pids()) == workers
    assert not any(r["target"] == "/boom" for r in app.records())

    # Misusing the API is a hook error too: never a malformed message, never a framing change.
    cases = ("status", "no-content-body", "backend", "framing", "value", "return")
    assert [client.get("/misuse", {"X-Case": case}).status for case in cases] == [500] * len(cases)
    assert metric(lb, "fastlb_hook_errors_total", hook="lbhooks:misuse") == len(cases)
    assert client.get("/misuse").status == 200

    r = client.get("/resp-boom")  # on_response raising: 500 too, and the connection still serves
    assert r.status == 500
    assert client.get("/fine").status == 200
    assert metric(lb, "fastlb_hook_errors_total", hook="lbhooks:on_response") == 1


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_async_hooks_answer_wait_and_time_out(hooked, scheme):
    lb, app, _ = hooked
    r = get(lb, scheme, "/auth/x")
    assert (r.status, r.headers["WWW-Authenticate"]) == (401, "Bearer")
    r = get(lb, scheme, "/auth/x", {"Authorization": "Bearer ok"}, method="POST", body=b"x" * 100_000)
    assert r.status == 200
    record = app.records()[-1]
    assert (header(record, "X-User"), record["body_len"]) == ("alice", 100_000)

    start = time.monotonic()
    r = get(lb, scheme, "/slow")
    assert r.status == 504
    assert 0.25 < time.monotonic() - start < 2.0  # [hooks] timeout = 300ms, not the hook's 5 s


def test_pipelined_requests_behind_an_async_hook_keep_their_order(hooked):
    lb, app, _ = hooked
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(b"GET /auth/1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer ok\r\n\r\n"
                  b"GET /two HTTP/1.1\r\nHost: a\r\n\r\n"
                  b"GET /auth/3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [200, 200, 401], lb.output
    assert [r["target"] for r in app.records()] == ["/auth/1", "/two"]


def _check(tmp_path, toml: str, module: str | None = None, env: dict | None = None):
    if module is not None:
        (tmp_path / "brokenhooks.py").write_text(module)
    config = tmp_path / "check.toml"
    config.write_text(toml + '\n[backends.app]\nservers = ["127.0.0.1:9"]\n')
    return subprocess.run([sys.executable, "-m", "fastlb", "check", str(config)], capture_output=True,
                          text=True, env={"PYTHONPATH": str(tmp_path), "PATH": os.environ["PATH"], **(env or {}),
                                          **{k: v for k, v in os.environ.items() if k == "FASTLB_NO_EXTENSIONS"}})


def test_a_hook_module_that_does_not_import_fails_the_check_in_one_line(tmp_path):
    result = _check(tmp_path, '[hooks]\nmodule = "brokenhooks"\n[[routes]]\nbackend = "app"\n',
                    "import no_such_module_anywhere\n")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "hooks.module: cannot import brokenhooks: ModuleNotFoundError" in lines[0]

    result = _check(tmp_path, '[[routes]]\nbackend = "app"\nhook = "brokenhooks:missing"\n',
                    "def present(req):\n    pass\n")
    assert result.returncode != 0
    assert "routes[0].hook: brokenhooks has no 'missing'" in result.stderr

    result = _check(tmp_path, '[hooks]\nmodule = "brokenhooks"\n[[routes]]\nbackend = "app"\n',
                    "async def on_response(req, resp):\n    pass\n")
    assert "on_response must not be async" in result.stderr

    result = _check(tmp_path, '[[routes]]\nbackend = "app"\n', "raise RuntimeError('at import')\n",
                    env={"FASTLB_HOOKS_MODULE": "brokenhooks"})
    assert result.stderr.strip() == ("environment: FASTLB_HOOKS_MODULE: cannot import brokenhooks: "
                                     "RuntimeError: at import")


def test_a_reload_imports_the_hook_module_again_and_refuses_a_broken_one(fastlb, backends, tmp_path, pems):
    (app,) = backends("app")
    module = tmp_path / "versioned.py"
    module.write_text('def on_request(req):\n    req.set_header("X-Version", "1")\n')
    lb = serve(fastlb, tmp_path, pems, '[hooks]\nmodule = "versioned"\n\n[[routes]]\nbackend = "app"\n',
               {"app": [app]})
    get(lb, "http", "/")
    module.write_text('def on_request(req):\n    req.set_header("X-Version", "2")\n')
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_for("reloaded: generation 1")
    get(lb, "http", "/")
    module.write_text("def on_request(req):\n    return (\n")  # a syntax error
    lb.proc.send_signal(signal.SIGHUP)
    line = lb.wait_for("reload failed")
    assert "hooks.module: cannot import versioned: SyntaxError" in line
    get(lb, "http", "/")
    assert [header(r, "X-Version") for r in app.records()] == ["1", "2", "2"]


def test_only_routes_with_hooks_or_policies_get_a_policy(tmp_path, monkeypatch):
    """What makes a route without hooks pay nothing: its Route.policy stays None."""
    (tmp_path / "onlyroute.py").write_text("def noop(req):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "c.toml"
    path.write_text('default_backend = "app"\n[hooks]\nmodule = "onlyroute"\n'
                    '[[routes]]\npath = "/h"\nbackend = "app"\nhook = "noop"\n'
                    '[[routes]]\npath = "/p"\nbackend = "app"\n[[routes]]\npath = "/d"\nbackend = "app"\n'
                    'deny = ["10.0.0.0/8"]\n[backends.app]\nservers = ["127.0.0.1:9"]\n')
    cfg = config.load(str(path), {})
    hooked, plain, denied, default = policy.build(cfg)
    assert (hooked.on_request.__name__, hooked.on_response, plain, default) == ("noop", None, None, None)
    assert denied.access is not None and denied.on_request is None
    (tmp_path / "onlyroute.py").write_text("def noop(req):\n    pass\ndef on_response(req, resp):\n    pass\n")
    cfg = config.load(str(path), {})  # a reload imports it again: now every route has a response hook
    assert all(rules is not None and rules.on_response is not None for rules in policy.build(cfg))


# -- examples/hooks.py, loaded as users would ----------------------------------------------------------

EXAMPLE_ROUTES = '''
[hooks]
module = "hooks"

[[routes]]
path = "/admin"
backend = "stable"
hook = "hooks:header_auth"

[[routes]]
backend = "stable"
hook = "hooks:canary"

[[routes]]
path = "/site"
backend = "stable"
'''


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_examples_header_auth_canary_and_maintenance(fastlb, backends, tmp_path, pems, scheme):
    stable, canary = backends("stable", "canary")
    flag = tmp_path / "maintenance"
    lb = serve(fastlb, tmp_path, pems, EXAMPLE_ROUTES, {"stable": [stable], "canary": [canary]},
               env={"LB_API_KEYS": "k1,k2", "LB_MAINTENANCE_FLAG": str(flag)})
    # 1. header auth: a wrong or missing key is refused; a good one passes, and is not forwarded.
    assert get(lb, scheme, "/admin/x").status == 401
    assert get(lb, scheme, "/admin/x", {"X-Api-Key": "nope"}).status == 401
    r = get(lb, scheme, "/admin/x", {"X-Api-Key": "k2"})
    assert (r.status, r.headers["X-Served-By"]) == (200, "stable")
    record = stable.records()[-1]
    assert (header(record, "X-Api-Key"), header(record, "X-Authenticated")) == (None, "api-key")
    # 2. canary by cookie
    r = get(lb, scheme, "/app", {"Cookie": "theme=dark; canary=1"})
    assert (r.status, r.headers["X-Served-By"]) == (200, "canary")
    assert header(canary.records()[-1], "X-Canary") == "1"
    assert get(lb, scheme, "/app", {"Cookie": "canary=0"}).headers["X-Served-By"] == "stable"
    # 3. maintenance page: on_request of the module, on the route without a hook of its own
    assert get(lb, scheme, "/site").status == 200
    flag.touch()
    r = get(lb, scheme, "/site")
    assert (r.status, r.headers["Retry-After"]) == (503, "120")
    assert b"Back in a few minutes" in r.body
    flag.unlink()
    assert get(lb, scheme, "/site").status == 200
