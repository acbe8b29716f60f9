"""TLS policy, certificate selection (SNI), client certificates, ALPN and handshake failure reasons for
the TLS listeners.

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

Strict SNI
----------
Without `strict_sni` a client that names no configured host, or sends no SNI at all (an IP literal, an
old client), gets the first certificate. With it the servername callback refuses the ClientHello with a
fatal `unrecognized_name` alert (RFC 6066 section 3 allows either answer), as HAProxy's `strict-sni` and
nginx's `ssl_reject_handshake` do; the callback is then installed even for a single certificate.

Client certificates (mutual TLS)
--------------------------------
`[tls.client_auth]` puts one policy on every context (the SNI switch keeps the default context's verify
mode but verifies against the new context's trust store and sends its CA list, so they must all agree):
- `verify_mode` `CERT_REQUIRED` ("require": no certificate, no handshake; RFC 8446 section 4.4.2.4's
  `certificate_required` alert in TLS 1.3, `handshake_failure` in TLS 1.2) or `CERT_OPTIONAL`
  ("optional": a certificate sent must verify, none is fine; the route's `require_client_cert` decides);
- the `ca` bundle as the trust store, and its subjects as the CertificateRequest's
  `certificate_authorities` (`SSL_CTX_set_client_CA_list`, as nginx's `ssl_client_certificate`): the
  stdlib sends none, and then a browser offers every certificate it holds instead of the fitting ones;
  `SSL_MODE_NO_AUTO_CHAIN` ("Handshake cost") keeps that store out of the chain we serve;
- the `crl` file's CRLs with `VERIFY_CRL_CHECK_LEAF`: the client's own certificate is checked against
  its issuer's CRL, so every CA in `ca` that issues client certificates needs its CRL in the file, or its
  clients are refused (OpenSSL's "unable to get certificate CRL"). `certs.load_crls` refuses at load a
  CRL that no CA of the bundle signed or whose nextUpdate has passed (every client would be refused);
- a session ID context that is a digest of the policy (mode, CA and CRL fingerprints). OpenSSL resumes
  a session, ticket or not, only in the context it was made in, and a resumed session skips certificate
  verification. CPython gives every context the same one ("Python"), so after a reload that turns
  `require` on, or adds a CRL that revokes a client, the tickets `carry_ticket_keys` keeps valid would
  resume without the certificate the new policy asks for (tests/test_tls_context.py shows it). With the
  digest they fall back to a full handshake; an unchanged policy still resumes across reloads.

Handshake failures
------------------
`handshake_failure_reason` names why a server-side `do_handshake()` failed, for the `reason` label of the
handshake error metric, from `SSLError.reason` (the name of OpenSSL's reason code). The TLS layer reads
the connection through a MemoryBIO, so whatever alert OpenSSL queued for the client (`protocol_version`,
`handshake_failure`, `unrecognized_name`, `certificate_required`, `unknown_ca`, `certificate_revoked`, ...)
is in the outgoing BIO, waiting to be flushed before the connection closes.

ALPN: only "http/1.1" is offered. CPython's server-side select callback (`_selectALPN_cb` in
Modules/_ssl.c) answers `SSL_TLSEXT_ERR_NOACK` when nothing overlaps, so a client offering only "h2"
completes the handshake with no protocol selected instead of getting the `no_application_protocol` alert
RFC 7301 section 3.2 calls for; it can still speak HTTP/1.1, which is what we want from a load balancer.
"""

from __future__ import annotations

import ctypes
import hashlib
import ssl
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes

from fastlb.net import certs

