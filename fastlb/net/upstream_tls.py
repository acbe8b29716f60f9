"""How a connection to a backend server is opened when it is more than plain TCP: TLS (verified, with
a client certificate for mTLS, sessions resumed) and the PROXY protocol header.

Theory of operation
-------------------
1. The master calls `build_contexts(cfg)` once per config generation, before forking, like the
   listeners' contexts (fastlb/net/tls.py): a broken CA bundle or client certificate refuses the config
   or the reload with a one-line `ConfigError` naming the key, the client key is read while the master
   can still read it (workers may run as another user), and a reload reads the files again. One client
   context per backend with `[backends.NAME.tls]`; `verify = false` is logged at start.
2. Each worker gives every server of such a backend (or of one with `send_proxy`) a `ServerLink`
   (`link_servers`): its context, the name sent as SNI and verified (RFC 6066 section 3, RFC 6125), the
   PROXY protocol version, and the metrics indices. `Server.link` is None for plain servers, so the data
   path (fastlb/http/protocol_py.py `connect`) pays one `is None` test for them.
3. TLS itself is fastlb's own layer over the loop's TCP transport (fastlb/net/tlsbio_py.py,
   compiled): uvloop's `create_connection(ssl=...)` costs more per request, has no `session=` argument
   and cannot put a PROXY header before the ClientHello.  Session resumption: each ServerLink keeps the
   last `ssl.SSLSession` of its server per name and hands it to `wrap_bio`, so a connection that has to
   be made again (the pool was empty, the server closed an idle one) costs a resumed handshake.  The
   session is taken when a new connection's first response is complete (`UpstreamConnection._complete`):
   a TLS 1.3 ticket (RFC 8446 section 4.6.1) arrives after the handshake, so the session right after it
   is not resumable yet.  The system trust store is the hashed directory (`capath`, certificates read
   when a chain needs them: 18 KiB per context) rather than the bundle file (850 KiB, parsed up front).
4. A failed handshake is a connect failure of kind `tls` (the next server is tried, then 502):
   `failure` names why, from `SSLCertVerificationError.verify_code` (expired, wrong name, unknown CA)
   or from the alert the server sent, counts it per backend and logs it, at most once a second per
   server.
5. PROXY protocol (`send_proxy`): the header is the first bytes on the connection, before the TLS
   ClientHello (`BackendTls` writes it as soon as TCP is up, then starts the handshake). It carries one client's address, so it is private to that client connection (one
   per server, a few at most) and never pooled for anyone else (`ClientConnection.private` in
   fastlb/http/protocol_py.py).
"""

from __future__ import annotations

import os
import ssl
import time

from fastlb import core
from fastlb.net import certs
from fastlb.net.tlsbio import BackendTls

__all__ = ["TLS_FAILURES", "ServerLink", "build_contexts", "failure", "link_servers", "unverified"]

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# fastlb_upstream_tls_errors_total{reason}: what failed, as an operator acts on it.
TLS_FAILURES = (
    "expired", "not_yet_valid", "wrong_name", "unknown_ca", "bad_certificate", "client_certificate",
    "handshake",
)
# X509_V_ERR_* codes (openssl/x509_vfy.h) behind SSLCertVerificationError.verify_code.
_VERIFY_REASONS = {
    10: "expired",          # X509_V_ERR_CERT_HAS_EXPIRED
    9: "not_yet_valid",     # X509_V_ERR_CERT_NOT_YET_VALID
    62: "wrong_name",       # X509_V_ERR_HOSTNAME_MISMATCH
    64: "wrong_name",       # X509_V_ERR_IP_ADDRESS_MISMATCH
    2: "unknown_ca",        # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
    18: "unknown_ca",       # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
    19: "unknown_ca",       # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
    20: "unknown_ca",       # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    21: "unknown_ca",       # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
}
# Alerts a server sends when it refuses our client certificate, or wanted one (RFC 8446 section 6.2):
# OpenSSL names them in SSLError.reason as e.g. TLSV13_ALERT_CERTIFICATE_REQUIRED.
_CLIENT_CERT_ALERTS = (
    "ALERT_CERTIFICATE_REQUIRED", "ALERT_BAD_CERTIFICATE", "ALERT_UNKNOWN_CA", "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_REVOKED", "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_ACCESS_DENIED",
)
# Names (and their sessions) kept per server with sni_from_host: one per Host seen, bounded.
_MAX_NAMES = 1024
_LOG_EVERY = 1.0


