"""Per-route policies and Python hooks: what runs between routing and choosing a server.

Theory of operation:
1. At config load the master imports the hook modules and reads the htpasswd files (config.py checks);
   before forking a generation it builds one `RouteRules` per route that has anything to do (`build`):
   compiled header rules, CIDR lists, the shared rate-limit tables, the users, the hook functions.
2. Each worker binds them to its routes (`attach`): `Route.policy` is a `RoutePolicy`, or None for a
   route with nothing configured, which is the one test the data path makes for such a route.
3. `ClientConnection._request` calls `RoutePolicy.request` after routing.  In order: deny/allow (403),
   rate limit (429, before the expensive checks, as nginx's limit_req runs before auth), basic auth
   (401), request header rules, path rewrite, then the request hook, which sees the result.  A local
   answer sets the exchange's status (and `answer`, its own fields and body); the exchange answers it
   when it starts, after any pipelined request before it.
4. An async hook, or a bcrypt check (in a thread), holds the exchange (status HOLD): the body keeps
   being buffered as for a connecting exchange; the task sets the outcome and starts the exchange if it
   is the connection's active one (otherwise it starts in its turn).  Past `[hooks] timeout`, 504.
5. `UpstreamConnection._head` calls `RoutePolicy.response` with the response head for the routes with
   response rules or an on_response hook (`Exchange.policy` is set only for them).
A hook that raises answers 500 (with the request id), counts fastlb_hook_errors_total{hook} and logs its
traceback, at most once per LOG_EVERY seconds per hook and worker.
"""

import asyncio
import inspect
import logging
import math
from time import monotonic

from fastlb import core, hooks
from fastlb.heads import Head, field_name, field_value
from fastlb.policy.access import Access
from fastlb.policy.basicauth import BasicAuth
from fastlb.policy.headers import HeaderRules, rewrite_path
from fastlb.policy.ratelimit import RateLimiter

__all__ = ["RouteRules", "RoutePolicy", "attach", "build", "hook_names"]

LOG_EVERY = 10.0
# Exchange.status while an async hook decides: negative, so Exchange.start waits (http/protocol_py.py).
HOLD = -1
_find_field = core.find_field
_log = logging.getLogger("fastlb.hooks")
_logged: dict = {}   # hook name -> [next time a traceback may be logged, tracebacks held back]


class RouteRules:
    """What the master builds for one route before forking; the workers share it (the rate-limit
    tables are shared memory)."""

    __slots__ = ("access", "limiter", "auth", "request_headers", "response_headers", "rewrite",
                 "on_request", "on_request_name", "is_async", "on_response", "on_response_name", "timeout")

    def __init__(self, spec, cfg):
        """spec: the RouteSpec, or None for the default_backend route (which gets the [hooks] module's)."""
        module = cfg.hooks.module
        hooks_module = hooks.check_module(module) if module else None
        self.access = self.limiter = self.auth = self.rewrite = None
        self.request_headers = self.response_headers = None
        self.on_request = getattr(hooks_module, "on_request", None)
        self.on_request_name = f"{module}:on_request"
        if spec is not None:
            if spec.allow or spec.deny:
                self.access = Access(spec.allow, spec.deny)
            if spec.rate_limit is not None:
                self.limiter = RateLimiter(spec.rate_limit)
            if spec.basic_auth:
                self.auth = BasicAuth(spec.basic_auth, f"{spec.host or ''}{spec.path}")
            if spec.request_headers is not None:
                self.request_headers = HeaderRules(spec.request_headers)
            if spec.response_headers is not None:
                self.response_headers = HeaderRules(spec.response_headers)
            if spec.rewrite_prefix:
                self.rewrite = (spec.path.encode(), spec.rewrite_prefix.encode())
            if spec.hook:
                self.on_request = hooks.resolve(spec.hook, module)
                self.on_request_name = _hook_name(spec.hook, module)
        self.is_async = self.on_request is not None and inspect.iscoroutinefunction(self.on_request)
        self.on_response = getattr(hooks_module, "on_response", None)
        self.on_response_name = f"{module}:on_response"
        self.timeout = cfg.hooks.timeout

    def empty(self) -> bool:
        return all(getattr(self, name) is None for name in (
            "access", "limiter", "auth", "request_headers", "response_headers", "rewrite", "on_request",
            "on_response"))


def build(cfg) -> list:
    """One RouteRules or None per route of the worker's Router, in its order (cfg.routes, then the
    default_backend route)."""
    rules = [RouteRules(spec, cfg) for spec in cfg.routes]
    if cfg.default_backend:
        rules.append(RouteRules(None, cfg))
    return [r if not r.empty() else None for r in rules]


