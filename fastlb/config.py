"""Configuration: one schema, three sources, one validated and frozen result.

Theory of operation
-------------------
The schema is the dataclasses below. Every field that can be configured carries its type (a ``_Kind``:
how to read it from TOML and from a string), its documentation and its environment-variable aliases in
``dataclasses.field(metadata=...)``. One generic walker reads any table into any of these dataclasses, the
environment-variable table ``ENV_KEYS`` is generated from the same fields, and so are the docs: a setting
is declared once.

``load()`` merges the sources into one TOML-shaped tree before anything is typed:

1. the TOML file (``--config`` / ``FASTLB_CONFIG``), parsed by ``tomllib``;
2. ``FASTLB_*`` environment variables, written into that tree;
3. command-line flags, passed in as the same ``FASTLB_*`` names, written last, so they win.

Values from (2) and (3) are ``_Text``: a ``str`` that remembers its source and variable name. Each kind
parses ``_Text`` from its string form (``"2"`` is a fine ``workers`` in the environment, an error in
TOML), and an error in such a value names the variable instead of a key in a file the value never came
from. The typed walk then runs once, followed by the checks that span sections (routes name defined
backends, listeners do not clash, ...), then the Ingress manifests (``--ingress``) are merged in, and
only then are TLS listeners checked for a certificate, since an Ingress ``tls:`` section may bring the
only one. Every failure is a ``ConfigError`` whose ``str`` is one line: ``<absolute file path or
"environment" or "command line">: <key path or variable>: <reason>``.

Nothing here runs per request; the router, balancers and TLS contexts compile what they need from the
resulting ``Config`` once per generation.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastlb.units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "DEFAULT_CIPHERS",
    "DEFAULT_LISTEN",
    "ENV_KEYS",
    "Address",
    "AcmeSpec",
    "AdminSpec",
    "BackendSpec",
    "BackendTlsSpec",
    "CertSpec",
    "ClientAuthSpec",
    "Config",
    "ConfigError",
    "HealthSpec",
    "HeaderRulesSpec",
    "HooksSpec",
    "LimitsSpec",
    "ListenerSpec",
    "LogSpec",
    "PassthroughSpec",
    "RateLimitSpec",
    "RouteSpec",
    "ServerSection",
    "ServerSpec",
    "TlsSpec",
    "load",
    "parse_address",
    "parse_duration",
    "parse_size",
]


class ConfigError(Exception):
    """A config value is wrong. ``str(e)`` is exactly one line: ``source: key: reason``.

    ``source`` is the absolute path of the config file (or Ingress manifest), ``"environment"`` or
    ``"command line"``; ``key`` is the dotted key path (``backends.api.servers[1].address``), the variable
    name (``FASTLB_WORKERS``) or ``"-"`` for the file as a whole.
    """

    def __init__(self, source: str, key: str, reason: str) -> None:
        self.source = _one_line(source)
        self.key = _one_line(key)
        self.reason = _one_line(reason)
        super().__init__(f"{self.source}: {self.key}: {self.reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # The master may hand a reload failure across a process boundary.
        return (type(self), (self.source, self.key, self.reason))


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


# --------------------------------------------------------------------------------------------------------
# Addresses

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_IPV4_LIKE = re.compile(r"[0-9.]+")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint. ``host`` is an IPv4 or IPv6 literal (no brackets) or a lower-case host name."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        return parse_address(text)


def parse_address(text: str) -> Address:
    """``"127.0.0.1:8080"``, ``"[::1]:8443"``, ``"localhost:80"`` or ``":8080"`` (all interfaces, IPv4).

    Raises ``ValueError("invalid address '...': <why>")``.
    """

    def invalid(why: str) -> ValueError:
        return ValueError(f"invalid address {text!r}: {why}")

    if not text:
        raise invalid("empty")
    if "://" in text:
        raise invalid("expected host:port, not a URL")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise invalid("missing ']' after the IPv6 address")
        try:
            host = str(ipaddress.IPv6Address(text[1:end]))
        except ValueError:
            raise invalid(f"{text[1:end]!r} is not an IPv6 address") from None
        rest = text[end + 1 :]
        if not rest.startswith(":"):
            raise invalid("missing port (expected [ipv6]:port)")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise invalid("missing port (expected host:port)")
        if ":" in host:
            raise invalid("an IPv6 address needs brackets, as in [::1]:8080")
        host = host or "0.0.0.0"
        why = _host_problem(host)
        if why:
            raise invalid(why)
        host = host.lower()
    if not port_text:
        raise invalid("missing port")
    if not _PORT.fullmatch(port_text):
        raise invalid(f"port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise invalid("port must be between 1 and 65535")
    return Address(host, port)


def _host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IPv4 literal nor a DNS name, or None if it is fine."""
    if _IPV4_LIKE.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not an IPv4 address"
        return None
    # RFC 1035 section 2.3.4: 253 characters in text form, 63 per label. '_' is allowed because
    # container and service-discovery names use it.
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.lower().split(".")):
        return f"{host!r} is not a valid host name"
    return None


# --------------------------------------------------------------------------------------------------------
# Value kinds: how one key is read from TOML and from an environment variable, and how its default is shown.


class _Bad(Exception):
    """A value is wrong; carries the reason only. The caller knows where the value came from."""


class _Text(str):
    """A value from an environment variable or a command-line flag: always a string, whatever the key's
    type, and its errors name the variable (``environment: FASTLB_WORKERS: ...``)."""

    source: str
    var: str

    def __new__(cls, value: str, source: str, var: str) -> _Text:
        self = super().__new__(cls, value)
        self.source = source
        self.var = var
        return self


class _Made(dict):  # type: ignore[type-arg]
    """A table that exists only because an environment variable or flag created it."""

    def __init__(self, source: str, var: str) -> None:
        super().__init__()
        self.source = source
        self.var = var


@dataclass(slots=True)
class _Ctx:
    source: str  # the config file as given, or "environment" when there is none
    base: str  # relative paths in the file are relative to the file's directory


def _error_at(value: object, key: str, ctx: _Ctx, reason: str) -> ConfigError:
    if isinstance(value, _Text):
        return ConfigError(value.source, value.var, reason)
    return ConfigError(ctx.source, key, reason)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    for pytype, name in (
        (str, "string"),
        (int, "integer"),
        (float, "float"),
        (dict, "table"),
        (list, "list"),
    ):
        if isinstance(value, pytype):
            return name
    return "date/time" if hasattr(value, "isoformat") else type(value).__name__


def _expect(value: object, types: tuple[type, ...], what: str) -> None:
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise _Bad(f"expected {what}, got {_type_name(value)}")


class _Kind:
    label = "value"  # names the type in ENV_KEYS and the docs
    from_env = True  # a scalar one environment variable can set

    def parse(self, value: object, key: str, ctx: _Ctx) -> Any:
        try:
            if isinstance(value, _Text):
                return self.text(str(value))
            return self.toml(value, ctx)
        except _Bad as e:
            raise _error_at(value, key, ctx, str(e)) from None

    def toml(self, value: object, ctx: _Ctx) -> Any:
        raise NotImplementedError

    def text(self, text: str) -> Any:
        return self.toml(text, _Ctx("environment", os.getcwd()))

    def show(self, default: Any) -> str:
        if default is None:
            return "none"
        return '""' if default == "" else str(default)


class _Str(_Kind):
    label = "string"

    def __init__(self, check: Callable[[str], Any] | None = None, label: str | None = None) -> None:
        self.check = check
        if label:
            self.label = label

    def toml(self, value: object, ctx: _Ctx) -> Any:
        _expect(value, (str,), "a string")
        text = str(value)
        return self.check(text) if self.check else text


class _Choice(_Str):
    def __init__(self, *options: str) -> None:
        super().__init__(self._pick, "|".join(options))
        self.options = options

    def _pick(self, text: str) -> str:
        if text not in self.options:
            raise _Bad(f"must be one of {', '.join(self.options)}; got {text!r}")
        return text


