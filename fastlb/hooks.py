"""Python hooks: the public API a hook module is written against.

A module named by ``[hooks] module`` (or ``FASTLB_HOOKS_MODULE``) may define::

    def on_request(req):            # or: async def on_request(req)
        ...                         # return None to go on, or fastlb.hooks.Response(...) to answer
    def on_response(req, resp):     # synchronous: it runs between two reads of the response
        ...

and a route may name its own request hook with ``hook = "mypkg.lb_hooks:function"`` (or ``"function"``
of the ``[hooks]`` module), which replaces the module's ``on_request`` on that route.  A route with no
hook and no policy (and no ``[hooks]`` module function, which applies to every route) runs none of
this: its ``Route.policy`` is None.

The names below are a contract: user code written against the README keeps working.

- ``req.method``, ``req.path``, ``req.query``, ``req.host`` (str; host None when absent);
  ``req.headers.get(name, default=None)``: read-only, case-insensitive (the head as it goes upstream);
  ``req.client_ip``: the client after the PROXY protocol and trusted proxies;
  ``req.tls_version`` ("TLSv1.3"), ``req.sni`` (the server name the client sent, lower case, or None),
  ``req.client_cert`` (DER of the verified client certificate, with [tls.client_auth]): None on plain
  listeners.
- ``req.set_header(name, value)``, ``req.remove_header(name)``: on the upstream request;
  ``req.path = "/new/path"`` rewrites the path (the query stays); ``req.backend = "name"`` sends the
  request to another configured backend.
- ``Response(status, body=b"", headers=None)``: returned by ``on_request``, answered by fastlb.
- ``resp.status``, ``resp.headers``, ``resp.set_header``, ``resp.remove_header`` in ``on_response``.

Framing fields (Content-Length, Transfer-Encoding, Connection, ...) are fastlb's and cannot be set or
removed: such a call raises ValueError, which is a hook error like any other (500).
"""

import contextlib
import importlib
import inspect
import os
import re
import sys

from fastlb.heads import Head, field_name, field_value

__all__ = ["Headers", "HookError", "Request", "Response", "ResponseHead", "check_module", "resolve"]

# RFC 3986 §3.3 path characters, percent-encoded or not: what req.path may be set to.
_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")


class HookError(Exception):
    """A hook module or function that cannot be used; the message is one line."""


class Response:
    """A local answer: ``return Response(403, b"no")`` from on_request."""

    __slots__ = ("status", "body", "headers")

    def __init__(self, status: int, body: bytes | str = b"", headers: dict | None = None):
        self.status = status
        self.body = body
        self.headers = headers

    def __repr__(self) -> str:
        return f"Response({self.status!r}, {self.body!r}, {self.headers!r})"


class Headers:
    """A read-only, case-insensitive view of a head's fields; values are str (Latin-1, as RFC 9110
    §5.5 allows obs-text)."""

    __slots__ = ("_head",)

    def __init__(self, head: Head):
        self._head = head

    def get(self, name: str, default=None):
        value = self._head.get(name.lower().encode("latin-1"))
        return default if value is None else value.decode("latin-1")

    def get_all(self, name: str) -> list:
        return [v.decode("latin-1") for v in self._head.get_all(name.lower().encode("latin-1"))]

    def __contains__(self, name) -> bool:
        return self._head.get(name.lower().encode("latin-1")) is not None

    def items(self) -> list:
        return [(f[0].decode("latin-1"), f[1].strip(b" \t").decode("latin-1")) for f in self._head.fields]

    def __iter__(self):
        return iter([name for name, _ in self.items()])

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"


