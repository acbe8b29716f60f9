"""The config contract: schema, sources and their precedence, and one-line errors that say where."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastlb import config as cfg
from fastlb.config import (
    DEFAULT_CIPHERS,
    ENV_KEYS,
    Address,
    AdminSpec,
    BackendSpec,
    CertSpec,
    Config,
    ConfigError,
    HealthSpec,
    LimitsSpec,
    ListenerSpec,
    LogSpec,
    RouteSpec,
    ServerSection,
    ServerSpec,
    TlsSpec,
    load,
    parse_address,
)
from fastlb.units import format_duration, format_size, parse_duration, parse_size

# The example from DESIGN.md "Config contract", with the real cipher list in place of its placeholder.
DESIGN_EXAMPLE = f"""
[server]
workers = 0                      # FASTLB_WORKERS; 0 = one per core
graceful_timeout = "30s"         # FASTLB_GRACEFUL_TIMEOUT

[[listeners]]
address = "0.0.0.0:8443"         # FASTLB_TLS_LISTEN sets the first TLS listener
tls = true
[[listeners]]
address = "0.0.0.0:8080"         # FASTLB_LISTEN sets the first plain listener
redirect_to_https = false

[tls]
min_version = "1.2"              # FASTLB_TLS_MIN_VERSION
ciphers = "{DEFAULT_CIPHERS}"
[[tls.certificates]]             # chosen by SNI from each certificate's SAN; the first is the default
cert = "site.pem"                # FASTLB_TLS_CERT
key = "site.key"                 # FASTLB_TLS_KEY

[admin]
address = "127.0.0.1:9900"       # FASTLB_ADMIN_LISTEN

[[routes]]
host = "app.example.com"         # exact, "*.example.com" (one label), or absent = any host
path = "/api"                    # absent = "/"
match = "prefix"                 # prefix (whole segments, as Kubernetes Ingress) | exact
backend = "api"

[backends.api]
servers = ["127.0.0.1:9101", {{ address = "127.0.0.1:9102", weight = 2 }}]
balance = "roundrobin"           # roundrobin | leastconn | p2c | hash | random
hash_on = "client_ip"            # client_ip | uri | header:NAME | cookie:NAME
[backends.api.health]
path = "/health"
interval = "2s"
timeout = "1s"
rise = 2
fall = 3
"""

# A small valid file the error cases below extend or break.
BASE = """
[[routes]]
backend = "api"

