"""One certificate order against an RFC 8555 CA, through certbot's `acme` library (JWS, nonces and
the protocol objects are the library's; this module only strings the steps together).

`order()` runs, blocking, in the control process's ACME thread:

1. fetch the directory (verified with `[acme] directory_ca`, else the system store);
2. newAccount with the account key kept in storage (RFC 8555 section 7.3; an existing account answers
   200 with its URL), with External Account Binding when configured (section 7.3.4);
3. newOrder for the names with a CSR for a fresh P-256 key;
4. for each pending authorization, publish the answer of the configured challenge (storage.py,
   challenges.py) and tell the CA it is ready (section 7.5.1);
5. poll until the order is valid and download the chain; withdraw the answers whatever happened;
6. check the result before anyone installs it: the key matches the leaf, the leaf is valid now and
   its subjectAltName covers every name.

Failures become `OrderError` with what the CA said, whether it is a rate limit, and the Retry-After
the CA sent (section 6.6: rateLimited errors, and 503s, may carry one).
"""

from __future__ import annotations

import datetime
import email.utils
import os
import ssl

import josepy as jose
import requests
from acme import challenges, crypto_util, errors, messages
from acme import client as acme_client
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fastlb import __version__
from fastlb.acme.challenges import tls_alpn01_certificate
from fastlb.acme.storage import pem_bundle
from fastlb.net import certs

ORDER_TIMEOUT = 120.0    # polling authorizations and finalization, together
NETWORK_TIMEOUT = 30


