"""fastlb's TLS: OpenSSL over two memory BIOs on the loop's plain transport.  `TlsBio` carries the
records of one connection and is the transport its app (a ClientConnection or an UpstreamConnection)
writes to; the listeners' `Front` (fastlb/http/front_py.py) drives a server-side one, `BackendTls` below
is the client side towards a backend server.

The one source of ``fastlb.net.tlsbio``: Cython compiles it as ``tlsbio_c`` (``tlsbio_c.pxd``), and
``FASTLB_NO_EXTENSIONS=1`` runs it as it is (see fastlb/native.py).

OpenSSL (the stdlib `ssl` module) does all of TLS; the loop's own transport does the socket I/O, with its
write buffering and flow control.  So a request costs the system calls of a plain connection (one read,
one write each way), where OpenSSL on the socket itself reads each record in two calls (its 5-byte header,
then its body: the stdlib cannot turn on read-ahead).

Why not uvloop's SSL layer: it never sends the alert of a refused handshake, keeps no reason for a
failure, cannot read a byte before the handshake (PROXY protocol, SNI passthrough) nor write one (a PROXY
header to a backend), has no `session=` for resuming a backend's sessions, and cost more per request (on
https-reencrypt it put fastlb at 1.13x nginx's CPU per request, 1.06x with this layer).
"""

import socket
import ssl
from asyncio import get_running_loop

from fastlb.net.biomem import release

# RFC 8446 section 5.1: a record carries at most 2^14 bytes of plaintext, so one read takes a record.
_RECORD = 16384
_SSLWantReadError = ssl.SSLWantReadError
_SSLZeroReturnError = ssl.SSLZeroReturnError
_SSLError = ssl.SSLError
_get_running_loop = get_running_loop
_release = release
_IPPROTO_TCP = socket.IPPROTO_TCP
_TCP_QUICKACK = socket.TCP_QUICKACK

# BackendTls.state
B_CONNECTING = 0
B_HANDSHAKE = 1
B_OPEN = 2
B_CLOSED = 3


