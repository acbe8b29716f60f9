"""Chooses the compiled ``tlsbio_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``tlsbio_py``
(see fastlb/native.py)."""

from fastlb.native import load

_impl = load("fastlb.net.tlsbio")
BackendTls = _impl.BackendTls
TlsBio = _impl.TlsBio

__all__ = ["BackendTls", "TlsBio"]