class _Int(_Kind):
    label = "integer"

    def __init__(self, lo: int = 0, hi: int | None = None) -> None:
        self.lo, self.hi = lo, hi

    def toml(self, value: object, ctx: _Ctx) -> int:
        _expect(value, (int,), "an integer")
        return self._range(int(value))  # type: ignore[call-overload]

    def text(self, text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):
            raise _Bad(f"expected an integer, got {text!r}")
        return self._range(int(text))

    def _range(self, number: int) -> int:
        if number < self.lo or (self.hi is not None and number > self.hi):
            if self.hi is None:
                raise _Bad(f"must be at least {self.lo}, got {number}")
            raise _Bad(f"must be between {self.lo} and {self.hi}, got {number}")
        return number


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class _Bool(_Kind):
    label = "boolean"

    def toml(self, value: object, ctx: _Ctx) -> bool:
        _expect(value, (bool,), "a boolean")
        return bool(value)

    def text(self, text: str) -> bool:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _Bad(f"expected a boolean (1/0, true/false, yes/no, on/off), got {text!r}")

    def show(self, default: Any) -> str:
        return "true" if default else "false"


class _Duration(_Kind):
    label = "duration"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def toml(self, value: object, ctx: _Ctx) -> float:
        _expect(value, (str, int, float), 'a duration such as "10s"')
        try:
            seconds = parse_duration(value)  # type: ignore[arg-type]
        except ValueError as e:
            raise _Bad(str(e)) from None
        if self.positive and seconds == 0:
            raise _Bad("must be greater than zero")
        return seconds

    def show(self, default: Any) -> str:
        return format_duration(default)


class _Size(_Kind):
    label = "size"

    def __init__(self, lo: int = 0) -> None:
        self.lo = lo

    def toml(self, value: object, ctx: _Ctx) -> int:
        _expect(value, (str, int), 'a size such as "16KiB"')
        try:
            size = parse_size(value)  # type: ignore[arg-type]
        except ValueError as e:
            raise _Bad(str(e)) from None
        if size < self.lo:
            raise _Bad(f"must be at least {self.lo} bytes, got {size}")
        return size

    def show(self, default: Any) -> str:
        return format_size(default)


class _AddressKind(_Kind):
    label = "host:port"

    def __init__(self, optional: bool = False) -> None:
        self.optional = optional
        if optional:
            self.label = 'host:port or "" to disable'

    def toml(self, value: object, ctx: _Ctx) -> Address | None:
        _expect(value, (str,), 'an address such as "127.0.0.1:8080"')
        if value == "" and self.optional:
            return None
        try:
            return parse_address(str(value))
        except ValueError as e:
            raise _Bad(str(e)) from None

    def show(self, default: Any) -> str:
        return "disabled" if default is None else str(default)


class _Path(_Kind):
    """A file path, made absolute against the config file's directory (or the working directory for a
    value from the environment), so a reload after ``chdir`` or a worker never resolves it differently."""

    label = "path"

    def __init__(
        self,
        readable: bool = False,
        keep: tuple[str, ...] = ("",),
        label: str | None = None,
        what: str = "certificate",
    ) -> None:
        self.readable = readable
        self.keep = keep
        self.what = what  # names the file in the "cannot read" reason
        if label:
            self.label = label

    def toml(self, value: object, ctx: _Ctx) -> str:
        _expect(value, (str,), "a string")
        text = str(value)
        if text in self.keep:
            return text
        if not text:
            raise _Bad("must not be empty")
        path = os.path.normpath(os.path.join(ctx.base, os.path.expanduser(text)))
        if self.readable:
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise _Bad(f"cannot read {self.what}: {e}") from None
        return path

    def show(self, default: Any) -> str:
        return '""' if default == "" else str(default)


class _TlsVersion(_Kind):
    label = "1.2|1.3"

    def toml(self, value: object, ctx: _Ctx) -> str:
        # `min_version = 1.2` without quotes is a TOML float; accept what the user obviously meant.
        _expect(value, (str, float), 'a string "1.2" or "1.3"')
        text = value if isinstance(value, str) else repr(value)
        if text not in ("1.2", "1.3"):
            raise _Bad(f'must be "1.2" or "1.3", got {text!r}')
        return str(text)

    def show(self, default: Any) -> str:
        return str(default)


class _Ciphers(_Str):
    label = "OpenSSL cipher list"

    def __init__(self) -> None:
        super().__init__(self._check)

    @staticmethod
    def _check(text: str) -> str:
        # Validated here so `fastlb check` rejects a list OpenSSL would refuse at startup.
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
        except ssl.SSLError:
            raise _Bad(f"OpenSSL accepts no cipher in {text!r}") from None
        return text

    def show(self, default: Any) -> str:
        return "Mozilla intermediate" if default == DEFAULT_CIPHERS else str(default)


class _Cidrs(_Kind):
    label = "comma-separated CIDRs"  # as a variable has it; the reference shows toml_label
    toml_label = "list of CIDRs"

    def parse(self, value: object, key: str, ctx: _Ctx) -> tuple[str, ...]:
        if isinstance(value, _Text):
            items = [item.strip() for item in value.split(",") if item.strip()]
            try:
                return tuple(self._one(item) for item in items)
            except _Bad as e:
                raise _error_at(value, key, ctx, str(e)) from None
        if not isinstance(value, list):
            raise _file_error(ctx, key, f"expected a list, got {_type_name(value)}")
        networks = []
        for i, item in enumerate(value):
            try:
                _expect(item, (str,), "a string")
                networks.append(self._one(item))
            except _Bad as e:
                raise _file_error(ctx, f"{key}[{i}]", str(e)) from None
        return tuple(networks)

    @staticmethod
    def _one(text: str) -> str:
        try:
            return str(ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            raise _Bad(f"invalid CIDR {text!r}: {e}") from None

    def show(self, default: Any) -> str:
        return ",".join(default) or "none"


def _file_error(ctx: _Ctx, key: str, reason: str) -> ConfigError:
    return ConfigError(ctx.source, key, reason)


class _StatusRange(_Kind):
    label = "status or range"

    def toml(self, value: object, ctx: _Ctx) -> tuple[int, int]:
        _expect(value, (str, int), 'a status or range such as "200-399"')
        text = str(value).strip()
        match = re.fullmatch(r"([0-9]{3})(?:\s*-\s*([0-9]{3}))?", text)
        if match is None:
            raise _Bad(f'expected a status or range such as "200-399", got {value!r}')
        lo = int(match.group(1))
        hi = int(match.group(2) or lo)
        if not 100 <= lo <= hi <= 599:
            raise _Bad(f"invalid status range {text!r}: statuses are 100-599, lowest first")
        return (lo, hi)

    def show(self, default: Any) -> str:
        return f"{default[0]}-{default[1]}"


# RFC 9110 section 5.6.2: token characters, which is what a header or cookie name may contain.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _check_hash_on(text: str) -> str:
    if text in ("client_ip", "uri"):
        return text
    kind, colon, name = text.partition(":")
    if colon and kind in ("header", "cookie") and _TOKEN.fullmatch(name):
        # Header names are case-insensitive (RFC 9110 section 5.1): fold once here, not per request.
        return f"header:{name.lower()}" if kind == "header" else text
    raise _Bad(f"must be client_ip, uri, header:NAME or cookie:NAME; got {text!r}")


def _check_route_host(text: str) -> str:
    host = text.lower()
    if not host:
        raise _Bad("must not be empty (leave host out to match any host)")
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]"
        except ValueError:
            raise _Bad(f"{text!r} is not an IPv6 address") from None
    if ":" in host:
        raise _Bad(f"{text!r}: a port is not allowed in host")
    name = host[2:] if host.startswith("*.") else host
    if "*" in name:
        raise _Bad(f"{text!r}: '*' is only allowed as the whole first label, as in *.example.com")
    why = _host_problem(name)
    if why:
        raise _Bad(why)
    return host


def _check_route_path(text: str) -> str:
    if not text.startswith("/"):
        raise _Bad(f"must start with '/', got {text!r}")
    if any(c in text for c in "?# \t") or not text.isprintable():
        raise _Bad(f"{text!r} is not a plain URL path (no query, fragment, spaces or control characters)")
    return text


def _check_nonempty(text: str) -> str:
    if not text:
        raise _Bad("must not be empty")
    return text


def _check_health_host(text: str) -> str:
    if not text or not text.isprintable() or any(c.isspace() for c in text):
        raise _Bad(f"{text!r} is not a valid Host header value")
    return text