class TlsBio:
    """One connection's records: decrypted into `app.data_received`, encrypted from `write`.  With no
    context (a PROXY-protocol listener without TLS) it passes bytes through and only reports the
    addresses the PROXY header gave."""

    def __init__(self, raw, app, peer, local):
        self.raw = raw            # the loop's transport of the socket
        self.app = app            # the protocol reading and writing the plaintext
        self.peer = peer          # what get_extra_info reports as peername and sockname
        self.local = local
        self.sslobj = None        # OpenSSL's connection (_ssl._SSLSocket) over the two BIOs
        self.incoming = None
        self.outgoing = None
        self.opened = False       # the handshake is done: records carry application data
        self.paused = False       # the app asked to stop reading
        self.closing = False
        self.error = None         # the SSLError that broke an open connection, for connection_lost
        self.quiet_ticks = 0      # worker ticks since bytes last came in (release_buffers counts them)
        # What waits in `outgoing` for a later write instead of taking a system call, a segment and a
        # wake-up of the peer of its own:
        # - lazy: a TLS 1.3 server's own messages after the handshake, i.e. its session ticket and the
        #   answer to a KeyUpdate.  A client never waits for them: tickets may come at any time (RFC 8446
        #   section 4.6.1), and a KeyUpdate answer need only precede our next application data (4.6.3).
        #   They go out with our next write, or with the close_notify.
        # - corked: the app's writes, until close() sends them with the close_notify (the last response
        #   of a connection that closes after it, see protocol_py.py `_complete`).
        self.lazy = False
        self.corked = False

    def wrap(self, context, server_side, server_hostname, session) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        if server_hostname is not None:
            server_hostname = context._encode_hostname(server_hostname)  # IDNA, as SSLContext.wrap_bio
        # The C object under ssl.SSLObject, whose methods are Python wrappers around its own: its calls
        # are per record.  No owner: an SNI callback then receives this C object itself.
        self.sslobj = context._wrap_bio(self.incoming, self.outgoing, server_side, server_hostname,
                                        session=session)

    def feed(self, data) -> None:
        """Bytes from the socket."""
        if self.sslobj is None:
            self.app.data_received(data)
            return
        self.quiet_ticks = 0
        self.incoming.write(data)
        if self.opened and not self.paused:
            self._read()

    def shake(self) -> bool:
        """One step of the handshake: True once it is done, False while it waits for the peer; what
        OpenSSL raises when it fails propagates (the caller sends the alert with `_flush`)."""
        sslobj = self.sslobj
        try:
            sslobj.do_handshake()
        except _SSLWantReadError:
            self._flush()
            return False
        server_side = sslobj.server_side
        if server_side and sslobj.version() == "TLSv1.3":
            self.lazy = True  # the session ticket goes out with the first response
        elif self.outgoing.pending:
            # The last flight, which the peer waits for: a TLS 1.2 server's Finished (a full handshake
            # ends with it, RFC 5246 section 7.3), or a client's Finished.
            self._flush()
            return True
        if server_side and not self.incoming.pending:
            # The handshake ended with the client's Finished and we sent nothing after it (a TLS 1.3
            # ticket held, a TLS 1.2 resumption); its request has not come yet.  The kernel would delay
            # the ACK of that Finished (up to 40 ms: the connection is interactive by now), and a client
            # that keeps Nagle's algorithm on holds its request until then.  So ACK it now (tcp(7)).
            sock = self.raw.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(_IPPROTO_TCP, _TCP_QUICKACK, 1)
        return True

    def open(self) -> None:
        """The handshake is done (or there is none): the app is told, then gets any application data
        that came with the handshake's last flight."""
        self.opened = True
        self.app.connection_made(self)
        if self.sslobj is not None and self.incoming.pending:
            self._read()

    def _read(self) -> None:
        """Hand the app every record the incoming BIO holds, until it pauses or closes."""
        sslobj = self.sslobj
        incoming = self.incoming
        app = self.app
        while True:
            try:
                data = sslobj.read(_RECORD)
            except _SSLWantReadError:
                break
            except _SSLZeroReturnError:
                # close_notify (RFC 8446 section 6.1): the peer's end of the stream.
                if not app.eof_received():
                    self.close()
                return
            except _SSLError as exc:
                # A record that fails to decrypt, or an alert (a TLS 1.3 server refusing our certificate
                # sends it after its side of the handshake): the stream is broken.
                self.error = exc
                self.abort()
                return
            app.data_received(data)
            if not self.opened or self.closing or self.paused:
                return
            # No sslobj.pending() here (it releases the GIL, a mutex round trip per request): SSL_read
            # returns one record's data at a time (no pipelining), and reading _RECORD bytes empties a
            # record, so nothing decrypted is ever left in OpenSSL; what is left is in `incoming`.
            if not incoming.pending:
                break
        if not self.lazy:
            self._flush()  # e.g. a TLS 1.2 renegotiation's handshake messages

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.raw.write(self.outgoing.read())

    def release_buffers(self) -> None:
        """The worker's tick calls this for a keep-alive connection waiting for its next request: at the
        second call in a row with nothing received in between (idle for a whole tick, so a busy connection
        between two requests does not free and regrow them), both BIOs free what they grew to
        (fastlb/net/biomem.py)."""
        if self.quiet_ticks == 2:
            return  # done for this quiet spell (or a record was half in then: it will come in whole)
        self.quiet_ticks += 1
        if (self.quiet_ticks == 2 and self.sslobj is not None and not self.incoming.pending
                and not self.outgoing.pending):
            _release(self.incoming)
            _release(self.outgoing)

    # -- asyncio's transport interface, for the app -------------------------------------------------------
    def write(self, data) -> None:
        if self.sslobj is None:
            self.raw.write(data)  # a plain connection (a PROXY-protocol listener without TLS)
        elif self.opened and data and not self.closing:
            # A memory BIO takes all of it: SSL_write only returns early on a socket that would block.
            # After our close_notify OpenSSL refuses to write, and so does a closing transport.
            self.sslobj.write(data)
            if not self.corked:
                self.raw.write(self.outgoing.read())

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.sslobj is not None and self.opened:
            # Our close_notify (RFC 8446 section 6.1), without waiting for the peer's, as nginx does; in
            # the same write as whatever `lazy` and `corked` held.
            try:
                self.sslobj.shutdown()
            except (_SSLError, ValueError):
                pass
            self._flush()
        if self.raw is not None:
            self.raw.close()

    def abort(self) -> None:
        self.closing = True
        if self.raw is not None:
            self.raw.abort()

    def is_closing(self) -> bool:
        return self.closing or self.raw is None or self.raw.is_closing()

    def pause_reading(self) -> None:
        self.paused = True
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.paused = False
        self.raw.resume_reading()
        if self.opened and self.sslobj is not None and (self.incoming.pending or self.sslobj.pending()):
            # Records already received: read them on the next loop pass, not inside the caller.
            _get_running_loop().call_soon(self._resume_read)

    def _resume_read(self) -> None:
        if self.opened and not self.paused and not self.closing:
            self._read()

    def get_write_buffer_size(self):
        return self.raw.get_write_buffer_size()

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self.sslobj
        if name == "peername" and self.peer is not None:
            return self.peer
        if name == "sockname" and self.local is not None:
            return self.local
        return self.raw.get_extra_info(name, default)