def _config_error(source: str, key: str, reason: str) -> Exception:
    from fastlb.config import ConfigError  # config imports nothing of ours; keep it that way

    return ConfigError(source, key, reason)


def build_contexts(cfg) -> dict[str, ssl.SSLContext]:
    """{backend: client context} for the backends with TLS on; raises ConfigError naming the first bad key."""
    source = cfg.source or "environment"
    contexts = {}
    for name, spec in cfg.backends.items():
        tls = spec.tls
        if tls is None or not tls.enabled:
            continue
        contexts[name] = _context(tls, f"backends.{name}.tls", source)
    return contexts


def unverified(cfg) -> list[str]:
    """Backends whose servers' certificates are not verified (`verify = false`), for the start-up log."""
    return [name for name, spec in cfg.backends.items() if spec.tls and spec.tls.enabled and not spec.tls.verify]


def _context(tls, key: str, source: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _MIN_VERSIONS[tls.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if tls.verify:
        # PROTOCOL_TLS_CLIENT starts with CERT_REQUIRED and check_hostname on.
        try:
            if tls.ca:
                context.load_verify_locations(cafile=tls.ca)
            else:
                _load_system_store(context)
        except (ssl.SSLError, OSError) as exc:
            raise _config_error(source, f"{key}.ca", f"not a PEM CA bundle: {tls.ca} ({_one_line(exc)})") from None
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert:
        _load_client_certificate(context, tls, key, source)
    if tls.alpn:
        context.set_alpn_protocols(list(tls.alpn))
    return context


def _load_system_store(context: ssl.SSLContext) -> None:
    # The hashed directory, read lazily, when there is one (module docstring, step 3); SSL_CERT_DIR and
    # SSL_CERT_FILE are honoured as OpenSSL's own defaults honour them.
    paths = ssl.get_default_verify_paths()
    if paths.capath and os.path.isdir(paths.capath) and any(
            name.endswith(".0") for name in os.listdir(paths.capath)):
        context.load_verify_locations(capath=paths.capath)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)


def _load_client_certificate(context: ssl.SSLContext, tls, key: str, source: str) -> None:
    try:
        leaf = certs.load_certificate_chain(tls.cert)[0]
    except certs.CertificateFileError as exc:
        raise _config_error(source, f"{key}.cert", str(exc)) from None
    problem = certs.validity_problem(leaf)
    if problem:
        raise _config_error(source, f"{key}.cert", f"{problem}: {tls.cert}")
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (ssl.SSLError, OSError) as exc:
        raise _config_error(
            source, f"{key}.key", f"cannot use {tls.key} with {tls.cert}: {_one_line(exc)}"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# ---------------------------------------------------------------------------------------------------------
# Per server, in the workers


class ServerLink:
    """What opening a connection to one server takes beyond TCP (module docstring, step 2)."""

    __slots__ = (
        "backend", "server", "context", "name", "names", "sessions", "sni_from_host", "proxy",
        "m_handshakes", "m_errors", "logged_at",
    )

    def __init__(self, backend: str, server, context, name: str, sni_from_host: bool, proxy: int):
        self.backend = backend
        self.server = server              # the data path's Server
        self.context = context            # the backend's client context, or None: plain TCP (send_proxy)
        self.name = name
        self.names: dict[str, str] = {}
        self.sessions: dict[str, ssl.SSLSession] = {}  # by name: the last session of this server
        self.sni_from_host = sni_from_host
        self.proxy = proxy                # 0, or the PROXY protocol version sent first
        self.m_handshakes = (0, 0)        # series of fastlb_upstream_tls_handshakes_total: full, resumed
        self.m_errors: dict[str, int] = {}
        self.logged_at = 0.0

    def name_for(self, host) -> str:
        """The TLS name of a connection for a request with this Host (bytes, or None)."""
        if not self.sni_from_host or not host:
            return self.name
        text = host.decode("ascii", "replace").lower()
        # Host is uri-host[:port] (RFC 9110 section 7.2), checked by the router; SNI has no port and no
        # trailing dot (RFC 6066 section 3), and an IPv6 literal loses its brackets.
        if text.startswith("["):
            text = text[1:text.find("]")]
        else:
            text = text.rsplit(":", 1)[0].rstrip(".")
        name = self.names.get(text)
        if name is None:
            if len(self.names) >= _MAX_NAMES:
                self.names.clear()
            name = self.names[text] = text
        return name

    def proxy_header(self, client, listener) -> bytes:
        """The PROXY header for a connection made for one client: (ip, port) of the client and of the
        listener it reached, as its transport reports them (the PROXY-protocol addresses when it came
        through one, see fastlb/net/tlsbio_py.py).  A link-local IPv6 address loses its zone
        (fe80::1%eth0): the header has no field for one, and the zone means nothing to the server."""
        build = core.proxy_header_v2 if self.proxy == 2 else core.proxy_header_v1
        return build(client[0].partition("%")[0], client[1], listener[0].partition("%")[0], listener[1])

    async def open(self, loop, conn, name: str, header: bytes | None) -> None:
        """Connect conn to the server: PROXY header first if any, then TLS if any (see `connect` in
        fastlb/http/protocol_py.py, which cancels this at connect_timeout)."""
        server = self.server
        if self.context is None:
            raw, _ = await loop.create_connection(lambda: conn, server.host, server.port)
            raw.write(header)
            return
        waiter = loop.create_future()
        layer = BackendTls(conn, self.context, name, self.sessions.get(name), header, waiter)
        try:
            await loop.create_connection(lambda: layer, server.host, server.port)
            await waiter
        except BaseException:
            layer.abort()  # cancelled at connect_timeout, or refused: nothing may stay open
            raise

    def save_session(self, name: str, transport) -> None:
        """Keep the session of a connection whose first response is complete, for the next one."""
        sessions = self.sessions
        if len(sessions) >= _MAX_NAMES:
            sessions.clear()
        sessions[name] = transport.get_extra_info("ssl_object").session

    def connected(self, transport, area) -> None:
        """A TLS connection is up: count its handshake, full or resumed."""
        tls = transport.get_extra_info("ssl_object")
        area[self.m_handshakes[1 if tls.session_reused else 0]] += 1

    def failed(self, exc: BaseException, area, log) -> str:
        """A connection attempt raised exc: the passive-failure kind ("tls" or "connect"); a TLS
        failure is counted by reason and logged with OpenSSL's words."""
        if self.context is None or not isinstance(exc, ssl.SSLError):
            return "connect"
        reason, message = failure(exc)
        area[self.m_errors[reason]] += 1
        now = time.monotonic()
        if now - self.logged_at >= _LOG_EVERY:
            self.logged_at = now
            log.warning("%s/%s: TLS to the server failed (%s): %s", self.backend, self.server.name,
                        reason, message)
        return "tls"


    def refused(self, exc, area, log) -> bool:
        """A new TLS connection was lost before any response byte: True (counted and logged as a
        failed handshake) if it was the TLS layer that ended it, i.e. an alert from the server."""
        if self.context is None or not isinstance(exc, ssl.SSLError):
            return False
        self.failed(exc, area, log)
        return True


def failure(exc: ssl.SSLError) -> tuple[str, str]:
    """(reason, message) of a failed TLS handshake to a server: one of TLS_FAILURES, and OpenSSL's
    words for it (SSLCertVerificationError.verify_message: "certificate has expired", "Hostname
    mismatch, certificate is not valid for 'x'.", "unable to get local issuer certificate"...)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad_certificate"), exc.verify_message or str(exc)
    what = exc.reason or ""
    if any(alert in what for alert in _CLIENT_CERT_ALERTS):
        return "client_certificate", f"the server refused the client certificate ({what})"
    return "handshake", what or _one_line(exc)


def link_servers(backends, cfg, contexts) -> None:
    """Give each server of a TLS or send_proxy backend its ServerLink (`Server.link`)."""
    for name, backend in backends.items():
        spec = cfg.backends[name]
        context = contexts.get(name)
        proxy = {"v1": 1, "v2": 2}.get(spec.send_proxy, 0)
        if context is None and not proxy:
            continue
        tls = spec.tls
        for server, server_spec in zip(backend.servers, spec.servers, strict=True):
            own = server_spec.server_name
            default = own or (tls.server_name if tls is not None else None) or server.host
            sni_from_host = context is not None and tls.sni_from_host and own is None
            server.link = ServerLink(name, server, context, default, sni_from_host, proxy)
