"""TLS to a backend server, driven by fastlb: the client side of what fastlb/http/front_py.py does for
listeners.

The one source of ``fastlb.http.backend_tls``: Cython compiles it as ``backend_tls_c``
(``backend_tls_c.pxd``), and ``FASTLB_NO_EXTENSIONS=1`` runs it as it is (see fastlb/native.py).

Why not uvloop's `create_connection(ssl=...)`: its SSL layer costs more per request than the rest of the
upstream path (on https-reencrypt it put fastlb at 1.13x nginx's CPU per request, against 1.02x on
https-ka, whose upstream is plain), it has no `session=` argument for resumption, and a PROXY header must
precede the ClientHello on the same connection.  `BackendTls` is the asyncio protocol of the loop's own
TCP transport and the transport of the UpstreamConnection; OpenSSL (the stdlib `ssl` module) does all of
TLS over two memory BIOs, the loop's transport all of the socket I/O (its write buffering and flow
control included), so a request costs one `SSL_write` and one socket write out, one read and one
`SSL_read` per record back.

    BackendTls.state
    CONNECTING ──TCP up (PROXY header written)──▶ HANDSHAKE ──done──▶ OPEN ──▶ CLOSED
                                                     └──refused, reset──────────▶ CLOSED

The handshake's outcome settles `waiter` (a future of the connect task, see fastlb/net/upstream_tls.py
`ServerLink.open`): its exception is what OpenSSL raised (`SSLCertVerificationError` names why), which
fastlb/http/protocol_py.py `_connected` turns into a failed connect of kind `tls`.  Once open, an
`SSLError` while reading (a TLS 1.3 server refusing our certificate sends its alert after its side of
the handshake) reaches `UpstreamConnection.connection_lost` as the reason the connection ended.
"""

import ssl

B_CONNECTING = 0
B_HANDSHAKE = 1
B_OPEN = 2
B_CLOSED = 3

# RFC 8446 section 5.1: a record carries at most 2^14 bytes of plaintext, so one read takes a record.
_RECORD = 16384
_SSLWantReadError = ssl.SSLWantReadError
_SSLZeroReturnError = ssl.SSLZeroReturnError
_SSLError = ssl.SSLError
_MemoryBIO = ssl.MemoryBIO


class BackendTls:
    """One TLS connection to a server: protocol of the loop's transport, transport of `app` (the
    UpstreamConnection)."""

    def __init__(self, app, context, name, session, header, waiter):
        self.app = app
        self.raw = None
        self.state = B_CONNECTING
        self.incoming = _MemoryBIO()
        self.outgoing = _MemoryBIO()
        # SNI and the name verified (RFC 6066 section 3, RFC 6125); the server's last session, resumed.
        self.sslobj = context.wrap_bio(self.incoming, self.outgoing, False, name, session)
        self.header = header      # the PROXY header, written before the ClientHello, or None
        self.waiter = waiter
        self.error = None         # what ended an open connection, for app.connection_lost

    # -- the loop's transport calls these -------------------------------------------------------------
    def connection_made(self, transport):
        self.raw = transport
        if self.header is not None:
            transport.write(self.header)
        self.state = B_HANDSHAKE
        self._handshake()

    def data_received(self, data):
        if self.state == B_OPEN:
            self.incoming.write(data)
            self._read()
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

    def pause_writing(self):
        if self.state == B_OPEN:
            self.app.pause_writing()

    def resume_writing(self):
        if self.state == B_OPEN:
            self.app.resume_writing()

    # -- TLS ------------------------------------------------------------------------------------------
    def _handshake(self) -> None:
        try:
            self.sslobj.do_handshake()
        except _SSLWantReadError:
            self._flush()
            return
        except _SSLError as exc:
            self._flush()  # the alert OpenSSL wrote, so the server knows why
            self.state = B_CLOSED
            self.raw.close()
            if not self.waiter.done():
                self.waiter.set_exception(exc)
            return
        self._flush()
        self.state = B_OPEN
        self.app.connection_made(self)
        if not self.waiter.done():
            self.waiter.set_result(None)
        if self.incoming.pending:
            self._read()  # application data that came with the server's last handshake message

    def _read(self) -> None:
        sslobj = self.sslobj
        incoming = self.incoming
        app = self.app
        while True:
            try:
                data = sslobj.read(_RECORD)
            except _SSLWantReadError:
                break
            except _SSLZeroReturnError:
                # close_notify (RFC 8446 section 6.1): the server's end of the stream.
                if not app.eof_received():
                    self.close()
                return
            except _SSLError as exc:
                # An alert (e.g. certificate_required after a TLS 1.3 handshake) or a broken record.
                self.error = exc
                self.raw.abort()
                return
            app.data_received(data)
            if self.state != B_OPEN:
                return
            if not incoming.pending and not sslobj.pending():
                break
        if self.outgoing.pending:
            self._flush()  # e.g. the answer to a TLS 1.3 KeyUpdate

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.raw.write(self.outgoing.read())

    # -- the UpstreamConnection calls these (the asyncio transport interface it uses) -----------------
    def write(self, data) -> None:
        if self.state == B_OPEN:
            self.sslobj.write(data)
            self.raw.write(self.outgoing.read())

    def close(self) -> None:
        if self.state == B_OPEN:
            try:
                self.sslobj.unwrap()  # close_notify (RFC 8446 section 6.1), as a client should
            except (_SSLError, ValueError):
                pass
            self._flush()
        if self.raw is not None:
            self.raw.close()

    def abort(self) -> None:
        if self.raw is not None:
            self.raw.abort()

    def is_closing(self) -> bool:
        return self.raw is None or self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def get_extra_info(self, name, default=None):
        if name == "ssl_object":
            return self.sslobj
        return self.raw.get_extra_info(name, default)


__all__ = ["BackendTls"]