class OrderError(Exception):
    """An order that did not produce a certificate.  kind: "unreachable" (the CA did not answer),
    "rate_limited", or "refused" (anything the CA answered with an error, failed validations
    included).  retry_after: seconds the CA asked us to wait, or None."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after


class _Ready:
    """The empty JSON object that tells the CA a challenge can be checked (RFC 8555 section 7.5.1);
    the same for every challenge type, tls-alpn-01 included, which the library does not model.  Not an
    empty josepy object: the library sends a falsy payload as b"", a POST-as-GET, which reads the
    challenge instead of answering it."""

    def json_dumps(self, **kwargs) -> str:
        return "{}"


def order(spec, storage, names: tuple[str, ...], log) -> tuple[bytes, object]:
    """Obtain a certificate for names: (PEM bundle of key and chain, leaf).  Raises OrderError."""
    net = None
    published: list[str] = []
    seen = {}

    def remember(response, *args, **kwargs):
        seen["last"] = response

    def down() -> bool:
        # A 5xx (RFC 8555 section 6.7 serverInternal, a maintenance 503, a proxy's 502) is the CA
        # not working, retried like one that does not answer.
        return getattr(seen.get("last"), "status_code", 0) >= 500

    try:
        key = _account_key(storage, spec.directory)
        net = acme_client.ClientNetwork(
            jose.JWKEC(key=key), alg=jose.ES256, verify_ssl=_trust(spec),
            user_agent=f"fastlb/{__version__}", timeout=NETWORK_TIMEOUT)
        # The library raises the CA's problem document without its response; the hook keeps the
        # latest response for its status and a rate limit's Retry-After header (section 6.6).
        net.session.hooks["response"].append(remember)
        return _order(net, spec, storage, names, published, log)
    except OrderError:
        raise
    except messages.Error as exc:
        kind = "rate_limited" if exc.code == "rateLimited" else "unreachable" if down() else "refused"
        raise OrderError(kind, _problem(exc), _retry_after(seen.get("last"))) from None
    except requests.RequestException as exc:
        raise OrderError("unreachable", f"cannot reach the CA: {_one_line(exc)}") from None
    except errors.ValidationError as exc:
        raise OrderError("refused", _validation_problem(exc)) from None
    except errors.TimeoutError:
        raise OrderError("refused", f"the order was not valid within {ORDER_TIMEOUT:g}s") from None
    except errors.Error as exc:
        status = getattr(seen.get("last"), "status_code", 0)
        detail = f"the CA answered {status}" if down() else _one_line(exc)
        raise OrderError("unreachable" if down() else "refused", detail, _retry_after(seen.get("last"))) from None
    finally:
        for path in published:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if net is not None:
            net.session.close()


def _order(net, spec, storage, names, published, log):
    directory = acme_client.ClientV2.get_directory(spec.directory, net)
    client = acme_client.ClientV2(directory, net)
    eab = None
    if spec.eab_kid:
        eab = messages.ExternalAccountBinding.from_data(net.key.public_key(), spec.eab_kid, spec.eab_hmac_key,
                                                        directory)
    registration = messages.NewRegistration.from_data(
        email=spec.email or None, terms_of_service_agreed=True, external_account_binding=eab)
    try:
        client.new_account(registration)
    except errors.ConflictError as exc:  # the key's account exists: 200 + Location
        net.account = messages.RegistrationResource(uri=str(exc.location), body=messages.Registration())

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    orderr = client.new_order(crypto_util.make_csr(key_pem, list(names)))
    for authzr in orderr.authorizations:
        if authzr.body.status == messages.STATUS_VALID:
            continue  # the CA still remembers a validation of this name for this account
        name = authzr.body.identifier.value
        challb = next((c for c in authzr.body.challenges if _type(c) == spec.challenge), None)
        if challb is None:
            offered = ", ".join(_type(c) for c in authzr.body.challenges)
            raise OrderError("refused", f"{name}: the CA offers no {spec.challenge} challenge (only {offered})")
        token = _token(challb)
        key_authorization = f"{token}.{jose.b64encode(net.key.thumbprint()).decode()}"
        if spec.challenge == "http-01":
            published.append(storage.publish_http01(token, key_authorization))
        else:
            published.append(storage.publish_tls_alpn01(name, tls_alpn01_certificate(name, key_authorization)))
        log.info("acme: %s: %s challenge published; telling the CA", name, spec.challenge)
        # Not ClientV2.answer_challenge: it insists on a Link "up" header, which RFC 8555 section
        # 7.5.1 does not require (pebble 2.4 sends none); the answer itself is all we need.
        net.post(challb.uri, _Ready(), new_nonce_url=directory["newNonce"])
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
    orderr = client.poll_and_finalize(orderr, deadline)
    chain = x509.load_pem_x509_certificates(orderr.fullchain_pem.encode())
    leaf = chain[0]
    problem = (None if certs.key_matches_certificate(leaf, key) else "its key is not the one we sent")
    problem = problem or certs.validity_problem(leaf)
    missing = set(names) - set(certs.certificate_dns_names(leaf))
    if problem is None and missing:
        problem = f"it does not cover {', '.join(sorted(missing))}"
    if problem:
        raise OrderError("refused", f"the CA issued a certificate that cannot be installed: {problem}")
    return pem_bundle(key, chain), leaf


def _trust(spec):
    """What the directory's HTTPS is verified with: directory_ca, else the system store (OpenSSL's
    default file or directory, SSL_CERT_FILE honoured); requests alone would use certifi's bundle."""
    if spec.directory_ca:
        return spec.directory_ca
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.capath):
        if path and os.path.exists(path):
            return path
    return True


def _type(challb) -> str:
    # acme 3 and later model http-01 and dns-01 only; tls-alpn-01 arrives as an UnrecognizedChallenge.
    chall = challb.chall
    return str(chall.jobj.get("type")) if isinstance(chall, challenges.UnrecognizedChallenge) else chall.typ


def _token(challb) -> str:
    chall = challb.chall
    return str(chall.jobj["token"]) if isinstance(chall, challenges.UnrecognizedChallenge) else chall.encode("token")


def _account_key(storage, directory_url: str):
    path = storage.account_key_path(directory_url)
    data = storage.read(path)
    if data is not None:
        return serialization.load_pem_private_key(data, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    storage.write(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


def _retry_after(response) -> float | None:
    """RFC 9110 section 10.2.3: delay-seconds or an HTTP-date."""
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


def _problem(exc: messages.Error) -> str:
    """RFC 7807 problem document, in one line: "rateLimited: too many certificates ..."."""
    code = exc.code or exc.typ
    return _one_line(f"{code}: {exc.detail}" if exc.detail else code)


def _validation_problem(exc: errors.ValidationError) -> str:
    reasons = []
    for authzr in exc.failed_authzrs:
        for challb in authzr.body.challenges:
            if challb.error is not None:
                reasons.append(f"{authzr.body.identifier.value}: {_problem(challb.error)}")
    return "validation failed: " + "; ".join(reasons)


def _one_line(exc) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
