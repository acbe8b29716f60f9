"""Chooses the compiled ``router_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``router_py``.

No fallback, as in ``fastlb.core``: an extension that was expected and did not build is an ImportError.
"""

import os

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    from fastlb.lb.router_py import InvalidHost, Route, Router
else:
    from fastlb.lb import router_c

    # router_c.py is a symlink to the source: without the built extension it would import as plain
    # Python, silently several times slower.
    if not router_c.__file__.endswith(".so"):
        raise ImportError(f"fastlb.lb.router_c is not compiled ({router_c.__file__}): build the "
                          "extension (python setup.py build_ext --inplace) or set FASTLB_NO_EXTENSIONS=1")
    from fastlb.lb.router_c import InvalidHost, Route, Router  # type: ignore[no-redef]

__all__ = ["InvalidHost", "Route", "Router"]
