"""The per-request computations, compiled (``fastlb._core``) unless ``FASTLB_NO_EXTENSIONS=1``.

Import from here, never from ``_core``/``_core_py`` directly. There is deliberately no fallback: if the
extension was expected and does not import, the ImportError surfaces at startup instead of the proxy
silently running several times slower (tests/test_core.py also fails in that case).
"""

import os

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    from fastlb._core_py import (
        F_AMBIGUOUS,
        F_CHUNKED,
        F_CONN_CLOSE,
        F_CONN_KEEPALIVE,
        F_CONTENT_LENGTH,
        F_EXPECT_CONTINUE,
        F_HAS_HOST,
        F_HTTP10,
        F_NO_BODY,
        F_UNTIL_CLOSE,
        F_UPGRADE,
        find_field,
        hash64,
        maglev_lookup,
        maglev_table,
        parse_request,
        parse_response,
        request_head,
        response_head,
    )

    EXTENSION = False
else:
    from fastlb._core import (  # type: ignore[no-redef]
        F_AMBIGUOUS,
        F_CHUNKED,
        F_CONN_CLOSE,
        F_CONN_KEEPALIVE,
        F_CONTENT_LENGTH,
        F_EXPECT_CONTINUE,
        F_HAS_HOST,
        F_HTTP10,
        F_NO_BODY,
        F_UNTIL_CLOSE,
        F_UPGRADE,
        find_field,
        hash64,
        maglev_lookup,
        maglev_table,
        parse_request,
        parse_response,
        request_head,
        response_head,
    )

    EXTENSION = True

# Table size callers use unless configured otherwise: the prime the Maglev paper evaluates (§5.3),
# >100x any realistic pool so each server's share stays within ~1% of its weight.
MAGLEV_SIZE = 65537

__all__ = [
    "EXTENSION",
    "MAGLEV_SIZE",
    "F_CONTENT_LENGTH",
    "F_CHUNKED",
    "F_EXPECT_CONTINUE",
    "F_UPGRADE",
    "F_CONN_CLOSE",
    "F_CONN_KEEPALIVE",
    "F_HAS_HOST",
    "F_NO_BODY",
    "F_UNTIL_CLOSE",
    "F_HTTP10",
    "F_AMBIGUOUS",
    "request_head",
    "response_head",
    "parse_request",
    "parse_response",
    "find_field",
    "hash64",
    "maglev_table",
    "maglev_lookup",
]