__all__ = [
    "GROUPS",
    "HANDSHAKE_FAILURE_REASONS",
    "build_server_context",
    "by_server_name",
    "carry_ticket_keys",
    "certificate_facts",
    "handshake_failure_reason",
]

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
_SSL_MAX_SID_CTX_LENGTH = 32
_VERIFY_MODES = {"require": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL}
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
    client_auth = _checked_client_auth(tls.client_auth, source) if tls.client_auth is not None else None
    by_name: dict[str, ssl.SSLContext] = {}
    contexts = []
    for index, spec in enumerate(tls.certificates):
        context = _policy_context(tls, source)
        if client_auth is not None:
            _require_client_certificates(context, tls.client_auth, client_auth, source)
        leaf = _load_certificate(context, index, spec, source)
        contexts.append(context)
        for name in certs.certificate_dns_names(leaf):
            # Config order breaks ties: the first certificate that names a host serves it.
            by_name.setdefault(name, context)
    default = contexts[0]
    if len(contexts) > 1 or tls.strict_sni:
        default.sni_callback = _certificate_selector(by_name, tls.strict_sni)
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


def by_server_name(table: dict, name: str):
    """The entry of `table` (keys lower case, exact or "*.parent") for the lower-case server name `name`:
    its exact entry, else the wildcard of its parent (RFC 6125 section 6.4.3: `*` covers exactly one,
    leftmost, label). For the certificate choice here and the SNI passthrough (fastlb/http/front_py.py)."""
    entry = table.get(name)
    if entry is None:
        _, dot, parent = name.partition(".")
        if dot:
            entry = table.get("*." + parent)
    return entry


def _certificate_selector(
    by_name: dict[str, ssl.SSLContext], strict: bool
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]:
    # RFC 6066 section 3: a server that does not recognise the name either continues (with its default
    # certificate) or aborts with a fatal unrecognized_name alert. strict_sni aborts, as HAProxy's
    # strict-sni and nginx's ssl_reject_handshake; CPython sends the alert a callback returns.
    unknown = ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME if strict else None

    def select_certificate(ssl_object, server_name, initial_context):
        # Runs inside OpenSSL's ClientHello processing: an exception here would become a handshake
        # failure alert, so only dict lookups. RFC 6066 section 3: no SNI for IP literals, no trailing dot.
        if server_name is None:
            return unknown
        context = by_server_name(by_name, server_name.lower())
        if context is None:
            return unknown
        if context is not initial_context:
            ssl_object.context = context
        return None

    return select_certificate


# ---------------------------------------------------------------------------------------------------------
# Client certificates (see the module docstring)


def _checked_client_auth(spec, source: str) -> bytes:
    """Check the `[tls.client_auth]` files once per generation; the session ID context for its policy."""
    mode = _VERIFY_MODES.get(spec.mode)
    if mode is None:
        raise _config_error(source, "tls.client_auth.mode", f'must be "require" or "optional", not {spec.mode!r}')
    try:
        authorities = certs.load_certificate_chain(spec.ca)
    except certs.CertificateFileError as exc:
        raise _config_error(source, "tls.client_auth.ca", str(exc)) from None
    policy = hashlib.sha256(spec.mode.encode())
    for authority in authorities:
        policy.update(authority.fingerprint(hashes.SHA256()))
    if spec.crl:
        try:
            crls = certs.load_crls(spec.crl, authorities)
        except certs.CertificateFileError as exc:
            raise _config_error(source, "tls.client_auth.crl", str(exc)) from None
        for crl in crls:
            policy.update(crl.fingerprint(hashes.SHA256()))
    return policy.digest()[:_SSL_MAX_SID_CTX_LENGTH]


