"""The data path: one ClientConnection per accepted connection, one Exchange per request, and the
UpstreamConnection that carries it to a server.  Read top to bottom, it is the order a request travels.

The one source of ``fastlb.http.protocol``: Cython compiles it as ``protocol_c`` (typed ``cdef``
classes declared in ``protocol_c.pxd``) and ``FASTLB_NO_EXTENSIONS=1`` runs it as it is.

Theory of operation:
1. `ClientConnection.data_received` frames the byte stream (RFC 9112 §6.3): a head ends at its CRLFCRLF,
   a body after Content-Length bytes or where `framing.ChunkedBody` says.  A head arriving in pieces is
   kept in a bytearray, its request line checked as soon as it is complete; limits are enforced as the
   bytes arrive (414, 431).
2. `core.parse_request` parses each head in one call over the raw bytes: request line, fields, every
   RFC 9112 check (400/414/431/501/505/405/417), Host, Content-Length, and the upstream head with
   X-Forwarded-* already written.  No callback per header, no header list.
3. The router picks a route; a route with policies or hooks runs them (`Route.policy`, fastlb/policy),
   which may answer locally, edit the upstream head and backend, or hold the exchange in NEW (status
   < 0) while an async hook or a bcrypt check decides.  The Exchange asks the backend's balancer for a
   server and takes an idle pooled connection or opens one.  Body bytes stream to it (chunked bodies
   decoded and re-chunked).
4. `UpstreamConnection.data_received` frames the response the same way, `core.parse_response` parses
   its head and writes the one sent to the client; head and body leave in one write per read.
5. When the request has been read and the response sent, the next pipelined request, if any, starts
   (responses stay in request order).
Errors that keep the connection (404, 502, 503, 504, 417) are answered as a normal response; framing
errors answer and close, because after them the next request cannot be found.

States (one enum per object; `_check` verifies every transition when FASTLB_DEBUG=1):

    ClientConnection.state                      Exchange.state
    HEAD ──head with body──▶ BODY ──┐           NEW ──▶ WAITING ──▶ CONNECTING ──▶ SENT ──▶ STREAMING
     ▲  ──chunked────────▶ CHUNKED ─┤            │        (queued at    ▲  (fresh     (head    (response
     │◀─────request read────────────┘            │        max_conns)    │  conn)      written)  head sent)
     ├──Upgrade request──▶ HELD ──101──▶ TUNNEL  └──────────────────────┴──▶ DONE ◀── any (local answer,
     └──Connection: close, framing error──▶ DONE                                        or response end)

    UpstreamConnection.state
    IDLE ──attach──▶ HEAD ──▶ LENGTH | CHUNKED | UNTIL_CLOSE ──response end──▶ IDLE (pooled) | CLOSED
                      └──101──▶ TUNNEL
"""

import functools
import os
import socket
import struct
from collections import deque
from sys import intern
from time import monotonic

from fastlb import core
from fastlb.http import framing
from fastlb.http.errors import error_response, local_response, redirect_response
from fastlb.lb.router import InvalidHost
from fastlb.net.certs import xfcc
from fastlb.net.tlsbio import TlsBio
from fastlb.obs.accesslog import record
from fastlb.obs.metrics import BUCKETS, HIST_SUM

# Verify every state transition (uvloop's sslproto does the same in its debug build).
_DEBUG = os.environ.get("FASTLB_DEBUG") == "1"

_F_CHUNKED = core.F_CHUNKED
_F_CONN_CLOSE = core.F_CONN_CLOSE
_F_CONN_KEEPALIVE = core.F_CONN_KEEPALIVE
_F_NO_BODY = core.F_NO_BODY
_F_UNTIL_CLOSE = core.F_UNTIL_CLOSE
_F_UPGRADE = core.F_UPGRADE
_F_HTTP10 = core.F_HTTP10
_F_AMBIGUOUS = core.F_AMBIGUOUS
_parse_request = core.parse_request
_parse_response = core.parse_response
_head_end = core.head_end
_head_and_body = core.head_and_body
_ChunkedBody = framing.ChunkedBody
_request_start_problem = framing.request_start_problem
_CHUNKED_BAD = framing.CHUNKED_BAD
_BUCKETS = BUCKETS
_HIST_SUM = HIST_SUM

# ClientConnection.state
C_HEAD = 0      # the next byte begins a request head
C_BODY = 1      # a Content-Length body: body_left bytes to come
C_CHUNKED = 2   # a chunked body, walked by self.chunked
C_HELD = 3      # after an Upgrade request: bytes held until the backend answers (101 or not)
C_TUNNEL = 4    # after a 101: bytes relayed both ways, no HTTP
C_DONE = 5      # nothing more is read as a request (Connection: close, or the stream is broken)
C_CLOSED = 6

# Exchange.state
X_NEW = 0         # parsed; not started (pipelined behind another)
X_WAITING = 1     # every up server is at max_connections: queued for a slot
X_CONNECTING = 2  # a new connection to self.server is being opened
X_SENT = 3        # the request head went upstream; waiting for the response head
X_STREAMING = 4   # the response head went to the client; its body follows
X_DONE = 5        # the response is complete (relayed, or answered by fastlb itself)

# UpstreamConnection.state
U_IDLE = 0         # no exchange: connecting, or pooled
U_HEAD = 1         # reading a response head
U_LENGTH = 2       # body of body_left bytes
U_CHUNKED = 3      # chunked body
U_UNTIL_CLOSE = 4  # body delimited by the close (RFC 9112 §6.3 item 8)
U_TUNNEL = 5
U_CLOSED = 6

_CLIENT_NEXT = {
    C_HEAD: (C_HEAD, C_BODY, C_CHUNKED, C_HELD, C_DONE, C_CLOSED),
    C_BODY: (C_HEAD, C_HELD, C_TUNNEL, C_DONE, C_CLOSED),
    C_CHUNKED: (C_HEAD, C_DONE, C_CLOSED),
    C_HELD: (C_HEAD, C_TUNNEL, C_DONE, C_CLOSED),
    C_TUNNEL: (C_CLOSED,),
    C_DONE: (C_DONE, C_CLOSED),
    C_CLOSED: (C_CLOSED,),
}
_EXCHANGE_NEXT = {
    X_NEW: (X_WAITING, X_CONNECTING, X_SENT, X_DONE),
    X_WAITING: (X_CONNECTING, X_SENT, X_DONE),
    X_CONNECTING: (X_CONNECTING, X_SENT, X_WAITING, X_DONE),
    X_SENT: (X_CONNECTING, X_SENT, X_WAITING, X_STREAMING, X_DONE),
    X_STREAMING: (X_DONE,),
    X_DONE: (X_DONE,),
}
_UPSTREAM_NEXT = {
    U_IDLE: (U_HEAD, U_CLOSED),
    U_HEAD: (U_HEAD, U_LENGTH, U_CHUNKED, U_UNTIL_CLOSE, U_TUNNEL, U_IDLE, U_CLOSED),
    U_LENGTH: (U_IDLE, U_CLOSED),
    U_CHUNKED: (U_IDLE, U_CLOSED),
    U_UNTIL_CLOSE: (U_IDLE, U_CLOSED),
    U_TUNNEL: (U_CLOSED,),
    U_CLOSED: (U_CLOSED,),
}


