"""X.509 certificates: loading and checking the configured ones, client-certificate CAs and CRLs, the
X-Forwarded-Client-Cert value of a verified client, and the self-signed demo certificate.

The stdlib `ssl` module can load a certificate into a context but cannot tell *why* one is unusable, nor
read its names or dates before a handshake. Every piece of X.509 parsing in fastlb lives here, on top of
`cryptography`; `fastlb.net.tls` turns the one-line reasons raised here into `ConfigError`s that carry the
config key.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateFileError",
    "certificate_dns_names",
    "certificate_fingerprint",
    "certificate_not_after",
    "certificate_primary_name",
    "ensure_demo_certificate",
    "key_matches_certificate",
    "load_certificate_chain",
    "load_crls",
    "load_private_key",
    "validity_problem",
    "xfcc",
]

DEMO_CERT_FILE = "demo-cert.pem"
DEMO_KEY_FILE = "demo-key.pem"
DEMO_VALIDITY = datetime.timedelta(days=365)
# A demo certificate this close to its end is replaced rather than served: a browser exception added for it
# would otherwise stop working in the middle of a demo.
DEMO_RENEW_BEFORE = datetime.timedelta(days=7)

_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class CertificateFileError(Exception):
    """A certificate or key file that cannot be served; `str()` is a one-line reason naming the file."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise CertificateFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def load_certificate_chain(path: str) -> list[x509.Certificate]:
    """The PEM certificates in `path`, leaf first (as `SSLContext.load_cert_chain` expects them)."""
    data = _read(path)
    if _PEM_CERTIFICATE not in data:
        raise CertificateFileError(f"not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line): {path}")
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CertificateFileError(f"not a valid PEM certificate: {path}: {_one_line(exc)}") from None
    return chain


