"""The client side: one ClientConnection per accepted (plain or TLS) connection, one Exchange per request.

Theory of operation, in the order a request travels:
1. `data_received` frames the byte stream itself (head at CRLFCRLF, body by Content-Length or
   framing.ChunkedBody) and feeds llhttp one unit at a time, so every request's first bytes are checked
   before llhttp parses them, and llhttp must agree with each boundary.
2. httptools (llhttp, strict) parses each unit; `on_url`/`on_header` enforce the size limits as bytes
   arrive (414, 431), so an oversized head is refused before it is buffered.
3. `on_headers_complete` checks the version (505) and hands the parsed head to `core.request_head`, which
   validates framing (400/501/417) and builds the upstream head with X-Forwarded-* in one pass.
4. The router picks a route; the Exchange asks the backend's balancer for a server and takes an idle
   pooled connection or opens one.  Body bytes stream to it (re-chunked when the client sent chunked).
5. The upstream side (http/upstream.py) streams the response back; when both the request body and the
   response are complete the next pipelined request, if any, starts (responses stay in request order).
Errors that keep the connection (404, 502, 503, 504, 417) are answered as a normal response; framing
errors answer and close, because after them the parser can no longer find the next request.
"""

import asyncio
import functools
import socket
import struct
import weakref
from collections import deque
from time import monotonic

import httptools
from httptools import HttpParserError, HttpParserUpgrade

from fastlb import core
from fastlb.http import upstream
from fastlb.http.errors import error_response, redirect_response
from fastlb.http.framing import CHUNKED_BAD, ChunkedBody, request_start_problem
from fastlb.http.upstream import PAUSE_BODY, PAUSE_FAILED, PAUSE_PIPELINE, PAUSE_UPGRADE
from fastlb.lb.router import InvalidHost
from fastlb.obs.accesslog import record
from fastlb.obs.metrics import observe

_F_CHUNKED = core.F_CHUNKED
_F_CONTENT_LENGTH = core.F_CONTENT_LENGTH
_F_CONN_CLOSE = core.F_CONN_CLOSE
_F_HAS_HOST = core.F_HAS_HOST
_request_head = core.request_head

# RFC 9110 §9.2.2: these may be replayed after a failure without changing the outcome.
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
_CHUNK_END = b"0\r\n\r\n"
# Body bytes held per exchange while its upstream connection is being opened; past this the client
# is paused, so memory per connection stays bounded whatever the body size.
_BODY_BUFFER_CAP = 64 * 1024

DRAIN_GRACE = 1.0
_LINGER_RESET = struct.pack("ii", 1, 0)
_HEAD_END = b"\r\n\r\n"

# What the connection's deadline means when it passes.
_IDLE, _HEADER, _BODY = 1, 2, 3
# What the next bytes from the client are (ClientConnection.framing).
_HEAD, _LENGTH, _CHUNKED, _DONE = 0, 1, 2, 3


class _Reject(Exception):
    """Raised inside a parser callback to answer `status` and close."""

    def __init__(self, status: int):
        self.status = status


