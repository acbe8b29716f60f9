"""Writes the raw request corpus: ``valid/NAME.http`` + ``NAME.expect`` and ``invalid/NAME.http`` + ``NAME.expect``.

This script is the reviewable source of the corpus: every case below is a Python bytes literal, so CR,
LF, NUL and friends are visible escapes instead of invisible bytes in a file. The ``.http`` files hold
exactly those bytes (written in binary mode, never touched by git's EOL conversion: see .gitattributes)
and are what the tests and anyone else (curl, nc, another proxy) can replay. tests/test_hardening.py
fails when the files and this script disagree.

    python tests/data/requests/make_corpus.py           # (re)write the files
    python tests/data/requests/make_corpus.py --check   # exit 1 if they are stale

The ``.expect`` format (JSON) is described in README.md next to this file.
"""

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
HOST = b"Host: example.test\r\n"
INVALID: dict[str, tuple[bytes, dict]] = {}
VALID: dict[str, tuple[bytes, dict]] = {}


def fwd(method: str, target: str, body: bytes = b"", headers=None, absent=(), upstream_absent=()) -> dict:
    """One request the backend must receive.

    headers: lowercase name -> value (or True: present with any value) the upstream head must carry;
    absent: lowercase names it must not carry; upstream_absent: byte strings (latin-1) that must appear
    nowhere in the raw upstream bytes (checked by the differential test, which sees them).
    """
    out = {"method": method, "target": target, "body_len": len(body),
           "body_sha256": hashlib.sha256(body).hexdigest()}
    if headers:
        out["headers"] = headers
    if absent:
        out["absent"] = list(absent)
    if upstream_absent:
        out["upstream_absent"] = list(upstream_absent)
    return out


def invalid(name: str, data: bytes, status: int, why: str, *, close: bool = True, before=(), then=(),
            forwarded=()):
    """A request fastlb must answer itself with `status` (and then close, unless close=False).

    before/then: statuses of the responses to good requests sent in the same bytes before/after it;
    forwarded: what the backend receives in total (only those good requests, never the bad one).
    """
    assert name not in INVALID, name
    INVALID[name] = (data, {"responses": [*before, status, *then], "close": close,
                            "forwarded": list(forwarded), "why": why})


def valid(name: str, data: bytes, forwarded, why: str, *, close: bool = False, responses=None, no_body=()):
    """Requests fastlb must forward: the backend receives exactly `forwarded`, nothing else.

    responses: statuses the client gets (default: one 200 per forwarded request); no_body: indexes of
    responses that have no body whatever their headers say (HEAD); close: fastlb closes after them.
    """
    assert name not in VALID, name
    VALID[name] = (data, {"responses": responses or [200] * len(forwarded), "close": close,
                          "forwarded": list(forwarded), "no_body": list(no_body), "why": why})


def post(headers: bytes, body: bytes, target: bytes = b"/", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST %s %s\r\n%s%s\r\n%s" % (target, version, HOST if version == b"HTTP/1.1" else b"", headers,
                                         body)


def chunked(te: bytes, body: bytes = b"5\r\nhello\r\n0\r\n\r\n", version: bytes = b"HTTP/1.1") -> bytes:
    return post(b"Transfer-Encoding: %s\r\n" % te, body, version=version)


# ---------------------------------------------------------------------------------------------------
# Invalid: message framing (RFC 9112 §6): 400 and close (DESIGN "Error table"), because
# once two parsers could disagree on where the body ends, no byte after it can be trusted.
# ---------------------------------------------------------------------------------------------------
CHUNK_HEAD_TE = b"Transfer-Encoding: chunked\r\n"
SMUGGLE = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"
invalid("cl_te", post(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", SMUGGLE), 400,
        "RFC 9112 §6.3 item 3: Content-Length with Transfer-Encoding")
invalid("te_cl", post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", SMUGGLE), 400,
        "RFC 9112 §6.3 item 3, the other order")
invalid("te_cl_http10", post(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", SMUGGLE,
                             version=b"HTTP/1.0"), 400, "RFC 9112 §6.3 item 3 on HTTP/1.0")
invalid("cl_duplicate_same", post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"), 400,
        "DESIGN: duplicate Content-Length, even equal (RFC 9112 §6.3 item 5 allows; we do not)")
invalid("cl_duplicate_different", post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), 400,
        "RFC 9112 §6.3 item 5: differing Content-Length values")
invalid("cl_list_same", post(b"Content-Length: 5, 5\r\n", b"hello"), 400,
        "DESIGN: comma-listed Content-Length, even equal")
invalid("cl_list_different", post(b"Content-Length: 5, 6\r\n", b"hello!"), 400,
        "RFC 9112 §6.3 item 5: comma-listed differing values")
