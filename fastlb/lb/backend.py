"""Chooses the compiled ``backend_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``backend_py``.

No fallback, as in ``fastlb.core`` and ``fastlb.lb.balance`` (which checks the same way that the
symlinked source was not imported in place of a missing extension).
"""

import os

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    from fastlb.lb.backend_py import DOWN, UP, Backend, Server, build_backends

    EXTENSION = False
else:
    from fastlb.lb import backend_c

    if not backend_c.__file__.endswith((".so", ".pyd")):
        raise ImportError(f"fastlb.lb.backend_c is not compiled ({backend_c.__file__}): build the "
                          "extension (python setup.py build_ext --inplace) or set FASTLB_NO_EXTENSIONS=1")
    from fastlb.lb.backend_c import DOWN, UP, Backend, Server, build_backends  # type: ignore[no-redef]

    EXTENSION = True

__all__ = ["EXTENSION", "DOWN", "UP", "Backend", "Server", "build_backends"]
