"""Chooses the compiled ``front_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``front_py``
(see fastlb/native.py)."""

from fastlb.native import load

_impl = load("fastlb.http.front")
Front = _impl.Front
Splice = _impl.Splice

__all__ = ["Front", "Splice"]