class BackendTls(TlsBio):
    """One TLS connection to a backend server: protocol of the loop's transport, and (a TlsBio) the
    transport of `app`, the UpstreamConnection.

        BackendTls.state
        CONNECTING ──TCP up (PROXY header written)──▶ HANDSHAKE ──done──▶ OPEN ──▶ CLOSED
                                                         └──refused, reset──────────▶ CLOSED

    The handshake's outcome settles `waiter` (a future of the connect task, see fastlb/net/upstream_tls.py
    `ServerLink.open`): its exception is what OpenSSL raised (`SSLCertVerificationError` names why), which
    fastlb/http/protocol_py.py `_connected` turns into a failed connect of kind `tls`.  Once open, an
    `SSLError` while reading reaches `UpstreamConnection.connection_lost` as the reason it ended."""

    def __init__(self, app, context, name, session, header, waiter):
        TlsBio.__init__(self, None, app, None, None)
        self.state = B_CONNECTING
        # SNI and the name verified (RFC 6066 section 3, RFC 6125); the server's last session, resumed.
        self.wrap(context, False, name, session)
        self.header = header      # the PROXY header, written before the ClientHello, or None
        self.waiter = waiter

    # -- the loop's transport calls these -------------------------------------------------------------
    def connection_made(self, transport):
        self.raw = transport
        if self.header is not None:
            transport.write(self.header)
        self.state = B_HANDSHAKE
        self._handshake()

    def data_received(self, data):
        if self.state == B_OPEN:
            self.feed(data)
        elif self.state == B_HANDSHAKE:
            self.incoming.write(data)
            self._handshake()

    def eof_received(self):
        if self.state == B_OPEN:
            # A TCP FIN without close_notify: the app decides as it would on a plain connection.
            return self.app.eof_received()
        return False

    def connection_lost(self, exc):
        state = self.state
        self.state = B_CLOSED
        if state == B_OPEN:
            self.app.connection_lost(self.error if self.error is not None else exc)
        elif state != B_CLOSED and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("the server closed during the TLS handshake"))
        # The app and this layer hold each other (app.transport, self.app): with that cut, both, the SSL
        # object and its BIOs are freed here by reference counting, not by a cyclic GC pass (as the
        # Front does for client connections). `closing` keeps a late write from reaching OpenSSL.
        self.closing = True
        self.app = None

    def pause_writing(self):
        if self.state == B_OPEN:
            self.app.pause_writing()

    def resume_writing(self):
        if self.state == B_OPEN:
            self.app.resume_writing()

    def _handshake(self) -> None:
        try:
            if not self.shake():
                return
        except _SSLError as exc:
            self._flush()  # the alert OpenSSL wrote, so the server knows why
            self.state = B_CLOSED
            self.raw.close()
            if not self.waiter.done():
                self.waiter.set_exception(exc)
            return
        self.state = B_OPEN
        if not self.waiter.done():
            self.waiter.set_result(None)  # its callbacks run on a later loop pass, after open()
        self.open()


__all__ = ["BackendTls", "TlsBio"]