def load_private_key(path: str):
    """The private key in `path` (PEM, unencrypted: a load balancer restarts unattended)."""
    data = _read(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateFileError(f"encrypted private keys are not supported: {path}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CertificateFileError(f"not a PEM private key: {path}: {_one_line(exc)}") from None


def key_matches_certificate(certificate: x509.Certificate, key) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return certificate.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def validity_problem(certificate: x509.Certificate, now: datetime.datetime | None = None) -> str | None:
    """Why `certificate` cannot be served at `now` (expired, not yet valid), or None."""
    now = now or datetime.datetime.now(datetime.UTC)
    if now > certificate.not_valid_after_utc:
        return f"certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    if now < certificate.not_valid_before_utc:
        return f"certificate is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
    return None


def _subject_alt_names(certificate: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def certificate_dns_names(certificate: x509.Certificate) -> list[str]:
    """SAN DNS names, lower-cased, in certificate order (exact names and `*.` wildcards alike).

    Only the SAN counts, as for every current browser (RFC 6125 section 6.4.4: the subject CN is a fallback
    that CAs no longer rely on).
    """
    san = _subject_alt_names(certificate)
    if san is None:
        return []
    return [name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName)]


def certificate_primary_name(certificate: x509.Certificate) -> str:
    """The name a person would call this certificate by: first SAN DNS name, else first IP, else the CN."""
    names = certificate_dns_names(certificate)
    if names:
        return names[0]
    san = _subject_alt_names(certificate)
    if san is not None:
        addresses = san.get_values_for_type(x509.IPAddress)
        if addresses:
            return str(addresses[0])
    common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if common_names:
        return str(common_names[0].value)
    return certificate.subject.rfc4514_string()


def certificate_not_after(certificate: x509.Certificate) -> float:
    """notAfter as Unix time."""
    return certificate.not_valid_after_utc.timestamp()


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as "AB:CD:...", the form browsers and `openssl x509 -fingerprint` show."""
    return ":".join(f"{byte:02X}" for byte in certificate.fingerprint(hashes.SHA256()))


# ---------------------------------------------------------------------------------------------------------
# Client certificates: the CRLs checked against them


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def load_crls(
    path: str, issuers: Sequence[x509.Certificate], now: datetime.datetime | None = None
) -> list[x509.CertificateRevocationList]:
    """The PEM CRLs in `path`, each checked against `issuers` (the client-certificate CAs).

    Refused, each with a reason naming the CRL's issuer: a CRL that no certificate of `issuers` signed
    (OpenSSL would never consult it, so nothing it lists would be refused) and a CRL past its nextUpdate
    (OpenSSL would refuse every certificate of that issuer: X509_V_ERR_CRL_HAS_EXPIRED).
    """
    now = now or datetime.datetime.now(datetime.UTC)
    blocks = _PEM_CRL.findall(_read(path))
    if not blocks:
        raise CertificateFileError(f"not a PEM CRL (no '-----BEGIN X509 CRL-----' line): {path}")
    crls = []
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError as exc:
            raise CertificateFileError(f"not a valid PEM CRL: {path}: {_one_line(exc)}") from None
        issuer = crl.issuer.rfc4514_string()
        if not any(_signed_crl(crl, ca) for ca in issuers):
            raise CertificateFileError(f"the CRL of {issuer} is signed by no certificate of the ca file: {path}")
        if crl.next_update_utc is not None and now > crl.next_update_utc:
            raise CertificateFileError(
                f"the CRL of {issuer} expired on {crl.next_update_utc:%Y-%m-%d %H:%M:%S} UTC: {path}"
            )
        crls.append(crl)
    return crls


def _signed_crl(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    if crl.issuer != ca.subject:
        return False
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, UnsupportedAlgorithm):  # a key type that cannot sign CRLs
        return False


# ---------------------------------------------------------------------------------------------------------
# X-Forwarded-Client-Cert

# Envoy's header (https://www.envoyproxy.io/docs/envoy/latest/configuration/http/http_conn_man/headers
# #x-forwarded-client-cert): `;`-separated Key=Value pairs; a value holding `,` `;` or `=` is double-quoted,
# and Subject always is.
_XFCC_SEPARATORS = frozenset(",;=")
# RFC 4514 section 2.4 names only these; OpenSSL (and so Envoy) prints the e-mail attribute by its short
# name too, where cryptography would print its dotted OID.
_DN_NAMES = {NameOID.EMAIL_ADDRESS: "emailAddress"}


def xfcc(der: bytes) -> bytes:
    """The X-Forwarded-Client-Cert value for a verified client certificate (DER), in Envoy's format:
    `Hash=<SHA-256 hex>;Subject="<RFC 4514 DN>";URI=<each URI SAN>;DNS=<each DNS SAN>`.

    As Envoy: `URI=` stays, empty, when the certificate has no URI SAN; `DNS=` is repeated per name and
    absent when there is none. The result is visible ASCII and spaces only, and never holds a `"` or a
    backslash that a quote-aware XFCC parser (Envoy's is one) could take for the end of a quoted value:
    whatever a certificate carries, the header cannot be split, nor its pairs forged.
    """
    # OpenSSL verified this certificate, but cryptography's strict DER parser can refuse what OpenSSL
    # reads leniently (a BER length, a malformed extension). The hash alone still identifies the
    # certificate, so a part that cannot be read is left empty rather than failing the request.
    try:
        certificate = x509.load_der_x509_certificate(der)
        subject = certificate.subject.rfc4514_string(_DN_NAMES)
    except ValueError:
        certificate, subject = None, ""
    try:
        san = _subject_alt_names(certificate) if certificate is not None else None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        san = None
    parts = ["Hash=" + hashlib.sha256(der).hexdigest(), f'Subject="{_xfcc_dn(subject)}"']
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    dns = san.get_values_for_type(x509.DNSName) if san is not None else []
    parts += [f"URI={_xfcc_value(uri)}" for uri in uris] or ["URI="]
    parts += [f"DNS={_xfcc_value(name)}" for name in dns]
    return ";".join(parts).encode("ascii")


def _xfcc_dn(dn: str) -> str:
    """An RFC 4514 string with every `"`, backslash, control and non-ASCII character as its `\\XX`
    hexpair (RFC 4514 section 2.4 allows one for any character): the same DN to an LDAP parser, OpenSSL's
    `XN_FLAG_RFC2253` output for the non-ASCII bytes, and nothing that could end the quoted value."""
    out = []
    chars = iter(dn)
    for char in chars:
        if char == "\\":
            escaped = next(chars)  # rfc4514_string never ends on a lone backslash
            out.append(_hexpairs(escaped) if escaped in '\\"' else "\\" + escaped)
        elif char == '"' or not " " <= char <= "~":
            out.append(_hexpairs(char))
        else:
            out.append(char)
    return "".join(out)


def _hexpairs(char: str) -> str:
    return "".join(f"\\{byte:02X}" for byte in char.encode("utf-8"))


def _xfcc_value(text: str) -> str:
    """A URI or DNS SAN: percent-encoded (RFC 3986 section 2.1) where a URI may not hold the character
    anyway (controls, space, `"`, backslash, non-ASCII), then quoted if it holds a separator."""
    value = "".join(
        char if "!" <= char <= "~" and char not in '"\\' else "".join(f"%{b:02X}" for b in char.encode("utf-8"))
        for char in text
    )
    return f'"{value}"' if _XFCC_SEPARATORS.intersection(value) else value


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# Demo certificate


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastlb")


def ensure_demo_certificate(cache_dir: str | None = None) -> tuple[str, str, str]:
    """(cert_path, key_path, SHA-256 fingerprint) of a self-signed ECDSA P-256 certificate for localhost.

    Generated once into `cache_dir` (default `$XDG_CACHE_HOME/fastlb`, else `~/.cache/fastlb`) and reused,
    so a browser exception for the demo stays valid across runs; replaced when unreadable, when the key no
    longer matches, or within `DEMO_RENEW_BEFORE` of its end.
    """
    directory = cache_dir or _default_cache_dir()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert_path = os.path.join(directory, DEMO_CERT_FILE)
    key_path = os.path.join(directory, DEMO_KEY_FILE)
    # Workers and `fastlb serve --demo` started twice at once must not interleave the two files.
    with open(os.path.join(directory, ".demo.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        certificate = _reusable_demo_certificate(cert_path, key_path)
        if certificate is None:
            certificate = _write_demo_certificate(cert_path, key_path)
    return cert_path, key_path, certificate_fingerprint(certificate)


def _reusable_demo_certificate(cert_path: str, key_path: str) -> x509.Certificate | None:
    try:
        certificate = load_certificate_chain(cert_path)[0]
        key = load_private_key(key_path)
    except CertificateFileError:
        return None
    now = datetime.datetime.now(datetime.UTC)
    if not key_matches_certificate(certificate, key) or validity_problem(certificate, now):
        return None
    if certificate.not_valid_after_utc - now < DEMO_RENEW_BEFORE:
        return None
    return certificate


def _demo_subject_alt_names() -> Sequence[x509.GeneralName]:
    return [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]


def _write_demo_certificate(cert_path: str, key_path: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastlb demo (localhost)")])
    # Backdated a little so a client whose clock runs slightly behind still accepts it.
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_before = now - datetime.timedelta(hours=1)
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + DEMO_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_demo_subject_alt_names()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Callers read the pair only after ensure_demo_certificate returns, i.e. after the lock is released.
    _write_atomically(key_path, key_pem, mode=0o600)
    _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return certificate


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    directory = os.path.dirname(path)
    # mkstemp creates the file 0600, so the key is never readable by others, not even for an instant.
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
