"""TLS policy, certificate selection (SNI) and ALPN for the TLS listeners.

Theory of operation
-------------------
The master calls `build_server_context()` once per config generation, *before* forking the workers. It
returns the context of the first (default) certificate; every other certificate gets its own context with
the same policy, reached through `sni_callback`. All of them are made in the master because OpenSSL draws
the session-ticket keys (RFC 5077, RFC 8446 section 4.6.1) at random in `SSL_CTX_new`: contexts made
before `fork()` carry the same keys into every worker, so a ticket issued by one worker resumes on any
other, which matters because SO_REUSEPORT spreads one client's connections over all workers. OpenSSL
encrypts and decrypts tickets with the connection's *initial* context (`SSL->session_ctx` does not change
when the SNI callback switches contexts), so tickets for every SNI name use the default context's keys.
A reload builds new contexts, which would mean new keys and a full handshake for every client that
comes back; `carry_ticket_keys` copies the running default context's keys into the new one instead
(`SSL_CTX_set_tlsext_ticket_keys`, the same ctypes path as the groups below), so sessions resume across
reloads, as with nginx's `ssl_session_ticket_key` files. A binary upgrade (USR2) is a new master: new keys.
The switch (`SSL_set_SSL_CTX`) brings the new certificate but keeps most settings the connection copied
from the default context at `SSL_new`, which is why every context gets the same policy, never its own.

Policy: Mozilla "intermediate" (https://ssl-config.mozilla.org/guidelines/5.7.json) unless
`min_version = "1.3"` ("modern"): TLS 1.2 and 1.3; the configured TLS 1.2 cipher list (TLS 1.3 suites
stay OpenSSL's defaults, which are exactly Mozilla's three); the client's cipher order
(`server_preferred_order: false` since all offered suites are strong, and the client knows whether it
has AES hardware); no compression (CRIME); no renegotiation; session tickets on, one per full TLS 1.3
handshake, and no server-side session cache (see "Handshake cost"); key exchange restricted to X25519,
P-256 and P-384.

Key-exchange groups
-------------------
The stdlib has no groups API (`set_ecdh_curve` sets a single curve), and OpenSSL's defaults add X448,
P-521 and the FFDHE groups, which Mozilla's profile rejects. We call `SSL_CTX_ctrl(ctx,
SSL_CTRL_SET_GROUPS_LIST, 0, "X25519:P-256:P-384")` (the macro `SSL_CTX_set1_groups_list`) through
ctypes on the `SSL_CTX *` of the Python context:
- the pointer: `PySSLContext` (Modules/_ssl.c) is `PyObject_HEAD` followed by `SSL_CTX *ctx`, so it sits
  at `object.__basicsize__` bytes into the object (that size includes the extra header fields of debug
  and free-threaded builds);
- the library: we open `_ssl`'s own shared object; `dlsym()` on that handle searches it and then its
  dependencies, so the symbols resolve to the very libssl `_ssl` is linked against (for an interpreter
  with `_ssl` built in, the process's global symbols);
- before writing anything we check both guesses: `OpenSSL_version_num()` must equal
  `ssl.OPENSSL_VERSION_NUMBER`, and `SSL_CTX_get_options()` through the pointer must equal
  `ctx.options`; then `SSL_CTX_ctrl` must return 1. Any failure raises `ConfigError` instead of serving
  a policy other than the one configured.
It holds in every worker because the group list is plain data inside the `SSL_CTX` (C heap): set once in
the master, copied by `fork()`, and copied again into each connection by `SSL_new()`; there is no
per-process state to redo. The alternative, an `OPENSSL_CONF` file with a `Groups` line, must be in place
before libssl initialises and would also apply to every client context of the process (health checks,
upstream TLS), so it was not chosen. tests/test_tls_context.py proves the restriction from forked workers
with `openssl s_client -groups`.

Handshake cost
--------------
Measured against nginx 1.22 on the same libssl 3.0.22, where the VM's load cannot blur it: uprobes on
libssl and libcrypto entry points count the calls per handshake, callgrind the server's instructions per
connection (user space, Python included). With CPython's defaults a uvloop server makes the same calls as
nginx (per full TLS 1.3 handshake: 33 digest and 7 MAC fetches, 8 walks of OpenSSL 3's algorithm store,
which are the `OPENSSL_LH_doall_arg` of a profile, about 770 allocations) plus one `X509_verify_cert`, and
2.92 million instructions against nginx's 2.86 million (2.58 against 2.50 for a resumption). So the CPU
gap per handshake is mostly not OpenSSL's; these settings remove what OpenSSL work there is to remove:
- One TLS 1.3 ticket per full handshake (`num_tickets`; OpenSSL's default, kept by nginx, is two). A
  ticket is a session copy, its DER encoding and AES-256-CBC + HMAC-SHA256 under algorithms OpenSSL 3
  fetches anew each time: 170,000 instructions, 6% of a full handshake. OpenSSL sends one ticket after a
  resumption whatever the setting, so a client that reconnects one connection after another always holds
  a fresh ticket; only a client opening several connections at once from one earlier connection resumes
  fewer of them (RFC 8446 appendix C.4: a ticket should not be used twice). Go's crypto/tls sends one.
- `SSL_MODE_NO_AUTO_CHAIN`, as nginx: without it OpenSSL runs `X509_verify_cert` against the context's
  trust store on every full handshake to complete a chain the certificate file did not give (4,700
  instructions), and sends whatever issuer it finds there, such as a CA loaded to verify clients. The
  chain served is exactly the file's.
- No server-side session cache (`SSL_SESS_CACHE_OFF`, nginx's `ssl_session_cache off`). It costs nothing
  measurable with clients that take tickets, whose sessions OpenSSL never stores (a TLS 1.2 session with
  a ticket has no session ID, TLS 1.3 tickets are stateless); it only kept, up to 20,480 per worker,
  sessions of TLS 1.2 clients that refuse tickets, resumable on the one worker of N that made them.
All told: 2.74 million instructions per full TLS 1.3 handshake, 6% fewer, below nginx's count.

ALPN: only "http/1.1" is offered. CPython's server-side select callback (`_selectALPN_cb` in
Modules/_ssl.c) answers `SSL_TLSEXT_ERR_NOACK` when nothing overlaps, so a client offering only "h2"
completes the handshake with no protocol selected instead of getting the `no_application_protocol` alert
RFC 7301 section 3.2 calls for; it can still speak HTTP/1.1, which is what we want from a load balancer.
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Callable

from fastlb.net import certs

__all__ = ["GROUPS", "build_server_context", "carry_ticket_keys", "certificate_facts", "handshake_facts"]

GROUPS = "X25519:P-256:P-384"

_MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_ALPN_PROTOCOLS = ["http/1.1"]
# openssl/ssl.h; these values have not changed since OpenSSL 1.1.0 and are part of the ABI.
_SSL_CTRL_MODE = 33
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
_SSL_SESS_CACHE_OFF = 0x0
_SSL_MODE_NO_AUTO_CHAIN = 0x8
# TLS 1.3 NewSessionTicket messages after a full handshake (module docstring, "Handshake cost").
TLS13_TICKETS = 1


def _config_error(source: str, key: str, reason: str) -> Exception:
    # Imported here, not at the top: fastlb.config may import this module to check a config.
    from fastlb.config import ConfigError

    return ConfigError(source, key, reason)


def build_server_context(tls, source: str) -> ssl.SSLContext:
    """The server context for `tls` (a `TlsSpec`): the first certificate's, with SNI to the others.

    Call before forking the workers (see the module docstring). Raises `ConfigError` with the config key
    of the first problem found.
    """
    if not tls.certificates:
        raise _config_error(source, "tls.certificates", "at least one certificate is required")
    by_name: dict[str, ssl.SSLContext] = {}
    contexts = []
    for index, spec in enumerate(tls.certificates):
        context = _policy_context(tls, source)
        leaf = _load_certificate(context, index, spec, source)
        contexts.append(context)
        for name in certs.certificate_dns_names(leaf):
            # Config order breaks ties: the first certificate that names a host serves it.
            by_name.setdefault(name, context)
    default = contexts[0]
    if len(contexts) > 1:
        default.sni_callback = _certificate_selector(by_name)
    return default


def _policy_context(tls, source: str) -> ssl.SSLContext:
    minimum = _MIN_VERSIONS.get(tls.min_version)
    if minimum is None:
        raise _config_error(source, "tls.min_version", f'must be "1.2" or "1.3", not {tls.min_version!r}')
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = minimum
    context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    try:
        context.set_ciphers(tls.ciphers)
    except ssl.SSLError:
        raise _config_error(source, "tls.ciphers", f"no TLS 1.2 cipher matches {tls.ciphers!r}") from None
    # PROTOCOL_TLS_SERVER starts with OP_CIPHER_SERVER_PREFERENCE set; clearing it honours the client order.
    # Plain ints: `~` on an ssl.Options flag spans only 32 bits and would clear OpenSSL 3's options above.
    clear = int(ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_TICKET)
    context.options = (int(context.options) & ~clear) | int(ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION)
    context.set_alpn_protocols(_ALPN_PROTOCOLS)
    context.num_tickets = TLS13_TICKETS
    _set_groups(context, GROUPS, source)
    _set_session_and_chain(context, source)
    return context


def _load_certificate(context: ssl.SSLContext, index: int, spec, source: str):
    cert_key = f"tls.certificates[{index}].cert"
    key_key = f"tls.certificates[{index}].key"
    try:
        leaf = certs.load_certificate_chain(spec.cert)[0]
    except certs.CertificateFileError as exc:
        raise _config_error(source, cert_key, str(exc)) from None
    problem = certs.validity_problem(leaf)
    if problem:
        raise _config_error(source, cert_key, f"{problem}: {spec.cert}")
    try:
        key = certs.load_private_key(spec.key)
    except certs.CertificateFileError as exc:
        raise _config_error(source, key_key, str(exc)) from None
    if not certs.key_matches_certificate(leaf, key):
        raise _config_error(source, key_key, f"key {spec.key} does not match certificate {spec.cert}")
    try:
        context.load_cert_chain(spec.cert, spec.key)
    except (ssl.SSLError, OSError) as exc:
        # What cryptography accepts but OpenSSL's security level refuses (e.g. an RSA key under 2048 bits).
        raise _config_error(source, cert_key, f"OpenSSL refused {spec.cert}: {exc}") from None
    return leaf


def _certificate_selector(
    by_name: dict[str, ssl.SSLContext],
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
    def select_certificate(ssl_object, server_name, initial_context):
        # Runs inside OpenSSL's ClientHello processing: an exception here would become a handshake
        # failure alert, so only dict lookups. RFC 6066 section 3: no SNI for IP literals, no trailing dot.
        if server_name is None:
            return None
        name = server_name.lower()
        context = by_name.get(name)
        if context is None:
            _, dot, parent = name.partition(".")
            if dot:
                # RFC 6125 section 6.4.3: the wildcard covers exactly one, leftmost, label.
                context = by_name.get("*." + parent)
        if context is not None and context is not initial_context:
            ssl_object.context = context
        return None

    return select_certificate


# ---------------------------------------------------------------------------------------------------------
# Key-exchange groups through libssl (see the module docstring)


class _LibSSL:
    """The libssl functions `_ssl` itself calls, looked up once."""

    def __init__(self) -> None:
        import _ssl

        path = getattr(_ssl, "__file__", None)
        handle = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        self.version_num = handle.OpenSSL_version_num
        self.version_num.restype = ctypes.c_ulong
        self.version_num.argtypes = []
        self.get_options = handle.SSL_CTX_get_options
        self.get_options.restype = ctypes.c_uint64
        self.get_options.argtypes = [ctypes.c_void_p]
        self.ctrl = handle.SSL_CTX_ctrl
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.clear_error = handle.ERR_clear_error
        self.clear_error.restype = None
        self.clear_error.argtypes = []


_libssl: _LibSSL | None = None


def _ssl_ctx_pointer(context: ssl.SSLContext) -> int:
    # struct PySSLContext { PyObject_HEAD; SSL_CTX *ctx; ... }
    return ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value or 0


def _checked_ssl_ctx(context: ssl.SSLContext, source: str) -> tuple[_LibSSL, int]:
    """libssl and the context's `SSL_CTX *`, both checked as the module docstring says, or ConfigError."""
    global _libssl
    try:
        if _libssl is None:
            _libssl = _LibSSL()
    except (OSError, AttributeError) as exc:
        raise _config_error(source, "tls", f"cannot reach libssl to set the TLS policy: {exc}") from None
    lib = _libssl
    linked = lib.version_num()
    if linked != ssl.OPENSSL_VERSION_NUMBER:
        raise _config_error(
            source,
            "tls",
            f"libssl found through _ssl is {linked:#x}, not {ssl.OPENSSL_VERSION_NUMBER:#x}; "
            "cannot set the TLS policy",
        )
    pointer = _ssl_ctx_pointer(context)
    if not pointer or lib.get_options(pointer) != int(context.options):
        raise _config_error(source, "tls", "unexpected SSLContext layout; cannot set the TLS policy")
    return lib, pointer


