"""The per-request computations, compiled (``fastlb._core``) unless ``FASTLB_NO_EXTENSIONS=1``.

Import from here, never from ``_core``/``_core_py`` directly. There is deliberately no fallback: if the
extension was expected and does not import, the ImportError surfaces at startup instead of the proxy
silently running several times slower (tests/test_core.py also fails in that case).
"""

import os

if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
    from fastlb import _core_py as _impl

    EXTENSION = False
else:
    from fastlb import _core as _impl  # type: ignore[attr-defined]

    EXTENSION = True

# What both twins define (tests/test_core.py checks each name in both), handed on from the one that runs.
_NAMES = (
    # flag bits of request_head/response_head and parse_request/parse_response
    "F_CONTENT_LENGTH", "F_CHUNKED", "F_EXPECT_CONTINUE", "F_UPGRADE", "F_CONN_CLOSE", "F_CONN_KEEPALIVE",
    "F_HAS_HOST", "F_NO_BODY", "F_UNTIL_CLOSE", "F_HTTP10", "F_AMBIGUOUS",
    "request_head", "response_head", "parse_request", "parse_response", "find_field", "head_end", "head_and_body",
    "hash64", "maglev_table", "maglev_lookup",
    # before TLS: the ClientHello (SNI passthrough) and the PROXY protocol
    "HELLO_MORE", "HELLO_OK", "HELLO_NOT_TLS", "HELLO_BAD", "HELLO_MAX", "parse_client_hello",
    "PROXY_MORE", "PROXY_OK", "PROXY_LOCAL", "PROXY_BAD", "PROXY_V1_MAX", "PP2_TYPE_CRC32C",
    "parse_proxy_header", "proxy_header_v1", "proxy_header_v2",
    # the host-wide rate limit's shared buckets
    "RATE_WAYS", "rate_take",
)
globals().update({name: getattr(_impl, name) for name in _NAMES})

# Table size callers use unless configured otherwise: the prime the Maglev paper evaluates (§5.3),
# >100x any realistic pool so each server's share stays within ~1% of its weight.
MAGLEV_SIZE = 65537

__all__ = ["EXTENSION", "MAGLEV_SIZE", *_NAMES]