def _observe(area, base, seconds) -> None:
    """One histogram observation in a worker's metrics area (obs/metrics.py lays it out): the count of
    the first bucket whose bound is >= seconds, non-cumulative (cumulated on scrape), and the sum."""
    i = 0
    for bound in _BUCKETS:
        if seconds <= bound:
            break
        i += 1
    area[base + i] += 1.0
    area[base + _HIST_SUM] += seconds


def _check(table, old, new) -> None:
    if new not in table[old]:
        raise AssertionError(f"state {old} -> {new} is not a transition of this machine")


# Reasons a client connection's reading is paused; reading resumes when none is left.
PAUSE_UPSTREAM = 1   # the backend is not taking the request body fast enough
PAUSE_BODY = 2       # body buffered while connecting reached its cap
PAUSE_PIPELINE = 4   # a pipelined request waits for the previous response
PAUSE_UPGRADE = 8    # bytes after an Upgrade request wait for the backend's 101 (or not)
PAUSE_FAILED = 16    # the request stream is broken: nothing more is read

# RFC 9110 §9.2.2: these may be replayed after a failure without changing the outcome.
_IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
_CHUNK_END = b"0\r\n\r\n"
_HEAD_END = b"\r\n\r\n"
# Body bytes held per exchange while its upstream connection is being opened; past this the client
# is paused, so memory per connection stays bounded whatever the body size.
_BODY_BUFFER_CAP = 64 * 1024
# Idle send_proxy connections one client connection keeps (see ClientConnection.private).
_MAX_PRIVATE = 5
# A response head may be 4x the request limits (Set-Cookie heavy responses).
_RESPONSE_HEAD_FACTOR = 4

DRAIN_GRACE = 1.0
_LINGER_RESET = struct.pack("ii", 1, 0)

# What the connection's deadline means when it passes.
_IDLE, _HEADER, _BODY = 1, 2, 3


def _bare_cr_or_lf(buf: bytearray, start) -> bool:
    """A CR not followed by LF, or an LF not preceded by CR, in buf[start:] (a final CR may still get
    its LF in the next read)."""
    i = buf.find(b"\n", start)
    while i >= 0:
        if i == 0 or buf[i - 1] != 13:
            return True
        i = buf.find(b"\n", i + 1)
    i = buf.find(b"\r", start)
    while i >= 0:
        if i + 1 < len(buf) and buf[i + 1] != 10:
            return True
        i = buf.find(b"\r", i + 1)
    return False


def _joined(payload: list) -> bytes:
    """The chunk-data ChunkedBody.scan found in one read, as one bytes object."""
    return payload[0] if len(payload) == 1 else b"".join(payload)


