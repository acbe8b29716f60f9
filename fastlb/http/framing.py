"""Chooses the compiled ``framing_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``framing_py``.

No fallback, as in ``fastlb.core``: an extension that was expected and did not build is an ImportError.
"""

import os

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    from fastlb.http.framing_py import (
        CHUNK_EXTENSIONS_MAX,
        CHUNKED_BAD,
        CHUNKED_MORE,
        ChunkedBody,
        request_start_problem,
    )
else:
    from fastlb.http.framing_c import (  # type: ignore[no-redef]
        CHUNK_EXTENSIONS_MAX,
        CHUNKED_BAD,
        CHUNKED_MORE,
        ChunkedBody,
        request_start_problem,
    )

__all__ = ["CHUNK_EXTENSIONS_MAX", "CHUNKED_BAD", "CHUNKED_MORE", "ChunkedBody", "request_start_problem"]