def _check_sni_name(text: str) -> str:
    name = text.lower()
    exact = name[2:] if name.startswith("*.") else name
    # RFC 6066 section 3: a ClientHello's server_name is a DNS host name, never an IP literal, and has
    # no trailing dot; a wildcard (RFC 6125 section 6.4.3) is a whole first label.
    if "*" in exact:
        raise _Bad(f"{text!r}: '*' is only allowed as the whole first label, as in *.example.com")
    why = _host_problem(exact) if exact else "must not be empty"
    if why is None and (_IPV4_LIKE.fullmatch(exact) or ":" in exact):
        why = f"{text!r}: an IP address is never sent as SNI"
    if why:
        raise _Bad(why)
    return name


SEND_PROXY_VERSIONS = ("", "v1", "v2")


def _check_upstream_name(text: str) -> str:
    # The name a backend's certificate is verified against (RFC 6125): a DNS name, or an IP literal,
    # which Python's ssl checks against the certificate's IP addresses and never sends as SNI.
    name = text.lower().rstrip(".")
    if ":" in name:
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            raise _Bad(f"{text!r} is neither a host name nor an IP address") from None
    why = _host_problem(name) if name else "must not be empty"
    if why:
        raise _Bad(why)
    return name


def _check_send_proxy(text: str) -> str:
    if text not in SEND_PROXY_VERSIONS:
        raise _Bad(f'must be "", "v1" or "v2"; got {text!r}')
    return text


def _check_acme_name(text: str) -> str:
    name = text.lower().rstrip(".")
    if name.startswith("*."):
        # RFC 8555 section 7.1.3: a wildcard can only be validated by DNS-01, which fastlb does not do.
        raise _Bad(f"{text!r}: wildcard names need the DNS-01 challenge, which fastlb does not do")
    why = _host_problem(name) if name else "must not be empty"
    if why or _IPV4_LIKE.fullmatch(name):
        raise _Bad(why or f"{text!r}: an IP address is not a DNS name")
    return name


def _check_acme_directory(text: str) -> str:
    if text and not text.startswith(("https://", "http://")):
        raise _Bad(f"{text!r} is not an http(s) URL")
    return text


def _optional_name(text: str) -> str | None:
    return text or None


class _Table(_Kind):
    from_env = False

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def parse(self, value: object, key: str, ctx: _Ctx) -> Any:
        return _parse_table(self.cls, value, key, ctx)


class _ListOf(_Kind):
    from_env = False

    def __init__(self, item: _Kind, empty: str | None = None) -> None:
        self.item = item
        self.empty = empty  # the reason an empty list is refused, or None if it is fine

    def parse(self, value: object, key: str, ctx: _Ctx) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _error_at(value, key, ctx, f"expected a list, got {_type_name(value)}")
        if not value and self.empty:
            raise _error_at(value, key, ctx, self.empty)
        return tuple(self.item.parse(item, f"{key}[{i}]", ctx) for i, item in enumerate(value))


class _Server(_Kind):
    """``"host:port"`` or ``{ address = "host:port", weight = 2 }``."""

    from_env = False

    def parse(self, value: object, key: str, ctx: _Ctx) -> ServerSpec:
        if isinstance(value, str):
            return ServerSpec(_ADDRESS.parse(value, f"{key}.address", ctx))
        if isinstance(value, dict):
            return _parse_table(ServerSpec, value, key, ctx)
        raise _error_at(value, key, ctx, f"expected a string or table, got {_type_name(value)}")


_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _named_tables(value: object, key: str, ctx: _Ctx) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _error_at(value, key, ctx, f"expected a table, got {_type_name(value)}")
    for name in value:
        if not _NAME.fullmatch(name):
            raise _file_error(ctx, f"{key}.{name}", "invalid name: use letters, digits, '_' and '-'")
    return value


class _Backends(_Kind):
    from_env = False

    def parse(self, value: object, key: str, ctx: _Ctx) -> dict[str, BackendSpec]:
        tables = _named_tables(value, key, ctx)
        return {
            name: _parse_table(BackendSpec, table, f"{key}.{name}", ctx, name=name)
            for name, table in tables.items()
        }


class _Services(_Kind):
    from_env = False

    def parse(self, value: object, key: str, ctx: _Ctx) -> dict[str, tuple[Address, ...]]:
        tables = _named_tables(value, key, ctx)
        return {name: _ADDRESS_LIST.parse(items, f"{key}.{name}", ctx) for name, items in tables.items()}


_ADDRESS = _AddressKind()
_ADDRESS_LIST = _ListOf(_ADDRESS)


def _setting(
    default: Any, kind: _Kind, doc: str, *, env: tuple[str, ...] = (), required: bool = False
) -> Any:
    """A configurable field: its kind, its one-line doc and extra environment-variable names."""
    metadata = {"kind": kind, "doc": doc, "env": env, "required": required}
    return field(default=default, metadata=metadata)


def _section(cls: type, doc: str, *, env: bool = False) -> Any:
    """A sub-table. With ``env``, each of its scalar keys is also ``FASTLB_<SECTION>_<KEY>``."""
    return field(default_factory=cls, metadata={"kind": _Table(cls), "doc": doc, "env_section": env})


# --------------------------------------------------------------------------------------------------------
# The schema

DEFAULT_CIPHERS = (
    # Mozilla "intermediate" TLS 1.2 suites (https://ssl-config.mozilla.org/, guidelines v5.7): forward
    # secrecy and AEAD only. TLS 1.3 suites are configured separately by OpenSSL and are all fine.
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)

DEFAULT_LISTEN = Address("0.0.0.0", 8080)

# "tls": the server's certificate failed verification, or the TLS handshake failed (fastlb/net/upstream_tls.py).
FAIL_KINDS = ("connect", "timeout", "reset", "invalid", "tls")
BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "p2c", "hash", "random")


@dataclass(frozen=True, slots=True)
class ServerSpec:
    address: Address = _setting(None, _ADDRESS, "server address", required=True)
    weight: int = _setting(1, _Int(0, 256), "relative share of requests; 0 = no new requests")
    server_name: str | None = _setting(
        None, _Str(_check_upstream_name), "TLS to this server: the SNI and the name verified (overrides the backend's)"
    )


def _check_alpn(text: str) -> str:
    # fastlb speaks HTTP/1.1 to backends: offering h2 would let a backend pick a protocol fastlb then
    # does not speak on that connection.
    if text not in ("http/1.1", "http/1.0"):
        raise _Bad(f'fastlb speaks HTTP/1.x to backends: "http/1.1" or "http/1.0", not {text!r}')
    return text


class _AlpnList(_ListOf):
    """A TOML list, or comma-separated in a variable (``FASTLB_BACKENDS_TLS_ALPN=http/1.1``)."""

    from_env = True
    label = "comma-separated ALPN protocols"
    toml_label = "list of ALPN protocols"

    def parse(self, value: object, key: str, ctx: _Ctx) -> tuple[Any, ...]:
        if isinstance(value, _Text):
            items = [_Text(item.strip(), value.source, value.var) for item in value.split(",") if item.strip()]
            return tuple(self.item.parse(item, key, ctx) for item in items)
        return super().parse(value, key, ctx)

    def show(self, default: Any) -> str:
        return ",".join(default) or "none"


@dataclass(frozen=True, slots=True)
class BackendTlsSpec:
    """``[backends.NAME.tls]``: TLS from fastlb to this backend's servers (fastlb/net/upstream_tls.py)."""

    enabled: bool = _setting(True, _Bool(), "encrypt connections to the servers (the table's presence turns it on)")
    ca: str = _setting(
        "", _Path(readable=True, what="CA bundle"), 'CA bundle (PEM) that verifies the servers; "" = the system store'
    )
    verify: bool = _setting(True, _Bool(), "verify the server's certificate and name (false is logged at start)")
    server_name: str | None = _setting(
        None, _Str(_check_upstream_name), "SNI and name verified (default: each server's host)"
    )
    sni_from_host: bool = _setting(
        False, _Bool(), "SNI and name verified are the request's Host (a server entry's server_name still wins)"
    )
    cert: str = _setting("", _Path(readable=True), 'client certificate chain (PEM) for mTLS; "" = none')
    key: str = _setting("", _Path(readable=True, what="private key"), 'private key (PEM) of cert; "" = none')
    min_version: str = _setting("1.2", _TlsVersion(), "lowest TLS version offered")
    alpn: tuple[str, ...] = _setting(("http/1.1",), _AlpnList(_Str(_check_alpn)), "ALPN protocols offered")


