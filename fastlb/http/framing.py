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
    from fastlb.http import framing_c

    # framing_c.py is a symlink to the source: without the built extension it would import as plain
    # Python, silently several times slower.
    if not framing_c.__file__.endswith(".so"):
        raise ImportError(f"fastlb.http.framing_c is not compiled ({framing_c.__file__}): build the "
                          "extension (python setup.py build_ext --inplace) or set FASTLB_NO_EXTENSIONS=1")
    from fastlb.http.framing_c import (  # type: ignore[no-redef]
        CHUNK_EXTENSIONS_MAX,
        CHUNKED_BAD,
        CHUNKED_MORE,
        ChunkedBody,
        request_start_problem,
    )

__all__ = ["CHUNK_EXTENSIONS_MAX", "CHUNKED_BAD", "CHUNKED_MORE", "ChunkedBody", "request_start_problem"]
