"""The front door: what a TLS or PROXY-protocol listener does with a connection before HTTP starts.

The one source of ``fastlb.http.front``: Cython compiles it as ``front_c`` (``front_c.pxd``), and
``FASTLB_NO_EXTENSIONS=1`` runs it as it is (see fastlb/native.py).

Why fastlb drives TLS itself: uvloop's SSL layer never sends the alert of a refused handshake (the client
sees an unexpected EOF, RFC 8446 section 6.2 wants the alert), keeps no reason for a failure, and cannot
read a byte before the handshake, which the PROXY protocol and SNI passthrough need.  `Front` is the
asyncio protocol of every accepted connection on such a listener, and the transport its ClientConnection
writes to.  OpenSSL (the stdlib `ssl` module) still does all of TLS, over two memory BIOs, as uvloop and
CPython's asyncio do: the loop's own plain transport keeps doing the socket I/O, with its write buffering
and flow control, so a request costs the same system calls as on a plain listener (one read, one write each
way), where OpenSSL on the socket itself reads each record in two calls (the 5-byte header, then the
body: stdlib `ssl` cannot turn on read-ahead) and needs one more that fails with EAGAIN per wakeup.

    Front.state
    PROXY ──header──▶ HELLO ──ClientHello, SNI not passed through──▶ HANDSHAKE ──▶ OPEN
      │                 └──SNI of a [[listeners.passthrough]] entry──▶ SPLICE
      └─(plain listener)──header──▶ OPEN                  any ──refused, timeout, reset──▶ CLOSED

PROXY is skipped without `proxy_protocol`.  HELLO parses the ClientHello (`core.parse_client_hello`,
0.3 microseconds compiled, once per connection) for the SNI passthrough and hooks see and the ALPN an ACME
TLS-ALPN-01 challenge comes with; a malformed one is left to OpenSSL, which refuses it with its alert.  A refused handshake sends the
alert OpenSSL wrote into the outgoing BIO, or, for plain HTTP sent to the TLS port, a 400 in plain
HTTP as nginx does; either way the reason is counted in fastlb_tls_handshake_errors_total.
"""

import ssl
from time import monotonic

from fastlb import core
from fastlb.http.protocol import ClientConnection
from fastlb.net import tlsbio
from fastlb.net.tls import by_server_name, handshake_failure_reason

F_PROXY = 0
F_HELLO = 1
F_HANDSHAKE = 2
F_OPEN = 3
F_SPLICE = 4
F_CLOSED = 5

_ACME_TLS = b"acme-tls/1"  # RFC 8737 section 3
_SSLError = ssl.SSLError
_parse_proxy_header = core.parse_proxy_header
_parse_client_hello = core.parse_client_hello
_PROXY_MORE = core.PROXY_MORE
_PROXY_BAD = core.PROXY_BAD
_PROXY_OK = core.PROXY_OK
_HELLO_MORE = core.HELLO_MORE
_HELLO_OK = core.HELLO_OK

# What OpenSSL calls a first record that is an HTTP request line (ssl/record/ssl3_record.c).
_HTTP_REQUEST = ("HTTP_REQUEST", "HTTPS_PROXY_REQUEST")
# nginx's answer to plain HTTP on an HTTPS port (its 497 code, sent as 400).
_BODY = b"400 Bad Request: the plain HTTP request was sent to an HTTPS port\n"
_NOT_TLS = b"".join((
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n",
    b"Content-Length: %d\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n" % len(_BODY), _BODY,
))