@dataclass(frozen=True, slots=True)
class HealthSpec:
    type: str = _setting("http", _Choice("http", "tcp"), "check by HTTP request or by TCP connect")
    path: str = _setting("/", _Str(_check_route_path), "path of the HTTP check request")
    interval: float = _setting(2.0, _Duration(positive=True), "time between checks")
    timeout: float = _setting(1.0, _Duration(positive=True), "time a check may take")
    rise: int = _setting(2, _Int(1, 100), "consecutive passes that bring a server up")
    fall: int = _setting(3, _Int(1, 100), "consecutive failures that take a server down")
    expect: tuple[int, int] = _setting((200, 399), _StatusRange(), "statuses that pass, as 200-399 or 200")
    host: str | None = _setting(
        None, _Str(_check_health_host), "Host header of the check (default: the server address)"
    )


@dataclass(frozen=True, slots=True)
class BackendSpec:
    name: str
    servers: tuple[ServerSpec, ...] = _setting(
        (), _ListOf(_Server(), empty="at least one server is required"), "servers to balance over", required=True
    )
    balance: str = _setting("roundrobin", _Choice(*BALANCE_ALGORITHMS), "balancing algorithm")
    hash_on: str = _setting(
        "client_ip", _Str(_check_hash_on, "client_ip|uri|header:NAME|cookie:NAME"), "hash key"
    )
    health: HealthSpec | None = _setting(None, _Table(HealthSpec), "active health check (none if absent)")
    connect_timeout: float = _setting(3.0, _Duration(), "time to connect to a server")
    response_timeout: float = _setting(60.0, _Duration(), "time from request sent to response head")
    idle_timeout: float = _setting(60.0, _Duration(), "how long an idle upstream connection is kept")
    retries: int = _setting(2, _Int(0, 100), "other servers tried after a failed connect")
    max_connections: int = _setting(0, _Int(0), "per-server in-flight requests per worker; 0 = no cap")
    max_queue: int = _setting(1000, _Int(0), "requests per worker waiting for a server under its cap")
    queue_timeout: float = _setting(5.0, _Duration(), "how long a request may wait in that queue (503 after)")
    max_fails: int = _setting(3, _Int(0), "consecutive failures that eject a server; 0 = never")
    fail_on: tuple[str, ...] = _setting(
        FAIL_KINDS, _ListOf(_Choice(*FAIL_KINDS, "5xx")), "failures max_fails counts"
    )
    fail_timeout: float = _setting(10.0, _Duration(), "how long an ejected server stays out (doubles on repeats)")
    slow_start: float = _setting(0.0, _Duration(), "ramp-up time of a recovered server's weight")
    send_proxy: str = _setting(
        "",
        _Str(_check_send_proxy, '"", v1 or v2'),
        'PROXY protocol header sent first on every connection to a server (v1 text, v2 binary); "" = none',
    )
    tls: BackendTlsSpec | None = _setting(
        None, _Table(BackendTlsSpec), "TLS to the servers (none if absent: plain TCP)"
    )


# Route policies and hooks (issue 17; fastlb/policy/, fastlb/hooks.py).

# Fields fastlb frames the message or the connection with (RFC 9112 §6, RFC 9110 §7.6.1): a header rule
# cannot touch them (fastlb/heads.py refuses them the same way at run time).
_PROTECTED_FIELDS = (
    "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer", "upgrade",
    "proxy-connection",
)


def _check_header_name(text: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise _Bad(f"{text!r} is not a header name")
    if text.lower() in _PROTECTED_FIELDS:
        raise _Bad(f"{text!r} frames the message or the connection: fastlb owns it")
    return text


class _HeaderMap(_Kind):
    """``{ "X-A" = "1", ... }``: header names to values, in file order."""

    from_env = False
    label = "table of header: value"

    def parse(self, value: object, key: str, ctx: _Ctx) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise _error_at(value, key, ctx, f"expected a table, got {_type_name(value)}")
        pairs = []
        for name, text in value.items():
            try:
                _check_header_name(name)
                _expect(text, (str,), "a string")
                if any(c in text for c in "\r\n\0"):
                    raise _Bad("a header value cannot hold CR, LF or NUL")
            except _Bad as e:
                raise _file_error(ctx, f"{key}.{name}", str(e)) from None
            pairs.append((name, text))
        return tuple(pairs)

    def show(self, default: Any) -> str:
        return "none"


_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


class _Rate(_Kind):
    label = "rate such as 100/s"

    def toml(self, value: object, ctx: _Ctx) -> float:
        _expect(value, (str,), 'a rate such as "100/s"')
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|m|h)\s*", str(value))
        if match is None:
            raise _Bad(f'expected a rate such as "100/s", "600/m" or "10/h", got {value!r}')
        per_second = float(match.group(1)) / _RATE_UNITS[match.group(2)]
        if not 1 / 3600 <= per_second <= 1_000_000:
            raise _Bad(f"{value!r} is outside 1/h to 1000000/s")
        return per_second

    def show(self, default: Any) -> str:
        return "none" if default is None else f"{default:g}/s"


def _check_rate_key(text: str) -> str:
    if text == "uri":
        raise _Bad("must be client_ip, header:NAME or cookie:NAME; got 'uri'")
    return _check_hash_on(text)


_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _check_module_name(text: str) -> str:
    if text and not _MODULE.fullmatch(text):
        raise _Bad(f"{text!r} is not a dotted Python module name")
    return text


def _check_hook_ref(text: str) -> str:
    module, colon, function = text.rpartition(":")
    if text and not (_MODULE.fullmatch(function) and "." not in function and (not colon or _MODULE.fullmatch(module))):
        raise _Bad(f'{text!r}: expected "module:function", or "function" of the [hooks] module')
    return text


def _check_rewrite(text: str) -> str:
    return _check_route_path(text) if text else text


@dataclass(frozen=True, slots=True)
class HeaderRulesSpec:
    set: tuple[tuple[str, str], ...] = _setting((), _HeaderMap(), "fields set (replacing any of that name)")
    remove: tuple[str, ...] = _setting((), _ListOf(_Str(_check_header_name)), "fields removed")


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    rate: float = _setting(None, _Rate(), "sustained rate per key, as 100/s, 600/m or 10/h", required=True)
    burst: int = _setting(1, _Int(1, 1_000_000), "requests a key may make at once above the rate")
    key: str = _setting(
        "client_ip", _Str(_check_rate_key, "client_ip|header:NAME|cookie:NAME"),
        "what a bucket is kept per (a request without the header or cookie is counted by client_ip)",
    )
    max_keys: int = _setting(
        65536, _Int(8, 1 << 24),
        "keys tracked at once, host-wide (8 bytes each, rounded up to a power of two); the least "
        "recently seen go first",
    )


@dataclass(frozen=True, slots=True)
class HooksSpec:
    module: str = _setting(
        "", _Str(_check_module_name, "module"),
        'Python module (on the import path) whose on_request/on_response run on every route; "" = none',
    )
    timeout: float = _setting(1.0, _Duration(positive=True), "how long an async hook may take (504 after)")


@dataclass(frozen=True, slots=True)
class RouteSpec:
    # Every field has a default so that positional and keyword construction both work; a route read
    # from the config must name its backend (`required`).
    host: str | None = _setting(None, _Str(_check_route_host), "exact host, *.example.com, or absent = any")
    path: str = _setting("/", _Str(_check_route_path), "URL path")
    match: str = _setting("prefix", _Choice("prefix", "exact"), "prefix (whole segments) or exact")
    backend: str = _setting("", _Str(_check_nonempty), "backend name", required=True)
    require_client_cert: bool = _setting(
        False, _Bool(), "refuse a request whose connection has no verified client certificate (needs [tls.client_auth])"
    )
    allow: tuple[str, ...] = _setting((), _Cidrs(), "client addresses served; others get 403 (none = all)")
    deny: tuple[str, ...] = _setting((), _Cidrs(), "client addresses refused with 403 (checked before allow)")
    rate_limit: RateLimitSpec | None = _setting(
        None, _Table(RateLimitSpec), "host-wide token bucket per key; over it, 429 with Retry-After"
    )
    basic_auth: str = _setting(
        "", _Path(readable=True, label="path", what="htpasswd file"),
        'htpasswd file of bcrypt hashes; without a valid user, 401; "" = off'
    )
    request_headers: HeaderRulesSpec | None = _setting(
        None, _Table(HeaderRulesSpec), "fields set and removed on the request sent upstream"
    )
    response_headers: HeaderRulesSpec | None = _setting(
        None, _Table(HeaderRulesSpec), "fields set and removed on the response sent to the client"
    )
    rewrite_prefix: str = _setting(
        "", _Str(_check_rewrite, "path"), 'replaces the matched path prefix upstream; "" = none'
    )
    hook: str = _setting(
        "", _Str(_check_hook_ref, "module:function"),
        "on_request function for this route, instead of the [hooks] module's",
    )