def hook_names(cfg) -> list:
    """The fastlb_hook_errors_total{hook} label values cfg can produce (its modules are imported)."""
    module = cfg.hooks.module
    names = []
    if module:
        hooks_module = hooks.check_module(module)
        names += [f"{module}:{attr}" for attr in ("on_request", "on_response")
                  if getattr(hooks_module, attr, None) is not None]
    for spec in cfg.routes:
        if spec.hook and _hook_name(spec.hook, module) not in names:
            names.append(_hook_name(spec.hook, module))
    return names


def _hook_name(ref: str, module: str) -> str:
    """A route's `hook` as its metric label: "module:function" ("function" is the [hooks] module's)."""
    return ref if ":" in ref else f"{module}:{ref}"


def attach(worker, rules: list, layout) -> None:
    """Bind the generation's rules to this worker's routes (run in the worker, after the fork)."""
    for route, route_rules in zip(worker.router.routes, rules, strict=True):
        if route_rules is not None:
            route.policy = RoutePolicy(route_rules, worker, route, layout)


class RoutePolicy:
    """A route's rules bound to one worker: its metrics, its backends, its loop."""

    __slots__ = ("rules", "worker", "m_limited", "m_request_hook", "m_response_hook", "edits_response")

    def __init__(self, rules, worker, route, layout):
        self.rules = rules
        self.worker = worker
        self.m_limited = (layout.find("fastlb_rate_limited_total", route=route.name)
                          if rules.limiter is not None else None)
        self.m_request_hook = (layout.find("fastlb_hook_errors_total", hook=rules.on_request_name)
                               if rules.on_request is not None else None)
        self.m_response_hook = (layout.find("fastlb_hook_errors_total", hook=rules.on_response_name)
                                if rules.on_response is not None else None)
        self.edits_response = rules.response_headers is not None or rules.on_response is not None

    # -- the request ------------------------------------------------------------------------------------
    def request(self, client, ex) -> None:
        """Run the route's request side on ex, just parsed: sets ex.status (and ex.answer) to answer
        locally, HOLD while an async hook decides, or edits ex.head and ex.backend."""
        rules = self.rules
        ip = self.client_ip(client, ex)
        if rules.access is not None and not rules.access.allowed(ip):
            ex.status = 403
            return
        limiter = rules.limiter
        if limiter is not None:
            wait = limiter.take(limiter.key(ip, ex.head), client.shared.now)
            if wait:
                self.worker.area[self.m_limited] += 1
                # RFC 9110 §10.2.3: delay-seconds, rounded up so a client that waits that long is served.
                _answer(ex, 429, b"Retry-After: %d\r\n" % math.ceil(wait / 1e6), b"429 Too Many Requests\n")
                return
        auth = rules.auth
        if auth is not None:
            authorization = _find_field(ex.head, 0, len(ex.head), b"authorization")
            known = auth.known(authorization)
            if known is None:
                # bcrypt takes milliseconds: off the loop, the request held meanwhile.
                ex.status = HOLD
                self.worker.loop.create_task(self._verify(client, ex, ip, authorization))
                return
            if not known:
                _answer(ex, 401, auth.challenge, b"401 Unauthorized\n")
                return
        self._admitted(client, ex, ip)

    def _admitted(self, client, ex, ip: bytes) -> None:
        """The rest of the request side, once access, rate and credentials are settled."""
        rules = self.rules
        if rules.request_headers is not None or rules.rewrite is not None:
            head = Head(ex.head)
            if rules.request_headers is not None:
                rules.request_headers.apply(head)
            if rules.rewrite is not None:
                head.set_target(rewrite_path(head.target(), *rules.rewrite))
            ex.head = head.bytes()
        if self.edits_response:
            ex.policy = self
        if rules.on_request is not None:
            self._request_hook(client, ex, ip)

    def client_ip(self, client, ex) -> bytes:
        """The real client: the connection's address (the PROXY protocol's source, when there is one),
        or, behind trusted proxies, the rightmost X-Forwarded-For hop that is not one of them (the hops
        to its right were added by proxies we trust; anything to its left, the client may have forged)."""
        ip = client.client_ip
        if not client.trust_xff:
            return ip
        forwarded = _find_field(ex.head, 0, len(ex.head), b"x-forwarded-for")
        if not forwarded:
            return ip
        is_trusted = self.worker.is_trusted
        for hop in reversed(forwarded.split(b",")):
            hop = hop.strip()
            try:
                if not is_trusted(hop.decode("ascii")):
                    return hop
            except (UnicodeDecodeError, ValueError):
                return hop  # not an address: no proxy of ours wrote it
            ip = hop
        return ip

    def _request_hook(self, client, ex, ip: bytes) -> None:
        rules = self.rules
        req = hooks.Request(ex, client, self, ip.decode("latin-1"))
        ex.hook_req = req
        try:
            result = rules.on_request(req)
            if not rules.is_async:
                self._decided(ex, req, result)
                return
        except Exception:  # noqa: BLE001 - a hook never takes the worker down
            self._failed(ex, rules.on_request_name, self.m_request_hook)
            return
        ex.status = HOLD
        self.worker.loop.create_task(self._await(client, ex, req, result))

    async def _verify(self, client, ex, ip: bytes, authorization: bytes) -> None:
        auth = self.rules.auth
        try:
            # The default executor's threads: the bcrypt binding releases the GIL while it hashes.
            ok = await self.worker.loop.run_in_executor(None, auth.verify, authorization)
        except Exception:  # noqa: BLE001 - the request must not stay held
            _log_limited("basic_auth", "basic_auth check failed (request %s)", ex.request_id.decode("latin-1"),
                         exc_info=True)
            ex.status = 500
            self._resume(client, ex)
            return
        if ok:
            auth.remember(authorization)
            ex.status = 0
            self._admitted(client, ex, ip)
            if ex.status == HOLD:
                return  # an async hook decides next, and resumes the exchange itself
        else:
            _answer(ex, 401, auth.challenge, b"401 Unauthorized\n")
        self._resume(client, ex)

    async def _await(self, client, ex, req, coro) -> None:
        try:
            result = await asyncio.wait_for(coro, self.rules.timeout)
            ex.status = 0
            self._decided(ex, req, result)
        except TimeoutError:
            ex.status = 504
            _log_limited(self.rules.on_request_name, "hook %s took more than [hooks] timeout (%gs): 504",
                         self.rules.on_request_name, self.rules.timeout)
        except Exception:  # noqa: BLE001
            self._failed(ex, self.rules.on_request_name, self.m_request_hook)
        self._resume(client, ex)

    def _resume(self, client, ex) -> None:
        """A held exchange is decided: it starts now if it is the connection's active one, else in its
        turn (ClientConnection.exchange_done starts it)."""
        if client.closed:
            return
        backend = ex.backend
        if backend is not None and backend.hash_key is not None:
            ex.key = backend.hash_key(ex.head, client.client_ip, ex.target)
        client.shared.now = monotonic()  # the data path reads the clock once per callback
        if client.active is ex:
            ex.start()

    def _decided(self, ex, req, result) -> None:
        """What the request hook returned: None to go on (with its edits), or a Response."""
        if result is None:
            req._finish()
            return
        if not isinstance(result, hooks.Response):
            raise TypeError(f"on_request returned {type(result).__name__}, not None or fastlb.hooks.Response")
        status = result.status
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            raise ValueError(f"Response status must be an int from 200 to 599, not {status!r}")
        body = result.body.encode() if isinstance(result.body, str) else bytes(result.body)
        if body and status in (204, 304):
            raise ValueError(f"a {status} response has no body (RFC 9110 §15.3.5, §15.4.5)")
        fields = b"".join(b"%s: %s\r\n" % (field_name(k), field_value(v))
                          for k, v in (result.headers or {}).items())
        _answer(ex, status, fields, body)

    def use_backend(self, ex, name: str) -> None:
        """req.backend = name"""
        backend = self.worker.backends.get(name)
        if backend is None:
            raise ValueError(f"no backend named {name!r}")
        ex.backend = backend

    # -- the response -----------------------------------------------------------------------------------
    def response(self, ex, status: int, head: bytes):
        """The response head as the client gets it, or None if the response hook raised (the caller
        answers 500 instead and drops the upstream connection)."""
        rules = self.rules
        parsed = Head(head)
        if rules.response_headers is not None:
            rules.response_headers.apply(parsed)
        if rules.on_response is not None:
            req = ex.hook_req
            if req is None:
                client = ex.client
                req = hooks.Request(ex, client, self, self.client_ip(client, ex).decode("latin-1"))
            try:
                rules.on_response(req, hooks.ResponseHead(status, parsed))
            except Exception:  # noqa: BLE001
                self._failed(ex, rules.on_response_name, self.m_response_hook)
                return None
        return parsed.bytes()

    # -- errors -----------------------------------------------------------------------------------------
    def _failed(self, ex, name: str, index) -> None:
        self.worker.area[index] += 1
        ex.status = 500
        ex.answer = None
        _log_limited(name, "hook %s raised (request %s)", name, ex.request_id.decode("latin-1"), exc_info=True)


def _answer(ex, status: int, fields: bytes, body: bytes) -> None:
    ex.status = status
    ex.answer = (fields, body)


def _log_limited(name: str, message: str, *args, exc_info: bool = False) -> None:
    """At most one log line per LOG_EVERY seconds per hook: a hook failing on every request must not
    turn the error log into the bottleneck."""
    now = monotonic()
    gate = _logged.setdefault(name, [0.0, 0])
    if now < gate[0]:
        gate[1] += 1
        return
    if gate[1]:
        message += f" ({gate[1]} more since the last one logged)"
    gate[0], gate[1] = now + LOG_EVERY, 0
    _log.error(message, *args, exc_info=exc_info)
