"""Answering the CA's challenges in the workers, from what the control process published in storage.

The control process orders certificates; the CA then connects to *any* worker (SO_REUSEPORT spreads
its connections), so every worker must answer.  The answers are files under the storage directory
(see storage.py), written before the control process tells the CA it is ready and read by a worker
only when a challenge request comes: nothing to push to the workers, nothing per normal request.

- HTTP-01 (RFC 8555 section 8.3): `GET /.well-known/acme-challenge/<token>` on the plain listeners is
  answered with the key authorization, before routing and before redirect_to_https (the data path
  calls `Http01Responder.response`).
- TLS-ALPN-01 (RFC 8737): a ClientHello offering only ALPN "acme-tls/1" gets a handshake with the
  challenge certificate for its SNI name: self-signed, the name as its only subjectAltName, and the
  critical acmeIdentifier extension holding SHA-256 of the key authorization (section 3).  The TLS
  front layer calls `Worker.tls_alpn_challenge`, which calls `challenge_context` here.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from fastlb.acme.storage import TOKEN, pem_bundle, valid_name
from fastlb.http.errors import error_response

PREFIX = b"/.well-known/acme-challenge/"
ALPN = "acme-tls/1"
# RFC 8737 section 6.1: id-pe-acmeIdentifier.
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


class Http01Responder:
    """What a worker answers to `GET /.well-known/acme-challenge/...` (Shared.acme in the data path)."""

    def __init__(self, directory: str):
        self.directory = directory

    def key_authorization(self, target: bytes) -> bytes | None:
        token = target[len(PREFIX):].decode("ascii", "replace")
        if not TOKEN.fullmatch(token):
            return None
        try:
            with open(os.path.join(self.directory, token), "rb") as f:
                return f.read()
        except OSError:
            return None

    def response(self, target: bytes, request_id: bytes, date: bytes) -> bytes:
        """The whole response, Connection: close (the CA fetches once per validation)."""
        body = self.key_authorization(target)
        if body is None:
            return error_response(404, request_id, date, True)
        return b"".join((
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: ",
            b"%d" % len(body), b"\r\nCache-Control: no-store\r\nConnection: close\r\nDate: ", date,
            b"\r\nX-Request-ID: ", request_id, b"\r\n\r\n", body,
        ))


def tls_alpn01_certificate(name: str, key_authorization: str) -> bytes:
    """The RFC 8737 section 3 challenge certificate and its key, as one PEM bundle."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        # extnValue is the DER OCTET STRING of the 32-byte digest (RFC 8737 section 3: "Authorization
        # ::= OCTET STRING (SIZE (32))"), critical.
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
        .sign(key, hashes.SHA256())
    )
    return pem_bundle(key, [cert])


_contexts: dict[str, tuple[int, ssl.SSLContext]] = {}


def challenge_context(directory: str, sni: str | None) -> ssl.SSLContext | None:
    """The server context that answers the TLS-ALPN-01 challenge for sni, or None if none is
    published (the handshake then fails: RFC 8737 section 3 forbids answering acme-tls/1 with a
    normal certificate).  Cached per name until the published file changes."""
    if not sni:
        return None
    name = sni.lower().rstrip(".")
    if not valid_name(name):
        return None
    path = os.path.join(directory, name + ".pem")
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        _contexts.pop(name, None)
        return None
    cached = _contexts.get(name)
    if cached is not None and cached[0] == mtime:
        return cached[1]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8737 section 4
    context.set_alpn_protocols([ALPN])
    try:
        context.load_cert_chain(path)
    except (OSError, ssl.SSLError):
        return None
    _contexts[name] = (mtime, context)
    return context