invalid("cl_plus", post(b"Content-Length: +5\r\n", b"hello"), 400, "RFC 9110 §8.6: 1*DIGIT, no sign")
invalid("cl_minus", post(b"Content-Length: -1\r\n", b""), 400, "RFC 9110 §8.6: 1*DIGIT, no sign")
invalid("cl_hex", post(b"Content-Length: 0x10\r\n", b"0123456789abcdef"), 400, "RFC 9110 §8.6: decimal only")
invalid("cl_inner_space", post(b"Content-Length: 1 0\r\n", b"0123456789"), 400,
        "RFC 9110 §8.6: no space inside the digits")
invalid("cl_empty", post(b"Content-Length: \r\n", b""), 400, "RFC 9110 §8.6: at least one digit")
invalid("cl_overflow", post(b"Content-Length: 99999999999999999999\r\n", b"x"), 400,
        "does not fit 64 bits: a parser that wraps it would frame differently")
invalid("cl_letters", post(b"Content-Length: five\r\n", b"hello"), 400, "RFC 9110 §8.6: digits only")
invalid("cl_decimal_point", post(b"Content-Length: 5.0\r\n", b"hello"), 400, "RFC 9110 §8.6: digits only")
invalid("cl_vertical_tab", post(b"Content-Length: \x0b5\r\n", b"hello"), 400,
        "VT is neither OWS nor a digit (RFC 9110 §5.6.3)")
invalid("cl_obs_fold", post(b"Content-Length:\r\n 5\r\n", b"hello"), 400, "RFC 9112 §5.2: obs-fold, DESIGN 400")
invalid("cl_space_before_colon", post(b"Content-Length : 5\r\n", b"hello"), 400,
        "RFC 9112 §5.1: whitespace between field name and colon MUST be a 400")
invalid("cl_underscore_name", post(b"Content_Length: 5\r\n", b"hello"), 400,
        "DESIGN: `_` in a framing header name (CGI maps it to CONTENT_LENGTH)")