class Request:
    """What on_request and on_response see of a request.  Made only for a route with a hook."""

    __slots__ = ("_ex", "_client", "_policy", "_head", "_edited", "client_ip")

    def __init__(self, ex, client, policy, client_ip: str):
        self._ex = ex
        self._client = client
        self._policy = policy
        self._head = None
        self._edited = False
        self.client_ip = client_ip

    # -- reading -------------------------------------------------------------------------------------
    def _parsed(self) -> Head:
        if self._head is None:
            self._head = Head(self._ex.head)
        return self._head

    def _target(self) -> bytes:
        return self._head.target() if self._head is not None else self._ex.head.split(b" ", 2)[1]

    @property
    def method(self) -> str:
        return self._ex.method.decode("latin-1")

    @property
    def path(self) -> str:
        target = self._target()
        q = target.find(b"?")
        return (target if q < 0 else target[:q]).decode("latin-1")

    @path.setter
    def path(self, value: str) -> None:
        if not isinstance(value, str) or not _PATH.fullmatch(value):
            raise ValueError(f"invalid path {value!r}: an absolute URL path, no query or spaces")
        head = self._parsed()
        target = head.target()
        q = target.find(b"?")
        head.set_target(value.encode("ascii") + (b"" if q < 0 else target[q:]))
        self._edited = True

    @property
    def query(self) -> str:
        target = self._target()
        q = target.find(b"?")
        return "" if q < 0 else target[q + 1:].decode("latin-1")

    @property
    def host(self):
        host = self._ex.host
        return None if host is None else host.decode("latin-1")

    @property
    def headers(self) -> Headers:
        return Headers(self._parsed())

    @property
    def tls_version(self):
        return self._client.tls_version

    @property
    def sni(self):
        return self._client.sni

    @property
    def client_cert(self):
        return self._client.client_cert

    # -- changing ------------------------------------------------------------------------------------
    def set_header(self, name: str, value: str) -> None:
        self._parsed().set(field_name(name), field_value(value))
        self._edited = True

    def remove_header(self, name: str) -> None:
        self._parsed().remove(field_name(name))
        self._edited = True

    @property
    def backend(self) -> str:
        return self._ex.backend.name

    @backend.setter
    def backend(self, name: str) -> None:
        self._policy.use_backend(self._ex, name)

    def _finish(self) -> None:
        """The hook returned: what it changed goes into the upstream head, in one join."""
        if self._edited:
            self._ex.head = self._head.bytes()
            self._head = None
            self._edited = False

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path!r} host={self.host!r} client_ip={self.client_ip!r}>"


class ResponseHead:
    """What on_response sees of the backend's response: its status and fields, which it may change."""

    __slots__ = ("_status", "_head")

    def __init__(self, status: int, head: Head):
        self._status = status
        self._head = head

    @property
    def status(self) -> int:
        return self._status

    @property
    def headers(self) -> Headers:
        return Headers(self._head)

    def set_header(self, name: str, value: str) -> None:
        self._head.set(field_name(name), field_value(value))

    def remove_header(self, name: str) -> None:
        self._head.remove(field_name(name))

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status} {self.headers.items()!r}>"


# -- loading (in the master, at config load) ------------------------------------------------------------

def _import(name: str, fresh: set | None):
    """The module, imported; on a reload (`fresh` not yet holding it) imported again, so the new
    generation runs the code as it is on disk now."""
    try:
        module = sys.modules.get(name)
        if module is not None and fresh is not None and name not in fresh:
            # A .pyc is trusted while its source's mtime (whole seconds) and size match: an edit within
            # the same second that keeps the size (version "1" -> "2") would reload the old code.
            with contextlib.suppress(OSError, TypeError):
                os.unlink(module.__cached__)
            module = importlib.reload(module)
        elif module is None:
            module = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - whatever the module raises, the config check reports it
        detail = " ".join(str(e).split()) or type(e).__name__
        raise HookError(f"cannot import {name}: {type(e).__name__}: {detail}") from None
    if fresh is not None:
        fresh.add(name)
    return module


def check_module(name: str, fresh: set | None = None):
    """Import the [hooks] module and check what it defines; returns it."""
    module = _import(name, fresh)
    for attr in ("on_request", "on_response"):
        fn = getattr(module, attr, None)
        if fn is not None and not callable(fn):
            raise HookError(f"{name}.{attr} is not callable")
    on_response = getattr(module, "on_response", None)
    if on_response is not None and inspect.iscoroutinefunction(on_response):
        raise HookError(f"{name}.on_response must not be async: it runs between two reads of the response")
    return module


def resolve(ref: str, default_module: str, fresh: set | None = None):
    """The function a route's `hook` names: "module:function", or "function" of the [hooks] module."""
    module_name, colon, function = ref.rpartition(":")
    if not colon:
        if not default_module:
            raise HookError(f'{ref!r} names no module and [hooks] module is not set: use "module:function"')
        module_name = default_module
    module = _import(module_name, fresh)
    fn = getattr(module, function, None)
    if fn is None:
        raise HookError(f"{module_name} has no {function!r}")
    if not callable(fn):
        raise HookError(f"{module_name}.{function} is not callable")
    return fn
