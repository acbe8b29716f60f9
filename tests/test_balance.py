"""Balancing algorithms: distributions, weights, being told of state changes, retries, Maglev
disruption, hash keys from the upstream head; then end to end.

Runs against whichever build fastlb.lb.backend chose: tox runs the file in both (default: the
compiled balance_c/backend_c; FASTLB_NO_EXTENSIONS=1: their source, balance_py/backend_py).
"""

import collections
import http.client
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastlb.config import Address, BackendSpec, ServerSpec
from fastlb.lb import backend as backend_module
from fastlb.lb import balance
from fastlb.lb.backend import DOWN, UP, Backend

NO_EXTENSIONS = os.environ.get("FASTLB_NO_EXTENSIONS") == "1"


def backend(weights, balance="roundrobin", hash_on="client_ip", **settings):
    servers = tuple(ServerSpec(Address("127.0.0.1", 9000 + i), w) for i, w in enumerate(weights))
    spec = BackendSpec(name="b", servers=servers, balance=balance, hash_on=hash_on, **settings)
    return Backend(spec, 0, bytearray([UP]) * len(servers))


def set_state(b, i, state, now=0.0):
    """What the control process and the worker's tick do: the shared byte, then Server.tick."""
    server = b.servers[i]
    server.states[server.gid] = state
    for s in b.servers:
        s.tick(now)


def names(picks):
    return [s.port - 9000 for s in picks]


def test_compiled_build_is_used_unless_disabled():
    """Fails if the extensions were expected (no FASTLB_NO_EXTENSIONS=1) and did not build."""
    if NO_EXTENSIONS:
        assert not balance.EXTENSION and not backend_module.EXTENSION
        assert balance.SmoothRoundRobin.__module__ == "fastlb.lb.balance_py"
        return
    # No try/except: a missing or broken extension must fail the run, not skip it.
    from fastlb.lb import backend_c, balance_c
    assert balance.EXTENSION and backend_module.EXTENSION
    assert balance_c.__file__.endswith(".so") and backend_c.__file__.endswith(".so")
    assert balance.MaglevHash is balance_c.MaglevHash and backend_module.Server is backend_c.Server


