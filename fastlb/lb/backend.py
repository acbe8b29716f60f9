"""Chooses the compiled ``backend_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``backend_py``
(see fastlb/native.py)."""

from fastlb.native import EXTENSIONS, load

_impl = load("fastlb.lb.backend")
DOWN = _impl.DOWN
UP = _impl.UP
Backend = _impl.Backend
Server = _impl.Server
build_backends = _impl.build_backends
EXTENSION = EXTENSIONS

__all__ = ["EXTENSION", "DOWN", "UP", "Backend", "Server", "build_backends"]