[backends.api]
servers = ["127.0.0.1:9101", "127.0.0.1:9102"]
"""


@pytest.fixture
def confdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with dummy certificate files (only readability is checked at load)."""
    (tmp_path / "site.pem").write_text("dummy certificate\n")
    (tmp_path / "site.key").write_text("dummy key\n")
    (tmp_path / "other.pem").write_text("dummy certificate\n")
    (tmp_path / "other.key").write_text("dummy key\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(directory: Path, text: str, name: str = "fastlb.toml") -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_error(path: str | None, env: dict[str, str] | None = None, cli: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path, env or {}, cli)
    error = info.value
    text = str(error)
    assert "\n" not in text and "\r" not in text
    assert text == f"{error.source}: {error.key}: {error.reason}"
    return error


# ------------------------------------------------------------------------------------------------------
# The full example


def test_design_example(confdir: Path) -> None:
    path = write(confdir, DESIGN_EXAMPLE)
    config = load(path, {})

    assert config.source == path
    assert config.server == ServerSection(workers=0, graceful_timeout=30.0)
    assert config.listeners == (
        ListenerSpec(Address("0.0.0.0", 8443), tls=True),
        ListenerSpec(Address("0.0.0.0", 8080), tls=False, redirect_to_https=False),
    )
    assert config.tls == TlsSpec(
        min_version="1.2",
        ciphers=DEFAULT_CIPHERS,
        handshake_timeout=10.0,
        certificates=(CertSpec(str(confdir / "site.pem"), str(confdir / "site.key")),),
    )
    assert config.admin == AdminSpec(Address("127.0.0.1", 9900))
    assert config.routes == (RouteSpec(host="app.example.com", path="/api", match="prefix", backend="api"),)
    assert config.backends == {
        "api": BackendSpec(
            name="api",
            servers=(ServerSpec(Address("127.0.0.1", 9101), 1), ServerSpec(Address("127.0.0.1", 9102), 2)),
            balance="roundrobin",
            hash_on="client_ip",
            health=HealthSpec(path="/health", interval=2.0, timeout=1.0, rise=2, fall=3),
        )
    }
    assert config.limits == LimitsSpec()
    assert config.log == LogSpec()
    assert config.default_backend is None
    assert config.services == {}


def test_everything_else_in_a_file(confdir: Path) -> None:
    path = write(
        confdir,
        """
        default_backend = "api"

        [server]
        workers = 4
        graceful_timeout = "1m30s"
        pid_file = "run/fastlb.pid"
        user = "nobody"
        group = "nogroup"
        trusted_proxies = ["10.0.0.1/8", "::1"]
        heartbeat_timeout = 5

        [[listeners]]
        address = "[::]:8443"
        tls = true
        [[listeners]]
        address = ":8080"
        redirect_to_https = true

        [tls]
        min_version = 1.3
        handshake_timeout = "2.5s"
        [[tls.certificates]]
        cert = "site.pem"
        key = "site.key"
        [[tls.certificates]]
        cert = "./other.pem"
        key = "other.key"

        [admin]
        address = ""

        [limits]
        max_request_line = "4KiB"
        max_header_bytes = "32KiB"
        max_headers = 50
        max_body_bytes = "10MB"
        header_timeout = "5s"
        body_timeout = "30s"
        send_timeout = "15s"
        idle_timeout = "75s"
        max_connections = 10000

        [log]
        access = "logs/access.log"
        format = "json"
        level = "debug"

        [[routes]]
        host = "*.Example.COM"
        path = "/static/"
        match = "exact"
        backend = "api"
        [[routes]]
        backend = "api"

        [backends.api]
        servers = [{ address = "backend-1.internal:80", weight = 0 }, "[2001:db8::1]:80"]
        balance = "hash"
        hash_on = "header:X-User"
        connect_timeout = "250ms"
        response_timeout = "2m"
        idle_timeout = "90s"
        retries = 0
        max_connections = 64
        max_fails = 5
        fail_timeout = "30s"
        slow_start = "1m"
        [backends.api.health]
        type = "tcp"
        expect = "200"
        host = "health.internal"

        [services]
        demo = ["127.0.0.1:9001", "127.0.0.1:9002"]
        """,
    )
    config = load(path, {})
    assert config.default_backend == "api"
    assert config.server == ServerSection(
        workers=4,
        graceful_timeout=90.0,
        pid_file=str(confdir / "run" / "fastlb.pid"),
        user="nobody",
        group="nogroup",
        trusted_proxies=("10.0.0.0/8", "::1/128"),
        heartbeat_timeout=5.0,
    )
    assert config.listeners == (
        ListenerSpec(Address("::", 8443), tls=True),
        ListenerSpec(Address("0.0.0.0", 8080), redirect_to_https=True),
    )
    assert config.tls.min_version == "1.3"
    assert config.tls.handshake_timeout == 2.5
    assert config.tls.certificates == (
        CertSpec(str(confdir / "site.pem"), str(confdir / "site.key")),
        CertSpec(str(confdir / "other.pem"), str(confdir / "other.key")),
    )
    assert config.admin.address is None
    assert config.limits == LimitsSpec(
        max_request_line=4096,
        max_header_bytes=32768,
        max_headers=50,
        max_body_bytes=10_000_000,
        header_timeout=5.0,
        body_timeout=30.0,
        send_timeout=15.0,
        idle_timeout=75.0,
        max_connections=10000,
    )
    assert config.log == LogSpec(access=str(confdir / "logs" / "access.log"), format="json", level="debug")
    assert config.routes == (
        RouteSpec(host="*.example.com", path="/static/", match="exact", backend="api"),
        RouteSpec(host=None, path="/", match="prefix", backend="api"),
    )
    api = config.backends["api"]
    assert api.servers == (ServerSpec(Address("backend-1.internal", 80), 0), ServerSpec(Address("2001:db8::1", 80), 1))
    assert (api.balance, api.hash_on) == ("hash", "header:x-user")
    assert (api.connect_timeout, api.response_timeout, api.idle_timeout) == (0.25, 120.0, 90.0)
    assert (api.retries, api.max_connections, api.max_fails, api.fail_timeout, api.slow_start) == (0, 64, 5, 30.0, 60.0)
    assert api.health == HealthSpec(type="tcp", expect=(200, 200), host="health.internal")
    assert config.services == {"demo": (Address("127.0.0.1", 9001), Address("127.0.0.1", 9002))}


def test_defaults_without_any_source(confdir: Path) -> None:
    config = load(None, {})
    assert config == Config()
    assert config.source is None
    assert config.listeners == (ListenerSpec(Address("0.0.0.0", 8080)),)
    assert config.admin.address == Address("127.0.0.1", 9900)
    assert config.backends == {} and config.routes == ()  # valid: every request gets a 503
    assert config.tls.ciphers == DEFAULT_CIPHERS


def test_results_are_frozen(confdir: Path) -> None:
    config = load(write(confdir, DESIGN_EXAMPLE), {})
    for obj in (config, config.server, config.listeners[0], config.listeners[0].address, config.tls,
                config.tls.certificates[0], config.routes[0], config.backends["api"], config.backends["api"].health,
                config.backends["api"].servers[0], config.admin, config.limits, config.log):
        assert dataclasses.is_dataclass(obj)
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.__setattr__(dataclasses.fields(obj)[0].name, None)
        assert not hasattr(obj, "__dict__")  # slots


def test_workers_effective() -> None:
    assert Config(server=ServerSection(workers=3)).workers_effective() == 3
    assert Config().workers_effective() == len(os.sched_getaffinity(0))


def test_relative_paths_follow_the_config_file_not_the_working_directory(confdir: Path, tmp_path_factory) -> None:
    path = write(confdir, BASE + '[[tls.certificates]]\ncert = "site.pem"\nkey = "site.key"\n')
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert load(path, {}).tls.certificates == (CertSpec(str(confdir / "site.pem"), str(confdir / "site.key")),)


def test_certificate_from_the_environment_is_relative_to_the_working_directory(confdir: Path) -> None:
    config = load(None, {"FASTLB_TLS_LISTEN": ":8443", "FASTLB_TLS_CERT": "site.pem", "FASTLB_TLS_KEY": "site.key"})
    assert config.listeners == (ListenerSpec(Address("0.0.0.0", 8443), tls=True),)
    assert config.tls.certificates == (CertSpec(str(confdir / "site.pem"), str(confdir / "site.key")),)


def test_environment_replaces_the_first_certificate_only(confdir: Path) -> None:
    path = write(
        confdir,
        BASE + '[[tls.certificates]]\ncert = "site.pem"\nkey = "site.key"\n'
        '[[tls.certificates]]\ncert = "site.pem"\nkey = "site.key"\n',
    )
    config = load(path, {"FASTLB_TLS_CERT": str(confdir / "other.pem")})
    assert config.tls.certificates == (
        CertSpec(str(confdir / "other.pem"), str(confdir / "site.key")),
        CertSpec(str(confdir / "site.pem"), str(confdir / "site.key")),
    )


# ------------------------------------------------------------------------------------------------------
# Precedence: command line > environment > file > default

WORKERS_FILE = BASE + "[server]\nworkers = 4\n"
LISTEN_FILE = BASE + '[[listeners]]\naddress = "127.0.0.1:7000"\n'
BACKENDS_FILE = """
[backends.default]
servers = ["127.0.0.1:7001"]
"""


@pytest.mark.parametrize(
    ("file", "env", "cli", "get", "expected"),
    [
        # workers
        (None, {}, {}, lambda c: c.server.workers, 0),
        (WORKERS_FILE, {}, {}, lambda c: c.server.workers, 4),
        (WORKERS_FILE, {"FASTLB_WORKERS": "3"}, {}, lambda c: c.server.workers, 3),
        (WORKERS_FILE, {"FASTLB_SERVER_WORKERS": "3"}, {}, lambda c: c.server.workers, 3),
        (WORKERS_FILE, {"FASTLB_WORKERS": "3"}, {"FASTLB_WORKERS": "2"}, lambda c: c.server.workers, 2),
        (None, {"FASTLB_WORKERS": "3"}, {"FASTLB_SERVER_WORKERS": "2"}, lambda c: c.server.workers, 2),
        (None, {}, {"FASTLB_WORKERS": 2}, lambda c: c.server.workers, 2),  # a flag already parsed to int
        # the plain listener
        (None, {}, {}, lambda c: c.listeners, (ListenerSpec(Address("0.0.0.0", 8080)),)),
        (LISTEN_FILE, {}, {}, lambda c: c.listeners, (ListenerSpec(Address("127.0.0.1", 7000)),)),
        (LISTEN_FILE, {"FASTLB_LISTEN": ":7100"}, {}, lambda c: c.listeners, (ListenerSpec(Address("0.0.0.0", 7100)),)),
        (None, {"FASTLB_LISTEN": ":7100"}, {}, lambda c: c.listeners, (ListenerSpec(Address("0.0.0.0", 7100)),)),
        (LISTEN_FILE, {"FASTLB_LISTEN": ":7100"}, {"FASTLB_LISTEN": "[::1]:7200"}, lambda c: c.listeners,
         (ListenerSpec(Address("::1", 7200)),)),
        # backends
        (None, {}, {}, lambda c: c.backends, {}),
        (BACKENDS_FILE, {}, {}, lambda c: c.backends["default"].servers, (ServerSpec(Address("127.0.0.1", 7001)),)),
        (BACKENDS_FILE, {"FASTLB_BACKENDS": "127.0.0.1:7101,127.0.0.1:7102"}, {},
         lambda c: c.backends["default"].servers,
         (ServerSpec(Address("127.0.0.1", 7101)), ServerSpec(Address("127.0.0.1", 7102)))),
        (BACKENDS_FILE, {"FASTLB_BACKENDS": "127.0.0.1:7101"}, {"FASTLB_BACKENDS": "127.0.0.1:7201"},
         lambda c: c.backends["default"].servers, (ServerSpec(Address("127.0.0.1", 7201)),)),
        # balance
        (BACKENDS_FILE, {}, {}, lambda c: c.backends["default"].balance, "roundrobin"),
        (BACKENDS_FILE + 'balance = "random"', {}, {}, lambda c: c.backends["default"].balance, "random"),
        (BACKENDS_FILE + 'balance = "random"', {"FASTLB_BALANCE": "p2c"}, {}, lambda c: c.backends["default"].balance, "p2c"),
        (BACKENDS_FILE, {"FASTLB_BALANCE": "p2c"}, {"FASTLB_BALANCE": "hash"}, lambda c: c.backends["default"].balance, "hash"),
        (None, {"FASTLB_BALANCE": "leastconn"}, {"FASTLB_BACKENDS": "127.0.0.1:7201"},
         lambda c: c.backends["default"].balance, "leastconn"),
        # other sections, generic names
        (BASE + '[limits]\nmax_header_bytes = "8KiB"\n', {"FASTLB_LIMITS_MAX_HEADER_BYTES": "32KiB"}, {},
         lambda c: c.limits.max_header_bytes, 32768),
        (BASE + '[server]\ngraceful_timeout = "5s"\n', {"FASTLB_GRACEFUL_TIMEOUT": "250ms"}, {},
         lambda c: c.server.graceful_timeout, 0.25),
        (None, {"FASTLB_ADMIN_LISTEN": ""}, {}, lambda c: c.admin.address, None),
        (None, {"FASTLB_ADMIN_ADDRESS": "[::1]:9901"}, {}, lambda c: c.admin.address, Address("::1", 9901)),
        (None, {"FASTLB_LOG_ACCESS": "stdout", "FASTLB_LOG_FORMAT": "json"}, {}, lambda c: (c.log.access, c.log.format),
         ("stdout", "json")),
        (None, {"FASTLB_SERVER_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.7"}, {}, lambda c: c.server.trusted_proxies,
         ("10.0.0.0/8", "192.168.1.7/32")),
        (None, {"FASTLB_SERVER_TRUSTED_PROXIES": ""}, {}, lambda c: c.server.trusted_proxies, ()),
        (None, {"FASTLB_TLS_MIN_VERSION": "1.3"}, {}, lambda c: c.tls.min_version, "1.3"),
        (None, {"FASTLB_LIMITS_HEADER_TIMEOUT": "3"}, {}, lambda c: c.limits.header_timeout, 3.0),
    ],
)
def test_precedence(confdir: Path, file, env, cli, get, expected) -> None:
    path = write(confdir, file) if file is not None else None
    assert get(load(path, env, cli)) == expected


def test_listen_variables_pick_the_first_listener_of_their_kind(confdir: Path) -> None:
    path = write(
        confdir,
        """
        [[listeners]]
        address = ":1443"
        tls = true
        [[listeners]]
        address = ":1080"
        [[listeners]]
        address = ":1081"
        [[tls.certificates]]
        cert = "site.pem"
        key = "site.key"
        """,
    )
    config = load(path, {"FASTLB_LISTEN": ":2080", "FASTLB_TLS_LISTEN": ":2443"})
    assert [(str(lis.address), lis.tls) for lis in config.listeners] == [
        ("0.0.0.0:2443", True), ("0.0.0.0:2080", False), ("0.0.0.0:1081", False)
    ]
    # no plain listener in the file: FASTLB_LISTEN adds one (and there is no default one besides)
    path = write(confdir, '[[listeners]]\naddress = ":1443"\ntls = true\n[[tls.certificates]]\ncert = "site.pem"\nkey = "site.key"\n')
    config = load(path, {"FASTLB_LISTEN": ":2080"})
    assert [(str(lis.address), lis.tls) for lis in config.listeners] == [("0.0.0.0:1443", True), ("0.0.0.0:2080", False)]


def test_backends_variable_adds_a_catch_all_route_only_without_routes(confdir: Path) -> None:
    config = load(None, {"FASTLB_BACKENDS": " 127.0.0.1:9101 , 127.0.0.1:9102"})
    assert config.routes == (RouteSpec(host=None, path="/", match="prefix", backend="default"),)
    assert config.backends["default"].servers == (
        ServerSpec(Address("127.0.0.1", 9101), 1),
        ServerSpec(Address("127.0.0.1", 9102), 1),
    )
    config = load(write(confdir, BASE), {"FASTLB_BACKENDS": "127.0.0.1:9201"})
    assert config.routes == (RouteSpec(backend="api"),)
    assert set(config.backends) == {"api", "default"}


def test_config_file_named_by_variable_or_flag(confdir: Path) -> None:
    env_file = write(confdir, BASE + "[server]\nworkers = 5\n", "env.toml")
    cli_file = write(confdir, BASE + "[server]\nworkers = 6\n", "cli.toml")
    arg_file = write(confdir, BASE + "[server]\nworkers = 7\n", "arg.toml")
    assert load(None, {"FASTLB_CONFIG": env_file}).server.workers == 5
    assert load(None, {"FASTLB_CONFIG": env_file}, {"FASTLB_CONFIG": cli_file}).server.workers == 6
    assert load(arg_file, {"FASTLB_CONFIG": env_file}, {"FASTLB_CONFIG": cli_file}).server.workers == 7
    assert load(None, {"FASTLB_CONFIG": env_file}).source == env_file


def test_ignored_variables(confdir: Path) -> None:
    env = {"FASTLB_NO_EXTENSIONS": "1", "FASTLB_TEST_SERVER": "x", "FASTLB_DEMO_PORT": "9", "PATH": "/bin", "fastlb_x": "1"}
    assert load(None, env) == Config()


@pytest.mark.parametrize(("text", "expected"), [(t, True) for t in ("1", "true", "TRUE", "yes", "on", " On ")]
                         + [(t, False) for t in ("0", "false", "no", "off", "Off")])
def test_boolean_text(text: str, expected: bool) -> None:
    assert cfg._Bool().text(text) is expected


# ------------------------------------------------------------------------------------------------------
# Errors: one line, "<source>: <key>: <reason>"

TLS_CERT = '[[tls.certificates]]\ncert = "site.pem"\nkey = "site.key"\n'
FILE_ERRORS = [
    # unknown keys, at every depth
    ("[server]\nwrokers = 2\n", "server.wrokers", "unknown key (did you mean 'workers'?)"),
    ("colour = 1\n", "colour", "unknown key"),
    ('[backends.api.health]\npaht = "/"\n', "backends.api.health.paht", "unknown key (did you mean 'path'?)"),
    # a key of a sub-table written in its parent: the natural guesses for TLS and workers
    ('[tls]\ncert = "site.pem"\n', "tls.cert", "unknown key (did you mean [[tls.certificates]] cert?)"),
    ("workers = 2\n", "workers", "unknown key (did you mean [server] workers?)"),
    ('[backends.web]\nservers = ["127.0.0.1:1"]\npath = "/health"\n', "backends.web.path",
     "unknown key (did you mean [backends.web.health] path?)"),
    ('[[listeners]]\naddress = ":1"\nssl = true\n', "listeners[0].ssl", "unknown key"),
    ('[[routes]]\nbackend = "api"\nprefix = "/"\n', "routes[1].prefix", "unknown key (did you mean 'rewrite_prefix'?)"),
    ('[backends.web]\nservers = [{ address = "127.0.0.1:1", wieght = 2 }]\n', "backends.web.servers[0].wieght",
     "unknown key (did you mean 'weight'?)"),
    # wrong types
    ('[server]\nworkers = "2"\n', "server.workers", "expected an integer, got string"),
    ("[server]\nworkers = 2.0\n", "server.workers", "expected an integer, got float"),
    ("[server]\nworkers = true\n", "server.workers", "expected an integer, got boolean"),
    ('[[listeners]]\naddress = ":1"\ntls = "yes"\n', "listeners[0].tls", "expected a boolean, got string"),
    ("[log]\nlevel = 3\n", "log.level", "expected a string, got integer"),
    ("server = 3\n", "server", "expected a table, got integer"),
    ("[[server]]\nworkers = 1\n", "server", "expected a table, got list"),
    ("[listeners]\naddress = ':1'\n", "listeners", "expected a list, got table"),
    ('[backends.web]\nservers = "127.0.0.1:1"\n', "backends.web.servers", "expected a list, got string"),
    ("[backends.web]\nservers = [9101]\n", "backends.web.servers[0]", "expected a string or table, got integer"),
    ('[server]\ntrusted_proxies = "10.0.0.0/8"\n', "server.trusted_proxies", "expected a list, got string"),
    ("[server]\ngraceful_timeout = 2000-01-01\n", "server.graceful_timeout",
     'expected a duration such as "10s", got date/time'),
    # value checks
    ("[server]\nworkers = -1\n", "server.workers", "must be between 0 and 1024, got -1"),
    ('[server]\ngraceful_timeout = "-5s"\n', "server.graceful_timeout", "invalid duration '-5s': must not be negative"),
    ("[server]\ngraceful_timeout = -5\n", "server.graceful_timeout", "invalid duration -5: must not be negative"),
    ('[server]\ngraceful_timeout = "soon"\n', "server.graceful_timeout",
     """invalid duration 'soon': expected a number of seconds or a number with a unit ms, s, m or h (e.g. "250ms", "10s")"""),
    ('[server]\ntrusted_proxies = ["10.0.0.0/8", "nope"]\n', "server.trusted_proxies[1]",
     "invalid CIDR 'nope': 'nope' does not appear to be an IPv4 or IPv6 network"),
    ('[limits]\nmax_header_bytes = "16k"\n', "limits.max_header_bytes",
     """invalid size '16k': expected a number of bytes or a number with a unit B, KiB, MiB, GiB, KB, MB or GB (e.g. "16KiB")"""),
    ("[limits]\nmax_header_bytes = 0\n", "limits.max_header_bytes", "must be at least 1 bytes, got 0"),
    ('[tls]\nmin_version = "1.1"\n', "tls.min_version", """must be "1.2" or "1.3", got '1.1'"""),
    ('[tls]\nciphers = "NOPE-NOPE"\n', "tls.ciphers", "OpenSSL accepts no cipher in 'NOPE-NOPE'"),
    ('[log]\nformat = "xml"\n', "log.format", "must be one of text, json; got 'xml'"),
    ('[backends.web]\nservers = ["127.0.0.1:1"]\nbalance = "fastest"\n', "backends.web.balance",
     "must be one of roundrobin, leastconn, p2c, hash, random; got 'fastest'"),
    ('[backends.web]\nservers = ["127.0.0.1:1"]\nhash_on = "header:"\n', "backends.web.hash_on",
     "must be client_ip, uri, header:NAME or cookie:NAME; got 'header:'"),
    ('[backends.web]\nservers = [{ address = "127.0.0.1:1", weight = 257 }]\n', "backends.web.servers[0].weight",
     "must be between 0 and 256, got 257"),
    ('[backends.api.health]\ninterval = "0s"\n', "backends.api.health.interval", "must be greater than zero"),
    ('[backends.api.health]\nexpect = "399-200"\n', "backends.api.health.expect",
     "invalid status range '399-200': statuses are 100-599, lowest first"),
    ('[backends.api.health]\npath = "health"\n', "backends.api.health.path", "must start with '/', got 'health'"),
    # addresses
    ('[[listeners]]\naddress = "0.0.0.0"\n', "listeners[0].address", "invalid address '0.0.0.0': missing port (expected host:port)"),
    ('[[listeners]]\naddress = ":8080"\n[[listeners]]\naddress = ":0"\n', "listeners[1].address",
     "invalid address ':0': port must be between 1 and 65535"),
    ('[[listeners]]\naddress = ":1"\n[[listeners]]\naddress = ":2"\n[[listeners]]\naddress = "::1:8080"\n',
     "listeners[2].address", "invalid address '::1:8080': an IPv6 address needs brackets, as in [::1]:8080"),
    ('[backends.web]\nservers = ["127.0.0.1:1", "10.0.0.300:80"]\n', "backends.web.servers[1].address",
     "invalid address '10.0.0.300:80': '10.0.0.300' is not an IPv4 address"),
    ('[backends.web]\nservers = ["127.0.0.1:1", { address = "host:http" }]\n', "backends.web.servers[1].address",
     "invalid address 'host:http': port 'http' is not a number"),
    ('[admin]\naddress = "[::1:9900"\n', "admin.address", "invalid address '[::1:9900': missing ']' after the IPv6 address"),
    ('[services]\ndemo = ["127.0.0.1:1", "x y:2"]\n', "services.demo[1]", "invalid address 'x y:2': 'x y' is not a valid host name"),
    # required keys and empty lists
    ("[[listeners]]\ntls = false\n", "listeners[0].address", "missing required key"),
    ('[[routes]]\npath = "/x"\n', "routes[1].backend", "missing required key"),
    ("[backends.web]\nbalance = \"random\"\n", "backends.web.servers", "missing required key"),
    ("[backends.web]\nservers = []\n", "backends.web.servers", "at least one server is required"),
    ('[[tls.certificates]]\ncert = "site.pem"\n', "tls.certificates[0].key", "missing required key"),
    # routes
    ('[[routes]]\nbackend = "web"\n', "routes[1].backend", "backend 'web' is not defined"),
    ('default_backend = "web"\n', "default_backend", "backend 'web' is not defined"),
    ('[[routes]]\nbackend = "api"\n', "routes[1]", "duplicate route: same host, path and match as routes[0]"),
    ('[[routes]]\nhost = "a.example.com:8080"\nbackend = "api"\n', "routes[1].host",
     "'a.example.com:8080': a port is not allowed in host"),
    ('[[routes]]\nhost = "a.*.example.com"\nbackend = "api"\n', "routes[1].host",
     "'a.*.example.com': '*' is only allowed as the whole first label, as in *.example.com"),
    ('[[routes]]\nhost = "*example.com"\nbackend = "api"\n', "routes[1].host",
     "'*example.com': '*' is only allowed as the whole first label, as in *.example.com"),
    ('[[routes]]\npath = "/x?y=1"\nbackend = "api"\n', "routes[1].path",
     "'/x?y=1' is not a plain URL path (no query, fragment, spaces or control characters)"),
    ('[[routes]]\nmatch = "regex"\nbackend = "api"\n', "routes[1].match", "must be one of prefix, exact; got 'regex'"),
    # backends
    ('[backends."my api"]\nservers = ["127.0.0.1:1"]\n', "backends.my api", "invalid name: use letters, digits, '_' and '-'"),
    ('[backends.web]\nservers = ["127.0.0.1:1", { address = "127.0.0.1:1", weight = 2 }]\n',
     "backends.web.servers[1].address", "duplicate server 127.0.0.1:1 (also servers[0])"),
    # listeners, TLS
    ('[[listeners]]\naddress = ":8443"\ntls = true\n', "tls.certificates",
     "TLS listener needs at least one certificate ([[tls.certificates]] or an Ingress tls: section)"),
    ('[[listeners]]\naddress = ":8443"\ntls = true\nredirect_to_https = true\n' + TLS_CERT,
     "listeners[0].redirect_to_https", "a TLS listener cannot redirect to https"),
    ('[[listeners]]\naddress = ":8080"\n[[listeners]]\naddress = "0.0.0.0:8080"\n', "listeners[1].address",
     "duplicate listener 0.0.0.0:8080 (also listeners[0])"),
    ('[admin]\naddress = "0.0.0.0:8080"\n', "admin.address", "0.0.0.0:8080 is already the address of listeners[0]"),
    ('[[tls.certificates]]\ncert = "missing.pem"\nkey = "site.key"\n', "tls.certificates[0].cert",
     "cannot read certificate: [Errno 2] No such file or directory: '{dir}/missing.pem'"),
    ('[[tls.certificates]]\ncert = "site.pem"\nkey = "."\n', "tls.certificates[0].key",
     "cannot read certificate: [Errno 21] Is a directory: '{dir}'"),
    # the TLS front door: client certificates, strict SNI, PROXY protocol, SNI passthrough
    ('[tls.client_auth]\nmode = "optional"\n', "tls.client_auth.ca", "missing required key"),
    ('[tls.client_auth]\nca = "site.pem"\nmode = "always"\n', "tls.client_auth.mode",
     "must be one of require, optional; got 'always'"),
    ('[tls.client_auth]\nca = "site.pem"\ncrl = "missing.pem"\n', "tls.client_auth.crl",
     "cannot read CRL: [Errno 2] No such file or directory: '{dir}/missing.pem'"),
    ('[tls.client_auth]\nca = "site.pem"\nverify = true\n', "tls.client_auth.verify", "unknown key"),
    ('[tls]\nstrict_sni = "yes"\n', "tls.strict_sni", "expected a boolean, got string"),
    ('[[routes]]\npath = "/admin"\nbackend = "api"\nrequire_client_cert = true\n', "routes[1].require_client_cert",
     "needs [tls.client_auth]"),
    ('[[listeners]]\naddress = ":8080"\nproxy_protocol = true\n', "listeners[0].proxy_protocol",
     "needs server.trusted_proxies: PROXY headers are accepted only from those peers"),
    ('[[listeners]]\naddress = ":8080"\n[[listeners.passthrough]]\nsni = "db.example"\nbackend = "api"\n',
     "listeners[0].passthrough", "SNI passthrough needs tls = true: SNI is in a TLS ClientHello"),
    ('[[listeners]]\naddress = ":8443"\ntls = true\n[[listeners.passthrough]]\nsni = "db.example"\nbackend = "db"\n'
     + TLS_CERT, "listeners[0].passthrough[0].backend", "backend 'db' is not defined"),
    ('[[listeners]]\naddress = ":8443"\ntls = true\n[[listeners.passthrough]]\nsni = "DB.example"\nbackend = "api"\n'
     '[[listeners.passthrough]]\nsni = "db.example"\nbackend = "api"\n' + TLS_CERT,
     "listeners[0].passthrough[1].sni", "duplicate sni 'db.example' (also passthrough[0])"),
    ('[[listeners]]\naddress = ":8443"\ntls = true\n[[listeners.passthrough]]\nbackend = "api"\n',
     "listeners[0].passthrough[0].sni", "missing required key"),
    ('[[listeners]]\naddress = ":8443"\ntls = true\n[[listeners.passthrough]]\nsni = "10.0.0.1"\nbackend = "api"\n',
     "listeners[0].passthrough[0].sni", "'10.0.0.1': an IP address is never sent as SNI"),
    ('[[listeners]]\naddress = ":8443"\ntls = true\n[[listeners.passthrough]]\nsni = "a.*.example"\nbackend = "api"\n',
     "listeners[0].passthrough[0].sni", "'a.*.example': '*' is only allowed as the whole first label, as in *.example.com"),
    ('[[listeners]]\naddress = ":8443"\ntls = true\n[[listeners.passthrough]]\nsni = "db.example:443"\nbackend = "api"\n',
     "listeners[0].passthrough[0].sni", "'db.example:443' is not a valid host name"),
    ('[backends.web]\nservers = ["127.0.0.1:1"]\nsend_proxy = "v3"\n', "backends.web.send_proxy",
     'must be "", "v1" or "v2"; got \'v3\''),
    ('[backends.web]\nservers = ["127.0.0.1:1"]\nsend_proxy = 2\n', "backends.web.send_proxy",
     "expected a string, got integer"),
]


@pytest.mark.parametrize(("extra", "key", "reason"), FILE_ERRORS, ids=[case[1] + ":" + case[2][:30] for case in FILE_ERRORS])
def test_file_errors(confdir: Path, extra: str, key: str, reason: str) -> None:
    # top-level keys must come before the first table header
    path = write(confdir, BASE + extra if extra.startswith("[") else extra + BASE)
    error = load_error(path)
    assert (error.source, error.key, error.reason) == (path, key, reason.format(dir=confdir))
    assert str(error) == f"{path}: {key}: {reason.format(dir=confdir)}"


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    error = load_error(path)
    assert str(error) == f"{path}: -: cannot read: [Errno 2] No such file or directory: '{path}'"
    error = load_error(None, {"FASTLB_CONFIG": path})
    assert error.source == path


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nworkers = \n')
    error = load_error(path)
    assert (error.source, error.key) == (path, "-")
    assert error.reason.startswith("invalid TOML: Invalid value (at line 2, column 11)")
    path = str(tmp_path / "latin1.toml")
    Path(path).write_bytes(b'[log]\nlevel = "caf\xe9"\n')
    assert load_error(path).reason.startswith("invalid TOML: not UTF-8")


ENV_ERRORS = [
    ({"FASTLB_WORKERS": "x"}, "FASTLB_WORKERS", "expected an integer, got 'x'"),
    ({"FASTLB_SERVER_WORKERS": "2.5"}, "FASTLB_SERVER_WORKERS", "expected an integer, got '2.5'"),
    ({"FASTLB_FOO": "1"}, "FASTLB_FOO", "unknown setting"),
    ({"FASTLB_SERVER_LISTEN": ":1"}, "FASTLB_SERVER_LISTEN", "unknown setting (did you mean FASTLB_LISTEN?)"),
    ({"FASTLB_WORKER": "2"}, "FASTLB_WORKER", "unknown setting (did you mean FASTLB_WORKERS?)"),
    ({"FASTLB_TLS_CERTIFICATE": "a.pem"}, "FASTLB_TLS_CERTIFICATE", "unknown setting (did you mean FASTLB_TLS_CERT?)"),
    ({"FASTLB_GRACEFUL_TIMEOUT": "-1s"}, "FASTLB_GRACEFUL_TIMEOUT", "invalid duration '-1s': must not be negative"),
    ({"FASTLB_LIMITS_MAX_BODY_BYTES": "lots"}, "FASTLB_LIMITS_MAX_BODY_BYTES",
     """invalid size 'lots': expected a number of bytes or a number with a unit B, KiB, MiB, GiB, KB, MB or GB (e.g. "16KiB")"""),
    ({"FASTLB_LISTEN": "8080"}, "FASTLB_LISTEN", "invalid address '8080': missing port (expected host:port)"),
    ({"FASTLB_ADMIN_LISTEN": "localhost:99999"}, "FASTLB_ADMIN_LISTEN", "invalid address 'localhost:99999': port must be between 1 and 65535"),
    ({"FASTLB_BACKENDS": "127.0.0.1:9101,nope"}, "FASTLB_BACKENDS", "invalid address 'nope': missing port (expected host:port)"),
    ({"FASTLB_BACKENDS": "127.0.0.1:9101,,127.0.0.1:9102"}, "FASTLB_BACKENDS",
     "expected comma-separated host:port addresses, got '127.0.0.1:9101,,127.0.0.1:9102'"),
    ({"FASTLB_BACKENDS": ""}, "FASTLB_BACKENDS", "expected comma-separated host:port addresses, got ''"),
    ({"FASTLB_BACKENDS": "127.0.0.1:1,127.0.0.1:1"}, "FASTLB_BACKENDS", "duplicate server 127.0.0.1:1 (also servers[0])"),
    ({"FASTLB_BACKENDS": "127.0.0.1:1", "FASTLB_BALANCE": "best"}, "FASTLB_BALANCE",
     "must be one of roundrobin, leastconn, p2c, hash, random; got 'best'"),
    ({"FASTLB_BALANCE": "p2c"}, "FASTLB_BALANCE", "there is no backend named 'default'; set FASTLB_BACKENDS"),
    ({"FASTLB_DEFAULT_BACKEND": "api"}, "FASTLB_DEFAULT_BACKEND", "backend 'api' is not defined"),
    ({"FASTLB_TLS_LISTEN": ":8443"}, "FASTLB_TLS_LISTEN",
     "TLS listener needs at least one certificate (set FASTLB_TLS_CERT and FASTLB_TLS_KEY)"),
    ({"FASTLB_TLS_CERT": "site.pem"}, "FASTLB_TLS_CERT", "FASTLB_TLS_KEY must be set too"),
    ({"FASTLB_TLS_KEY": "site.key"}, "FASTLB_TLS_KEY", "FASTLB_TLS_CERT must be set too"),
    ({"FASTLB_TLS_CERT": "nope.pem", "FASTLB_TLS_KEY": "site.key"}, "FASTLB_TLS_CERT",
     "cannot read certificate: [Errno 2] No such file or directory: '{dir}/nope.pem'"),
    ({"FASTLB_TLS_MIN_VERSION": "1.0"}, "FASTLB_TLS_MIN_VERSION", """must be "1.2" or "1.3", got '1.0'"""),
    ({"FASTLB_WORKERS": "2", "FASTLB_SERVER_WORKERS": "3"}, "FASTLB_WORKERS", "conflicts with FASTLB_SERVER_WORKERS='3'"),
    ({"FASTLB_SERVER_TRUSTED_PROXIES": "10.0.0.0/8,bad"}, "FASTLB_SERVER_TRUSTED_PROXIES",
     "invalid CIDR 'bad': 'bad' does not appear to be an IPv4 or IPv6 network"),
    ({"FASTLB_LISTEN": "127.0.0.1:9900"}, "FASTLB_LISTEN", "duplicate listener 127.0.0.1:9900 (also listeners[0])"),
    ({"FASTLB_TLS_CLIENT_AUTH_MODE": "optional"}, "FASTLB_TLS_CLIENT_AUTH_MODE",
     "FASTLB_TLS_CLIENT_AUTH_CA must be set too"),
    ({"FASTLB_TLS_CLIENT_AUTH_CA": "site.pem", "FASTLB_TLS_CLIENT_AUTH_MODE": "sometimes"}, "FASTLB_TLS_CLIENT_AUTH_MODE",
     "must be one of require, optional; got 'sometimes'"),
    ({"FASTLB_TLS_CLIENT_AUTH_CA": "nope.pem"}, "FASTLB_TLS_CLIENT_AUTH_CA",
     "cannot read certificate: [Errno 2] No such file or directory: '{dir}/nope.pem'"),
    ({"FASTLB_TLS_STRICT_SNI": "strict"}, "FASTLB_TLS_STRICT_SNI",
     "expected a boolean (1/0, true/false, yes/no, on/off), got 'strict'"),
]


@pytest.mark.parametrize(("env", "key", "reason"), ENV_ERRORS, ids=[case[1] + ":" + case[2][:30] for case in ENV_ERRORS])
@pytest.mark.parametrize("layer", ["environment", "command line"])
def test_variable_errors(confdir: Path, layer: str, env: dict[str, str], key: str, reason: str) -> None:
    if key == "FASTLB_LISTEN" and "duplicate" in reason:
        # two listeners on one address need a file listener to collide with
        error = load_error(write(confdir, '[[listeners]]\naddress = "127.0.0.1:9900"\ntls = true\n' + TLS_CERT),
                           **{"env" if layer == "environment" else "cli": env})
        assert str(error) == f"{layer}: {key}: duplicate listener 127.0.0.1:9900 (also listeners[0])"
        return
    error = load_error(None, **{"env" if layer == "environment" else "cli": env})
    assert str(error) == f"{layer}: {key}: {reason.format(dir=confdir)}"


def test_variable_errors_name_the_variable_even_with_a_file(confdir: Path) -> None:
    path = write(confdir, BASE + '[server]\nworkers = 2\n')
    assert str(load_error(path, {"FASTLB_WORKERS": "many"})) == "environment: FASTLB_WORKERS: expected an integer, got 'many'"
    assert str(load_error(path, {}, {"FASTLB_WORKERS": "-2"})) == "command line: FASTLB_WORKERS: must be between 0 and 1024, got -2"
    # ... and a file error still names the file when a variable touches the same table
    path = write(confdir, BASE + '[server]\nworkers = "2"\n')
    assert str(load_error(path, {"FASTLB_GRACEFUL_TIMEOUT": "1s"})) == f"{path}: server.workers: expected an integer, got string"


def test_error_pickles_and_keeps_one_line() -> None:
    error = ConfigError("a.toml", "server.workers", "bad\nthing")
    assert str(error) == "a.toml: server.workers: bad thing"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.source, copy.key, copy.reason, str(copy)) == ("a.toml", "server.workers", "bad thing", str(error))


