"""Chooses the compiled ``backend_tls_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``backend_tls_py``
(see fastlb/native.py)."""

from fastlb.native import load

_impl = load("fastlb.http.backend_tls")
BackendTls = _impl.BackendTls

__all__ = ["BackendTls"]