@dataclass(frozen=True, slots=True)
class PassthroughSpec:
    sni: str = _setting("", _Str(_check_sni_name), "exact server name or *.example.com", required=True)
    backend: str = _setting("", _Str(_check_nonempty), "backend the connection is spliced to", required=True)


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    address: Address = _setting(None, _ADDRESS, "address to listen on", required=True)
    tls: bool = _setting(False, _Bool(), "terminate TLS on this listener")
    redirect_to_https: bool = _setting(False, _Bool(), "answer every request with a redirect to https")
    proxy_protocol: bool = _setting(
        False, _Bool(), "expect a PROXY protocol v1/v2 header first, from server.trusted_proxies only"
    )
    passthrough: tuple[PassthroughSpec, ...] = _setting(
        (),
        _ListOf(_Table(PassthroughSpec)),
        "TLS connections whose SNI matches are spliced, never decrypted, to a backend (TLS listeners only)",
    )


@dataclass(frozen=True, slots=True)
class CertSpec:
    # cert and key are required unless acme = true (_check_cert_spec): then fastlb obtains them.
    cert: str = _setting("", _Path(readable=True), "certificate chain (PEM)")
    key: str = _setting("", _Path(readable=True), "private key (PEM)")
    acme: bool = _setting(False, _Bool(), "obtain and renew this certificate from the [acme] CA")
    names: tuple[str, ...] = _setting(
        (), _ListOf(_Str(_check_acme_name)), "with acme: the DNS names the certificate covers (first = its name)"
    )


CLIENT_AUTH_MODES = ("require", "optional")


@dataclass(frozen=True, slots=True)
class ClientAuthSpec:
    ca: str = _setting(
        "", _Path(readable=True), "CA certificates (PEM) client certificates must chain to", required=True
    )
    mode: str = _setting(
        "require", _Choice(*CLIENT_AUTH_MODES), "require: no certificate, no handshake; optional: verified if sent"
    )
    crl: str = _setting(
        "", _Path(readable=True, what="CRL"), 'revoked client certificates: PEM CRLs of the ca issuers; "" = none'
    )


@dataclass(frozen=True, slots=True)
class TlsSpec:
    min_version: str = _setting("1.2", _TlsVersion(), "lowest TLS version accepted")
    ciphers: str = _setting(DEFAULT_CIPHERS, _Ciphers(), "TLS 1.2 cipher suites")
    handshake_timeout: float = _setting(10.0, _Duration(), "time a TLS handshake may take")
    certificates: tuple[CertSpec, ...] = _setting(
        (),
        _ListOf(_Table(CertSpec)),
        "certificates: each serves the names in its subjectAltName (SNI); the first also serves clients "
        "that send no name or an unknown one (unless strict_sni)",
    )
    strict_sni: bool = _setting(
        False,
        _Bool(),
        "refuse a handshake whose SNI names no certificate, or that has none, with the unrecognized_name alert",
    )
    client_auth: ClientAuthSpec | None = _setting(
        None, _Table(ClientAuthSpec), "client certificates (mutual TLS) on every TLS listener; none if absent"
    )


ACME_CHALLENGES = ("http-01", "tls-alpn-01")


@dataclass(frozen=True, slots=True)
class AcmeSpec:
    directory: str = _setting(
        "", _Str(_check_acme_directory, "URL"),
        'the CA\'s ACME directory URL (RFC 8555 section 7.1.1); "" = no ACME'
    )
    email: str = _setting("", _Str(), "contact address given to the CA for expiry notices")
    directory_ca: str = _setting(
        "", _Path(readable=True), 'CA bundle (PEM) the directory\'s HTTPS is verified with; "" = system store'
    )
    storage: str = _setting(
        "", _Path(),
        'directory for the account key and certificates; "" = /var/lib/fastlb/acme as root, else '
        "$XDG_DATA_HOME/fastlb/acme or ~/.local/share/fastlb/acme",
    )
    challenge: str = _setting("http-01", _Choice(*ACME_CHALLENGES), "how the CA checks that we serve a name")
    renew_before: float = _setting(
        30 * 86400.0, _Duration(positive=True), "renew a certificate this long before it expires"
    )
    eab_kid: str = _setting("", _Str(), "External Account Binding key id (ZeroSSL, some private CAs)")
    eab_hmac_key: str = _setting("", _Str(), "External Account Binding HMAC key (base64url)")


@dataclass(frozen=True, slots=True)
class AdminSpec:
    address: Address | None = _setting(
        Address("127.0.0.1", 9900),
        _AddressKind(optional=True),
        "admin listener (/metrics, /status, /healthz)",
        env=("FASTLB_ADMIN_LISTEN",),
    )


@dataclass(frozen=True, slots=True)
class LimitsSpec:
    max_request_line: int = _setting(8192, _Size(lo=1), "longest request line (414 above)")
    max_header_bytes: int = _setting(16384, _Size(lo=1), "largest request header block (431 above)")
    max_headers: int = _setting(100, _Int(1), "most request header fields (431 above)")
    max_body_bytes: int = _setting(0, _Size(), "largest request body (413 above); 0 = unlimited")
    header_timeout: float = _setting(10.0, _Duration(), "total time to receive a request head (408 after)")
    body_timeout: float = _setting(60.0, _Duration(), "time between two reads of a request body")
    send_timeout: float = _setting(60.0, _Duration(), "time a client may take to accept response data")
    idle_timeout: float = _setting(60.0, _Duration(), "how long an idle client connection is kept")
    max_connections: int = _setting(0, _Int(0), "client connections per worker; 0 = unlimited")


@dataclass(frozen=True, slots=True)
class LogSpec:
    access: str = _setting(
        "", _Path(keep=("", "stdout"), label='"", "stdout" or path'), 'JSON access log; "" = off'
    )
    access_buffer: int = _setting(
        8 << 20, _Size(lo=1), "access log bytes waiting for the disk before lines are dropped"
    )
    format: str = _setting("text", _Choice("text", "json"), "error log format")
    level: str = _setting("info", _Choice("debug", "info", "warning", "error", "critical"), "error log level")


@dataclass(frozen=True, slots=True)
class ServerSection:
    workers: int = _setting(
        0, _Int(0, 1024), "worker processes; 0 = one per usable core", env=("FASTLB_WORKERS",)
    )
    graceful_timeout: float = _setting(
        30.0, _Duration(), "how long stopping workers may finish requests", env=("FASTLB_GRACEFUL_TIMEOUT",)
    )
    pid_file: str = _setting(
        "",
        _Path(),
        'file the master writes and locks its pid in; "" = /run/fastlb.pid as root, else '
        "$XDG_RUNTIME_DIR/fastlb.pid or /tmp/fastlb-UID.pid",
    )
    user: str = _setting("", _Str(), 'user to switch to after binding; "" = stay')
    group: str = _setting("", _Str(), 'group to switch to after binding; "" = stay')
    trusted_proxies: tuple[str, ...] = _setting((), _Cidrs(), "peers whose X-Forwarded-For is kept")
    heartbeat_timeout: float = _setting(10.0, _Duration(), "a worker silent this long is killed and replaced")
    drain_delay: float = _setting(
        0.0,
        _Duration(),
        "on TERM, /healthz answers 503 at once and the listeners keep serving this long before the "
        "graceful drain, so an L4 balancer's health check takes the node out first",
    )
    watch: bool = _setting(
        False,
        _Bool(),
        "reload when the config file, a certificate, an htpasswd file or an --ingress manifest changes (debounced; "
        "follows Kubernetes' ..data symlink swap of mounted ConfigMaps and Secrets)",
    )


