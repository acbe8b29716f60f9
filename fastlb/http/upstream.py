"""The backend side of an exchange: one keep-alive HTTP/1.1 connection to a server, and its pool.

Theory of operation: an UpstreamConnection carries one exchange at a time (no upstream pipelining, so a
response can never be matched to the wrong request).  `attach` writes the request head and any body
bytes buffered while connecting; the response is parsed by httptools (llhttp, strict) and streamed to the
client as it arrives.  When the response ends cleanly on a connection both sides keep alive, and no
byte follows it, the connection goes back to its server's idle list (LIFO: the warmest socket first);
anything else closes it, so a connection is never reused after a close-delimited, interrupted or
over-long response.
"""

import asyncio
import functools
from time import monotonic

import httptools
from httptools import HttpParserError, HttpParserUpgrade

from fastlb import core
from fastlb.obs.metrics import observe

_F_CHUNKED = core.F_CHUNKED
_F_NO_BODY = core.F_NO_BODY
_F_UNTIL_CLOSE = core.F_UNTIL_CLOSE
_F_UPGRADE = core.F_UPGRADE
_CHUNK_END = b"0\r\n\r\n"


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "worker", "server", "transport", "parser", "ex", "reason", "headers", "got_bytes", "complete",
        "keep", "dirty", "down_chunked", "until_close", "interim", "deadline", "idle_since", "tunnel",
        "reused", "out", "sent_at", "head_size",
    )

    def __init__(self, worker, server):
        self.worker = worker
        self.server = server
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex = None
        self.reason = b""
        self.headers = None
        self.got_bytes = False   # any response byte for the current exchange
        self.complete = False    # the current response ended inside this feed_data
        self.keep = False
        self.dirty = False       # bytes after the response: never reuse (response desync)
        self.down_chunked = False
        self.until_close = False
        self.interim = False     # the message being parsed is a 1xx interim response
        self.deadline = 0.0
        self.idle_since = 0.0
        self.tunnel = None       # the ClientConnection after a 101 upgrade
        self.reused = False
        self.out = []            # bytes for the client produced by one feed_data, sent in one write
        self.sent_at = 0.0
        self.head_size = 0

    # -- connection lifecycle -------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def attach(self, ex, reused: bool) -> None:
        """Send ex's request on this connection (fresh from connect, or popped from the idle list)."""
        self.ex = ex
        self.reused = reused
        self.got_bytes = False
        ex.upstream = self
        worker = self.worker
        self.sent_at = monotonic()
        self.deadline = self.sent_at + ex.backend.spec.response_timeout
        worker.awaiting.add(self)
        if ex.client.write_paused:
            self.transport.pause_reading()
        body = ex.body
        if body:
            ex.body = None
            ex.body_size = 0
            ex.body_sent = True
            body.insert(0, ex.head)
            self.transport.write(b"".join(body))
            ex.client.resume(PAUSE_BODY)
        else:
            self.transport.write(ex.head)

    def data_received(self, data):
        if self.tunnel is not None:
            self.tunnel.transport.write(data)
            return
        if self.ex is None:
            # An idle pooled connection must stay silent (RFC 9112 §9.3): bytes here would be read
            # as the next request's response.
            self.transport.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._flush()
            self._start_tunnel(data[exc.args[0]:])
            return
        except HttpParserError:
            if self.complete:
                self._flush()
                self.dirty = True  # the response ended well; what followed it is junk
                self._finish()
            else:
                self.out = []
                self._fail_response("invalid")
            return
        # One write per read: a response head and its body leave in one send (one syscall, one
        # TLS record) instead of one per parser callback.
        self._flush()
        if self.complete:
            self._finish()

    def _flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            data = out[0] if len(out) == 1 else b"".join(out)
            ex = self.ex
            ex.bytes_out += len(data)
            ex.client.transport.write(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.worker.awaiting.discard(self)
        if self.tunnel is not None:
            client, self.tunnel = self.tunnel, None
            client.transport.close()
            return
        ex = self.ex
        if ex is None:
            idle = self.server.idle
            if self in idle:
                idle.remove(self)
            return
        self.ex = None
        if ex.response_state == 0:
            # A pooled connection the server closed just as we reused it is the classic keep-alive
            # race (RFC 9112 §9.3.1); Exchange.upstream_failed replays idempotent requests only.
            ex.upstream_failed(self.server, "invalid" if self.got_bytes else "reset", sent=True,
                               stale=self.reused and not self.got_bytes)
        elif self.until_close and not self.complete:
            # A close-delimited body ends at EOF (RFC 9112 §6.3 item 8).
            client = ex.client
            if self.down_chunked:
                client.transport.write(_CHUNK_END)
            ex.response_done()
        elif ex.response_state == 1:
            # Died mid-body: the client must see an incomplete message, never a clean end.
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

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self):
        if self.complete or self.ex is None:
            self.dirty = True
            raise _Desync()
        self.headers = []
        self.reason = b""
        self.head_size = 0

    def on_status(self, reason):
        self.reason += reason

    def on_header(self, name, value):
        headers = self.headers
        headers.append((name, value))
        # A response head is bounded too: 4x the request limits (Set-Cookie heavy responses).
        limits = self.worker.limits
        self.head_size += len(name) + len(value) + 4
        if self.head_size > 4 * limits.max_header_bytes or len(headers) > 4 * limits.max_headers:
            raise _Desync()

    def on_headers_complete(self):
        ex = self.ex
        status = self.parser.get_status_code()
        headers, self.headers = self.headers, None
        if status < 200 and status != 101:
            # Interim responses (100 Continue, 103 Early Hints) go to HTTP/1.1 clients only: HTTP/1.0
            # has no 1xx (RFC 9110 §15.2).
            self.interim = True
            if ex.chunk_ok:
                err, _, head = core.response_head(status, self.reason, headers, False, True, False)
                if not err:
                    self.out.append(head)
            return
        self.interim = False
        if status == 101 and not ex.flags & _F_UPGRADE:
            raise _Desync()
        server = self.server
        if status >= 500 and server.failed("5xx", self.worker.now):
            self.worker.log.warning("%s/%s ejected after %d consecutive 5xx responses",
                                    server.backend.name, server.name, server.backend.spec.max_fails)
        elif status < 500:
            server.fails = 0
        worker = self.worker
        worker.awaiting.discard(self)
        ex.upstream_time = monotonic() - self.sent_at
        observe(worker.area, server.m_upstream, ex.upstream_time)
        ex.status = status
        close = not ex.keep_alive or worker.draining
        err, flags, head = core.response_head(status, self.reason, headers, ex.is_head, ex.chunk_ok, close)
        if err:
            raise _Desync()
        self.keep = self.parser.should_keep_alive()
        self.until_close = bool(flags & _F_UNTIL_CLOSE)
        no_body = flags & _F_NO_BODY
        framed_by_us = flags & (_F_CHUNKED | _F_UNTIL_CLOSE) and not no_body
        self.down_chunked = bool(framed_by_us and ex.chunk_ok)
        if framed_by_us and not ex.chunk_ok:
            ex.keep_alive = False  # core added Connection: close; the body ends when we close
        ex.response_state = 1
        self.out.append(head)
        if status != 101 and ex.is_head:
            # llhttp does not know the request was HEAD and would wait for Content-Length bytes
            # (RFC 9112 §6.3 item 1): the message ends here, and the parser is replaced in _finish.
            self.complete = True

    def on_body(self, body):
        if self.complete:
            self.dirty = True
            return
        if self.down_chunked:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            self.out.append(body)

    def on_message_complete(self):
        if self.interim:
            self.interim = False
            return
        if self.down_chunked:
            self.out.append(_CHUNK_END)
        self.complete = True

    # -- outcomes ---------------------------------------------------------------------------------
    def _finish(self):
        ex = self.ex
        self.ex = None
        self.complete = False
        if ex.is_head:
            self.parser = httptools.HttpResponseParser(self)
        if self.keep and not self.dirty and not self.until_close and ex.body_done:
            self.idle_since = self.worker.now
            if ex.client.write_paused:
                self.transport.resume_reading()
            self.server.idle.append(self)
        else:
            # An early answer before the whole request body was read leaves the body half-sent on
            # this connection: it cannot carry another request.
            self.transport.close()
        ex.upstream = None
        ex.response_done()

    def _fail_response(self, kind: str) -> None:
        ex = self.ex
        self.ex = None
        self.worker.awaiting.discard(self)
        self.transport.abort()
        if ex is None:
            return
        if ex.response_state == 0:
            ex.upstream_failed(self.server, kind, sent=True)
        else:
            ex.client.abort()

    def _start_tunnel(self, rest: bytes) -> None:
        ex = self.ex
        self.ex = None
        client = ex.client
        self.tunnel = client
        ex.upstream = None
        client.start_tunnel(ex, self)
        if rest:
            client.transport.write(rest)

    def timed_out(self) -> None:
        """The response head did not come within response_timeout."""
        ex = self.ex
        self.ex = None
        self.transport.abort()
        if ex is not None:
            ex.upstream_failed(self.server, "timeout", sent=True)


