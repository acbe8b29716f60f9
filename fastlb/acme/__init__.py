"""Certificates that manage themselves: ACME (RFC 8555) issuance and renewal.

- storage.py: the storage directory (account key, certificates, challenge answers, order state, locks).
- client.py: one order, through certbot's `acme` library.
- manager.py: when to order, back-off, and asking the master to reload; a thread of the control process.
- challenges.py: what the workers answer to the CA (HTTP-01, TLS-ALPN-01).

The master calls `tls_to_serve` when it builds a generation's TLS contexts: an `acme = true` entry
becomes its certificate file in storage, or a temporary self-signed one until the CA has issued it, so
the listeners start at once, as Caddy's do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile

from fastlb.acme.storage import Storage

__all__ = ["tls_to_check", "tls_to_serve"]


def tls_to_serve(cfg, log: logging.Logger | None, owner: tuple[int, int] | None = None):
    """cfg.tls with every `acme = true` certificate replaced by the file that serves it now."""
    if not any(spec.acme for spec in cfg.tls.certificates):
        return cfg.tls
    from fastlb.config import ConfigError

    storage = Storage(cfg.acme, owner)
    certificates = []
    for spec in cfg.tls.certificates:
        if spec.acme:
            found = storage.usable_certificate(spec.names)
            if found is not None:
                path = found[0]
            else:
                try:
                    path = storage.temporary_certificate(spec.names)
                except OSError as exc:
                    raise ConfigError(cfg.source or "environment", "acme.storage",
                                      f"cannot write in {storage.root}: {exc.strerror or exc}") from None
                if log is not None:
                    log.warning("acme: %s: no certificate yet; serving a temporary self-signed one until "
                                "the CA issues it", ", ".join(spec.names))
            spec = dataclasses.replace(spec, cert=path, key=path)
        certificates.append(spec)
    return dataclasses.replace(cfg.tls, certificates=tuple(certificates))


@contextlib.contextmanager
def tls_to_check(cfg):
    """cfg.tls for `fastlb check`: the TLS policy and the certificate files are checked as at start-up,
    with stand-ins for the managed certificates made in a throwaway directory (a check touches
    neither the CA nor the storage)."""
    with tempfile.TemporaryDirectory(prefix="fastlb-check-") as scratch:
        yield tls_to_serve(dataclasses.replace(cfg, acme=dataclasses.replace(cfg.acme, storage=scratch)), None)
