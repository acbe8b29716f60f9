"""Chooses the compiled ``framing_c`` or, with ``FASTLB_NO_EXTENSIONS=1``, its source ``framing_py``
(see fastlb/native.py)."""

from fastlb.native import load

_impl = load("fastlb.http.framing")
CHUNK_EXTENSIONS_MAX = _impl.CHUNK_EXTENSIONS_MAX
CHUNKED_BAD = _impl.CHUNKED_BAD
CHUNKED_MORE = _impl.CHUNKED_MORE
ChunkedBody = _impl.ChunkedBody
request_start_problem = _impl.request_start_problem

__all__ = ["CHUNK_EXTENSIONS_MAX", "CHUNKED_BAD", "CHUNKED_MORE", "ChunkedBody", "request_start_problem"]
