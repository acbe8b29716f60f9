"""Chooses the compiled ``router_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``router_py``
(see fastlb/native.py)."""

from fastlb.native import load

_impl = load("fastlb.lb.router")
InvalidHost = _impl.InvalidHost
Route = _impl.Route
Router = _impl.Router

__all__ = ["InvalidHost", "Route", "Router"]