def _content_length(headers) -> int:
    """The (already validated, single) Content-Length of a request that has one."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value)
    return 0


class _Answered(Exception):
    """Raised inside a parser callback after fastlb has answered itself; the connection then closes."""


class Exchange:
    """One request and its response, from the request head to the last response byte."""

    __slots__ = (
        "client", "method", "head", "flags", "request_id", "route", "backend", "keep_alive", "chunk_ok",
        "is_head", "server", "pending_server", "tried", "upstream", "body", "body_size", "body_sent",
        "body_done", "response_state", "local", "key", "queued_at", "t0", "status", "host", "target",
        "bytes_in", "bytes_out", "last_server", "upstream_time", "attempts", "body_received",
    )

    def __init__(self, client, method, head, flags, request_id, route, keep_alive, chunk_ok):
        self.client = client
        self.method = method
        self.head = head
        self.flags = flags
        self.request_id = request_id
        self.route = route
        self.backend = route.backend if route is not None else None
        self.keep_alive = keep_alive
        self.chunk_ok = chunk_ok
        self.is_head = method == b"HEAD"
        self.server = None
        self.pending_server = None
        self.tried = ()
        self.upstream = None
        self.body = None          # framed body bytes waiting for an upstream connection
        self.body_size = 0
        self.body_sent = False    # some body bytes left for a backend: no replay possible
        self.body_done = False
        self.response_state = 0   # 0 nothing sent to the client, 1 head sent, 2 complete
        self.local = 0            # status of a response fastlb answers itself
        self.key = None           # hash key, for backends balanced by hash
        self.queued_at = 0.0      # when it started waiting for a server under max_connections
        self.t0 = monotonic()     # request head received
        self.status = 0           # the final response status, for the metrics
        # for the access log:
        self.host = self.target = None
        self.bytes_in = self.bytes_out = 0
        self.last_server = None
        self.upstream_time = 0.0
        self.attempts = 0
        self.body_received = 0

    def start(self) -> None:
        if self.local:
            self.respond_local(self.local)
        elif self.backend is None:
            self.respond_local(404)
        else:
            self.try_next()

    def try_next(self) -> None:
        backend = self.backend
        server = backend.balancer.pick(self.tried, self.key)
        if server is None:
            if not self.tried and backend.saturated() and len(backend.waiting) < backend.spec.max_queue:
                # Every up server is at max_connections: wait for a slot (bounded, queue_timeout).
                self.queued_at = self.client.worker.now
                backend.waiting.append(self)
                return
            # Nothing tried yet means nothing was available (DESIGN: 503); otherwise every candidate
            # failed to connect (502).
            self.respond_local(502 if self.tried else 503)
            return
        self.tried += (server,)
        self.use(server, pooled=True)

    def use(self, server, pooled: bool) -> None:
        self.server = self.last_server = server
        self.attempts += 1
        server.active += 1
        if pooled:
            idle = server.idle
            while idle:
                conn = idle.pop()
                if not conn.transport.is_closing():
                    conn.attach(self, reused=True)
                    return
        self.pending_server = server
        upstream.connect(self.client.worker, server, self)

    def release_server(self) -> None:
        """The attempt on self.server is over: free its slot, and give it to a waiting request."""
        server = self.server
        if server is None:
            return
        self.server = None
        server.active -= 1
        waiting = server.backend.waiting
        while waiting:
            ex = waiting.popleft()
            if not ex.client.closed:
                ex.try_next()
                break

    def upstream_failed(self, server, kind: str, sent: bool, stale: bool = False) -> None:
        """The attempt on server failed before any response byte reached the client.

        stale: a pooled connection closed before answering, the keep-alive race of RFC 9112 §9.3.1
        (the server timed it out as we reused it).  Not the server's fault: an idempotent request is
        replayed on a fresh connection to the same server, once.
        """
        client = self.client
        self.release_server()
        self.upstream = None
        self.pending_server = None
        worker = client.worker
        worker.area[server.m_errors[kind]] += 1
        if stale and not client.closed and not self.body_sent and self.method in _IDEMPOTENT:
            worker.area[self.backend.m_retries] += 1
            self.use(server, pooled=False)
            return
        if server.failed(kind, worker.now):
            client.worker.log.warning("%s/%s ejected after %d consecutive failures (last: %s)",
                                      server.backend.name, server.name, server.backend.spec.max_fails, kind)
        if client.closed:
            return
        retry = not sent or (kind != "timeout" and not self.body_sent and self.method in _IDEMPOTENT)
        if retry and len(self.tried) <= self.backend.spec.retries:
            worker.area[self.backend.m_retries] += 1
            self.try_next()
        else:
            # A connect timeout is a failed connect (502); only a response timeout is a 504.
            self.respond_local(504 if kind == "timeout" and sent else 502)

    def feed_body(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.body_received += len(data)
        if self.flags & _F_CHUNKED:
            # Re-chunk: extensions and the sender's chunk sizes are dropped (one framing, ours).
            data = b"%x\r\n%s\r\n" % (len(data), data)
        self._forward(data)

    def body_complete(self) -> None:
        self.body_done = True
        if self.flags & _F_CHUNKED:
            # Trailers are dropped: the terminator is ours (RFC 9112 §7.1.2 lets a proxy discard them).
            self._forward(_CHUNK_END)
        if self.response_state == 2:
            self.client.exchange_done(self)

    def _forward(self, data: bytes) -> None:
        """Framed body bytes to the backend, or held while its connection is being opened."""
        conn = self.upstream
        if conn is not None:
            self.body_sent = True
            conn.transport.write(data)
        elif self.response_state == 0 and not self.local:
            if self.body is None:
                self.body = [data]
            else:
                self.body.append(data)
            self.body_size += len(data)
            if self.body_size > _BODY_BUFFER_CAP:
                self.client.pause(PAUSE_BODY)
        # else: the answer is already decided (local error, or the backend answered early): discard.

    def respond_local(self, status: int) -> None:
        client = self.client
        self.local = self.status = status
        close = not self.keep_alive or client.worker.draining
        response = error_response(status, self.request_id, client.worker.date, close, self.is_head)
        self.bytes_out += len(response)
        client.transport.write(response)
        if close:
            self.keep_alive = False
        self.body = None
        self.response_done()

    def response_done(self) -> None:
        self.response_state = 2
        self.release_server()
        worker = self.client.worker
        route = self.route or worker.no_route
        area = worker.area
        area[route.m_requests[self.status // 100 - 1]] += 1
        now = monotonic()
        observe(area, route.m_duration, now - self.t0)
        if worker.access_log is not None:
            worker.access_log.log(record(self, now, worker.iso_time))
        if self.body_done:
            self.client.exchange_done(self)
        elif self.upstream is not None:
            # The backend answered before reading the whole body; that connection can't be reused.
            self.upstream.transport.close()
            self.upstream = None


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "worker", "listener", "transport", "parser", "client_ip", "trust_xff", "url", "headers",
        "head_size", "incoming", "active", "queue", "paused", "write_paused", "deadline", "deadline_kind",
        "closed", "held", "tunnel", "tls_version", "failed", "at_start", "line", "send_deadline",
        "framing", "tail", "body_left", "chunked", "begins", "head_ends", "ending", "handshake",
        "__weakref__",
    )

    def __init__(self, worker, listener):
        self.worker = worker
        self.listener = listener
        self.transport = None
        self.parser = None
        self.client_ip = b""
        self.trust_xff = False
        self.url = b""
        self.headers = None
        self.head_size = 0
        self.incoming = None      # the exchange whose request is being read
        self.active = None        # the exchange whose response is being written
        self.queue = None         # pipelined exchanges waiting for `active` to finish
        self.paused = 0           # PAUSE_* reasons reading is paused for
        self.write_paused = False
        self.deadline = 0.0
        self.deadline_kind = 0
        self.closed = False
        self.held = None          # bytes after an Upgrade request, held until the backend answers
        self.tunnel = None
        self.tls_version = None
        self.failed = 0           # status of a bad pipelined request, answered after the ones before it
        self.at_start = True      # the next byte begins a request (checked before llhttp sees it)
        self.line = b""           # the request line so far, while at_start
        self.send_deadline = 0.0  # set while the client is not reading what we write
        # fastlb frames the byte stream itself and feeds llhttp one head or body at a time (see
        # data_received); llhttp must agree with every boundary, or the request is refused.
        self.framing = _HEAD
        self.tail = b""           # the last bytes (up to 3) of a head that goes on in the next read
        self.body_left = 0        # _LENGTH: body bytes still to come
        self.chunked = None       # _CHUNKED: the ChunkedBody walking the framing
        self.begins = False       # the bytes being fed may begin a request
        self.head_ends = False    # ... end a request head
        self.ending = False       # ... end a request
        self.handshake = None
        if listener.m_tls is not None:
            ref = weakref.ref(self, functools.partial(worker.handshake_abandoned, listener, monotonic()))
            worker.handshakes[id(ref)] = ref
            self.handshake = ref

    # -- connection lifecycle -------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        worker = self.worker
        listener = self.listener
        limit = worker.limits.max_connections
        if limit and len(worker.connections) >= limit:
            # Over the per-worker cap: accepted and closed at once, so the worker stays responsive.
            self.closed = True
            transport.abort()
            worker.connections.add(self)
            listener.open += 1
            return
        listener.open += 1
        worker.area[listener.m_total] += 1
        if listener.m_tls is not None:
            # Completed: drop every strong reference to the weakref, so its callback never fires.
            del worker.handshakes[id(self.handshake)]
            self.handshake = None
            tls = transport.get_extra_info("ssl_object")
            self.tls_version = tls.version()
            index = listener.m_tls.get((self.tls_version, tls.cipher()[0], tls.session_reused))
            if index is not None:
                worker.area[index] += 1
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0].encode()
            self.trust_xff = worker.is_trusted(peer[0])
        self.parser = httptools.HttpRequestParser(self)
        self.deadline = monotonic() + worker.limits.header_timeout
        self.deadline_kind = _HEADER
        worker.connections.add(self)

    def data_received(self, data):
        """Feed llhttp one unit at a time, each ending where fastlb's own framing says it does: a head
        (at its CRLFCRLF), a Content-Length body, a chunked body (framing.ChunkedBody).  So fastlb knows
        where every request begins, even in the middle of a read, and checks what llhttp would forgive
        there before llhttp parses it; and the parser callbacks check that llhttp saw the same
        boundaries (RFC 9112 §6.3: a message framed two ways is how requests are smuggled)."""
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        pos = 0
        end = len(data)
        while pos < end:
            if self.closed or self.paused & PAUSE_FAILED or self.framing == _DONE:
                return  # a broken stream, or one that ended: nothing more is parsed
            stop = self._next_unit(data, pos, end)
            if stop < 0:
                return
            try:
                self.parser.feed_data(data if pos == 0 and stop == end else data[pos:stop])
            except HttpParserUpgrade as exc:
                self._hold_after_upgrade(data[pos + exc.args[0]:])
                return
            except HttpParserError as exc:
                self._parse_error(exc)
                return
            if self.head_ends or self.ending:
                self.fail(400)  # llhttp did not end the head or the request where the framing does
                return
            pos = stop

    def _next_unit(self, data: bytes, pos: int, end: int) -> int:
        """Where the unit that begins at data[pos] ends (at most `end`), flags set for the callbacks;
        -1 if it is refused (already answered)."""
        framing = self.framing
        if framing == _LENGTH:
            stop = min(end, pos + self.body_left)
            self.body_left -= stop - pos
            self.ending = not self.body_left
            return stop
        if framing == _CHUNKED:
            stop = self.chunked.scan(data, pos)
            if stop == CHUNKED_BAD:
                self.fail(400)
                return -1
            self.ending = stop >= 0
            return stop if stop >= 0 else end
        # _HEAD
        self.begins = self.headers is None  # no head under way: a request begins here
        if self.at_start and not self._check_request_line(data, pos):
            return -1
        tail = self.tail
        stop = -1
        if tail:  # the head began in an earlier read (so pos is 0): its CRLFCRLF may straddle the two
            found = (tail + data[:3]).find(_HEAD_END)
            if found >= 0:
                stop = found + 4 - len(tail)
        if stop < 0:
            found = data.find(_HEAD_END, pos)
            if found >= 0:
                stop = found + 4
        if stop >= 0:
            self.tail = b""
            self.head_ends = True
            return stop
        self.tail = data[end - 3:] if end - pos >= 3 else (tail + data[pos:])[-3:]
        return end

    def _check_request_line(self, data: bytes, pos: int) -> bool:
        """Check the bytes that begin a request (see framing.request_start_problem), before llhttp sees them."""
        if self.line:  # the request line began in the previous read: this read continues it (pos 0)
            line = self.line + data
        else:
            line = data
        status = request_start_problem(line, pos)
        if status is None:  # no complete request line yet
            if len(line) - pos > self.worker.limits.max_request_line:
                self.at_start = False  # llhttp answers 414 on its own
            else:
                self.line = line[pos:] if pos else line
            return True
        self.at_start = False
        self.line = b""
        if status:
            self.fail(status)
            return False
        return True

    def _parse_error(self, exc: HttpParserError) -> None:
        if self.closed:
            return
        cause = exc.__context__
        if isinstance(cause, _Answered):
            self.close()
            return
        if isinstance(cause, _Reject):
            status = cause.status
        elif cause is not None and not isinstance(cause, upstream._Desync):
            self.worker.log.exception("bug while parsing a request", exc_info=cause)
            status = 500
        else:
            # llhttp's words for an HTTP version it does not speak (1.2; 2.0 is refused in
            # on_headers_complete, its PRI preface by framing.request_start_problem)
            status = 505 if str(exc) == "Invalid HTTP version" else 400
        self.fail(status)

    def fail(self, status: int) -> None:
        """Answer a request that can't be framed, then close (the byte stream can't be trusted).

        Requests pipelined before the bad one are answered first, in order: the error is the answer
        to the bad request, so it goes out after theirs."""
        worker = self.worker
        index = worker.m_bad.get(status)
        if index is not None:
            worker.area[index] += 1
        self.pause(PAUSE_FAILED)
        bad = self.incoming
        self.incoming = None
        if self.queue and bad is not None and bad in self.queue:
            self.queue.remove(bad)
        active = self.active
        if active is not None and active is not bad and active.response_state != 2:
            self.failed = status
            return
        if active is None or active.response_state == 0:
            self.transport.write(error_response(status, worker.next_request_id(), worker.date, True))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Reset the connection: SO_LINGER 0 makes close() send RST and drop queued data (socket(7)),
        so a client that stopped reading is really cut, and a broken response never ends cleanly."""
        self.closed = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.transport.abort()

    def connection_lost(self, exc):
        self.closed = True
        self.listener.open -= 1
        self.worker.connections.discard(self)
        if self.tunnel is not None:
            conn, self.tunnel = self.tunnel, None
            conn.tunnel = None
            conn.transport.close()
        for ex in (self.active, self.incoming):
            if ex is not None:
                ex.release_server()
                if ex.upstream is not None:
                    ex.upstream.ex = None
                    ex.upstream.transport.abort()
                    ex.upstream = None
        self.active = self.incoming = self.queue = None

    def pause_writing(self):
        self.write_paused = True
        self.send_deadline = monotonic() + self.worker.limits.send_timeout
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.transport.pause_reading()
        elif self.tunnel is not None:
            self.tunnel.transport.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        self.send_deadline = 0.0
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.transport.resume_reading()
        elif self.tunnel is not None:
            self.tunnel.transport.resume_reading()

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def drain(self, now: float) -> None:
        """The worker is stopping.  An idle keep-alive connection is closed after DRAIN_GRACE, not at
        once: a client may have sent its next request already (RFC 9112 §9.6 race), and that request
        is better answered, with Connection: close, than cut."""
        if self.deadline_kind == _IDLE:
            self.deadline = min(self.deadline, now + DRAIN_GRACE)

    def on_deadline(self) -> None:
        if self.deadline_kind in (_HEADER, _BODY):
            self.fail(408)
        else:
            self.close()

    # -- httptools callbacks, in the order they fire --------------------------------------------
    def on_message_begin(self):
        if not self.begins:
            raise _Reject(400)  # llhttp found a request where fastlb's framing does not begin one
        self.begins = False
        self.url = b""
        self.headers = []
        self.head_size = 0
        if self.deadline_kind != _HEADER:
            # header_timeout is a total deadline for the head, counted from its first byte.
            self.deadline = monotonic() + self.worker.limits.header_timeout
            self.deadline_kind = _HEADER

    def on_url(self, url):
        url = self.url + url
        if len(url) > self.worker.limits.max_request_line:
            raise _Reject(414)
        self.url = url

    def on_header(self, name, value):
        self.head_size += len(name) + len(value) + 4
        headers = self.headers
        limits = self.worker.limits
        if headers is None:
            # Trailer fields of a chunked body (RFC 9112 §7.1.2): dropped, but still bounded.
            if self.head_size > limits.max_header_bytes:
                raise _Reject(431)
            return
        headers.append((name, value))
        if self.head_size > limits.max_header_bytes or len(headers) > limits.max_headers:
            raise _Reject(431)

    def on_headers_complete(self):
        if not self.head_ends:
            raise _Reject(400)  # llhttp ended the head before its CRLFCRLF
        self.head_ends = False
        parser = self.parser
        worker = self.worker
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _Reject(505)
        method = parser.get_method()
        listener = self.listener
        headers = self.headers
        self.headers = None
        err, flags, host, request_id, head = _request_head(
            method, self.url, headers, self.client_ip, listener.proto, listener.port,
            self.trust_xff, worker.next_request_id(),
        )
        if err:
            if err == 417:
                local = 417
            else:
                raise _Reject(err)
        else:
            local = 0
        chunk_ok = version == "1.1"
        url = self.url
        if not url.startswith(b"/") and not (url == b"*" and method == b"OPTIONS"):
            # absolute-form, authority-form and asterisk-form (outside OPTIONS) are refused: we route
            # on Host, and a target naming another host would make the two disagree (§3.2).
            raise _Reject(405 if method == b"CONNECT" else 400)
        if flags & _F_CHUNKED and not chunk_ok:
            raise _Reject(400)  # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing
        length = _content_length(headers) if flags & _F_CONTENT_LENGTH else 0
        limit = self.worker.limits.max_body_bytes
        if limit and length > limit:
            raise _Reject(413)  # refused before the body is read
        if not flags & _F_HAS_HOST:
            if chunk_ok:
                raise _Reject(400)  # RFC 9112 §3.2: a 1.1 request without Host is invalid
            # We speak HTTP/1.1 upstream, which requires Host: name the authority the client reached.
            line_end = head.index(b"\r\n") + 2
            head = b"%sHost: %s\r\n%s" % (head[:line_end], listener.authority, head[line_end:])
        if method == b"CONNECT":
            raise _Reject(405)  # a load balancer is not a forward proxy
        if listener.redirect_to_https:
            self.transport.write(redirect_response(
                listener.https_location(host, self.url), request_id, worker.date, True))
            raise _Answered()
        try:
            route = worker.router.match(host, b"/" if url == b"*" else url)
        except InvalidHost:
            raise _Reject(400) from None  # RFC 9112 §3.2: a Host that is not a valid uri-host[:port]
        # HTTP/1.0 clients are closed after the response (RFC 9112 §9.3): no guessing at 1.0 keep-alive.
        keep_alive = chunk_ok and not flags & _F_CONN_CLOSE and not worker.draining
        ex = Exchange(self, method, head, flags, request_id, route, keep_alive, chunk_ok)
        ex.local = local
        ex.host = host
        ex.target = self.url
        ex.bytes_in = self.head_size + len(self.url)
        if route is not None and route.backend.hash_key is not None:
            ex.key = route.backend.hash_key(headers, self.client_ip, self.url)
        if flags & _F_CHUNKED:
            self.framing = _CHUNKED
            self.chunked = ChunkedBody()
        elif length:
            self.framing = _LENGTH
            self.body_left = length
        else:
            self.ending = True  # no body (RFC 9112 §6.3 item 7): the request ends with its head
        if self.framing != _HEAD:
            # body_timeout: the longest silence allowed while the request body arrives
            self.deadline = monotonic() + worker.limits.body_timeout
            self.deadline_kind = _BODY
        else:
            self.deadline_kind = 0
        self.incoming = ex
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self.pause(PAUSE_PIPELINE)

    def on_body(self, body):
        ex = self.incoming
        if self.deadline_kind == _BODY:
            self.deadline = monotonic() + self.worker.limits.body_timeout
        limit = self.worker.limits.max_body_bytes
        if limit and ex.body_received + len(body) > limit:
            raise _Reject(413)  # counted for chunked bodies (Content-Length was checked up front)
        ex.feed_body(body)

    def on_message_complete(self):
        if not self.ending:
            raise _Reject(400)  # llhttp ended the request where fastlb's framing does not
        self.ending = False
        ex = self.incoming
        self.incoming = None
        self.at_start = True
        self.chunked = None
        # RFC 9112 §9.6: after a request that closes the connection, nothing more is read as a request.
        self.framing = _HEAD if ex.keep_alive else _DONE
        if self.deadline_kind == _BODY:
            self.deadline_kind = 0
        ex.body_complete()

    # -- the end of an exchange ------------------------------------------------------------------
    def exchange_done(self, ex) -> None:
        if self.active is not ex:
            return
        if not ex.keep_alive or self.closed:
            self.close()
            return
        queue = self.queue
        if queue:
            self.active = nxt = queue.popleft()
            if not queue:
                self.resume(PAUSE_PIPELINE)
            nxt.start()
            return
        self.active = None
        if self.failed:
            worker = self.worker
            self.transport.write(error_response(self.failed, worker.next_request_id(), worker.date, True))
            self.close()
            return
        if self.incoming is None:
            worker = self.worker
            # While draining, a response that went out before the drain began promised keep-alive:
            # the client may already be sending its next request, which gets Connection: close.
            self.deadline = monotonic() + (DRAIN_GRACE if worker.draining else worker.limits.idle_timeout)
            self.deadline_kind = _IDLE
        held = self.held
        if held is not None:
            self.held = None
            self.resume(PAUSE_UPGRADE)
            self.data_received(held)

    # -- Upgrade (RFC 9110 §7.8) -----------------------------------------------------------------
    def _hold_after_upgrade(self, rest: bytes) -> None:
        """llhttp stops after an Upgrade request; what follows is tunnel data only if the backend says 101."""
        self.held = rest
        self.pause(PAUSE_UPGRADE)

    def start_tunnel(self, ex, conn) -> None:
        self.tunnel = conn
        self.active = None
        self.deadline_kind = 0
        ex.release_server()
        held, self.held = self.held, None
        if held:
            conn.transport.write(held)
        self.resume(PAUSE_UPGRADE)