@dataclass(frozen=True, slots=True)
class Config:
    source: str | None = None  # absolute path of the config file, or None
    server: ServerSection = _section(ServerSection, "process settings", env=True)
    listeners: tuple[ListenerSpec, ...] = _setting(
        (ListenerSpec(DEFAULT_LISTEN),),
        _ListOf(_Table(ListenerSpec)),
        f"listening sockets; with none configured, one plain listener on {DEFAULT_LISTEN}",
    )
    tls: TlsSpec = _section(TlsSpec, "TLS settings", env=True)
    acme: AcmeSpec = _section(AcmeSpec, "automatic certificates (ACME, RFC 8555)", env=True)
    admin: AdminSpec = _section(AdminSpec, "admin listener", env=True)
    limits: LimitsSpec = _section(LimitsSpec, "client request limits", env=True)
    log: LogSpec = _section(LogSpec, "logging", env=True)
    hooks: HooksSpec = _section(HooksSpec, "Python hooks (fastlb.hooks)", env=True)
    routes: tuple[RouteSpec, ...] = _setting(
        (), _ListOf(_Table(RouteSpec)), "routing table: the most specific host wins, then the longest path"
    )
    backends: dict[str, BackendSpec] = field(
        default_factory=dict, metadata={"kind": _Backends(), "doc": "backends by name, as routes name them"}
    )
    default_backend: str | None = _setting(
        None, _Str(_optional_name), "backend for requests no route matches"
    )
    services: dict[str, tuple[Address, ...]] = field(
        default_factory=dict,
        metadata={
            "kind": _Services(),
            "doc": 'Kubernetes Service names and their servers, for --ingress: api = ["10.0.0.5:8080", ...]',
        },
    )

    def workers_effective(self) -> int:
        if self.server.workers:
            return self.server.workers
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------------
# The generic walk


def _settings(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if "kind" in f.metadata}


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _parse_table(cls: type, value: object, key: str, ctx: _Ctx, **given: Any) -> Any:
    if not isinstance(value, dict):
        raise _error_at(value, key, ctx, f"expected a table, got {_type_name(value)}")
    settings = _settings(cls)
    for name in value:
        if name not in settings:
            raise _file_error(ctx, _join(key, name), "unknown key" + _key_hint(settings, key, name))
    kwargs = dict(given)
    for name, f in settings.items():
        if name in value:
            kwargs[name] = f.metadata["kind"].parse(value[name], _join(key, name), ctx)
        elif f.metadata.get("required"):
            raise _file_error(ctx, _join(key, name), "missing required key")
    result = cls(**kwargs)
    check = _TABLE_CHECKS.get(cls)
    if check is not None:
        check(result, value, key, ctx)
    return result


