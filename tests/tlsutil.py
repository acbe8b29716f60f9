"""Certificates and TLS client helpers shared by tests/test_tls_context.py and tests/test_tls.py.

Leaves are made with `cryptography` and signed by a trustme CA (see `write_certificate` for why not with
trustme itself); `make_pems` writes the standard set both test modules serve: an ECDSA default, an ECDSA
one-label wildcard and an RSA certificate with exact names.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import subprocess
from types import SimpleNamespace

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

OPENSSL = shutil.which("openssl")

# Certificate SANs: the default first, then a one-label wildcard, then an RSA certificate that also has an
# exact name under the wildcard (exact must beat wildcard although the wildcard comes first in config order).
DEFAULT_NAMES = ["localhost", "default.example", "127.0.0.1"]
WILDCARD_NAMES = ["*.wild.example"]
RSA_NAMES = ["rsa.example", "exact.wild.example"]


def days_from_now(days):
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)


def write_certificate(directory, stem, names, not_before, not_after, *, key=None, ca=None):
    """A leaf for `names` (DNS names or IP literals) signed by `ca` (a trustme.CA), or self-signed.

    Writes `<directory>/<stem>.pem` and `<stem>.key` and returns (cert_path, key_path).

    Not trustme's own leaves: they mark the subjectAltName critical next to a non-empty subject, which
    RFC 5280 section 4.2.1.6 forbids and sslyze's path validation (cryptography's verifier) rejects; they
    also live until the year 3000, over Mozilla's 366-day limit.
    """
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0])])
    if ca is None:
        issuer, signing_key = subject, key
    else:
        issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).subject
        signing_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    alt_names = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
        .sign(signing_key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, f"{stem}.pem")
    key_path = os.path.join(directory, f"{stem}.key")
    with open(cert_path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return cert_path, key_path


def make_pems(directory, ca: trustme.CA | None = None) -> SimpleNamespace:
    """The CA (`ca.pem`) and three leaves it signed, valid from yesterday for 90 days (Mozilla's advice).

    default: ECDSA P-256 for DEFAULT_NAMES; wildcard: ECDSA for WILDCARD_NAMES; rsa: RSA 2048 for RSA_NAMES.
    Each is a (cert_path, key_path) pair.
    """
    directory = str(directory)
    ca = ca or trustme.CA()
    ca_path = os.path.join(directory, "ca.pem")
    ca.cert_pem.write_to_path(ca_path)
    start, end = days_from_now(-1), days_from_now(90)
    return SimpleNamespace(
        directory=directory,
        ca_authority=ca,
        ca=ca_path,
        default=write_certificate(directory, "default", DEFAULT_NAMES, start, end, ca=ca),
        wildcard=write_certificate(directory, "wildcard", WILDCARD_NAMES, start, end, ca=ca),
        rsa=write_certificate(
            directory,
            "rsa",
            RSA_NAMES,
            start,
            end,
            key=rsa.generate_private_key(public_exponent=65537, key_size=2048),
            ca=ca,
        ),
    )


def load_certificate(path) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def dns_names(der: bytes) -> list[str]:
    """SAN DNS names of a DER certificate (what `getpeercert(binary_form=True)` returns)."""
    certificate = x509.load_der_x509_certificate(der)
    san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def handshake_facts(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, str, bool]:
    """(protocol version, cipher suite name, session resumed) of a completed handshake."""
    cipher = ssl_object.cipher()
    return ssl_object.version() or "", cipher[0] if cipher else "", ssl_object.session_reused


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as "AB:CD:..." (the form `openssl x509 -fingerprint` prints)."""
    digest = x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256())
    return ":".join(f"{byte:02X}" for byte in digest)


# ---------------------------------------------------------------------------------------------------------
# Clients


def client_context(pems, *, check_hostname=True, minimum=None, maximum=None, ciphers=None, alpn=None):
    """A client context trusting exactly the test CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pems.ca)
    context.check_hostname = check_hostname
    if minimum:
        context.minimum_version = minimum
    if maximum:
        context.maximum_version = maximum
    if ciphers:
        context.set_ciphers(ciphers)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def client_hello(context: ssl.SSLContext, server_hostname: str | None = "localhost") -> bytes:
    """The bytes of the ClientHello `context` sends (its first flight), made without any network."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    ssl_object = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        ssl_object.do_handshake()
    except ssl.SSLWantReadError:
        pass
    else:  # pragma: no cover - a handshake cannot complete without a server
        raise AssertionError("handshake completed without a server")
    hello = outgoing.read()
    # A TLS record (type 22, handshake) holding a ClientHello (handshake type 1).
    assert hello[:1] == b"\x16" and hello[5:6] == b"\x01", hello[:16]
    return hello


def s_client(port, *args, input=None, timeout=10):
    """`openssl s_client` against 127.0.0.1:port; stdin is `input` (bytes/str) or nothing."""
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", *args],
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