invalid("te_underscore_name", post(b"Transfer_Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 400,
        "DESIGN: `_` in a framing header name")
invalid("te_http10", chunked(b"chunked", version=b"HTTP/1.0"), 400,
        "RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 request MUST be treated as faulty framing; close")
invalid("te_obs_fold", chunked(b"\r\n chunked"), 400, "RFC 9112 §5.2: obs-fold in Transfer-Encoding, DESIGN 400")
invalid("te_vertical_tab", chunked(b"\x0bchunked"), 400, "VT is not OWS: not a field value byte")
invalid("te_space_before_colon", post(b"Transfer-Encoding : chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 400,
        "RFC 9112 §5.1: whitespace before the colon")
invalid("te_nul", chunked(b"chunked\x00"), 400, "RFC 9110 §5.5: NUL in a field value")

# Transfer codings other than exactly `chunked` (after removing OWS, any case): DESIGN "transfer-coding
# other than chunked" = 501 and close; except where chunked itself is misused (present but not final,
# or twice), which is faulty framing: 400 (RFC 9112 §6.1 MUST). `chunked ` with trailing OWS is valid:
# OWS is not part of a field value, RFC 9110 §5.5; see valid/te_chunked_trailing_ows.
invalid("te_gzip", chunked(b"gzip", b"hello"), 501, "DESIGN: coding other than chunked")
invalid("te_identity", chunked(b"identity", b"hello"), 501, "identity was removed in RFC 7230; not chunked")
invalid("te_gzip_chunked", chunked(b"gzip, chunked"), 501, "DESIGN: we only decode chunked, alone")
invalid("te_chunked_gzip", chunked(b"chunked, gzip"), 400,
        "RFC 9112 §6.1: chunked present but not the final coding MUST be a 400 (length undeterminable)")
invalid("te_comma_chunked", chunked(b",chunked"), 501, "not exactly chunked: we do not parse TE lists")
invalid("te_chunked_chunked", chunked(b"chunked, chunked"), 400,
        "RFC 9112 §7.1: chunked applied twice is faulty framing, not an unknown coding")
invalid("te_xchunked", chunked(b"xchunked"), 501, "not chunked")
invalid("te_chunked_parameter", chunked(b"chunked;q=1"), 501, "chunked takes no parameters: not exactly chunked")
invalid("te_two_lines", post(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                             b"5\r\nhello\r\n0\r\n\r\n"), 501, "two TE field lines = gzip, chunked")
# Look-alike framing names (issue 14 item 10): some servers fold "_" into "-" and collapse runs of
# them, so these would reach an application as the real field while fastlb framed the body without it.
invalid("te_dashes_name", post(b"Transfer---Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 400,
        "runs of '-' collapse to transfer-encoding (issue 14 item 10; was forwarded)")
invalid("te_underscores_name", post(b"Transfer___Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 400,
        "runs of '_' collapse to transfer-encoding (issue 14 item 10; was forwarded)")
invalid("cl_dashes_name", post(b"Content--Length: 5\r\n", b"hello"), 400,
        "runs of '-' collapse to content-length (issue 14 item 10; was forwarded)")
invalid("cl_mixed_runs_name", post(b"Content-_Length: 5\r\n", b"hello"), 400,
        "a run of '-' and '_' collapses to content-length (issue 14 item 10)")
invalid("te_two_lines_chunked", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                                     b"5\r\nhello\r\n0\r\n\r\n"), 400, "two TE field lines = chunked applied twice")

# GET and HEAD with a chunked body (issue 14 item 9): a backend that ignores bodies on these methods
# reads the chunks as the next request (AWS's "ambiguous" desync class). Refused, not normalised.
SMUGGLED_GET = b"GET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"
invalid("get_chunked", b"GET / HTTP/1.1\r\n" + HOST + CHUNK_HEAD_TE + b"\r\n" + b"%x\r\n%s\r\n0\r\n\r\n"
        % (len(SMUGGLED_GET), SMUGGLED_GET), 400, "GET with Transfer-Encoding: chunked (issue 14 item 9; was forwarded)")
invalid("head_chunked", b"HEAD / HTTP/1.1\r\n" + HOST + CHUNK_HEAD_TE + b"\r\n0\r\n\r\n", 400,
        "HEAD with Transfer-Encoding: chunked, even an empty body (issue 14 item 9)")

# Chunked bodies (RFC 9112 §7.1). The head is fine, so fastlb may already have sent it upstream: the
# backend must still never see a complete request.
CHUNK_HEAD = b"Transfer-Encoding: chunked\r\n"
invalid("chunk_size_not_hex", post(CHUNK_HEAD, b"zz\r\nhello\r\n0\r\n\r\n"), 400, "chunk-size = 1*HEXDIG")
invalid("chunk_size_negative", post(CHUNK_HEAD, b"-5\r\nhello\r\n0\r\n\r\n"), 400, "chunk-size = 1*HEXDIG")
invalid("chunk_size_0x", post(CHUNK_HEAD, b"0x5\r\nhello\r\n0\r\n\r\n"), 400, "chunk-size = 1*HEXDIG, no prefix")
invalid("chunk_size_overflow", post(CHUNK_HEAD, b"10000000000000005\r\nhello\r\n0\r\n\r\n"), 400,
        "17 hex digits: over 64 bits")
invalid("chunk_size_empty", post(CHUNK_HEAD, b"\r\nhello\r\n0\r\n\r\n"), 400, "chunk-size missing")
invalid("chunk_size_inner_space", post(CHUNK_HEAD, b"1 0\r\n0123456789abcdef\r\n0\r\n\r\n"), 400,
        "space inside the chunk size")
invalid("chunk_ext_cr", post(CHUNK_HEAD, b"5;a=b\rc\r\nhello\r\n0\r\n\r\n"), 400, "bare CR inside a chunk extension")
invalid("chunk_ext_lf", post(CHUNK_HEAD, b"5;a=b\nc\r\nhello\r\n0\r\n\r\n"), 400, "bare LF inside a chunk extension")
invalid("chunk_ext_over_4kib", post(CHUNK_HEAD, b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n"), 400,
        "over 4 KiB of chunk extensions in one chunk: an unbounded read otherwise (issue: 4 KiB)")
invalid("chunk_ext_many_over_4kib", post(CHUNK_HEAD, b"5" + b";a=b" * 1200 + b"\r\nhello\r\n0\r\n\r\n"), 400,
        "many small extensions adding up to over 4 KiB")
invalid("chunk_data_too_long", post(CHUNK_HEAD, b"5\r\nhelloX\r\n0\r\n\r\n"), 400,
        "chunk data longer than its size: CRLF expected after it")
invalid("chunk_missing_crlf", post(CHUNK_HEAD, b"5\r\nhello0\r\n\r\n"), 400, "no CRLF after chunk data")
invalid("chunk_bare_lf_after_size", post(CHUNK_HEAD, b"5\nhello\r\n0\r\n\r\n"), 400, "bare LF after chunk size")
invalid("chunk_bare_lf_after_data", post(CHUNK_HEAD, b"5\r\nhello\n0\r\n\r\n"), 400, "bare LF after chunk data")
invalid("chunk_trailer_space_in_name", post(CHUNK_HEAD, b"5\r\nhello\r\n0\r\nBad Name: x\r\n\r\n"), 400,
        "trailer field name is not a token")
invalid("chunk_trailer_obs_fold", post(CHUNK_HEAD, b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n"), 400,
        "obs-fold in a trailer field")

# Line endings (RFC 9112 §2.2: a recipient MAY accept bare LF; DESIGN: we do not).
invalid("bare_lf_request_line", b"GET / HTTP/1.1\n" + HOST + b"\r\n", 400, "DESIGN: bare LF")
invalid("bare_lf_header", b"GET / HTTP/1.1\r\nHost: example.test\n\r\n", 400, "DESIGN: bare LF")
invalid("bare_lf_everywhere", b"GET / HTTP/1.1\nHost: example.test\n\n", 400, "DESIGN: bare LF")
invalid("bare_lf_end_of_head", b"GET / HTTP/1.1\r\nHost: example.test\r\n\n", 400, "DESIGN: bare LF")
invalid("bare_lf_before_request_line", b"\nGET / HTTP/1.1\r\n" + HOST + b"\r\n", 400,
        "DESIGN: bare LF; only an empty line (CRLF) may precede the request line (RFC 9112 §2.2)")
invalid("bare_lf_after_body", post(b"Content-Length: 4\r\n", b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"),
        400, "the body ends after CR; the LF left is not an empty line: GET /smuggled is never forwarded",
        before=[200], forwarded=[fwd("POST", "/", b"0\r\n\r")])
# After a chunked body the next request's offset is known only by walking the chunk framing
# (http/framing.py): these are checked there, wherever the reads cut the bytes.
invalid("bare_lf_after_chunked_body", post(CHUNK_HEAD, b"5\r\nhello\r\n0\r\n\r\n\nGET /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"),
        400, "a bare LF after a chunked body is not an empty line: GET /smuggled is never forwarded",
        before=[200], forwarded=[fwd("POST", "/", b"hello")])
invalid("double_space_after_chunked_body",
        post(CHUNK_HEAD, b"3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\nGET  /smuggled HTTP/1.1\r\n" + HOST + b"\r\n"),
        400, "RFC 9112 §3: single spaces in the request line, for a request after trailers too",
        before=[200], forwarded=[fwd("POST", "/", b"abc")])
invalid("http09_after_chunked_body", post(CHUNK_HEAD, b"0\r\n\r\nGET /smuggled\r\n\r\n"), 400,
        "one separator pipelined after an empty chunked body: malformed (RFC 9112 §3, issue 14 item 6)",
        before=[200], forwarded=[fwd("POST", "/")])
invalid("bare_cr_before_request_line", b"\rGET / HTTP/1.1\r\n" + HOST + b"\r\n", 400,
        "RFC 9112 §2.2: only empty lines (CRLF) may precede the request line; a bare CR is invalid")
invalid("bare_cr_request_line", b"GET / HTTP/1.1\r" + HOST + b"\r\n", 400,
        "RFC 9112 §2.2: bare CR MUST be rejected or replaced")
invalid("bare_cr_header_value", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\rc\r\n\r\n", 400,
        "RFC 9110 §5.5: CR in a field value")
invalid("bare_cr_end_of_head", b"GET / HTTP/1.1\r\n" + HOST + b"\r\r\n", 400, "bare CR")

# Field syntax (RFC 9110 §5, RFC 9112 §5).
invalid("nul_in_header_value", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\x00c\r\n\r\n", 400,
        "RFC 9110 §5.5: NUL in a field value")
invalid("nul_in_header_name", b"GET / HTTP/1.1\r\n" + HOST + b"X-\x00A: b\r\n\r\n", 400, "field-name = token")
invalid("vertical_tab_in_header_value", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\x0bc\r\n\r\n", 400,
        "RFC 9110 §5.5: VT is not a field-vchar")
invalid("space_before_colon", b"GET / HTTP/1.1\r\n" + HOST + b"X-A : b\r\n\r\n", 400, "RFC 9112 §5.1 MUST 400")
invalid("tab_before_colon", b"GET / HTTP/1.1\r\n" + HOST + b"X-A\t: b\r\n\r\n", 400, "RFC 9112 §5.1 MUST 400")
invalid("header_without_colon", b"GET / HTTP/1.1\r\n" + HOST + b"X-A b\r\n\r\n", 400, "no colon")
invalid("header_empty_name", b"GET / HTTP/1.1\r\n" + HOST + b": b\r\n\r\n", 400, "empty field name")
invalid("header_name_not_token", b"GET / HTTP/1.1\r\n" + HOST + b"X(A): b\r\n\r\n", 400, "field-name = token")
invalid("header_name_utf8", b"GET / HTTP/1.1\r\n" + HOST + b"X-\xc3\xa9: b\r\n\r\n", 400, "field-name = token")
invalid("obs_fold", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\r\n c\r\n\r\n", 400, "RFC 9112 §5.2, DESIGN 400")
invalid("obs_fold_tab", b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\r\n\tc\r\n\r\n", 400, "RFC 9112 §5.2, DESIGN 400")
invalid("whitespace_before_first_header", b"GET / HTTP/1.1\r\n " + HOST + b"\r\n", 400,
        "RFC 9112 §2.2: whitespace before the first field line MUST be rejected (or consumed)")

# Host (RFC 9112 §3.2: 400 for none in 1.1, more than one, or an invalid value).
invalid("host_missing_http11", b"GET / HTTP/1.1\r\n\r\n", 400, "RFC 9112 §3.2: no Host in HTTP/1.1")
invalid("host_duplicate", b"GET / HTTP/1.1\r\n" + HOST + b"Host: other.test\r\n\r\n", 400, "RFC 9112 §3.2")
invalid("host_duplicate_same", b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n", 400, "RFC 9112 §3.2, even equal")
invalid("host_with_space", b"GET / HTTP/1.1\r\nHost: exa mple.test\r\n\r\n", 400,
        "RFC 9112 §3.2: invalid Host field value (RFC 3986 reg-name has no SP)")
invalid("host_with_path", b"GET / HTTP/1.1\r\nHost: example.test/admin\r\n\r\n", 400,
        "RFC 9112 §3.2: invalid Host field value (authority has no path)")
invalid("host_empty", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400,
        "an empty Host names no authority to route on (RFC 9110 §4.2.1; nginx: 400; issue 14 item 8)")
invalid("host_empty_ows", b"GET / HTTP/1.1\r\nHost: \t \r\n\r\n", 400,
        "OWS is not part of the value (RFC 9110 §5.5): still empty (issue 14 item 8)")
invalid("host_empty_http10", b"GET / HTTP/1.0\r\nHost:\r\n\r\n", 400,
        "HTTP/1.0 needs no Host, but one that is sent must be valid (issue 14 item 8)")
invalid("host_port_only", b"GET / HTTP/1.1\r\nHost: :8080\r\n\r\n", 400,
        "RFC 9110 §4.2.1: an http URI with an empty host is invalid")

# Request line (RFC 9112 §3).
invalid("absolute_form", b"GET http://evil.test/ HTTP/1.1\r\n" + HOST + b"\r\n", 400,
        "decision: a reverse proxy routes on Host; RFC 9112 §3.2.2 makes the target's authority win, "
        "so we refuse absolute-form rather than route on one name and forward another")
invalid("authority_form_get", b"GET example.test:80 HTTP/1.1\r\n" + HOST + b"\r\n", 400,
        "RFC 9112 §3.2.3: authority-form is only for CONNECT")
invalid("asterisk_form_get", b"GET * HTTP/1.1\r\n" + HOST + b"\r\n", 400,
        "RFC 9112 §3.2.4: asterisk-form is only for OPTIONS")
invalid("http09", b"GET /\r\n\r\n", 400,
        "RFC 9112 §3: a request line with one separator is malformed, not an HTTP/0.9 request (issue 14 item 6)")
invalid("missing_target", b"GET HTTP/1.1\r\n" + HOST + b"\r\n", 400,
        "RFC 9112 §3: no request-target, one separator (issue 14 item 6; was 505)")
invalid("tab_for_one_space", b"GET\t/ HTTP/1.1\r\n" + HOST + b"\r\n", 400,
        "RFC 9112 §3: SP only; with a tab the line has one separator (issue 14 item 6; was 505)")
invalid("http09_explicit", b"GET / HTTP/0.9\r\n" + HOST + b"\r\n", 505, "DESIGN: version other than 1.0/1.1")
invalid("http20", b"GET / HTTP/2.0\r\n" + HOST + b"\r\n", 505, "DESIGN: version other than 1.0/1.1")
invalid("http_lowercase", b"GET / http/1.1\r\n" + HOST + b"\r\n", 400, "RFC 9112 §2.3: HTTP-name is case-sensitive")
invalid("http_version_garbage", b"GET / HTTP/1.1x\r\n" + HOST + b"\r\n", 400, "malformed version")
invalid("h2_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "HTTP/2 prior knowledge: DESIGN version != 1.x")
invalid("double_space", b"GET  / HTTP/1.1\r\n" + HOST + b"\r\n", 400, "RFC 9112 §3: exactly one SP")
invalid("double_space_before_version", b"GET /  HTTP/1.1\r\n" + HOST + b"\r\n", 400, "RFC 9112 §3: one SP")
invalid("trailing_space_request_line", b"GET / HTTP/1.1 \r\n" + HOST + b"\r\n", 400, "RFC 9112 §3")
invalid("tab_separated_request_line", b"GET\t/\tHTTP/1.1\r\n" + HOST + b"\r\n", 400, "RFC 9112 §3: SP only")
invalid("space_in_target", b"GET /a b HTTP/1.1\r\n" + HOST + b"\r\n", 400, "RFC 9112 §3.2: no SP in the target")
invalid("nul_in_target", b"GET /a\x00b HTTP/1.1\r\n" + HOST + b"\r\n", 400, "CTL in the target")
invalid("ctl_in_target", b"GET /a\x01b HTTP/1.1\r\n" + HOST + b"\r\n", 400, "CTL in the target")
invalid("high_byte_in_target", b"GET /\xff HTTP/1.1\r\n" + HOST + b"\r\n", 400,
        "RFC 3986: no raw non-ASCII in a URI (h11 backends would refuse it: 400, not 502)")
invalid("method_not_token", b"G(T / HTTP/1.1\r\n" + HOST + b"\r\n", 400, "method = token")
invalid("empty_method", b" / HTTP/1.1\r\n" + HOST + b"\r\n", 400, "method = token")

# Limits (defaults: 8 KiB request line, 16 KiB / 100 header fields).
invalid("request_line_over_8kib", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HOST + b"\r\n", 414,
        "DESIGN: request line over 8 KiB")
invalid("header_block_over_16kib",
        b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 1000) for i in range(20))
        + b"\r\n", 431, "DESIGN: header block over max_header_bytes (20 KiB)")
invalid("header_value_over_16kib", b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"b" * 17000 + b"\r\n\r\n", 431,
        "DESIGN: one 17 KiB field")
invalid("headers_101", b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(100))
        + b"\r\n", 431, "DESIGN: over 100 header fields (Host + 100)")

# Methods and expectations.
invalid("connect", b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n", 405,
        "DESIGN: CONNECT, a load balancer is not a forward proxy")
AFTER = b"GET /after HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n"
invalid("expect_unknown", b"GET /expect HTTP/1.1\r\n" + HOST + b"Expect: foo\r\n\r\n" + AFTER, 417,
        "DESIGN: Expect other than 100-continue, connection kept", close=True, then=[200],
        forwarded=[fwd("GET", "/after")])
invalid("expect_unknown_with_body",
        post(b"Expect: bar\r\nContent-Length: %d\r\n" % len(AFTER.replace(b"/after", b"/smuggled")),
             AFTER.replace(b"/after", b"/smuggled")) + AFTER, 417,
        "the refused request's body (which looks like a request) is read and discarded, not parsed",
        close=True, then=[200], forwarded=[fwd("GET", "/after")])

# A bad request after a good one on the same connection: the good one is served, the rest refused.
invalid("pipeline_good_then_bad",
        b"GET /first HTTP/1.1\r\n" + HOST + b"\r\n" + post(b"Content-Length: 1\r\nContent-Length: 2\r\n", b"ab"),
        400, "the first is served, the second (duplicate Content-Length) is a 400 and a close",
        before=[200], forwarded=[fwd("GET", "/first")])


# ---------------------------------------------------------------------------------------------------
# Valid: forwarded, with exactly the method, target and body the client meant.
# ---------------------------------------------------------------------------------------------------
def get(target: bytes = b"/", extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"GET %s %s\r\n%s%s\r\n" % (target, version, HOST if version == b"HTTP/1.1" else b"", extra)


valid("get_simple", get(), [fwd("GET", "/", headers={"host": "example.test"})], "the simplest request")
valid("get_with_body", b"GET /search HTTP/1.1\r\n" + HOST + b"Content-Length: 11\r\n\r\nhello world",
      [fwd("GET", "/search", b"hello world", headers={"content-length": "11"})],
      "a GET body is framed by its Content-Length (RFC 9110 §9.3.1), never assumed empty; the request is "
      "ambiguous (a backend may ignore the body), so fastlb closes after it (issue 14 item 9)", close=True)
valid("get_with_body_then_request",
      b"GET /first HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nhello" + b"GET /second HTTP/1.1\r\n" + HOST
      + b"\r\n", [fwd("GET", "/first", b"hello")],
      "after an ambiguous GET with a body nothing more is read from the connection (issue 14 item 9)", close=True)
valid("head_with_body", b"HEAD /h HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc",
      [fwd("HEAD", "/h", b"abc")], "HEAD with a Content-Length body: forwarded, then closed (issue 14 item 9)",
      close=True, no_body=[0])
valid("http12_processed_as_http11", get(b"/v12", HOST, version=b"HTTP/1.2") + get(b"/after"),
      [fwd("GET", "/v12"), fwd("GET", "/after")],
      "RFC 9112 §2.3: a higher minor version of HTTP/1 is processed as 1.1, kept alive (issue 14 item 7; was 505)")
valid("http19_processed_as_http11", get(b"/v19", HOST, version=b"HTTP/1.9"), [fwd("GET", "/v19")],
      "RFC 9112 §2.3: any HTTP/1.x above 1.1 is 1.1 (issue 14 item 7)")
valid("post_content_length", post(b"Content-Length: 5\r\n", b"hello", b"/form"), [fwd("POST", "/form", b"hello")],
      "plain Content-Length body")
valid("post_empty_content_length", post(b"Content-Length: 0\r\n", b"", b"/empty"), [fwd("POST", "/empty")],
      "Content-Length: 0")
valid("post_chunked_extensions_trailers",
      post(b"Transfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n",
           b"5;name=value\r\nhello\r\n6;a;b=\"quoted;str\"\r\n world\r\n0;last\r\nX-Checksum: abc\r\nX-Trailer: t\r\n\r\n",
           b"/upload"),
      [fwd("POST", "/upload", b"hello world", headers={"transfer-encoding": "chunked"},
           absent=["content-length", "trailer"],
           upstream_absent=["name=value", "quoted", "last", "X-Checksum", "X-Trailer"])],
      "de-chunked and re-chunked: extensions and trailers dropped (RFC 9112 §7.1.2), TE regenerated")
valid("post_chunked_uppercase", chunked(b"CHUNKED"),
      [fwd("POST", "/", b"hello", headers={"transfer-encoding": "chunked"})],
      "RFC 9112 §7: coding names are case-insensitive; regenerated as `chunked`")
valid("te_chunked_trailing_ows", chunked(b"chunked "),
      [fwd("POST", "/", b"hello", headers={"transfer-encoding": "chunked"})],
      "RFC 9110 §5.5: OWS around a field value is not part of it, so `chunked ` is chunked")
valid("te_chunked_leading_tab", chunked(b"\tchunked"), [fwd("POST", "/", b"hello")],
      "HTAB is OWS too (RFC 9110 §5.6.3)")
valid("chunked_sizes_upper_hex_and_zeros",
      post(CHUNK_HEAD, b"A\r\n0123456789\r\n0005\r\nhello\r\n00\r\n\r\n"),
      [fwd("POST", "/", b"0123456789hello")], "chunk-size = 1*HEXDIG: upper case and leading zeros")
valid("chunked_empty_body", post(CHUNK_HEAD, b"0\r\n\r\n", b"/nothing"), [fwd("POST", "/nothing")],
      "only the last chunk")
valid("http10_get_without_host", get(b"/old", version=b"HTTP/1.0"),
      [fwd("GET", "/old", headers={"host": True})], "HTTP/1.0 needs no Host; we add one upstream (1.1)",
      close=True)
valid("http10_keep_alive_still_closed", get(b"/ka", b"Connection: keep-alive\r\n", version=b"HTTP/1.0"),
      [fwd("GET", "/ka")], "DESIGN: HTTP/1.0 clients are closed after the response", close=True)
valid("http10_post_content_length", post(b"Content-Length: 3\r\n", b"abc", b"/legacy", version=b"HTTP/1.0"),
      [fwd("POST", "/legacy", b"abc")], "HTTP/1.0 body framed by Content-Length", close=True)
valid("pipelined_pair", get(b"/one") + post(b"Content-Length: 3\r\n", b"two", b"/two"),
      [fwd("GET", "/one"), fwd("POST", "/two", b"two")], "two requests in one write, answered in order")
valid("pipelined_after_chunked_trailers",
      post(CHUNK_HEAD, b"3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n", b"/one") + b"\r\n" + get(b"/two"),
      [fwd("POST", "/one", b"abc"), fwd("GET", "/two")],
      "the next request begins right after the trailers' empty line (one more CRLF is allowed, §2.2)")
valid("pipelined_head_get", b"HEAD /head-first HTTP/1.1\r\n" + HOST + b"\r\n" + get(b"/after-head"),
      [fwd("HEAD", "/head-first"), fwd("GET", "/after-head")],
      "a HEAD response has no body (RFC 9110 §9.3.2) and the next response still parses", no_body=[0])
valid("connection_close_then_data", get(b"/first", b"Connection: close\r\n") + get(b"/after-close"),
      [fwd("GET", "/first")], "RFC 9112 §9.6: nothing after Connection: close is a request", close=True)
valid("long_legal_headers",
      b"GET /long HTTP/1.1\r\n" + HOST + b"X-Long: " + b"l" * 8000 + b"\r\n"
      + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(5)) + b"\r\n",
      [fwd("GET", "/long", headers={"x-long": "l" * 8000})], "a 13 KiB head is under the 16 KiB limit")
valid("headers_100", b"GET /many HTTP/1.1\r\n" + HOST + b"".join(b"X-H%d: v\r\n" % i for i in range(99)) + b"\r\n",
      [fwd("GET", "/many", headers={"x-h98": "v"})], "exactly 100 fields is not over 100")
valid("long_legal_target", get(b"/" + b"t" * 4000), [fwd("GET", "/" + "t" * 4000)], "a 4 KiB target")
valid("percent_encoded_path", get(b"/a%20b/%E2%82%AC/%2F..%2f?x=%26"), [fwd("GET", "/a%20b/%E2%82%AC/%2F..%2f?x=%26")],
      "the target is forwarded byte for byte, never decoded")
valid("query_string", get(b"/search?q=fast+lb&page=2&empty=&flag"), [fwd("GET", "/search?q=fast+lb&page=2&empty=&flag")],
      "query string kept")
valid("options_asterisk", b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n", [fwd("OPTIONS", "*")],
      "RFC 9112 §3.2.4 asterisk-form")
valid("head", b"HEAD /head HTTP/1.1\r\n" + HOST + b"\r\n", [fwd("HEAD", "/head")],
      "HEAD: the response's Content-Length describes a body that is not sent", no_body=[0])
valid("delete_with_body", b"DELETE /item/1 HTTP/1.1\r\n" + HOST + b"Content-Length: 7\r\n\r\nreason!",
      [fwd("DELETE", "/item/1", b"reason!")], "a DELETE body is forwarded per its Content-Length")
valid("put_binary_body", b"PUT /blob HTTP/1.1\r\n" + HOST + b"Content-Length: 256\r\n\r\n" + bytes(range(256)),
      [fwd("PUT", "/blob", bytes(range(256)))], "every byte value in a body, CR and LF included")
valid("cl_leading_zeros", post(b"Content-Length: 005\r\n", b"hello"), [fwd("POST", "/", b"hello")],
      "RFC 9110 §8.6: 1*DIGIT allows leading zeros; decimal, never octal")
valid("cl_trailing_ows", post(b"Content-Length: 5 \r\n", b"hello"), [fwd("POST", "/", b"hello")],
      "OWS after the value is not part of it")
valid("expect_100_continue_body_sent_at_once",
      post(b"Expect: 100-continue\r\nContent-Length: 5\r\n", b"hello", b"/expect"),
      [fwd("POST", "/expect", b"hello")], "RFC 9110 §10.1.1: a client may send the body without waiting")
valid("connection_lists_content_length",
      post(b"Connection: keep-alive, Content-Length\r\nContent-Length: 4\r\n", b"body", b"/cl-listed"),
      [fwd("POST", "/cl-listed", b"body", headers={"content-length": "4"})],
      "Connection cannot strip the framing field: the body still reaches the backend delimited")
valid("hop_by_hop_removed",
      get(b"/hop", b"Connection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
          b"Proxy-Connection: keep-alive\r\n"),
      [fwd("GET", "/hop", absent=["connection", "x-secret", "keep-alive", "te", "proxy-connection"])],
      "RFC 9110 §7.6.1: hop-by-hop and Connection-listed fields removed")
valid("client_cert_header_dropped",
      get(b"/xfcc", b"X-Forwarded-Client-Cert: Hash=spoof-1;Subject=\"CN=admin\"\r\nX_Forwarded_Client_Cert: spoof-2\r\n"
          b"x-forwarded--client-cert: spoof-3\r\nX-Forwarded-Client-Certs: kept\r\n"),
      [fwd("GET", "/xfcc", headers={"x-forwarded-client-certs": "kept"},
           absent=["x-forwarded-client-cert", "x_forwarded_client_cert", "x-forwarded--client-cert"],
           upstream_absent=["spoof-1", "spoof-2", "spoof-3", "CN=admin"])],
      "issue 15: only fastlb states a verified client certificate (X-Forwarded-Client-Cert, Envoy's format); "
      "a client-sent one and its look-alikes (runs of - and _) never reach the backend")
valid("upgrade_h2c_stripped",
      get(b"/h2c", b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
      [fwd("GET", "/h2c", absent=["upgrade", "http2-settings", "connection"])],
      "RFC 9113 §3.1: h2c upgrade is deprecated; forwarded as plain HTTP/1.1 without Upgrade")
valid("leading_empty_line", b"\r\n" + get(b"/after-crlf"), [fwd("GET", "/after-crlf")],
      "RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line")


def render() -> dict[Path, bytes]:
    files = {}
    for kind, cases in (("invalid", INVALID), ("valid", VALID)):
        for name, (data, expect) in cases.items():
            files[HERE / kind / f"{name}.http"] = data
            files[HERE / kind / f"{name}.expect"] = (json.dumps(expect, indent=1, sort_keys=True) + "\n").encode()
    return files


def stale() -> list[str]:
    """Corpus files that differ from this script, are missing, or are left over."""
    files = render()
    problems = [str(p.relative_to(HERE)) for p, data in files.items() if not p.exists() or p.read_bytes() != data]
    for kind in ("invalid", "valid"):
        for p in sorted((HERE / kind).glob("*")) if (HERE / kind).exists() else ():
            if p not in files:
                problems.append(f"{p.relative_to(HERE)} (not generated)")
    return problems


def main() -> int:
    if sys.argv[1:] == ["--check"]:
        problems = stale()
        for p in problems:
            print("stale:", p)
        return 1 if problems else 0
    for kind in ("invalid", "valid"):
        (HERE / kind).mkdir(exist_ok=True)
        for p in (HERE / kind).glob("*"):
            p.unlink()
    for path, data in render().items():
        path.write_bytes(data)
    print(f"{len(INVALID)} invalid, {len(VALID)} valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