def _key_hint(settings: dict[str, dataclasses.Field[Any]], key: str, name: str) -> str:
    """`` (did you mean ...?)`` for an unknown key, or "". A key of a sub-table written in its parent
    comes first (``[tls] cert`` is ``[[tls.certificates]] cert``, ``workers`` is ``[server] workers``),
    then a near spelling of a key of this table (``wrokers``)."""
    for f in settings.values():
        kind = f.metadata["kind"]
        inner = kind.item if isinstance(kind, _ListOf) else kind
        if isinstance(inner, _Table) and name in _settings(inner.cls):
            table = f"[[{_join(key, f.name)}]]" if isinstance(kind, _ListOf) else f"[{_join(key, f.name)}]"
            return f" (did you mean {table} {name}?)"
    close = difflib.get_close_matches(name, list(settings), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_listener(listener: ListenerSpec, raw: dict[str, Any], key: str, ctx: _Ctx) -> None:
    if listener.tls and listener.redirect_to_https:
        raise _file_error(ctx, f"{key}.redirect_to_https", "a TLS listener cannot redirect to https")
    if listener.passthrough and not listener.tls:
        raise _file_error(ctx, f"{key}.passthrough", "SNI passthrough needs tls = true: SNI is in a TLS ClientHello")
    seen: dict[str, int] = {}
    for i, entry in enumerate(listener.passthrough):
        if entry.sni in seen:
            reason = f"duplicate sni {entry.sni!r} (also passthrough[{seen[entry.sni]}])"
            raise _file_error(ctx, f"{key}.passthrough[{i}].sni", reason)
        seen[entry.sni] = i


def _check_backend(backend: BackendSpec, raw: dict[str, Any], key: str, ctx: _Ctx) -> None:
    seen: dict[Address, int] = {}
    for i, server in enumerate(backend.servers):
        if server.address in seen:
            item = raw["servers"][i]
            where = item.get("address") if isinstance(item, dict) else item
            reason = f"duplicate server {server.address} (also servers[{seen[server.address]}])"
            raise _error_at(where, f"{key}.servers[{i}].address", ctx, reason)
        seen[server.address] = i


def _check_cert_spec(spec: CertSpec, raw: dict[str, Any], key: str, ctx: _Ctx) -> None:
    if spec.acme:
        if not spec.names:
            raise _file_error(ctx, f"{key}.names", "acme = true needs the names to obtain a certificate for")
        for name in ("cert", "key"):
            if name in raw:
                raise _file_error(ctx, f"{key}.{name}", "not allowed with acme = true: fastlb obtains it")
        return
    if spec.names:
        raise _file_error(ctx, f"{key}.names", "only for acme = true (a file's names are its subjectAltName)")
    for name in ("cert", "key"):
        if name not in raw:
            raise _file_error(ctx, f"{key}.{name}", "missing required key")


def _check_acme(config: Config, raw: dict[str, Any], ctx: _Ctx) -> None:
    managed = [i for i, spec in enumerate(config.tls.certificates) if spec.acme]
    if not managed:
        return
    acme = config.acme
    if not acme.directory:
        raise _file_error(ctx, f"tls.certificates[{managed[0]}].acme", "needs [acme] directory")
    if not any(listener.tls for listener in config.listeners):
        raise _file_error(ctx, f"tls.certificates[{managed[0]}].acme", "needs a TLS listener to serve it")
    if bool(acme.eab_kid) != bool(acme.eab_hmac_key):
        raise _file_error(ctx, "acme.eab_kid" if not acme.eab_kid else "acme.eab_hmac_key",
                          "eab_kid and eab_hmac_key go together")
    # RFC 8555 section 8.3 / RFC 8737 section 3: the CA connects to port 80 or 443 of the name; the
    # listener that answers there must exist.
    tls = acme.challenge == "tls-alpn-01"
    if not any(listener.tls == tls for listener in config.listeners):
        kind = "TLS" if tls else "plain"
        raise _file_error(ctx, "acme.challenge", f"{acme.challenge} needs a {kind} listener")


def _check_route_policies(config: Config, raw: dict[str, Any], ctx: _Ctx) -> None:
    """Import the hook modules and read the htpasswd files now, in the master: a typo, an import error or
    an unusable file fails `fastlb check` and refuses a reload instead of failing requests later."""
    from fastlb import hooks
    from fastlb.policy import basicauth

    raw_routes = raw.get("routes") or []

    def where(i: int, name: str) -> object:
        return raw_routes[i].get(name) if i < len(raw_routes) and isinstance(raw_routes[i], dict) else None

    fresh: set[str] = set()
    if config.hooks.module:
        try:
            hooks.check_module(config.hooks.module, fresh)
        except hooks.HookError as e:
            raise _error_at(raw.get("hooks", {}).get("module"), "hooks.module", ctx, str(e)) from None
    for i, route in enumerate(config.routes):
        if route.hook:
            try:
                hooks.resolve(route.hook, config.hooks.module, fresh)
            except hooks.HookError as e:
                raise _error_at(where(i, "hook"), f"routes[{i}].hook", ctx, str(e)) from None
        if route.basic_auth:
            try:
                basicauth.read_htpasswd(route.basic_auth)
            except ValueError as e:
                raise _error_at(where(i, "basic_auth"), f"routes[{i}].basic_auth", ctx, str(e)) from None


def _check_backend_tls(tls: BackendTlsSpec, raw: dict[str, Any], key: str, ctx: _Ctx) -> None:
    for name, other in (("cert", "key"), ("key", "cert")):
        if getattr(tls, name) and not getattr(tls, other):
            raise _error_at(raw.get(name), f"{key}.{other}", ctx, f"{other} is required with {name} (mTLS)")


_TABLE_CHECKS: dict[type, Callable[[Any, dict[str, Any], str, _Ctx], None]] = {
    CertSpec: _check_cert_spec,
    ListenerSpec: _check_listener,
    BackendSpec: _check_backend,
    BackendTlsSpec: _check_backend_tls,
}


def _check_front_door(config: Config, ctx: _Ctx) -> None:
    """The TLS front door's keys that name another section: client_auth, trusted_proxies, backends."""
    if config.tls.client_auth is None:
        for i, route in enumerate(config.routes):
            if route.require_client_cert:
                raise _file_error(ctx, f"routes[{i}].require_client_cert", "needs [tls.client_auth]")
    for i, listener in enumerate(config.listeners):
        if listener.proxy_protocol and not config.server.trusted_proxies:
            # A PROXY header names the client; taking it from any peer would let anyone pick its address.
            reason = "needs server.trusted_proxies: PROXY headers are accepted only from those peers"
            raise _file_error(ctx, f"listeners[{i}].proxy_protocol", reason)
        for j, entry in enumerate(listener.passthrough):
            if entry.backend not in config.backends:
                reason = f"backend {entry.backend!r} is not defined"
                raise _file_error(ctx, f"listeners[{i}].passthrough[{j}].backend", reason)


def _check_config(config: Config, raw: dict[str, Any], ctx: _Ctx) -> None:
    """What no single table can check: references between sections and clashes."""
    raw_routes = raw.get("routes") or []
    routes_seen: dict[tuple[str | None, str, str], int] = {}
    for i, route in enumerate(config.routes):
        if route.backend not in config.backends:
            where = raw_routes[i].get("backend")
            raise _error_at(where, f"routes[{i}].backend", ctx, f"backend {route.backend!r} is not defined")
        ident = (route.host, route.path, route.match)
        if ident in routes_seen:
            raise _file_error(
                ctx,
                f"routes[{i}]",
                f"duplicate route: same host, path and match as routes[{routes_seen[ident]}]",
            )
        routes_seen[ident] = i

    if config.default_backend is not None and config.default_backend not in config.backends:
        reason = f"backend {config.default_backend!r} is not defined"
        raise _error_at(raw.get("default_backend"), "default_backend", ctx, reason)

    raw_listeners = raw.get("listeners") or []

    def listener_address(i: int) -> object:
        return raw_listeners[i].get("address") if i < len(raw_listeners) else None

    addresses: dict[Address, int] = {}
    for i, listener in enumerate(config.listeners):
        if listener.address in addresses:
            reason = f"duplicate listener {listener.address} (also listeners[{addresses[listener.address]}])"
            raise _error_at(listener_address(i), f"listeners[{i}].address", ctx, reason)
        addresses[listener.address] = i
    if config.admin.address in addresses:
        reason = (
            f"{config.admin.address} is already the address of listeners[{addresses[config.admin.address]}]"
        )
        raise _error_at((raw.get("admin") or {}).get("address"), "admin.address", ctx, reason)
    _check_acme(config, raw, ctx)
    _check_front_door(config, ctx)


def _check_certificates(config: Config, raw: dict[str, Any], ctx: _Ctx) -> None:
    """A TLS listener needs a certificate. Run after the Ingress manifests are merged: their ``tls:``
    sections may be the only certificates."""
    if config.tls.certificates:
        return
    raw_listeners = raw.get("listeners") or []
    for i, listener in enumerate(config.listeners):
        if listener.tls:
            where = raw_listeners[i].get("address") if i < len(raw_listeners) else None
            if isinstance(where, _Text):
                reason = "TLS listener needs at least one certificate (set FASTLB_TLS_CERT and FASTLB_TLS_KEY)"
                raise ConfigError(where.source, where.var, reason)
            reason = "TLS listener needs at least one certificate ([[tls.certificates]] or an Ingress tls: section)"
            raise _file_error(ctx, "tls.certificates", reason)


# --------------------------------------------------------------------------------------------------------
# Environment variables and command-line flags


@dataclass(frozen=True, slots=True)
class _EnvVar:
    name: str
    doc: str
    apply: Callable[[dict[str, Any], _Text], None] | None  # None: read elsewhere or not a setting
    path: tuple[str, ...] = ()  # the key a generic variable sets, to catch two names for it at once
    # For the configuration reference: the key a variable sets, in its notation (``listeners[].address``),
    # and which of several such keys when it is not all of them (``first plain listener``).
    key: str = ""
    scope: str = ""


def _subtable(
    tree: dict[str, Any], path: tuple[str, ...], made: _Text | None = None
) -> dict[str, Any] | None:
    """The table at ``path``, created if absent; None if the file put something else there (the typed walk
    reports that with the file's key path)."""
    table = tree
    for name in path:
        if name not in table:
            table[name] = _Made(made.source, made.var) if made is not None else {}
        table = table[name]
        if not isinstance(table, dict):
            return None
    return table


def _setter(path: tuple[str, ...]) -> Callable[[dict[str, Any], _Text], None]:
    def apply(tree: dict[str, Any], text: _Text) -> None:
        table = _subtable(tree, path[:-1])
        if table is not None:
            table[path[-1]] = text

    return apply


def _made_setter(path: tuple[str, ...]) -> Callable[[dict[str, Any], _Text], None]:
    """Like `_setter`, but a table it creates remembers the variable, for `_check_made`."""

    def apply(tree: dict[str, Any], text: _Text) -> None:
        table = _subtable(tree, path[:-1], made=text)
        if table is not None:
            table[path[-1]] = text

    return apply


def _set_listener(tls: bool) -> Callable[[dict[str, Any], _Text], None]:
    def apply(tree: dict[str, Any], text: _Text) -> None:
        listeners = tree.setdefault("listeners", [])
        if not isinstance(listeners, list):
            return
        for listener in listeners:
            if isinstance(listener, dict) and (listener.get("tls") is True) == tls:
                listener["address"] = text
                return
        listeners.append({"address": text, "tls": True} if tls else {"address": text})

    return apply


def _set_certificate(name: str) -> Callable[[dict[str, Any], _Text], None]:
    def apply(tree: dict[str, Any], text: _Text) -> None:
        tls = _subtable(tree, ("tls",))
        if tls is None:
            return
        certificates = tls.setdefault("certificates", [])
        if not isinstance(certificates, list):
            return
        if not certificates:
            certificates.append(_Made(text.source, text.var))
        if isinstance(certificates[0], dict):
            certificates[0][name] = text

    return apply


def _set_backends(tree: dict[str, Any], text: _Text) -> None:
    items = [_Text(item.strip(), text.source, text.var) for item in text.split(",")]
    if not all(items):
        raise ConfigError(
            text.source, text.var, f"expected comma-separated host:port addresses, got {str(text)!r}"
        )
    backend = _subtable(tree, ("backends", "default"), made=text)
    if backend is None:
        return
    backend["servers"] = items
    if not tree.get("routes"):
        tree["routes"] = [{"path": "/", "backend": "default"}]


def _set_backend_tls(name: str) -> Callable[[dict[str, Any], _Text], None]:
    def apply(tree: dict[str, Any], text: _Text) -> None:
        table = _subtable(tree, ("backends", "default", "tls"), made=text)
        if table is not None:
            table[name] = text

    return apply


def _set_balance(tree: dict[str, Any], text: _Text) -> None:
    backend = _subtable(tree, ("backends", "default"), made=text)
    if backend is not None:
        backend["balance"] = text


def _describe(key: str, f: dataclasses.Field[Any]) -> str:
    kind: _Kind = f.metadata["kind"]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return f"{key}: {f.metadata['doc']} ({kind.label}; default {kind.show(default)})"


def _env_table() -> dict[str, _EnvVar]:
    table: dict[str, _EnvVar] = {}

    def add(var: _EnvVar) -> None:
        if var.name in table:
            raise AssertionError(f"two settings named {var.name}")  # a schema mistake, caught at import
        table[var.name] = var

    add(_EnvVar("FASTLB_CONFIG", "path of the TOML config file (default: none)", None))
    add(
        _EnvVar(
            "FASTLB_LISTEN",
            "address of the first plain (non-TLS) listener, created if there is none "
            f"(host:port; default {DEFAULT_LISTEN} when no listener is configured)",
            _set_listener(tls=False),
            key="listeners[].address",
            scope="first plain listener",
        )
    )
    add(
        _EnvVar(
            "FASTLB_TLS_LISTEN",
            "address of the first TLS listener, created if there is none (host:port; default none)",
            _set_listener(tls=True),
            key="listeners[].address",
            scope="first TLS listener",
        )
    )
    add(
        _EnvVar(
            "FASTLB_TLS_CERT",
            "certificate chain (PEM) of the first certificate, created with "
            "FASTLB_TLS_KEY if there is none (path; default none)",
            _set_certificate("cert"),
            key="tls.certificates[].cert",
            scope="first certificate",
        )
    )
    add(
        _EnvVar(
            "FASTLB_TLS_KEY",
            "private key (PEM) of the first certificate, created with FASTLB_TLS_CERT "
            "if there is none (path; default none)",
            _set_certificate("key"),
            key="tls.certificates[].key",
            scope="first certificate",
        )
    )
    add(
        _EnvVar(
            "FASTLB_BACKENDS",
            'comma-separated host:port servers of the backend named "default", with a '
            "catch-all route to it if no route is configured (default none)",
            _set_backends,
            key="backends.NAME.servers",
            scope='backend "default"',
        )
    )
    balance = _describe("backends.default.balance", _settings(BackendSpec)["balance"])
    add(_EnvVar("FASTLB_BALANCE", balance, _set_balance, key="backends.NAME.balance", scope='backend "default"'))
    for name, f in _settings(BackendTlsSpec).items():
        add(
            _EnvVar(
                f"FASTLB_BACKENDS_TLS_{name.upper()}",
                _describe(f"backends.default.tls.{name}", f),
                _set_backend_tls(name),
                key=f"backends.NAME.tls.{name}",
                scope='backend "default"',
            )
        )

    for top in dataclasses.fields(Config):
        kind = top.metadata.get("kind")
        if top.metadata.get("env_section"):
            for f in _settings(kind.cls).values():
                if isinstance(f.metadata["kind"], _Table):
                    # A table inside a section ([tls.client_auth]): FASTLB_TLS_CLIENT_AUTH_CA and so on.
                    for inner in _settings(f.metadata["kind"].cls).values():
                        path = (top.name, f.name, inner.name)
                        doc = _describe(".".join(path), inner)
                        name = "_".join(("FASTLB", *path)).upper()
                        add(_EnvVar(name, doc, _made_setter(path), path, ".".join(path)))
                    continue
                if not f.metadata["kind"].from_env:
                    continue
                path = (top.name, f.name)
                doc = _describe(".".join(path), f)
                for name in (f"FASTLB_{top.name}_{f.name}".upper(), *f.metadata.get("env", ())):
                    add(_EnvVar(name, doc, _setter(path), path, ".".join(path)))
        elif kind is not None and kind.from_env:
            add(
                _EnvVar(
                    f"FASTLB_{top.name}".upper(),
                    _describe(top.name, top),
                    _setter((top.name,)),
                    (top.name,),
                    top.name,
                )
            )

    add(
        _EnvVar(
            "FASTLB_NO_EXTENSIONS",
            "1 = use the pure-Python fastlb._core_py instead of the compiled "
            "fastlb._core (boolean; default 0)",
            None,
        )
    )
    add(
        _EnvVar(
            "FASTLB_DEBUG",
            "1 = check every state transition of the data path, in both builds (slower; default 0)",
            None,
        )
    )
    return table


_ENV = _env_table()

#: Every ``FASTLB_*`` variable the loader reads, with a one-line description including its default.
ENV_KEYS: dict[str, str] = {name: var.doc for name, var in _ENV.items()}

# Test harnesses and the demo pass their own FASTLB_TEST_* / FASTLB_DEMO_* variables through the
# environment; they are not settings.
_IGNORED_PREFIXES = ("FASTLB_TEST_", "FASTLB_DEMO_")


def _apply_layer(tree: dict[str, Any], source: str, values: Mapping[str, Any], only_fastlb: bool) -> None:
    present: dict[str, str] = {}
    for name, value in values.items():
        if value is None or (only_fastlb and not name.startswith("FASTLB_")):
            continue
        if name.startswith(_IGNORED_PREFIXES):
            continue
        if name not in _ENV:
            raise ConfigError(source, name, "unknown setting" + _env_hint(name))
        present[name] = value if isinstance(value, str) else _flag_text(value)

    claimed: dict[tuple[str, ...], str] = {}
    for var in _ENV.values():  # declaration order: FASTLB_BACKENDS before FASTLB_BALANCE
        if var.name not in present or var.apply is None:
            continue
        value = present[var.name]
        if var.path:
            other = claimed.setdefault(var.path, var.name)
            if other != var.name and present[other] != value:
                raise ConfigError(source, var.name, f"conflicts with {other}={present[other]!r}")
        var.apply(tree, _Text(value, source, var.name))


def _env_hint(name: str) -> str:
    """`` (did you mean FASTLB_...?)`` for an unknown variable, or "". The last word says what the value
    is, so the shortest (most general) variable ending in the same word comes first: FASTLB_SERVER_LISTEN
    means FASTLB_LISTEN, not FASTLB_SERVER_USER, the nearer spelling. Otherwise the nearest spelling,
    compared without the prefix every name shares."""
    if not name.startswith("FASTLB_"):
        return ""
    rest = name[len("FASTLB_") :]
    names = [var[len("FASTLB_") :] for var in _ENV]
    same_end = [other for other in names if other.rsplit("_", 1)[-1] == rest.rsplit("_", 1)[-1]]
    close = [min(same_end, key=len)] if same_end else difflib.get_close_matches(rest, names, n=1)
    return f" (did you mean FASTLB_{close[0]}?)" if close else ""


def _flag_text(value: object) -> str:
    # The CLI may hand over a parsed flag (an int, a bool) instead of its text.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_made(tree: dict[str, Any]) -> None:
    """Tables created from variables must be complete once every layer is applied."""
    tls = tree.get("tls")
    certificates = tls.get("certificates") if isinstance(tls, dict) else None
    if isinstance(certificates, list) and certificates and isinstance(certificates[0], _Made):
        made = certificates[0]
        for name, var in (("cert", "FASTLB_TLS_CERT"), ("key", "FASTLB_TLS_KEY")):
            if name not in made:
                other = made["key" if name == "cert" else "cert"]
                raise ConfigError(other.source, other.var, f"{var} must be set too")
    client_auth = tls.get("client_auth") if isinstance(tls, dict) else None
    if isinstance(client_auth, _Made) and "ca" not in client_auth:
        raise ConfigError(client_auth.source, client_auth.var, "FASTLB_TLS_CLIENT_AUTH_CA must be set too")
    backends = tree.get("backends")
    default = backends.get("default") if isinstance(backends, dict) else None
    if isinstance(default, _Made) and "servers" not in default:
        raise ConfigError(
            default.source, default.var, "there is no backend named 'default'; set FASTLB_BACKENDS"
        )


# --------------------------------------------------------------------------------------------------------
# Loading


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(path, "-", f"cannot read: {e}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, "-", f"invalid TOML: not UTF-8 ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "-", f"invalid TOML: {e}") from None


def load(
    path: str | None,
    env: Mapping[str, str],
    cli: Mapping[str, str] | None = None,
    merge: Callable[[Config], Config] | None = None,
) -> Config:
    """Read, merge (command line > environment > file > default) and validate the configuration.

    ``env`` is usually ``os.environ``; only ``FASTLB_*`` names are read. ``cli`` maps the same names to
    the command-line flags' values. Without ``path``, ``FASTLB_CONFIG`` (command line, then environment)
    names the file; with neither, the configuration comes from variables and defaults alone. ``merge``
    adds what another source brings (the Kubernetes Ingress manifests: routes, backends, certificates)
    before the checks that need it; the caller passes it, so this module imports nothing of theirs.
    Raises ``ConfigError``.
    """
    cli = cli or {}
    if path is None:
        path = cli.get("FASTLB_CONFIG") or env.get("FASTLB_CONFIG") or None
    if path:
        # Errors name the file by its absolute path: they surface in logs (a failed reload) read long after
        # and far from the shell that started fastlb, whose working directory no one remembers.
        path = os.path.abspath(path)
        tree = _read_toml(path)
        ctx = _Ctx(path, os.path.dirname(path))
    else:
        tree = {}
        ctx = _Ctx("environment", os.getcwd())
    _apply_layer(tree, "environment", env, only_fastlb=True)
    _apply_layer(tree, "command line", cli, only_fastlb=False)
    _check_made(tree)
    config: Config = _parse_table(Config, tree, "", ctx, source=path)
    if not config.listeners:
        config = dataclasses.replace(config, listeners=(ListenerSpec(DEFAULT_LISTEN),))
    _check_config(config, tree, ctx)
    if merge is not None:
        config = merge(config)
    _check_certificates(config, tree, ctx)
    _check_route_policies(config, tree, ctx)
    return config