def _chunk(data: bytes) -> bytes:
    """Body bytes of one read as one chunk of ours (RFC 9112 §7.1)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Shared:
    """What every request of one worker reads: the limits, the clock, the Date header, the request-id
    counter, the router.  Typed fields, built once per worker (process/worker.py keeps it current), so a
    request reads them from a struct, not through the attributes of Python objects."""

    def __init__(self, limits, router, no_route, rid_prefix, access_log, area):
        # This worker's metrics (float64 series, obs/metrics.py), typed once here: a typed memoryview
        # field per connection would cost each one a memoryview object and a 208-byte slice.
        self.area = area
        self.max_connections = limits.max_connections
        self.max_request_line = limits.max_request_line
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_response_head = _RESPONSE_HEAD_FACTOR * limits.max_header_bytes
        self.max_response_headers = _RESPONSE_HEAD_FACTOR * limits.max_headers
        self.max_body_bytes = limits.max_body_bytes
        self.header_timeout = limits.header_timeout
        self.body_timeout = limits.body_timeout
        self.idle_timeout = limits.idle_timeout
        self.send_timeout = limits.send_timeout
        self.router = router
        self.no_route = no_route
        self.access_log = access_log
        self.rid_prefix = rid_prefix
        self.rid = 0
        # The clock as of the current loop callback: the data path reads it once per read and stores
        # it here, the worker's tick refreshes it, so nothing else per request needs a clock read.
        self.now = monotonic()
        self.date = b""          # the Date header value, refreshed once a second by the worker
        self.iso_time = ""       # the same second for the access log
        self.draining = False
        # fastlb/acme/challenges.py Http01Responder when a certificate is managed by ACME, else None.
        self.acme = None

    def next_request_id(self) -> bytes:
        self.rid += 1
        return b"%s-%x" % (self.rid_prefix, self.rid)


class ClientConnection:
    """One accepted client connection (asyncio protocol), plain or TLS."""

    def __init__(self, worker, listener):
        self.worker = worker
        self.shared = worker.shared
        self.listener = listener
        # What every request reads of the listener, as typed fields: attribute lookups on the listener
        # (a Python object) cost more per request than copying them once per connection.
        self.proto = listener.proto
        self.port = listener.port
        self.authority = listener.authority
        self.redirect = listener.redirect_to_https
        self.transport = None
        self.state = C_HEAD
        self.client_ip = b""
        self.trust_xff = False
        self.pending = None       # bytearray: a head begun in an earlier read
        self.checked = False      # the pending head's request line passed request_start_problem
        self.body_left = 0        # C_BODY: body bytes still to come
        self.chunked = None       # C_CHUNKED: the ChunkedBody walking the framing
        self.incoming = None      # the exchange whose request is being read
        self.active = None        # the exchange whose response is being written
        self.queue = None         # pipelined exchanges waiting for `active` to finish
        self.paused = 0           # PAUSE_* reasons reading is paused for
        self.write_paused = False
        self.deadline = 0.0
        self.deadline_kind = 0
        self.send_deadline = 0.0  # set while the client is not reading what we write
        self.held = None          # bytes after an Upgrade request, held until the backend answers
        self.tunnel = None
        self.tls_version = None
        self.failed = 0           # status of a bad pipelined request, answered after the ones before it
        # Idle upstream connections that carry this client's address in their PROXY header
        # (send_proxy): private to this client, never pooled for another (fastlb/net/upstream_tls.py).
        self.private = None       # list, oldest first, at most _MAX_PRIVATE
        self.client_cert = None   # DER of the client's verified certificate (mTLS)
        self.xfcc = None          # its X-Forwarded-Client-Cert field line, added to every upstream head
        self.sni = None           # TLS: the server name the client asked for (set by the Front)

    def _to(self, state) -> None:
        if _DEBUG:
            _check(_CLIENT_NEXT, self.state, state)
        self.state = state

    # -- connection lifecycle -------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        worker = self.worker
        listener = self.listener
        limit = self.shared.max_connections
        if limit and len(worker.connections) >= limit:
            # Over the per-worker cap: accepted and closed at once, so the worker stays responsive.
            self.state = C_CLOSED
            transport.abort()
            worker.connections.add(self)
            listener.open += 1
            return
        listener.open += 1
        worker.area[listener.m_total] += 1
        if listener.m_tls is not None:
            tls = transport.get_extra_info("ssl_object")
            self.tls_version = intern(tls.version())  # one "TLSv1.3" for all connections, not one each
            index = listener.m_tls.get((self.tls_version, tls.cipher()[0], tls.session_reused))
            if index is not None:
                worker.area[index] += 1
            if listener.client_auth:
                der = tls.getpeercert(True)
                if der is not None:
                    # Verified by OpenSSL during the handshake (a failed one never gets here).
                    self.client_cert = der
                    self.xfcc = b"X-Forwarded-Client-Cert: %s\r\n" % xfcc(der)
                    worker.area[listener.m_client_certs["verified"]] += 1
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0].encode()
            self.trust_xff = worker.is_trusted(peer[0])
        self.deadline = monotonic() + self.shared.header_timeout
        self.deadline_kind = _HEADER
        worker.connections.add(self)

    # -- 1. framing --------------------------------------------------------------------------------
    def data_received(self, data):
        state = self.state
        if state == C_TUNNEL:
            self.tunnel.transport.write(data)
            return
        if state == C_HELD:
            self.held += data
            return
        if state >= C_DONE:
            return  # a broken stream, or one that ended: nothing more is parsed
        self.shared.now = now = monotonic()  # the one clock read for everything this read starts
        pos = 0
        end = len(data)
        pending = self.pending
        if pending is not None:
            # A head began in an earlier read: it continues here.  Only the head is kept; what
            # follows its end is parsed from `data` itself.
            found = self._head_end(pending, data)
            if found < 0:
                return
            self.pending = None
            pos = found - len(pending)
            pending += data[:pos]
            if not self._request(bytes(pending), 0, len(pending), now):
                return
        while pos < end:
            state = self.state
            if state == C_HEAD:
                stop = _head_end(data, pos)
                if stop < 0:
                    self._partial_head(data, pos, now)
                    return
                if not self._request(data, pos, stop, now):
                    return
                pos = stop
            elif state == C_BODY:
                stop = end if end - pos <= self.body_left else pos + self.body_left
                self.body_left -= stop - pos
                if not self._body(data if stop - pos == end else data[pos:stop], stop - pos, now):
                    return
                pos = stop
                if not self.body_left:
                    self._request_read()
            elif state == C_CHUNKED:
                payload = []
                stop = self.chunked.scan(data, pos, end, payload)
                if stop == _CHUNKED_BAD:
                    self.fail(400)
                    return
                if payload:
                    body = _joined(payload)
                    if not self._body(_chunk(body), len(body), now):
                        return
                if stop < 0:
                    return
                pos = stop
                # Trailers are dropped: the terminator is ours (RFC 9112 §7.1.2 lets a proxy discard them).
                self.incoming.forward(_CHUNK_END)
                self._request_read()
            elif state == C_HELD:
                self.held = data[pos:]
                return
            else:  # C_DONE, C_CLOSED: a broken stream, or one that ended: nothing more is parsed
                return

    def _partial_head(self, data: bytes, pos, now) -> None:
        """A head that does not end in this read: keep it, check what can be checked already."""
        self.pending = bytearray()
        self.checked = False
        if self.deadline_kind != _HEADER:
            # header_timeout is a total deadline for the head, counted from its first byte.
            self.deadline = now + self.shared.header_timeout
            self.deadline_kind = _HEADER
        self._head_end(self.pending, data[pos:] if pos else data)

    def _head_end(self, pending: bytearray, data: bytes) -> int:
        """Add `data` to the pending head; where its CRLFCRLF ends (an offset into pending + data), or -1
        (then the head is kept, unless it was refused, which closes the connection)."""
        before = len(pending)
        pending += data
        found = pending.find(_HEAD_END, before - 3 if before > 3 else 0)
        if found >= 0:
            del pending[before:]
            return found + 4
        if _bare_cr_or_lf(pending, before - 1 if before else 0):
            # RFC 9112 §2.2: a head that uses bare CR or LF as a line end may never show a CRLFCRLF;
            # refuse it now rather than at header_timeout.
            self.fail(400)
            return -1
        shared = self.shared
        if not self.checked:
            status = _request_start_problem(pending, 0)
            if status is None:
                if len(pending) > shared.max_request_line:
                    self.fail(414)
                    return -1
                return -1
            if status:
                self.fail(status)
                return -1
            self.checked = True
        if len(pending) > shared.max_request_line + shared.max_header_bytes:
            self.fail(431)
        return -1

    # -- 2. one head, parsed in one call -------------------------------------------------------------
    def _request(self, data: bytes, start, stop, now) -> bool:
        """Parse and start the request whose head is data[start:stop]; False if the stream stops."""
        shared = self.shared
        shared.rid += 1
        status, flags, method, target, host, request_id, length, head = _parse_request(
            data, start, stop, self.client_ip, self.proto, self.port, self.trust_xff,
            shared.rid_prefix, shared.rid, self.authority, shared.max_request_line,
            shared.max_header_bytes, shared.max_headers)
        if status and status != 417:
            self.fail(status)
            return False
        if shared.max_body_bytes and length > shared.max_body_bytes:
            self.fail(413)  # refused before the body is read
            return False
        if shared.acme is not None and target.startswith(b"/.well-known/acme-challenge/"):
            # RFC 8555 section 8.3: the CA's HTTP-01 check, answered by every worker, before routing
            # and before redirect_to_https (the CA would follow the redirect, but the answer is here).
            self.transport.write(shared.acme.response(target, request_id, shared.date))
            self.close()
            return False
        if self.redirect:
            self.transport.write(redirect_response(
                self.listener.https_location(host, target), request_id, shared.date, True))
            self.close()
            return False
        try:
            route = shared.router.match(host, b"/" if target == b"*" else target)
        except InvalidHost:
            self.fail(400)  # RFC 9112 §3.2: a Host that is not a valid uri-host[:port]
            return False
        if route is not None and route.require_client_cert and self.client_cert is None:
            status = 403  # answered once the exchange starts, like 417; the connection stays usable
        if self.xfcc is not None:
            # The verified identity (parse_request dropped any the client sent), Envoy's header.
            head = b"".join((head[:len(head) - 2], self.xfcc, b"\r\n"))
        # No call of the type (its arguments would be boxed into Python objects): a fresh object, from
        # the compiled build's freelist, set up by a C method.
        ex = Exchange.__new__(Exchange)
        ex.begin(self, method, head, flags, request_id, route, now)
        # HTTP/1.0 clients are closed after the response (RFC 9112 §9.3): no guessing at 1.0 keep-alive.
        # An ambiguous request (a body on GET/HEAD) closes both connections after it, as AWS's defensive
        # desync mitigation does: a backend that ignores such a body would read it as the next request.
        ex.keep_alive = not flags & (_F_HTTP10 | _F_CONN_CLOSE | _F_AMBIGUOUS) and not shared.draining
        ex.status = status  # 417: answered by fastlb once the exchange starts
        ex.host = host
        ex.target = target
        ex.bytes_in = stop - start
        if route is not None and route.policy is not None and not status:
            # The route's policies and hooks (fastlb/policy): they may answer locally (ex.status), hold
            # the exchange while an async hook decides, or edit the upstream head and the backend.
            route.policy.request(self, ex)
        if ex.backend is not None and ex.backend.hash_key is not None:
            ex.key = ex.backend.hash_key(ex.head, self.client_ip, target)
        self.incoming = ex
        if flags & _F_CHUNKED:
            self._to(C_CHUNKED)
            self.chunked = _ChunkedBody(shared.max_header_bytes)
        elif length:
            self._to(C_BODY)
            self.body_left = length
        if self.state != C_HEAD:
            # body_timeout: the longest silence allowed while the request body arrives
            self.deadline = now + shared.body_timeout
            self.deadline_kind = _BODY
        else:
            self.deadline_kind = 0
        if self.active is None:
            self.active = ex
            ex.start()
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self.pause(PAUSE_PIPELINE)
        if self.state == C_HEAD:
            self._request_read()  # no body (RFC 9112 §6.3 item 7): the request ends with its head
        return self.state <= C_HELD  # C_HELD: data_received keeps what follows the head

    def _body(self, data: bytes, size, now) -> bool:
        """Request body bytes, framed for upstream: `size` of them are payload."""
        ex = self.incoming
        if self.deadline_kind == _BODY:
            self.deadline = now + self.shared.body_timeout
        limit = self.shared.max_body_bytes
        ex.body_received += size
        if limit and ex.body_received > limit:
            self.fail(413)  # counted for chunked bodies (Content-Length was checked up front)
            return False
        ex.bytes_in += len(data)
        ex.forward(data)
        return self.state != C_CLOSED

    def _request_read(self) -> None:
        """The incoming request has been read to its end."""
        ex = self.incoming
        self.incoming = None
        self.chunked = None
        if self.deadline_kind == _BODY:
            self.deadline_kind = 0
        if ex.flags & _F_UPGRADE and ex.state != X_DONE:
            # What follows an Upgrade request is tunnel data only if the backend says 101.
            self.held = b""
            self._to(C_HELD)
            self.pause(PAUSE_UPGRADE)
        elif not ex.keep_alive:
            # RFC 9112 §9.6: after a request that closes the connection, nothing more is read as a request.
            self._to(C_DONE)
        else:
            self._to(C_HEAD)
        if ex.state == X_DONE:
            self.exchange_done(ex)

    # -- errors and closing --------------------------------------------------------------------------
    def fail(self, status) -> None:
        """Answer a request that can't be framed, then close (the byte stream can't be trusted).

        Requests pipelined before the bad one are answered first, in order: the error is the answer
        to the bad request, so it goes out after theirs."""
        if self.state == C_CLOSED:
            return
        worker = self.worker
        index = worker.m_bad.get(status)
        if index is not None:
            worker.area[index] += 1
        self.pause(PAUSE_FAILED)
        self._to(C_DONE)
        bad = self.incoming
        self.incoming = None
        if self.queue and bad is not None and bad in self.queue:
            self.queue.remove(bad)
        active = self.active
        if active is not None and active is not bad and active.state != X_DONE:
            self.failed = status
            return
        if active is None or active.state < X_STREAMING:
            self.transport.write(error_response(status, self.shared.next_request_id(), self.shared.date, True))
        self.close()

    def close(self) -> None:
        if self.state != C_CLOSED:
            self.state = C_CLOSED
            self.transport.close()

    def abort(self) -> None:
        """Reset the connection: SO_LINGER 0 makes close() send RST and drop queued data (socket(7)),
        so a client that stopped reading is really cut, and a broken response never ends cleanly."""
        self.state = C_CLOSED
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.transport.abort()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.state = C_CLOSED
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
        if self.private is not None:
            private, self.private = self.private, None
            for conn in private:
                conn.transport.close()

    @property
    def closed(self) -> bool:
        return self.state == C_CLOSED

    # -- flow control --------------------------------------------------------------------------------
    def pause_writing(self):
        self.write_paused = True
        self.send_deadline = monotonic() + self.shared.send_timeout
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

    def pause(self, reason) -> None:
        if not self.paused and self.state != C_CLOSED:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.state != C_CLOSED:
                self.transport.resume_reading()

    # -- deadlines (the worker's tick calls these) ---------------------------------------------------
    def drain(self, now) -> None:
        """The worker is stopping.  An idle keep-alive connection is closed after DRAIN_GRACE, not at
        once: a client may have sent its next request already (RFC 9112 §9.6 race), and that request
        is better answered, with Connection: close, than cut."""
        if self.deadline_kind == _IDLE:
            self.deadline = min(self.deadline, now + DRAIN_GRACE)

    def on_tick(self, now) -> None:
        """The worker's tick: a TLS keep-alive connection waiting for its next request gives back its BIOs'
        buffers.  The idle send_proxy connections private to it are in no server's pool, so the tick does
        here what it does for a pool: closes those idle longer than their backend's idle_timeout, and the
        others give back their buffers."""
        if self.deadline_kind == _IDLE and isinstance(self.transport, TlsBio):
            self.transport.release_buffers()
        private = self.private
        if private is not None:
            private[:] = [conn for conn in private if not conn.idle_tick(now)]

    def on_deadline(self) -> None:
        if self.deadline_kind == _HEADER or self.deadline_kind == _BODY:
            self.fail(408)
        else:
            self.close()

    def upstream_deadline(self, now) -> None:
        """response_timeout: the active exchange's server has not sent a response head in time."""
        ex = self.active
        if ex is not None and ex.state == X_SENT and ex.upstream.deadline < now:
            ex.upstream.timed_out()

    # -- 5. the end of an exchange -------------------------------------------------------------------
    def exchange_done(self, ex) -> None:
        """ex's response is complete and its request read: start the next request, if any."""
        if self.active is not ex:
            return
        if not ex.keep_alive or self.state == C_CLOSED:
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
        shared = self.shared
        if self.failed:
            self.transport.write(error_response(self.failed, shared.next_request_id(), shared.date, True))
            self.close()
            return
        if self.incoming is None:
            # While draining, a response that went out before the drain began promised keep-alive:
            # the client may already be sending its next request, which gets Connection: close.
            # shared.now is fresh: whatever completed the exchange read the clock (see response_done).
            self.deadline = shared.now + (DRAIN_GRACE if shared.draining else shared.idle_timeout)
            self.deadline_kind = _IDLE
        if self.state == C_HELD:
            # The backend did not switch protocols: what was held is the next request (RFC 9110 §7.8).
            held, self.held = self.held, None
            self._to(C_HEAD)
            self.resume(PAUSE_UPGRADE)
            if held:
                self.data_received(held)

    def start_tunnel(self, ex, conn) -> None:
        """The backend answered 101: from now on bytes are relayed both ways (RFC 9110 §7.8)."""
        self.tunnel = conn
        self.active = None
        self.deadline_kind = 0
        ex.release_server()
        held, self.held = self.held, None
        self._to(C_TUNNEL)
        if held:
            conn.transport.write(held)
        self.resume(PAUSE_UPGRADE)


