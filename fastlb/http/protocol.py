"""Chooses the compiled ``protocol_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``protocol_py``
(see fastlb/native.py)."""

from fastlb.native import load

_impl = load("fastlb.http.protocol")
ClientConnection = _impl.ClientConnection
Exchange = _impl.Exchange
Shared = _impl.Shared
UpstreamConnection = _impl.UpstreamConnection

__all__ = ["ClientConnection", "Exchange", "Shared", "UpstreamConnection"]
