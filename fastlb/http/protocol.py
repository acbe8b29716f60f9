"""Chooses the compiled ``protocol_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``protocol_py``.

No fallback, as in ``fastlb.core``: an extension that was expected and did not build is an ImportError.
"""

import os

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    from fastlb.http.protocol_py import ClientConnection, Exchange, Shared, UpstreamConnection
else:
    from fastlb.http import protocol_c

    # protocol_c.py is a symlink to the source: without the built extension it would import as plain
    # Python, silently several times slower.
    if not protocol_c.__file__.endswith(".so"):
        raise ImportError(f"fastlb.http.protocol_c is not compiled ({protocol_c.__file__}): build the "
                          "extension (python setup.py build_ext --inplace) or set FASTLB_NO_EXTENSIONS=1")
    from fastlb.http.protocol_c import (  # type: ignore[no-redef]
        ClientConnection,
        Exchange,
        Shared,
        UpstreamConnection,
    )

__all__ = ["ClientConnection", "Exchange", "Shared", "UpstreamConnection"]