def _set_groups(context: ssl.SSLContext, groups: str, source: str) -> None:
    lib, pointer = _checked_ssl_ctx(context, source)
    if lib.ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) != 1:
        # Leave no stale entry in this thread's OpenSSL error queue for the ssl module to misreport later.
        lib.clear_error()
        raise _config_error(source, "tls", f"OpenSSL {ssl.OPENSSL_VERSION} refused the group list {groups}")


def _set_session_and_chain(context: ssl.SSLContext, source: str) -> None:
    """No server-side session cache, no automatic chain building ("Handshake cost" in the module docstring).

    Neither call can fail: SSL_CTX_set_session_cache_mode returns the previous mode, SSL_CTX_set_mode the
    new mode bits.
    """
    lib, pointer = _checked_ssl_ctx(context, source)
    lib.ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    lib.ctrl(pointer, _SSL_CTRL_MODE, _SSL_MODE_NO_AUTO_CHAIN, None)


def carry_ticket_keys(running: ssl.SSLContext, new: ssl.SSLContext) -> bool:
    """Give `new` the session-ticket keys of `running` (both default contexts from
    build_server_context, so _checked_ssl_ctx has already checked the pointer layout and loaded libssl).
    False, with nothing changed, if OpenSSL refuses."""
    lib = _libssl
    source, target = _ssl_ctx_pointer(running), _ssl_ctx_pointer(new)
    if lib is None or not source or not target:
        return False
    # A NULL buffer makes SSL_CTX_ctrl return the key block's length (80 in OpenSSL 3: name, HMAC, AES).
    length = lib.ctrl(source, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, 0, None)
    if length > 0:
        keys = ctypes.create_string_buffer(length)
        if (lib.ctrl(source, _SSL_CTRL_GET_TLSEXT_TICKET_KEYS, length, keys) == 1
                and lib.ctrl(target, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, length, keys) == 1):
            return True
    lib.clear_error()
    return False


# ---------------------------------------------------------------------------------------------------------
# Facts for metrics and logs


def certificate_facts(tls) -> list[tuple[str, float]]:
    """(primary name, notAfter as Unix time) of each configured certificate, in config order."""
    facts = []
    for spec in tls.certificates:
        leaf = certs.load_certificate_chain(spec.cert)[0]
        facts.append((certs.certificate_primary_name(leaf), certs.certificate_not_after(leaf)))
    return facts


def handshake_facts(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, str, bool]:
    """(protocol version, cipher suite name, session resumed) of a completed handshake."""
    cipher = ssl_object.cipher()
    return ssl_object.version() or "", cipher[0] if cipher else "", ssl_object.session_reused