class Front:
    """One accepted connection on a TLS or PROXY-protocol listener: the protocol of the loop's transport.
    Its `tls` (a TlsBio) is the ClientConnection's transport; a passthrough `splice` gets raw bytes."""

    def __init__(self, worker, listener, context):
        self.worker = worker
        self.listener = listener
        self.context = context    # the listener's SSLContext, None on a plain PROXY listener
        self.raw = None           # the loop's transport of the accepted socket
        self.tls = None           # the TlsBio: OpenSSL's records (or the plain bytes), the app's transport
        self.app = None           # the ClientConnection once HTTP starts
        self.splice = None        # the Splice to a passthrough backend
        self.state = F_CLOSED
        self.buffer = b""         # bytes received before TLS or HTTP starts (PROXY header, ClientHello)
        # (ip, port) of the client and of the listener as a PROXY header gave them, else None: the
        # TlsBio then asks the socket when the app wants them, so an idle connection keeps no tuples.
        self.peer = None
        self.local = None
        self.sni = None           # the server name of a well-formed ClientHello
        self.deadline = 0.0

    # -- the loop's transport calls these -------------------------------------------------------------
    def connection_made(self, transport):
        self.raw = transport
        worker = self.worker
        listener = self.listener
        self.deadline = monotonic() + listener.front_timeout
        worker.fronts.add(self)
        if listener.proxy_protocol:
            # PROXY headers are taken only from trusted_proxies: from anyone else one would let a
            # client choose the address every rule and log sees.
            if not worker.is_trusted(transport.get_extra_info("peername")[0]):
                self._give_up("untrusted")
                return
            self.state = F_PROXY
        else:
            self._begin(b"")

    def data_received(self, data):
        state = self.state
        if state == F_OPEN:
            self.tls.feed(data)
        elif state == F_SPLICE:
            self.splice.send(data)
        elif state == F_HANDSHAKE:
            self.tls.incoming.write(data)
            self._handshake()
        elif state == F_PROXY:
            self._proxy_header(self.buffer + data)
        elif state == F_HELLO:
            self._hello(self.buffer + data)

    def eof_received(self):
        if self.state == F_OPEN:
            return self.app.eof_received()
        if self.state == F_SPLICE:
            return self.splice.client_eof()
        return False  # closed during PROXY/handshake: connection_lost counts it as reset

    def connection_lost(self, exc):
        state = self.state
        self.state = F_CLOSED
        self.worker.fronts.discard(self)
        if self.app is not None:
            self.app.connection_lost(exc)
            # The app and its TlsBio hold each other (app.transport, tls.app). With that cut, both, the SSL
            # object and its BIOs (OpenSSL's record buffers) are freed right here by reference counting
            # instead of waiting for a cyclic GC pass (9 objects per connection before). `closing` keeps
            # a late write or a queued _resume_read from reaching the app.
            self.tls.closing = True
            self.tls.app = None
        elif self.splice is not None:
            self.splice.client_lost()
        elif state == F_PROXY:
            # Closed before its PROXY header ended: the header is missing, whatever the listener
            # speaks after it (nothing of TLS has started, so no handshake error).
            self.worker.area[self.listener.m_proxy_errors["bad_header"]] += 1
        elif state in (F_HELLO, F_HANDSHAKE):
            self._count("reset")

    def pause_writing(self):
        if self.app is not None:
            self.app.pause_writing()
        elif self.splice is not None:
            self.splice.pause()

    def resume_writing(self):
        if self.app is not None:
            self.app.resume_writing()
        elif self.splice is not None:
            self.splice.resume()

    # -- before HTTP ------------------------------------------------------------------------------------
    def _proxy_header(self, data: bytes) -> None:
        status, used, src, sport, dst, dport, tlvs = _parse_proxy_header(data)
        if status == _PROXY_MORE:
            self.buffer = data
            return
        if status == _PROXY_BAD:
            self._give_up("bad_header")
            return
        if status == _PROXY_OK:
            self.peer = (src, sport)
            self.local = (dst, dport)
        # PROXY_LOCAL (a health check from the proxy itself): the socket's own addresses stay.
        self.buffer = b""
        self._begin(data[used:])

    def _begin(self, data: bytes) -> None:
        if self.context is None:
            self.tls = tlsbio.TlsBio(self.raw, None, self.peer, self.local)
            self._open()
            if data:
                self.tls.feed(data)
        else:
            self.state = F_HELLO
            if data:
                self._hello(data)

    def _hello(self, data: bytes) -> None:
        status, sni, alpn = _parse_client_hello(data)
        if status == _HELLO_MORE:
            self.buffer = data
            return
        self.buffer = b""
        context = self.context
        if status == _HELLO_OK:
            self.sni = sni  # for hooks (req.sni): the stdlib has no server-side getter for it
            passthrough = self.listener.passthrough
            if sni is not None and passthrough is not None:
                # An absolute name (RFC 1034 section 3.1) is the same host.
                backend = by_server_name(passthrough, sni.rstrip("."))
                if backend is not None:
                    if self.peer is None:  # the splice hashes on it and may send it in a PROXY header
                        self.peer = self.raw.get_extra_info("peername")
                        self.local = self.raw.get_extra_info("sockname")
                    self.state = F_SPLICE
                    self.worker.fronts.discard(self)
                    self.splice = Splice(self, backend, data)
                    return
            if _ACME_TLS in alpn and self.worker.acme_alpn:
                challenge = self.worker.tls_alpn_challenge(sni)
                if challenge is not None:
                    context = challenge
        # Anything else, malformed or not TLS at all, is OpenSSL's to refuse, with its alert.
        self._start_tls(data, context)

    def _start_tls(self, data: bytes, context) -> None:
        self.state = F_HANDSHAKE
        self.tls = tlsbio.TlsBio(self.raw, None, self.peer, self.local)
        self.tls.wrap(context, True, None, None)
        if data:
            self.tls.incoming.write(data)
            self._handshake()

    def _handshake(self) -> None:
        try:
            if not self.tls.shake():
                return
        except (_SSLError, ValueError) as exc:
            self._refuse(handshake_failure_reason(exc), getattr(exc, "reason", None) in _HTTP_REQUEST)
            return
        # shake() sent our Finished flight; a TLS 1.3 session ticket waits for the first response.
        self._open()

    def _refuse(self, reason: str, plain_http: bool) -> None:
        """The handshake failed: send what OpenSSL wrote (the alert), count why, close."""
        self._count(reason)
        if plain_http:
            self.raw.write(_NOT_TLS)
        else:
            self.tls._flush()  # the alert
        self.state = F_CLOSED
        self.worker.fronts.discard(self)
        self.raw.close()

    def _give_up(self, reason: str) -> None:
        """No usable PROXY header: nothing to answer in any protocol, so the connection is cut."""
        self.worker.area[self.listener.m_proxy_errors[reason]] += 1
        self.state = F_CLOSED
        self.worker.fronts.discard(self)
        self.raw.abort()

    def timed_out(self) -> None:
        """handshake_timeout (TLS) or header_timeout (a PROXY header that never ends) passed."""
        if self.context is not None:
            self._count("timeout")
        else:
            self.worker.area[self.listener.m_proxy_errors["timeout"]] += 1
        self.state = F_CLOSED
        self.worker.fronts.discard(self)
        self.raw.abort()

    def _count(self, reason: str) -> None:
        listener = self.listener
        if listener.m_tls_errors is not None:
            self.worker.area[listener.m_tls_errors[reason]] += 1
            if reason == "bad_client_certificate":
                self.worker.area[listener.m_client_certs["failed"]] += 1

    def _open(self) -> None:
        self.state = F_OPEN
        self.worker.fronts.discard(self)
        app = ClientConnection(self.worker, self.listener)
        self.app = app
        app.sni = self.sni
        self.tls.app = app
        self.tls.open()  # app.connection_made, then any application data that came with the Finished