def _require_client_certificates(context: ssl.SSLContext, spec, session_context: bytes, source: str) -> None:
    context.verify_mode = _VERIFY_MODES[spec.mode]
    # X509_STORE_load_file reads the CRLs of a PEM file as well as its certificates.
    for key, path in (("tls.client_auth.ca", spec.ca), ("tls.client_auth.crl", spec.crl)):
        try:
            if path:
                context.load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError) as exc:
            raise _config_error(source, key, f"OpenSSL refused {path}: {exc}") from None
    if spec.crl:
        # The client's own certificate only: its CA's CRL, not the CRLs of the CAs above (VERIFY_CRL_CHECK_CHAIN
        # would need one for the root too), as nginx's ssl_crl does.
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    lib, pointer = _checked_ssl_ctx(context, source)
    names = lib.load_client_ca_file(spec.ca.encode())
    if not names:
        lib.clear_error()
        raise _config_error(source, "tls.client_auth.ca", f"OpenSSL found no CA name in {spec.ca}")
    lib.set_client_ca_list(pointer, names)  # the context owns the list from here
    if lib.set_session_id_context(pointer, session_context, len(session_context)) != 1:
        lib.clear_error()
        raise _config_error(source, "tls.client_auth", "OpenSSL refused the session ID context")


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
        # STACK_OF(X509_NAME) *SSL_load_client_CA_file(const char *file)
        self.load_client_ca_file = handle.SSL_load_client_CA_file
        self.load_client_ca_file.restype = ctypes.c_void_p
        self.load_client_ca_file.argtypes = [ctypes.c_char_p]
        # void SSL_CTX_set_client_CA_list(SSL_CTX *ctx, STACK_OF(X509_NAME) *list)
        self.set_client_ca_list = handle.SSL_CTX_set_client_CA_list
        self.set_client_ca_list.restype = None
        self.set_client_ca_list.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        # int SSL_CTX_set_session_id_context(SSL_CTX *ctx, const unsigned char *sid_ctx, unsigned int len)
        self.set_session_id_context = handle.SSL_CTX_set_session_id_context
        self.set_session_id_context.restype = ctypes.c_int
        self.set_session_id_context.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint]


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


# ---------------------------------------------------------------------------------------------------------
# Why a handshake failed (module docstring, "Handshake failures")

HANDSHAKE_FAILURE_REASONS = (
    "unsupported_version",
    "no_shared_cipher",
    "unknown_sni",
    "bad_client_certificate",
    "not_tls",
    "reset",
    "other",
)

# `SSLError.reason`, the OpenSSL 3 reason code's name, as a failed server-side handshake reports it. Each
# was provoked by a real client in tests/test_tls_context.py, which also checks the alert OpenSSL queued.
_FAILURE_REASONS = {
    # ClientHello versions all below min_version (alert protocol_version).
    "UNSUPPORTED_PROTOCOL": "unsupported_version",
    # No TLS 1.2 suite in common; in TLS 1.3 no key-exchange group in common (handshake_failure).
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_KEY_SHARE": "no_shared_cipher",
    # The servername callback answered with an alert. Ours is the only callback that can, and only under
    # strict_sni (unrecognized_name).
    "CALLBACK_FAILED": "unknown_sni",
    # No certificate under mode = "require" (TLS 1.3 certificate_required, TLS 1.2 handshake_failure),
    # or one that does not verify: unknown CA, revoked, expired (unknown_ca, certificate_revoked, ...).
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "bad_client_certificate",
    "CERTIFICATE_VERIFY_FAILED": "bad_client_certificate",
    # The first bytes are no TLS record: plain HTTP (OpenSSL recognises the methods), an HTTP proxy's
    # CONNECT, anything else. No alert: the peer would not understand one.
    "HTTP_REQUEST": "not_tls",
    "HTTPS_PROXY_REQUEST": "not_tls",
    "WRONG_VERSION_NUMBER": "not_tls",
}


def handshake_failure_reason(exc: BaseException) -> str:
    """What a failed server-side `do_handshake()` raised, as one of `HANDSHAKE_FAILURE_REASONS` (the
    `reason` label of fastlb_tls_handshake_errors_total). `timeout` is not among them: it is the
    caller's clock that runs out, not OpenSSL that fails."""
    if isinstance(exc, (ssl.SSLEOFError, ConnectionError)):
        # The peer closed or reset the connection mid-handshake (UNEXPECTED_EOF_WHILE_READING when the
        # caller passes the EOF on to the MemoryBIO).
        return "reset"
    if isinstance(exc, ssl.SSLError):
        return _FAILURE_REASONS.get(exc.reason or "", "other")
    return "other"


def certificate_facts(tls) -> list[tuple[str, float]]:
    """(primary name, notAfter as Unix time) of each configured certificate, in config order."""
    facts = []
    for spec in tls.certificates:
        leaf = certs.load_certificate_chain(spec.cert)[0]
        facts.append((certs.certificate_primary_name(leaf), certs.certificate_not_after(leaf)))
    return facts