class Exchange:
    """One request and its response, from the request head to the last response byte.  Made by
    ClientConnection._request: `Exchange.__new__(Exchange)`, then `begin`."""

    def begin(self, client, method, head, flags, request_id, route, now) -> None:
        self.client = client
        self.state = X_NEW
        self.method = method
        self.head = head
        self.flags = flags
        self.request_id = request_id
        self.route = route
        self.backend = route.backend if route is not None else None
        self.keep_alive = False
        self.chunk_ok = not flags & _F_HTTP10
        self.is_head = method == b"HEAD"
        self.server = None
        self.tried = ()
        self.upstream = None
        self.body = None          # framed body bytes waiting for an upstream connection
        self.body_size = 0
        self.body_sent = False    # some body bytes left for a backend: no replay possible
        self.key = None           # hash key, for backends balanced by hash
        self.queued_at = 0.0      # when it started waiting for a server under max_connections
        self.t0 = now             # request head received
        self.status = 0           # the final response status
        # for the access log:
        self.host = self.target = None
        self.bytes_in = self.bytes_out = 0
        self.last_server = None
        self.upstream_time = 0.0
        self.attempts = 0
        self.body_received = 0
        # Set only on routes with policies or hooks (fastlb/policy):
        self.answer = None        # (field lines, body) of a local answer a policy or hook made
        self.policy = None        # the RoutePolicy that edits the response head
        self.hook_req = None      # the fastlb.hooks.Request the hooks see

    def _to(self, state) -> None:
        if _DEBUG:
            _check(_EXCHANGE_NEXT, self.state, state)
        self.state = state

    # -- 3. choosing a server ------------------------------------------------------------------------
    def start(self) -> None:
        if self.status:
            if self.status > 0:  # negative: an async hook is deciding; it starts the exchange itself
                self.respond_local(self.status)
        elif self.backend is None:
            self.respond_local(404)
        else:
            self.try_next()

    def try_next(self) -> None:
        backend = self.backend
        balancer = backend.balancer
        server = balancer.pick(self.tried, self.key)
        if server is None:
            if self.state == X_WAITING and backend.saturated():
                # Handed a slot it cannot use (freed on a server that went down meanwhile): it keeps
                # its place at the head of the queue, and its queue_timeout still runs from queued_at.
                backend.waiting.appendleft(self)
                return
            if not self.tried and backend.saturated() and len(backend.waiting) < backend.spec.max_queue:
                # Every up server is at max_connections: wait for a slot (bounded, queue_timeout).
                self.queued_at = self.client.shared.now
                self._to(X_WAITING)
                backend.waiting.append(self)
                return
            # Nothing tried yet means nothing was available (DESIGN: 503); otherwise every candidate
            # failed to connect (502).
            self.respond_local(502 if self.tried else 503)
            return
        self.tried += (server,)
        self.use(server, True)

    def use(self, server, pooled) -> None:
        self.server = self.last_server = server
        self.attempts += 1
        server.active += 1
        if pooled:
            client = self.client
            private = client.private
            if private is not None:
                for conn in private:
                    if conn.server is server:
                        private.remove(conn)
                        if not conn.transport.is_closing():
                            conn.attach(self, True)
                            return
                        break
            idle = server.idle
            link = server.link
            if link is not None and link.sni_from_host:
                # Only a connection made (and verified) for this request's Host may carry it.
                conn = _pooled_for(idle, link.name_for(self.host))
                if conn is not None:
                    conn.attach(self, True)
                    return
            else:
                while idle:
                    conn = idle.pop()
                    if not conn.transport.is_closing():
                        conn.attach(self, True)
                        return
        self._to(X_CONNECTING)
        connect(self.client.worker, server, self)

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
            if ex.client.state != C_CLOSED:
                ex.try_next()
                break

    def upstream_failed(self, server, kind, sent, stale=False) -> None:
        """The attempt on server failed before any response byte reached the client.

        stale: a pooled connection closed before answering, the keep-alive race of RFC 9112 §9.3.1
        (the server timed it out as we reused it).  Not the server's fault: an idempotent request is
        replayed on a fresh connection to the same server, once.
        """
        client = self.client
        self.release_server()
        self.upstream = None
        worker = client.worker
        worker.area[server.m_errors[kind]] += 1
        gone = client.state == C_CLOSED
        if stale and not gone and not self.body_sent and self.method in _IDEMPOTENT:
            worker.area[self.backend.m_retries] += 1
            self.use(server, False)
            return
        if server.failed(kind, client.shared.now):
            worker.log.warning("%s/%s ejected after %d consecutive failures (last: %s)",
                               server.backend.name, server.name, server.backend.spec.max_fails, kind)
        if gone:
            self._to(X_DONE)
            return
        retry = not sent or (kind != "timeout" and not self.body_sent and self.method in _IDEMPOTENT)
        if retry and len(self.tried) <= self.backend.spec.retries:
            worker.area[self.backend.m_retries] += 1
            self.try_next()
        else:
            # A connect timeout is a failed connect (502); only a response timeout is a 504.
            self.respond_local(504 if kind == "timeout" and sent else 502)

    # -- request body --------------------------------------------------------------------------------
    def forward(self, data: bytes) -> None:
        """Framed body bytes to the backend, or held while its connection is being opened."""
        conn = self.upstream
        if conn is not None:
            if not conn.transport.is_closing():  # its connection_lost decides what happens next
                self.body_sent = True
                conn.transport.write(data)
        elif self.state < X_SENT:
            if self.body is None:
                self.body = [data]
            else:
                self.body.append(data)
            self.body_size += len(data)
            if self.body_size > _BODY_BUFFER_CAP:
                self.client.pause(PAUSE_BODY)
        # else: the answer is already decided (local error, or the backend answered early): discard.

    # -- the response ----------------------------------------------------------------------------------
    def respond_local(self, status) -> None:
        client = self.client
        self.status = status
        close = not self.keep_alive or client.shared.draining
        if self.answer is None:
            response = error_response(status, self.request_id, client.shared.date, close, self.is_head)
        else:
            fields, body = self.answer
            response = local_response(status, fields, body, self.request_id, client.shared.date, close,
                                      self.is_head)
        self.bytes_out += len(response)
        client.transport.write(response)
        if close:
            self.keep_alive = False
        self.body = None
        shared = client.shared
        shared.now = monotonic()  # a timer or a connection loss may have brought us here
        self.response_done(shared.now)

    def response_done(self, now) -> None:
        """now: shared.now, which the caller has just read from the clock."""
        self._to(X_DONE)
        self.release_server()
        client = self.client
        shared = client.shared
        route = self.route or shared.no_route
        area = shared.area
        area[route.m_requests[self.status // 100 - 1]] += 1
        _observe(area, route.m_duration, now - self.t0)
        if shared.access_log is not None:
            shared.access_log.log(record(self, now, shared.iso_time))
        if client.incoming is not self:
            client.exchange_done(self)
        elif self.upstream is not None:
            # The backend answered before reading the whole body; that connection can't be reused.
            self.upstream.transport.close()
            self.upstream = None


class UpstreamConnection:
    """One keep-alive HTTP/1.1 connection to a server (asyncio protocol), carrying one exchange at a
    time: no upstream pipelining, so a response can never be matched to the wrong request.  When a
    response ends cleanly on a connection both sides keep alive, and no byte follows it, the
    connection goes back to its server's idle list (LIFO: the warmest socket first); anything else
    closes it, so a connection is never reused after a close-delimited, interrupted or over-long
    response."""

    def __init__(self, worker, server):
        self.worker = worker
        self.shared = worker.shared
        self.server = server
        self.transport = None
        self.state = U_IDLE
        self.ex = None
        self.pending = None       # bytearray: a response head begun in an earlier read
        self.body_left = 0        # U_LENGTH
        self.chunked = None       # U_CHUNKED
        self.got_bytes = False    # any response byte for the current exchange
        self.keep = False         # both sides keep the connection after this response
        self.down_chunked = False  # the body is chunked by us towards the client
        self.deadline = 0.0
        self.idle_since = 0.0
        self.tunnel = None        # the ClientConnection after a 101 upgrade
        self.reused = False
        self.sent_at = 0.0
        self.owner = None         # send_proxy: the ClientConnection this connection is private to
        self.tls_name = None      # TLS: the name it was opened with (SNI, verified; sessions by it)
        self.refused = False      # TLS: the server ended it with an alert before it carried anything

    def _to(self, state) -> None:
        if _DEBUG:
            _check(_UPSTREAM_NEXT, self.state, state)
        self.state = state

    def connection_made(self, transport):
        self.transport = transport

    def idle_tick(self, now) -> bool:
        """The worker's tick for a connection waiting idle, in its server's pool or kept for one client
        (send_proxy): past its backend's idle_timeout it closes and returns True, for the caller to drop
        it from its list (connection_lost comes later, on the loop); otherwise a TLS one gives back its
        BIOs' buffers, as a client's does."""
        if now - self.idle_since > self.server.backend.spec.idle_timeout:
            self.transport.close()
            return True
        if isinstance(self.transport, TlsBio):
            self.transport.release_buffers()
        return False

    def attach(self, ex, reused) -> None:
        """Send ex's request on this connection (fresh from connect, or popped from the idle list)."""
        self.ex = ex
        self.reused = reused
        self.got_bytes = False
        self._to(U_HEAD)
        ex._to(X_SENT)
        ex.upstream = self
        self.sent_at = self.shared.now
        self.deadline = self.sent_at + ex.backend.response_timeout
        client = ex.client
        if client.write_paused:
            self.transport.pause_reading()
        body = ex.body
        if body:
            ex.body = None
            ex.body_size = 0
            ex.body_sent = True
            body.insert(0, ex.head)
            self.transport.write(b"".join(body))
            client.resume(PAUSE_BODY)
        else:
            self.transport.write(ex.head)

    # -- 4. the response -----------------------------------------------------------------------------
    def data_received(self, data):
        state = self.state
        if state == U_TUNNEL:
            self.tunnel.transport.write(data)
            return
        ex = self.ex
        if ex is None:
            # An idle pooled connection must stay silent (RFC 9112 §9.3): bytes here would be read
            # as the next request's response.
            self._to(U_CLOSED)
            self.transport.close()
            return
        self.got_bytes = True
        self.shared.now = monotonic()  # the one clock read for everything this read finishes
        out = []
        pos = 0
        end = len(data)
        pending = self.pending
        if pending is not None:
            before = len(pending)
            pending += data
            found = pending.find(_HEAD_END, before - 3 if before > 3 else 0)
            if found < 0:
                if len(pending) > self.shared.max_response_head:
                    self._fail_response("invalid")
                return
            self.pending = None
            pos = found + 4 - before
            del pending[found + 4:]
            if not self._head(bytes(pending), 0, len(pending), out):
                return
        while pos < end:
            state = self.state
            if state == U_HEAD:
                stop = _head_end(data, pos)
                if stop < 0:
                    self.pending = bytearray(data[pos:] if pos else data)
                    if len(self.pending) > self.shared.max_response_head:
                        self._fail_response("invalid")
                        return
                    break
                if not self._head(data, pos, stop, out):
                    return
                pos = stop
            elif state == U_LENGTH:
                stop = end if end - pos <= self.body_left else pos + self.body_left
                self.body_left -= stop - pos
                if stop - pos == end:
                    out.append(data)
                elif out:
                    # After the head parsed from this read: the two as one object, no slice, no join.
                    out[len(out) - 1] = _head_and_body(out[len(out) - 1], data, pos, stop)
                else:
                    out.append(data[pos:stop])
                pos = stop
                if not self.body_left:
                    self._complete(out, pos < end)
                    return
            elif state == U_CHUNKED:
                payload = []
                stop = self.chunked.scan(data, pos, end, payload)
                if stop == _CHUNKED_BAD:
                    self._flush(out)
                    self._fail_response("invalid")
                    return
                if payload:
                    body = _joined(payload)
                    out.append(_chunk(body) if self.down_chunked else body)
                if stop < 0:
                    break
                if self.down_chunked:
                    out.append(_CHUNK_END)
                self._complete(out, stop < end)
                return
            elif state == U_UNTIL_CLOSE:
                body = data if pos == 0 else data[pos:]
                out.append(_chunk(body) if self.down_chunked else body)
                break
            else:  # U_TUNNEL after a 101 in this read: the rest is tunnel data
                self.tunnel.transport.write(data[pos:])
                break
        # One write per read: a response head and its body leave in one send (one syscall, one
        # TLS record) instead of one per piece.
        self._flush(out)

    def _head(self, data: bytes, start, stop, out: list) -> bool:
        """Parse the response head data[start:stop]; False if the exchange ended with it."""
        ex = self.ex
        worker = self.worker
        shared = self.shared
        close = not ex.keep_alive or shared.draining
        status, flags, length, head = _parse_response(
            data, start, stop, ex.is_head, ex.chunk_ok, close,
            shared.max_response_head, shared.max_response_headers)
        if status < 0 or (status == 101 and not ex.flags & _F_UPGRADE):
            self._flush(out)
            self._fail_response("invalid")
            return False
        if status < 200 and status != 101:
            # Interim responses (100 Continue, 103 Early Hints) go to HTTP/1.1 clients only: HTTP/1.0
            # has no 1xx (RFC 9110 §15.2).  The final response follows on the same connection.
            if ex.chunk_ok:
                out.append(head)
            return True
        server = self.server
        if status >= 500 and server.failed("5xx", self.shared.now):
            worker.log.warning("%s/%s ejected after %d consecutive 5xx responses",
                               server.backend.name, server.name, server.backend.spec.max_fails)
        elif status < 500:
            server.fails = 0
        ex.upstream_time = self.shared.now - self.sent_at
        _observe(self.shared.area, server.m_upstream, ex.upstream_time)
        if ex.policy is not None:
            head = ex.policy.response(ex, status, head)  # response_headers, on_response (fastlb/policy)
            if head is None:
                # The response hook raised: the client gets a 500 instead, and this response goes with
                # its connection (the body left unread would be taken for the next response).
                self._flush(out)
                self.ex = None
                self._to(U_CLOSED)
                self.transport.abort()
                ex.upstream = None
                ex.release_server()
                ex.respond_local(500)
                return False
        ex.status = status
        ex._to(X_STREAMING)
        out.append(head)
        if status == 101:
            self._flush(out)
            out.clear()
            self._start_tunnel(ex)
            return True
        # The upstream keeps the connection if it speaks 1.1 and does not close, or 1.0 with keep-alive.
        self.keep = not flags & _F_CONN_CLOSE and (not flags & _F_HTTP10 or bool(flags & _F_CONN_KEEPALIVE))
        if flags & _F_NO_BODY:
            self._complete(out, stop < len(data))
            return False
        framed_by_us = bool(flags & (_F_CHUNKED | _F_UNTIL_CLOSE))
        self.down_chunked = framed_by_us and ex.chunk_ok
        if framed_by_us and not ex.chunk_ok:
            ex.keep_alive = False  # core added Connection: close; the body ends when we close
        if flags & _F_CHUNKED:
            self._to(U_CHUNKED)
            self.chunked = _ChunkedBody(shared.max_response_head)
        elif flags & _F_UNTIL_CLOSE:
            self._to(U_UNTIL_CLOSE)
        elif length:
            self._to(U_LENGTH)
            self.body_left = length
        else:
            self._complete(out, stop < len(data))
            return False
        return True

    def _flush(self, out: list) -> None:
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            ex = self.ex
            ex.bytes_out += len(data)
            ex.client.transport.write(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        state = self.state
        self.state = U_CLOSED
        if state == U_TUNNEL:
            client, self.tunnel = self.tunnel, None
            if client is not None:
                client.transport.close()
            return
        ex = self.ex
        if ex is None:
            if (self.tls_name is not None and not self.reused and state == U_IDLE
                    and self.server.link.refused(exc, self.worker.area, self.worker.log)):
                # Refused (an alert) before _connected ran, on another loop iteration: it says "tls".
                self.refused = True
            owner = self.owner
            if owner is not None:
                if owner.private is not None and self in owner.private:
                    owner.private.remove(self)
                return
            idle = self.server.idle
            if self in idle:
                idle.remove(self)
            return
        self.ex = None
        if ex.state == X_CONNECTING:
            # Closed before _connected could use it (see there): nothing was sent.
            refused = self.server.link.refused(exc, self.worker.area, self.worker.log)
            ex.upstream_failed(self.server, "tls" if refused else "reset", False)
        elif ex.state == X_SENT:
            link = self.server.link
            if (link is not None and not self.got_bytes and not self.reused
                    and link.refused(exc, self.worker.area, self.worker.log)):
                # A TLS 1.3 server checks our certificate after its side of the handshake is done
                # (RFC 8446 §4.4.2.4): a refusal comes as an alert in place of the response, and the
                # request never reached the application.  A failed connect, then: the next server.
                ex.upstream_failed(self.server, "tls", False)
                return
            # A pooled connection the server closed just as we reused it is the classic keep-alive
            # race (RFC 9112 §9.3.1); Exchange.upstream_failed replays idempotent requests only.
            ex.upstream_failed(self.server, "invalid" if self.got_bytes else "reset", True,
                               self.reused and not self.got_bytes)
        elif state == U_UNTIL_CLOSE:
            # A close-delimited body ends at EOF (RFC 9112 §6.3 item 8).
            if self.down_chunked:
                ex.bytes_out += len(_CHUNK_END)
                ex.client.transport.write(_CHUNK_END)
            ex.upstream = None
            self.shared.now = monotonic()
            ex.response_done(self.shared.now)
        elif ex.state == X_STREAMING:
            # Died mid-body: the client must see an incomplete message, never a clean end.
            ex.upstream = None
            ex.client.abort()

    def pause_writing(self):
        if self.ex is not None:
            self.ex.client.pause(PAUSE_UPSTREAM)
        elif self.tunnel is not None:
            self.tunnel.pause(PAUSE_UPSTREAM)

    def resume_writing(self):
        if self.ex is not None:
            self.ex.client.resume(PAUSE_UPSTREAM)
        elif self.tunnel is not None:
            self.tunnel.resume(PAUSE_UPSTREAM)

    # -- outcomes ---------------------------------------------------------------------------------
    def _complete(self, out: list, dirty) -> None:
        """The response ended.  dirty: bytes followed it (a response desync): never reuse."""
        ex = self.ex
        client = ex.client
        if (not ex.keep_alive and client.active is ex and client.incoming is not ex
                and isinstance(client.transport, TlsBio)):
            # exchange_done closes the client connection right after this: the response's last records
            # go out with the close_notify, in one write.
            client.transport.corked = True
        self._flush(out)
        self.ex = None
        self.chunked = None
        if not self.reused and self.tls_name is not None:
            # The first response on a new TLS connection: its session, with the TLS 1.3 ticket that
            # came after the handshake, resumes the next connection (fastlb/net/upstream_tls.py, 3).
            self.server.link.save_session(self.tls_name, self.transport)
        if (self.keep and not dirty and client.incoming is not ex
                and not ex.flags & _F_AMBIGUOUS and self.state != U_TUNNEL):
            self._to(U_IDLE)
            self.idle_since = self.shared.now
            if client.write_paused:
                self.transport.resume_reading()
            if self.owner is None:
                self.server.idle.append(self)
            elif client.state != C_CLOSED:
                # send_proxy: kept for this client's next requests only, one per server, a few at most
                # (HAProxy's max-session-srv-conns, 5 by default).
                private = client.private
                if private is None:
                    client.private = private = []
                private.append(self)
                if len(private) > _MAX_PRIVATE:
                    private.pop(0).transport.close()
            else:
                self._to(U_CLOSED)
                self.transport.close()
        else:
            # An early answer before the whole request body was read leaves the body half-sent on
            # this connection: it cannot carry another request.
            self._to(U_CLOSED)
            self.transport.close()
        ex.upstream = None
        ex.response_done(self.shared.now)

    def _fail_response(self, kind) -> None:
        ex = self.ex
        self.ex = None
        self.state = U_CLOSED
        self.transport.abort()
        if ex is None:
            return
        ex.upstream = None
        if ex.state == X_SENT:
            ex.upstream_failed(self.server, kind, True)
        else:
            ex.client.abort()

    def _start_tunnel(self, ex) -> None:
        self.ex = None
        self._to(U_TUNNEL)
        client = ex.client
        self.tunnel = client
        ex.upstream = None
        client.start_tunnel(ex, self)

    def timed_out(self) -> None:
        """The response head did not come within response_timeout."""
        ex = self.ex
        self.ex = None
        self.state = U_CLOSED
        self.transport.abort()
        if ex is not None:
            ex.upstream = None
            ex.upstream_failed(self.server, "timeout", True)


def connect(worker, server, ex) -> None:
    """Open a new connection to server for ex; the outcome arrives in _connected."""
    loop = worker.loop
    conn = UpstreamConnection(worker, server)
    link = server.link
    if link is None:
        coro = loop.create_connection(lambda: conn, server.host, server.port)
    else:
        # TLS and/or a PROXY header (fastlb/net/upstream_tls.py): a connection that carries this
        # client's address in its header is this client's alone.
        header = None
        if link.proxy:
            transport = ex.client.transport
            header = link.proxy_header(transport.get_extra_info("peername"),
                                       transport.get_extra_info("sockname"))
            conn.owner = ex.client
        if link.context is not None:
            conn.tls_name = link.name_for(ex.host)
        coro = link.open(loop, conn, conn.tls_name, header)
    task = loop.create_task(coro)
    timer = loop.call_later(ex.backend.spec.connect_timeout, task.cancel)
    task.add_done_callback(functools.partial(_connected, conn, ex, timer))


def _connected(conn, ex, timer, task) -> None:
    timer.cancel()
    server = conn.server
    if task.cancelled():
        ex.upstream_failed(server, "timeout", False)
        return
    exc = task.exception()
    if exc is not None:
        link = server.link
        # A certificate that fails verification, or a refused handshake, is a failed connect: kind
        # "tls", counted by reason and logged with OpenSSL's words (upstream_tls.ServerLink.failed).
        kind = "connect" if link is None else link.failed(exc, conn.worker.area, conn.worker.log)
        ex.upstream_failed(server, kind, False)
        return
    if conn.transport.is_closing():
        # uvloop runs connection_made, the task's result and this callback on separate loop
        # iterations: a server that closes or resets right after accepting is already gone here.
        # Writing to it would raise and leave the exchange to response_timeout (issue 14's flake).
        # Nothing was sent, so any method may go to the next server.
        if ex.state == X_CONNECTING and ex.server is server:
            if conn.tls_name is not None and conn.state != U_CLOSED:
                # Its connection_lost has yet to run, and only it learns why (a TLS alert, say, when
                # the server refused our certificate): it decides.
                conn.ex = ex
            else:
                ex.upstream_failed(server, "tls" if conn.refused else "reset", False)
        return
    if conn.tls_name is not None:
        server.link.connected(conn.transport, conn.worker.area)
    if ex.state == X_CONNECTING and ex.server is server and ex.client.state != C_CLOSED:
        conn.attach(ex, False)
    elif conn.owner is not None:
        conn.transport.close()  # made for a client that went away: nobody else may use it
    else:
        # The client went away while we were connecting: keep the fresh connection for the next one.
        conn.idle_since = conn.shared.now
        server.idle.append(conn)


def _pooled_for(idle: list, name):
    """The warmest idle connection opened under this TLS name (sni_from_host), taken out, or None."""
    i = len(idle) - 1
    while i >= 0:
        conn = idle[i]
        if conn.tls_name == name and not conn.transport.is_closing():
            del idle[i]
            return conn
        i -= 1
    return None


__all__ = ["ClientConnection", "Exchange", "Shared", "UpstreamConnection", "connect"]