# ------------------------------------------------------------------------------------------------------
# Units and addresses


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("250ms", 0.25), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), ("1.5s", 1.5), ("0", 0.0), ("0s", 0.0),
        ("30", 30.0), ("2.5", 2.5), (" 10s ", 10.0), ("10 s", 10.0), ("1m30s", 90.0), ("1h30m", 5400.0),
        ("1s500ms", 1.5), ("10S", 10.0), (5, 5.0), (0.1, 0.1), (0, 0.0),
    ],
)
def test_durations(value, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("-1s", "must not be negative"), (-1, "must not be negative"), (-0.5, "must not be negative"),
        ("", "expected a number"), ("s", "expected a number"), ("10x", "expected a number"), ("1d", "expected a number"),
        ("ten seconds", "expected a number"), ("1e3", "expected a number"), ("inf", "expected a number"),
        (float("nan"), "expected a number"), (float("inf"), "must be at most 365 days"), ("400d", "expected a number"),
        ("9000h", "must be at most 365 days"), (True, "expected a number"),
    ],
)
def test_bad_durations(value, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value).startswith(f"invalid duration {value!r}: {why}")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("16KiB", 16384), ("8KiB", 8192), ("1MiB", 1 << 20), ("1GiB", 1 << 30), ("512", 512), ("512B", 512),
        ("64KB", 64000), ("1MB", 1_000_000), ("2GB", 2_000_000_000), ("16 KiB", 16384), ("16kib", 16384),
        ("1.5MiB", 1572864), ("0", 0), (0, 0), (4096, 4096),
    ],
)
def test_sizes(value, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("16k", "expected a number of bytes"), ("16M", "expected a number of bytes"), ("", "expected a number of bytes"),
        ("KiB", "expected a number of bytes"), ("-1", "must not be negative"), (-1, "must not be negative"),
        ("0.5B", "not a whole number of bytes"), ("1e3", "expected a number of bytes"), (1.5, "expected a number of bytes"),
        (True, "expected a number of bytes"),
    ],
)
def test_bad_sizes(value, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value).startswith(f"invalid size {value!r}: {why}")


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.25, "250ms"), (30, "30s"), (60, "1m"), (7200, "2h"), (1.5, "1500ms")])
def test_format_duration_round_trips(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("size", "text"), [(0, "0"), (512, "512"), (16384, "16KiB"), (1 << 20, "1MiB"), (1000, "1000")])
def test_format_size_round_trips(size: int, text: str) -> None:
    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "address", "shown"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080), "127.0.0.1:8080"),
        ("[::1]:8443", Address("::1", 8443), "[::1]:8443"),
        ("[::]:80", Address("::", 80), "[::]:80"),
        ("[2001:DB8:0:0::1]:443", Address("2001:db8::1", 443), "[2001:db8::1]:443"),
        ("[fe80::1%eth0]:80", Address("fe80::1%eth0", 80), "[fe80::1%eth0]:80"),
        ("localhost:80", Address("localhost", 80), "localhost:80"),
        ("Backend-1.Internal:9000", Address("backend-1.internal", 9000), "backend-1.internal:9000"),
        ("my_service:1", Address("my_service", 1), "my_service:1"),
        (":8080", Address("0.0.0.0", 8080), "0.0.0.0:8080"),
        ("0.0.0.0:65535", Address("0.0.0.0", 65535), "0.0.0.0:65535"),
    ],
)
def test_addresses(text: str, address: Address, shown: str) -> None:
    assert parse_address(text) == address
    assert Address.parse(text) == address
    assert str(address) == shown
    assert parse_address(str(address)) == address


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("127.0.0.1", "missing port (expected host:port)"),
        ("127.0.0.1:", "missing port"),
        ("127.0.0.1:0", "port must be between 1 and 65535"),
        ("127.0.0.1:65536", "port must be between 1 and 65535"),
        ("127.0.0.1:123456", "port '123456' is not a number"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("127.0.0.1:8o", "port '8o' is not a number"),
        ("256.0.0.1:80", "'256.0.0.1' is not an IPv4 address"),
        ("::1:80", "an IPv6 address needs brackets, as in [::1]:8080"),
        ("[::1]", "missing port (expected [ipv6]:port)"),
        ("[::1]8080", "missing port (expected [ipv6]:port)"),
        ("[::1:8080", "missing ']' after the IPv6 address"),
        ("[127.0.0.1]:80", "'127.0.0.1' is not an IPv6 address"),
        ("[nope]:80", "'nope' is not an IPv6 address"),
        ("bad host:80", "'bad host' is not a valid host name"),
        ("-lead.example:80", "'-lead.example' is not a valid host name"),
        ("a..b:80", "'a..b' is not a valid host name"),
        ("http://x:80", "expected host:port, not a URL"),
    ],
)
def test_bad_addresses(text: str, why: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == f"invalid address {text!r}: {why}"


@pytest.mark.parametrize(
    ("host", "stored"),
    [("App.Example.COM", "app.example.com"), ("*.example.com", "*.example.com"), ("10.1.2.3", "10.1.2.3"),
     ("[::1]", "[::1]"), ("localhost", "localhost")],
)
def test_route_hosts(confdir: Path, host: str, stored: str) -> None:
    path = write(confdir, BASE.replace('backend = "api"', f'host = "{host}"\nbackend = "api"'))
    assert load(path, {}).routes[0].host == stored


def test_tls_front_door_keys(confdir: Path) -> None:
    path = write(
        confdir,
        BASE
        + """
        [server]
        trusted_proxies = ["10.0.0.0/8"]

        [[listeners]]
        address = ":8443"
        tls = true
        proxy_protocol = true
        [[listeners.passthrough]]
        sni = "DB.Example.com"
        backend = "db"
        [[listeners.passthrough]]
        sni = "*.internal.example"
        backend = "api"
        [[listeners]]
        address = ":8080"

        [tls]
        strict_sni = true
        [tls.client_auth]
        ca = "other.pem"
        mode = "optional"
        crl = "other.key"
        [[tls.certificates]]
        cert = "site.pem"
        key = "site.key"

        [[routes]]
        path = "/admin"
        backend = "api"
        require_client_cert = true

        [backends.db]
        servers = ["127.0.0.1:5432"]
        send_proxy = "v2"
        """,
    )
    config = load(path, {})
    assert config.listeners[0].proxy_protocol and not config.listeners[1].proxy_protocol
    assert config.listeners[0].passthrough == (
        cfg.PassthroughSpec(sni="db.example.com", backend="db"),
        cfg.PassthroughSpec(sni="*.internal.example", backend="api"),
    )
    assert config.listeners[1].passthrough == ()
    assert config.tls.strict_sni is True
    assert config.tls.client_auth == cfg.ClientAuthSpec(
        ca=str(confdir / "other.pem"), mode="optional", crl=str(confdir / "other.key")
    )
    assert [route.require_client_cert for route in config.routes] == [False, True]
    assert (config.backends["api"].send_proxy, config.backends["db"].send_proxy) == ("", "v2")
    # Off by default, and the table is absent unless written.
    defaults = load(None, {})
    assert (defaults.tls.strict_sni, defaults.tls.client_auth) == (False, None)
    assert defaults.listeners[0].proxy_protocol is False and defaults.listeners[0].passthrough == ()
    # From variables: the table is made, relative paths follow the working directory.
    env = load(None, {"FASTLB_TLS_CLIENT_AUTH_CA": "site.pem", "FASTLB_TLS_STRICT_SNI": "yes"})
    assert env.tls.client_auth == cfg.ClientAuthSpec(ca=str(confdir / "site.pem"))
    assert env.tls.strict_sni is True


def test_hash_on_forms(confdir: Path) -> None:
    for value, stored in [("client_ip", "client_ip"), ("uri", "uri"), ("header:X-Tenant", "header:x-tenant"),
                          ("cookie:SessionID", "cookie:SessionID")]:
        path = write(confdir, BASE + f'hash_on = "{value}"\n')
        assert load(path, {}).backends["api"].hash_on == stored


# ------------------------------------------------------------------------------------------------------
# ENV_KEYS: generated from the schema, documents everything


SECTIONS = {"server": ServerSection, "tls": TlsSpec, "admin": AdminSpec, "limits": LimitsSpec, "log": LogSpec}


def test_env_keys_cover_every_scalar_key() -> None:
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in ("certificates", "client_auth"):  # tables: FASTLB_TLS_CERT/KEY, FASTLB_TLS_CLIENT_AUTH_*
                continue
            name = f"FASTLB_{section}_{f.name}".upper()
            assert name in ENV_KEYS, name
            assert ENV_KEYS[name].startswith(f"{section}.{f.name}: ")
    design_names = {
        "FASTLB_CONFIG", "FASTLB_WORKERS", "FASTLB_GRACEFUL_TIMEOUT", "FASTLB_LISTEN", "FASTLB_TLS_LISTEN",
        "FASTLB_TLS_CERT", "FASTLB_TLS_KEY", "FASTLB_TLS_MIN_VERSION", "FASTLB_ADMIN_LISTEN", "FASTLB_BACKENDS",
        "FASTLB_BALANCE", "FASTLB_DEFAULT_BACKEND", "FASTLB_NO_EXTENSIONS",
    }
    assert design_names <= set(ENV_KEYS)
    assert "FASTLB_TLS_CERTIFICATES" not in ENV_KEYS


def test_env_keys_are_one_line_with_a_default() -> None:
    for name, doc in ENV_KEYS.items():
        assert name.startswith("FASTLB_") and name == name.upper()
        assert "\n" not in doc and "default" in doc, name
    assert ENV_KEYS["FASTLB_WORKERS"] == "server.workers: worker processes; 0 = one per usable core (integer; default 0)"
    assert ENV_KEYS["FASTLB_LIMITS_MAX_HEADER_BYTES"].endswith("(size; default 16KiB)")
    assert ENV_KEYS["FASTLB_ADMIN_LISTEN"].endswith("default 127.0.0.1:9900)")


@pytest.mark.parametrize("name", sorted(set(ENV_KEYS) - {"FASTLB_CONFIG", "FASTLB_NO_EXTENSIONS", "FASTLB_DEBUG"}))
def test_every_env_key_is_read(confdir: Path, name: str) -> None:
    """Each documented variable is accepted and changes the loaded config."""
    samples = {
        "FASTLB_SERVER_PID_FILE": "x.pid", "FASTLB_SERVER_USER": "nobody", "FASTLB_SERVER_GROUP": "nogroup",
        "FASTLB_SERVER_TRUSTED_PROXIES": "10.0.0.0/8", "FASTLB_TLS_MIN_VERSION": "1.3",
        "FASTLB_TLS_CIPHERS": "ECDHE-RSA-AES128-GCM-SHA256", "FASTLB_ADMIN_ADDRESS": ":9999",
        "FASTLB_ADMIN_LISTEN": ":9999", "FASTLB_LOG_ACCESS": "stdout", "FASTLB_LOG_FORMAT": "json",
        "FASTLB_LOG_LEVEL": "debug", "FASTLB_LISTEN": ":9998", "FASTLB_BACKENDS": "127.0.0.1:2",
        "FASTLB_DEFAULT_BACKEND": "default", "FASTLB_BALANCE": "p2c", "FASTLB_TLS_LISTEN": ":9997",
        "FASTLB_TLS_CERT": "other.pem", "FASTLB_TLS_KEY": "other.key", "FASTLB_TLS_STRICT_SNI": "on",
        "FASTLB_TLS_CLIENT_AUTH_CA": "other.pem", "FASTLB_TLS_CLIENT_AUTH_MODE": "optional",
        "FASTLB_TLS_CLIENT_AUTH_CRL": "other.pem",
        "FASTLB_ACME_DIRECTORY": "https://ca.test/dir", "FASTLB_ACME_DIRECTORY_CA": "other.pem",
        "FASTLB_ACME_CHALLENGE": "tls-alpn-01",
        "FASTLB_HOOKS_MODULE": "json",  # any importable module: it is imported at load
        "FASTLB_BACKENDS_TLS_ENABLED": "on", "FASTLB_BACKENDS_TLS_CA": "other.pem",
        "FASTLB_BACKENDS_TLS_VERIFY": "off", "FASTLB_BACKENDS_TLS_SERVER_NAME": "api.internal",
        "FASTLB_BACKENDS_TLS_SNI_FROM_HOST": "on", "FASTLB_BACKENDS_TLS_CERT": "other.pem",
        "FASTLB_BACKENDS_TLS_KEY": "other.key", "FASTLB_BACKENDS_TLS_MIN_VERSION": "1.3",
        "FASTLB_BACKENDS_TLS_ALPN": "http/1.0", "FASTLB_SERVER_WATCH": "on",
    }
    base = {"FASTLB_BACKENDS": "127.0.0.1:1", "FASTLB_TLS_CERT": "site.pem", "FASTLB_TLS_KEY": "site.key"}
    if name.startswith("FASTLB_TLS_CLIENT_AUTH_") and name != "FASTLB_TLS_CLIENT_AUTH_CA":
        base["FASTLB_TLS_CLIENT_AUTH_CA"] = "site.pem"  # the table's required key
    if name in ("FASTLB_BACKENDS_TLS_CERT", "FASTLB_BACKENDS_TLS_KEY"):
        base.update(FASTLB_BACKENDS_TLS_CERT="site.pem", FASTLB_BACKENDS_TLS_KEY="site.key")  # a pair
    value = samples.get(name, "7")
    assert load(None, {**base, name: value}) != load(None, base)


def test_errors_name_the_file_by_its_absolute_path(confdir: Path) -> None:
    # One form whichever check finds the problem: the schema walk, or TLS when `fastlb check` builds the
    # contexts (it used to print the path as given for the first and the absolute path for the second).
    absolute = write(confdir, BASE + "[server]\nworkers = -1\n")
    error = load_error("fastlb.toml")
    assert (error.source, error.key) == (absolute, "server.workers")
    write(confdir, BASE + '[[listeners]]\naddress = ":8443"\ntls = true\n'
          '[[tls.certificates]]\ncert = "site.pem"\nkey = "site.key"\n')
    assert load("fastlb.toml", {}).source == absolute
    out = subprocess.run([sys.executable, "-m", "fastlb", "check", "fastlb.toml"], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.startswith(f"{absolute}: tls.certificates[0].cert: "), out.stderr
    write(confdir, BASE)
    out = subprocess.run([sys.executable, "-m", "fastlb", "check", "fastlb.toml"], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (0, f"{absolute}: ok\n")