class Splice:
    """SNI passthrough: the client's bytes, ClientHello first, go to a server of the backend untouched,
    and the server's come back the same way (fastlb holds no key for them).  The asyncio protocol of the
    server connection; the Front forwards the client side to it."""

    def __init__(self, front, backend, hello: bytes):
        worker = front.worker
        self.front = front
        self.worker = worker
        self.backend = backend
        self.transport = None
        self.server = None
        self.tried = ()
        self.pending = [hello]    # client bytes that came before the server connection was up
        self.closed = False
        self.m_in, self.m_out = front.listener.m_passthrough[backend.name]
        worker.area[front.listener.m_passthrough_total[backend.name]] += 1
        worker.splices.add(self)
        front.raw.pause_reading()
        self._next()

    def _next(self) -> None:
        backend = self.backend
        key = None
        if backend.hash_key is not None:
            key = backend.hash_key(b"", self.front.peer[0].encode(), b"/")
        server = backend.balancer.pick(self.tried, key)
        if server is None or len(self.tried) > backend.spec.retries:
            self.front.raw.abort()  # no TLS of ours to send an alert with: the client sees a reset
            return
        self.tried += (server,)
        self.server = server
        server.active += 1
        self.worker.area[server.m_upstream] += 1
        loop = self.worker.loop
        task = loop.create_task(loop.create_connection(lambda: self, server.host, server.port))
        timer = loop.call_later(backend.spec.connect_timeout, task.cancel)
        task.add_done_callback(lambda task: self._connected(server, timer, task))

    def _connected(self, server, timer, task) -> None:
        timer.cancel()
        if task.cancelled() or task.exception() is not None or self.transport is None \
                or self.transport.is_closing():
            server.active -= 1
            kind = "timeout" if task.cancelled() else "connect"
            self.worker.area[server.m_errors[kind]] += 1
            if server.failed(kind, self.worker.shared.now):
                self.worker.log.warning("%s/%s ejected after %d consecutive failures (last: %s)",
                                        server.backend.name, server.name, server.backend.spec.max_fails, kind)
            if self.transport is not None:
                self.transport.abort()
                self.transport = None
            if not self.closed:
                self._next()
            return
        if self.closed:
            self.transport.close()
            return
        front = self.front
        if server.link is not None and server.link.proxy:
            # Before any TLS byte: the server, or a balancer behind us, sees the real client.
            self.transport.write(server.link.proxy_header(front.peer, front.local))
        data = b"".join(self.pending)
        self.pending = None
        self.transport.write(data)
        self.worker.area[self.m_in] += len(data)
        front.raw.resume_reading()

    # -- the client side, from the Front ----------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.pending is not None:
            self.pending.append(data)
            return
        self.transport.write(data)
        self.worker.area[self.m_in] += len(data)

    def client_eof(self) -> bool:
        return False

    def client_lost(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    # -- the server side ------------------------------------------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.front.raw.write(data)
        self.worker.area[self.m_out] += len(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if self.pending is not None:
            return  # failed before it was used: _connected tries the next server
        if self.server is not None:
            self.server.active -= 1
            self.server = None
        self.worker.splices.discard(self)
        if not self.closed:
            self.closed = True
            self.front.raw.close()

    def pause_writing(self):
        self.front.raw.pause_reading()

    def resume_writing(self):
        self.front.raw.resume_reading()

    def abort(self) -> None:
        """The worker stops: cut both sides."""
        self.closed = True
        self.front.raw.abort()
        if self.transport is not None:
            self.transport.abort()


__all__ = ["Front", "Splice"]
