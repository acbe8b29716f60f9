"""Chooses the compiled ``protocol_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``protocol_py``.

No fallback, as in ``fastlb.core``: an extension that was expected and did not build is an ImportError.
"""

import os

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    from fastlb.http.protocol_py import ClientConnection, Exchange, UpstreamConnection
else:
    from fastlb.http.protocol_c import (  # type: ignore[no-redef]
        ClientConnection,
        Exchange,
        UpstreamConnection,
    )

__all__ = ["ClientConnection", "Exchange", "UpstreamConnection"]