class _Desync(Exception):
    """Raised inside a parser callback: the response can't be relayed safely (502 or abort)."""


# Reasons a client connection's reading is paused; reading resumes when none is left.
PAUSE_UPSTREAM = 1   # the backend is not taking the request body fast enough
PAUSE_BODY = 2       # body buffered while connecting reached its cap
PAUSE_PIPELINE = 4   # a pipelined request waits for the previous response
PAUSE_UPGRADE = 8    # bytes after an Upgrade request wait for the backend's 101 (or not)
PAUSE_FAILED = 16    # the request stream is broken: nothing more is read


def connect(worker, server, ex) -> None:
    """Open a new connection to server for ex; the outcome arrives in _connected."""
    loop = worker.loop
    conn = UpstreamConnection(worker, server)
    task = loop.create_task(loop.create_connection(lambda: conn, server.host, server.port))
    timer = loop.call_later(ex.backend.spec.connect_timeout, task.cancel)
    task.add_done_callback(functools.partial(_connected, conn, ex, timer))


def _connected(conn, ex, timer, task) -> None:
    timer.cancel()
    if task.cancelled():
        ex.upstream_failed(conn.server, "timeout", sent=False)
        return
    if task.exception() is not None:
        ex.upstream_failed(conn.server, "connect", sent=False)
        return
    if ex.pending_server is conn.server and not ex.client.closed:
        ex.pending_server = None
        conn.attach(ex, reused=False)
    else:
        # The client went away while we were connecting: keep the fresh connection for the next one.
        conn.idle_since = conn.worker.now
        conn.server.idle.append(conn)