@pytest.mark.parametrize("first", ["fastlb.lb.balance", "fastlb.lb.backend"])
def test_either_module_imports_first(first):
    """balance_c needs backend_c's Server type and backend_c needs balance: no import-order trap."""
    code = f"import {first}, fastlb.lb.backend as b; b.build_backends"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_missing_extension_is_an_import_error_not_the_symlinked_source(tmp_path):
    """balance_c.py is a symlink to the source: without the .so Python would import it uncompiled."""
    package = Path(__file__).resolve().parent.parent / "fastlb"
    shutil.copytree(package, tmp_path / "fastlb", symlinks=True,
                    ignore=shutil.ignore_patterns("balance_c.*.so", "backend_c.*.so", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "FASTLB_NO_EXTENSIONS"}
    if NO_EXTENSIONS:  # no _core either: give the copy the twin, only the balancer chooser is tested
        env["FASTLB_NO_EXTENSIONS"] = "1"
        code = "import fastlb.lb.balance as b; assert not b.EXTENSION"
    else:
        code = ("import fastlb.lb.balance\n"
                "raise SystemExit('imported without the extension')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    if NO_EXTENSIONS:
        assert run.returncode == 0, run.stderr
    else:
        assert run.returncode == 1 and "ImportError: fastlb.lb.balance_c is not compiled" in run.stderr, run.stderr


def test_smooth_round_robin_is_nginx_sequence():
    b = backend([5, 1, 1])
    assert names(b.balancer.pick() for _ in range(7)) == [0, 0, 1, 0, 2, 0, 0]


@pytest.mark.parametrize("balance", ["roundrobin", "random", "p2c", "leastconn", "hash"])
def test_distribution_follows_weights(balance):
    random.seed(7)
    weights = [1, 2, 5, 0]
    b = backend(weights, balance)
    counts = collections.Counter()
    for i in range(10_000):
        server = b.balancer.pick((), b"client-%d" % i)
        counts[server.port - 9000] += 1
        if balance in ("leastconn", "p2c"):
            # in flight for a while: load is what these two balance on
            server.active += 1
            if random.random() < 0.9:
                server.active -= 1
    total = sum(weights)
    assert counts[3] == 0  # weight 0 never gets traffic
    for i, w in enumerate(weights[:3]):
        share = counts[i] / 10_000
        assert abs(share - w / total) < 0.03, (balance, i, counts)


def test_leastconn_prefers_the_idle_server_then_round_robins_ties():
    b = backend([1, 1, 1], "leastconn")
    s0, s1, s2 = b.servers
    s0.active, s1.active, s2.active = 3, 0, 0
    assert names(b.balancer.pick() for _ in range(4)) in ([1, 2, 1, 2], [2, 1, 2, 1])


def test_leastconn_compares_load_per_unit_of_weight():
    b = backend([1, 4], "leastconn")
    b.servers[0].active, b.servers[1].active = 1, 3  # 1/1 against 3/4
    assert all(b.balancer.pick() is b.servers[1] for _ in range(10))


def test_p2c_never_picks_the_more_loaded_of_two():
    b = backend([1, 1], "p2c")
    b.servers[0].active = 10
    assert all(b.balancer.pick() is b.servers[1] for _ in range(200))


@pytest.mark.parametrize("balance", ["roundrobin", "random", "p2c", "leastconn", "hash"])
def test_down_servers_and_retries_fall_through(balance):
    b = backend([1, 1, 1], balance)
    set_state(b, 1, DOWN)
    for i in range(300):
        key = b"k%d" % i
        first = b.balancer.pick((), key)
        assert first is not b.servers[1]
        second = b.balancer.pick((first,), key)
        assert second not in (first, b.servers[1]) and second is not None
        assert b.balancer.pick((first, second), key) is None


@pytest.mark.parametrize("balance", ["roundrobin", "random", "p2c", "leastconn", "hash"])
def test_the_balancer_is_told_of_state_changes_instead_of_reading_shared_memory(balance):
    """The shared byte is read on the worker's tick (Server.tick), not per pick (HAProxy lb_fwrr.c)."""
    b = backend([1, 1], balance)
    s0, s1 = b.servers
    keys = [b"k%d" % i for i in range(200)]
    s1.states[s1.gid] = DOWN  # the control process's verdict, not yet seen by this worker
    assert s1 in {b.balancer.pick((), k) for k in keys}
    assert s1.tick(0.25) is None
    assert s1.usable is False and b.balancer.usable == [s0]
    assert {b.balancer.pick((), k) for k in keys} == {s0}
    s1.states[s1.gid] = UP
    s1.tick(0.5)
    assert b.balancer.usable == [s0, s1]
    assert s1 in {b.balancer.pick((), k) for k in keys}
    set_state(b, 0, DOWN, 0.75)
    set_state(b, 1, DOWN, 0.75)
    assert b.balancer.usable == [] and b.balancer.pick((), b"k") is None and not b.saturated()


@pytest.mark.parametrize("balance", ["roundrobin", "random", "p2c", "leastconn", "hash"])
def test_passive_ejection_takes_the_server_out_at_once_and_the_tick_brings_it_back(balance):
    b = backend([1, 1], balance, max_fails=2, fail_timeout=1.0)
    s0, s1 = b.servers
    keys = [b"k%d" % i for i in range(200)]
    assert not s1.failed("connect", 10.0)
    assert s1.failed("connect", 10.0)  # the second one ejects: no tick needed to stop picking it
    assert {b.balancer.pick((), k) for k in keys} == {s0}
    s1.tick(10.5)
    assert {b.balancer.pick((), k) for k in keys} == {s0}
    assert s1.tick(11.0) == f"b/{s1.name} back from passive ejection"
    assert s1 in {b.balancer.pick((), k) for k in keys}


@pytest.mark.parametrize("balance", ["roundrobin", "random"])
def test_slow_start_weight_reaches_the_balancer(balance):
    random.seed(3)
    b = backend([100, 100], balance, slow_start=10.0)
    s0, s1 = b.servers
    set_state(b, 1, DOWN, 0.0)
    set_state(b, 1, UP, 1.0)       # back at t=1: ramps from weight 1
    s1.tick(6.0)                   # half way: weight 50
    assert s1.weight == 50
    counts = collections.Counter(names(b.balancer.pick() for _ in range(3000)))
    if balance == "roundrobin":
        assert counts == {0: 2000, 1: 1000}
    else:
        assert b.balancer.total == 150 and abs(counts[1] / 3000 - 1 / 3) < 0.03, counts
    s1.tick(11.0)
    assert s1.weight == 100
    counts = collections.Counter(names(b.balancer.pick() for _ in range(3000)))
    assert abs(counts[1] / 3000 - 1 / 2) < 0.03, counts


@pytest.mark.parametrize("balance", ["roundrobin", "random", "p2c", "leastconn", "hash"])
def test_a_server_at_its_cap_is_skipped_then_the_backend_is_saturated(balance):
    b = backend([1, 1], balance, max_connections=2)
    s0, s1 = b.servers
    s0.active = 2
    assert all(b.balancer.pick((), b"k%d" % i) is s1 for i in range(100))
    assert not b.saturated()
    s1.active = 2
    assert b.balancer.pick((), b"k") is None and b.saturated()
    s1.active -= 1  # what the data path does when a request ends
    assert b.balancer.pick((), b"k") is s1


def _mapping(b, keys):
    return [b.balancer.pick((), k) for k in keys]


def test_maglev_disruption_is_about_one_nth_and_restores():
    n = 7
    b = backend([1] * n, "hash")
    keys = [b"client-%d" % i for i in range(100_000)]
    before = _mapping(b, keys)
    table = b.balancer.table
    set_state(b, 3, DOWN)
    after = _mapping(b, keys)
    moved = sum(1 for x, y in zip(before, after, strict=True) if x is not y)
    owned = sum(1 for x in before if x is b.servers[3])
    assert moved <= 1.2 * len(keys) / n
    assert moved >= owned  # every key of the down server moved, and few others
    set_state(b, 3, UP)
    assert b.balancer.table is table  # built once per set of usable servers, then cached
    assert _mapping(b, keys) == before


def test_maglev_table_ignores_slow_start_and_is_not_rebuilt_per_pick():
    b = backend([1, 1, 1], "hash", slow_start=10.0)
    keys = [b"client-%d" % i for i in range(5000)]
    before = _mapping(b, keys)
    set_state(b, 1, DOWN, 0.0)
    set_state(b, 1, UP, 1.0)
    b.servers[1].tick(2.0)           # ramping: weight changes are told, the table stays
    table = b.balancer.table
    assert _mapping(b, keys) == before and b.balancer.table is table


def test_maglev_is_the_same_in_every_process():
    """Built from names and weights only: two independent Backends agree on every key."""
    keys = [b"k%d" % i for i in range(2000)]
    a, b = backend([1, 2, 1], "hash"), backend([1, 2, 1], "hash")
    assert [s.port for s in _mapping(a, keys)] == [s.port for s in _mapping(b, keys)]


HEAD = (b"GET /p?q=1 HTTP/1.1\r\nHost: a.example\r\nReferer: /?x-user: eve\r\nX-User-Id: bob\r\nx-USER:  alice \t\r\n"
        b"X-User: carol\r\nCookie: a=1; sidx=0\r\nCookie: b=2; sid=abc\r\nX-Empty:\r\n\r\n")


@pytest.mark.parametrize("hash_on,expect_key", [
    ("header:X-User", b"alice"),       # case-insensitive, first occurrence, trimmed; not X-User-Id
    ("header:x-user-id", b"bob"),
    ("header:Host", b"a.example"),
    ("header:X-Empty", b""),
    ("header:X-Missing", None),
    ("cookie:sid", b"abc"),            # in the second Cookie field; sidx is another cookie
    ("cookie:a", b"1"),
    ("cookie:nope", None),
    ("uri", b"/p?q=1"),
    ("client_ip", b"10.0.0.1"),
])
def test_hash_keys_from_the_upstream_head(hash_on, expect_key):
    b = backend([1, 1], "hash", hash_on)
    assert b.hash_key(HEAD, b"10.0.0.1", b"/p?q=1") == expect_key


def test_missing_hash_key_falls_back_to_round_robin():
    b = backend([1, 1], "hash", "header:x-user")
    assert names(b.balancer.pick((), None) for _ in range(4)) in ([0, 1, 0, 1], [1, 0, 1, 0])


def _config(tmp_path, servers, balance, extra=""):
    listed = ", ".join(f'{{ address = "{s.address}", weight = {w} }}' for s, w in servers)
    cfg = tmp_path / f"{balance}.toml"
    cfg.write_text(f'[[routes]]\nbackend = "b"\n[backends.b]\nservers = [{listed}]\n'
                   f'balance = "{balance}"\n{extra}')
    return cfg


@pytest.mark.parametrize("balance", ["roundrobin", "random", "p2c", "leastconn"])
def test_algorithms_through_the_server(backends, fastlb, tmp_path, balance):
    b1, b2 = backends("b1", "b2")
    lb = fastlb({"FASTLB_WORKERS": "1"}, args=["--config", str(_config(tmp_path, [(b1, 3), (b2, 1)], balance))])
    conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
    seen = collections.Counter()
    for _ in range(400):
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        seen[resp.getheader("X-Backend")] += 1
    if balance == "leastconn":  # sequential requests: no load, so ties -> weighted round robin
        assert seen == {"b1": 300, "b2": 100}
    else:
        assert 240 <= seen["b1"] <= 360, seen
    assert len(b1.records()) == seen["b1"]


def test_hash_is_sticky_across_workers_and_instances(backends, fastlb, tmp_path):
    servers = backends("b1", "b2", "b3")
    cfg = _config(tmp_path, [(s, 1) for s in servers], "hash", 'hash_on = "header:X-User"\n')
    lbs = [fastlb({"FASTLB_WORKERS": "2"}, args=["--config", str(cfg)]) for _ in range(2)]
    chosen = {}
    for user in [f"user-{i}" for i in range(30)]:
        for lb in lbs:
            for _ in range(2):  # new connections: spread over both workers of each instance
                conn = http.client.HTTPConnection("127.0.0.1", lb.port, timeout=10)
                conn.request("GET", "/", headers={"X-User": user})
                resp = conn.getresponse()
                resp.read()
                conn.close()
                assert chosen.setdefault(user, resp.getheader("X-Backend")) == resp.getheader("X-Backend")
    assert len(set(chosen.values())) == 3
