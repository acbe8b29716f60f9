"""Plain-Python twin of ``fastlb._core``: the per-request computations of the proxy.

Theory of operation
-------------------
The HTTP parser (httptools/llhttp, strict mode) hands the worker a request line and the header fields
as a list of ``(name, value)`` tuples in arrival order. This module decides whether that message may be
forwarded at all (framing and field syntax, RFC 9112 §6 and RFC 9110 §5), summarises what the caller
needs to know about it in an ``int`` of flag bits, and serialises the head the other side will receive
(hop-by-hop fields removed, X-Forwarded-* set). The same for a backend's response, plus the hashing
primitives of the Maglev balancer, and the two parsers of what a connection may carry before TLS
starts (issue 15): ``parse_client_hello`` (SNI and ALPN, for passthrough) and ``parse_proxy_header``
(PROXY protocol v1/v2), with ``proxy_header_v1``/``proxy_header_v2`` to write one towards a backend.
Both parsers are fed the bytes received so far and answer MORE until they can decide.

``fastlb/_core.pyx`` is the compiled twin. Both must return identical values and raise the same
exception types for every input: tests/test_core.py checks it with hypothesis. When a rule changes here
it changes there too. This file is the readable reference: it favours the obvious formulation, the
Cython one favours C loops over the same rules.

Conventions shared by every function:
- Field values are interpreted after removing SP/HTAB around them (RFC 9110 §5.5: OWS is not part of a
  field value). llhttp already strips them; being robust costs nothing. Values are forwarded as received.
- Field names compare case-insensitively, ASCII only (RFC 9110 §5.1), like ``bytes.lower``.
- When ``error_status`` is not 0 the head is ``b""``, but flags/host/request id still describe the
  headers, so a caller can log them and knows how the (rejected) message was framed.

Two entry points per direction share one path:
- ``request_head``/``response_head`` take a head already split into a list of fields (by llhttp);
- ``parse_request``/``parse_response`` take the raw head bytes, split them here (RFC 9112 §2-§5: the
  request or status line, then field lines, every byte checked) into the same list of fields, and hand
  it to the same ``_request``/``_response`` that ``request_head``/``response_head`` use. The compiled
  twin does the same with a C array of fields filled from either source.
"""

import multiprocessing as _multiprocessing
import re
import socket as _socket
from http import HTTPStatus

# Flag bits returned by request_head/response_head. _core.pyx defines the same values (tested).
F_CONTENT_LENGTH = 1  # exactly one, valid Content-Length
F_CHUNKED = 2  # exactly one Transfer-Encoding, and it is "chunked"
F_EXPECT_CONTINUE = 4  # request: Expect: 100-continue
F_UPGRADE = 8  # request: Upgrade (not h2c) + Connection: upgrade; response: 101 with Upgrade
F_CONN_CLOSE = 16  # "close" among the Connection options
F_CONN_KEEPALIVE = 32  # "keep-alive" among the Connection options
F_HAS_HOST = 64  # request: at least one Host field
F_NO_BODY = 128  # response: no body by definition (RFC 9112 §6.3 item 1); overrides the framing bits
F_UNTIL_CLOSE = 256  # response: body delimited by the end of the connection (RFC 9112 §6.3 item 8)
F_HTTP10 = 512  # parse_request/parse_response: the message is HTTP/1.0
# request: GET, HEAD or TRACE with a Content-Length body. Forwarded, but the upstream and the client
# connections close after the response (see _BODYLESS).
F_AMBIGUOUS = 1024

# RFC 9110 §5.6.2: token = 1*tchar.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_OWS = b" \t"
_CTL_SP = bytes(range(0x21)) + b"\x7f"
# Longest Content-Length we accept: 18 digits always fit in a signed 64-bit integer (the body counters
# of httptools and of the upstream protocol), 19 may not.
_MAX_CL_DIGITS = 18
# Largest limit parse_request/parse_response take (a Py_ssize_t on every platform we build for).
_MAX_LIMIT = 0x7FFFFFFF

# Header kinds. The numeric values mirror the enum in _core.pyx only for readability; they never leave
# the module.
_OTHER = 0
_HOST = 1
_CONTENT_LENGTH = 2
_TRANSFER_ENCODING = 3
_CONNECTION = 4
_UPGRADE = 5
_EXPECT = 6
_HOP = 7  # other hop-by-hop fields: dropped, nothing to interpret
_XFF = 8
_XF_OTHER = 9  # X-Forwarded-Proto/Port/Host/Client-Cert: always replaced by ours, never trusted (DESIGN "Headers")
_REQUEST_ID = 10
_DROP = 11  # X_Forwarded_For & co: see the underscore rule in request_head

# RFC 9110 §7.6.1: Connection, and the fields a proxy must not forward even when Connection does not
# list them (Proxy-Connection is the pre-standard spelling some clients still send).
_KINDS = {
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"keep-alive": _HOP,
    b"proxy-connection": _HOP,
    b"te": _HOP,
    b"trailer": _HOP,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XF_OTHER,
    b"x-forwarded-port": _XF_OTHER,
    b"x-forwarded-host": _XF_OTHER,
    # Issue 15: the client certificate identity fastlb verified (Envoy's format); the caller appends its
    # own, so a client-sent one (or a look-alike) must never reach the backend.
    b"x-forwarded-client-cert": _XF_OTHER,
    b"x-request-id": _REQUEST_ID,
}
# Responses: only framing and hop-by-hop names matter; X-Forwarded-* or Host in a response are plain
# end-to-end fields.
_RESPONSE_KINDS = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"upgrade": _UPGRADE,
    b"keep-alive": _HOP,
    b"proxy-connection": _HOP,
    b"te": _HOP,
    b"trailer": _HOP,
}
# Kinds a Connection option can remove (RFC 9110 §7.6.1). Host and Content-Length are deliberately not
# among them: "Connection: content-length" would make us forward a body the next hop cannot delimit
# (request smuggling), and Host is what the backend routes on. Every other kind is dropped anyway.
_LISTABLE = (_OTHER, _EXPECT)

_HEADERS_TYPE = "headers must be a list of (name: bytes, value: bytes) tuples"

_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
# Pre-encoded status lines for the standard phrases (STYLE: constant bytes at import time).
_STATUS_LINES = {code: b"HTTP/1.1 %d %s\r\n" % (code, phrase) for code, phrase in _REASONS.items()}

# The common methods, returned as these very objects by parse_request (no allocation per request).
_METHODS = {m: m for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH")}
# Methods whose request content has no defined meaning: RFC 9110 §9.3.1 (GET) and §9.3.2 (HEAD) warn that
# a body "might lead some implementations to reject the request and close the connection because of its
# potential as a request smuggling attack", and §9.3.8 forbids content in TRACE outright. A backend that
# ignores such a body reads it as the next request: AWS's "ambiguous" desync class (issue 14 item 9).
# DELETE and OPTIONS are left out: their bodies are in real use (search and bulk APIs) and RFC 9110
# neither forbids nor warns about them in those words for OPTIONS.
_BODYLESS = (b"GET", b"HEAD", b"TRACE")
# Runs of "-" and "_" in a field name, collapsed to one "-" to find look-alikes of the framing fields.
_DASH_RUNS = re.compile(rb"[-_]+")
# RFC 9112 §3.2 + RFC 3986 §3.2.2: Host = uri-host [ ":" port ], uri-host an IP-literal or a reg-name.
# The same characters as fastlb/lb/router.py's _HOST, minus the empty host: RFC 9110 §4.2.1 says an
# http URI with an empty host is invalid, and an empty Host names no authority to route on (14.8).
# Whatever this accepts, the router accepts too, so it never has to refuse a Host itself.
_HOST_VALUE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+)(?::[0-9]*)?")
# RFC 9110 §5.5: field-value bytes are VCHAR, obs-text, SP and HTAB; every other CTL and DEL is refused
# (llhttp strict refuses them too). parse_* check this on the raw bytes; request_head's caller (llhttp)
# already did, so _bad_fields only needs the three bytes that would split a field.
_VALUE_CTL = bytes(c for c in range(0x20) if c != 0x09) + b"\x7f"
# RFC 9112 §3.2: the request-target is visible ASCII (RFC 3986 has no raw SP, CTL or non-ASCII byte).
_NOT_VCHAR = bytes(range(0x21)) + bytes(range(0x7F, 0x100))


def _bad_value(value):
    # RFC 9110 §5.5: a recipient of CR, LF or NUL in a field value MUST reject the message or replace
    # them with SP. Rejecting is the only safe choice for a proxy: forwarded, they split the field.
    return b"\r" in value or b"\n" in value or b"\x00" in value


def _bad_name(name):
    # RFC 9110 §5.1: field-name = token. Anything else (empty, SP, ":", obs-text) is not a field.
    return not name or bool(name.translate(None, _TCHAR))


def _bad_fields(lowercase_names, values):
    # _bad_name/_bad_value over all fields at once: only "is any field bad" matters, and one scan of
    # the joined bytes costs less than a scan per field (bench/micro_core.py request: 12.9 -> 7.4 us).
    # Lowercasing maps tchars to tchars and leaves every other byte alone, so lowercase names will do.
    return (
        b"" in lowercase_names
        or bool(b"".join(lowercase_names).translate(None, _TCHAR))
        or _bad_value(b"".join(values))
    )


def _check_bytes(what, value):
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes")


def _check_int(what, value, low, high):
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an int")
    if not low <= value <= high:
        raise OverflowError(f"{what} must be in [{low}, {high}]")


def _valid_content_length(value):
    # RFC 9110 §8.6: Content-Length = 1*DIGIT. No sign, no hex, no inner spaces, and no list: the RFC
    # lets a recipient accept "5, 5", we refuse it (RFC 9112 §6.3 item 5) because front and back ends
    # that disagree on such a value are how requests get smuggled.
    value = value.strip(_OWS)
    return 0 < len(value) <= _MAX_CL_DIGITS and value.isdigit()


def _connection_options(value, options):
    # RFC 9110 §7.6.1 + §5.6.1: a comma list of case-insensitive tokens; empty elements are ignored.
    for element in value.split(b","):
        element = element.strip(_OWS).lower()
        if element:
            options.add(element)


def _upgrade_wanted(upgrade_values):
    # RFC 9110 §7.8: the client lists protocols in descending order of preference. We tunnel whatever
    # the backend accepts except h2c: RFC 9113 §3.1 deprecated that upgrade and we would have to speak
    # HTTP/2 ourselves to route its streams. No protocol at all: nothing to upgrade to.
    for value in upgrade_values:
        for element in value.split(b","):
            element = element.strip(_OWS)
            if element:
                return element.split(b"/", 1)[0].lower() != b"h2c"
    return False


def _alias(low):
    # Many servers (CGI/WSGI environ, PHP, some frameworks) map "-" and "_" to the same variable, and
    # some normalise runs of them, so "Content_Length" or "Transfer---Encoding" would reach the
    # application as if it were the real field while we never interpreted it (issue 14 item 10). The
    # kind the name would have once runs of "-" and "_" become one "-"; _OTHER if that is no name we know.
    if b"_" not in low and b"--" not in low:
        return _OTHER
    return _KINDS.get(_DASH_RUNS.sub(b"-", low), _OTHER)


def _split_fields(head, pos):
    """The field lines of ``head`` from ``pos`` (RFC 9112 §5), as ``(name, value)`` tuples with the value
    trimmed of OWS, or None if one of them is malformed. ``head`` ends with the CRLF of the last field
    line followed by the empty line's CRLF."""
    fields = []
    for line in head[pos:-4].split(b"\r\n") if pos < len(head) - 2 else ():
        # RFC 9112 §5.2: obs-fold (a line starting with SP or HTAB) is refused (DESIGN "Error table");
        # before the first field line it is §2.2's whitespace, which a server MUST reject too.
        if not line or line[0] in b" \t":
            return None
        name, colon, value = line.partition(b":")
        # RFC 9112 §5.1: no whitespace between the name and the colon (MUST 400): a token check.
        if not colon or _bad_name(name):
            return None
        value = value.strip(_OWS)
        # Bare CR or LF inside a line, NUL, and every other CTL (RFC 9112 §2.2, RFC 9110 §5.5).
        if len(value.translate(None, _VALUE_CTL)) != len(value):
            return None
        fields.append((name, value))
    return fields


def _request_line(head, max_request_line):
    """Check the request line at the start of ``head`` (RFC 9112 §2.2, §3).

    Returns ``(status, method, target, minor, fields_start)``: status 0 if the line is fine, else what
    to answer. The checks before the version are framing.request_start_problem's, in its order, so both
    answer the same status for the same bytes.
    """
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line (CRLF) received before the
    # request-line; one, not more: anything else before the method is refused.
    pos = 2 if head.startswith(b"\r\n") else 0
    eol = head.find(b"\r\n", pos)
    line = head[pos:eol]
    if not line or line[0] in b" \r\n" or b"\n" in line or b"\r" in line:
        return 400, b"", b"", 0, 0
    if line.startswith(b"PRI ") and line.endswith(b"HTTP/2.0"):
        return 505, b"", b"", 0, 0  # HTTP/2 prior knowledge (RFC 9113 §3.4)
    # RFC 9112 §3: request-line = method SP request-target SP HTTP-version. One separator is a missing
    # target or version (or a tab for a space): malformed, not HTTP/0.9 (issue 14 item 6).
    if line.count(b" ") != 2 or b"  " in line:
        return 400, b"", b"", 0, 0
    method, target, version = line.split(b" ")
    # RFC 9112 §3.1: method = token, checked before the length as request_start_problem does (it
    # refuses the first wrong byte of a method before the line is complete).
    if _bad_name(method):
        return 400, b"", b"", 0, 0
    if len(line) > max_request_line:
        return 414, b"", b"", 0, 0
    # RFC 9112 §3.2: the target is visible ASCII.
    if len(target.translate(None, _NOT_VCHAR)) != len(target):
        return 400, b"", b"", 0, 0
    # RFC 9112 §2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive.
    if len(version) != 8 or not version.startswith(b"HTTP/") or version[6] != 0x2E \
            or not (0x30 <= version[5] <= 0x39 and 0x30 <= version[7] <= 0x39):
        return 400, b"", b"", 0, 0
    if version[5] != 0x31:
        return 505, b"", b"", 0, 0  # HTTP/0.9, HTTP/2.0...: DESIGN "version other than 1.x"
    # RFC 9112 §2.3: a higher minor version of HTTP/1 is processed as HTTP/1.1 (issue 14 item 7).
    return 0, _METHODS.get(method, method), target, 0 if version[7] == 0x30 else 1, eol + 2


def parse_request(data, start, end, client_ip, proto, port, trust_xff, rid_prefix, rid_counter, authority,
                  max_request_line, max_header_bytes, max_headers):
    """Check one raw request head and build the head sent upstream: ``request_head`` from the bytes.

    ``data[start:end]`` is one request head, from where the previous request ended (so it may begin with
    the one empty line RFC 9112 §2.2 lets a server ignore) to just after its first CRLFCRLF.

    Returns ``(status, flags, method, target, host, request_id, content_length, head)``. ``status`` is 0
    (forward ``head``) or what fastlb answers: 400 malformed, 414/431 over the limits, 501 transfer coding,
    505 version, 405 CONNECT, 417 expectation (the connection is kept: flags and content_length still
    say how to skip the body). ``request_id`` is the client's X-Request-ID, else
    ``b"%s-%x" % (rid_prefix, rid_counter)``. When the request line or a field line is malformed (or
    over a limit) nothing else was read: flags 0, method and target ``b""``, host None.
    """
    _check_bytes("data", data)
    _check_int("start", start, 0, len(data))
    _check_int("end", end, start, len(data))
    for what, arg in (("client_ip", client_ip), ("proto", proto), ("port", port), ("rid_prefix", rid_prefix),
                      ("authority", authority)):
        _check_bytes(what, arg)
    _check_int("rid_counter", rid_counter, 0, _MASK64)
    for what, arg in (("max_request_line", max_request_line), ("max_header_bytes", max_header_bytes),
                      ("max_headers", max_headers)):
        _check_int(what, arg, 0, _MAX_LIMIT)

    head = data[start:end]
    if not head.endswith(b"\r\n\r\n"):
        # Not a head as the caller frames them; the bytes cannot be a request.
        return 400, 0, b"", b"", None, b"%s-%x" % (rid_prefix, rid_counter), 0, b""
    status, method, target, minor, pos = _request_line(head, max_request_line)
    if not status:
        # Limits (DESIGN "Error table"): the field section, CRLFs included, and its number of lines.
        if len(head) - pos > max_header_bytes or head.count(b"\r\n", pos) - 1 > max_headers:
            status = 431
        else:
            fields = _split_fields(head, pos)
            if fields is None:
                status = 400
    if status:
        return status, 0, b"", b"", None, b"%s-%x" % (rid_prefix, rid_counter), 0, b""
    status, flags, host, request_id, length, upstream_head = _request(
        method, target, fields, client_ip, proto, port, trust_xff, (rid_prefix, rid_counter), minor, authority
    )
    if not minor:
        flags |= F_HTTP10
    return status, flags, method, target, host, request_id, length, upstream_head


def request_head(method, target, headers, client_ip, proto, port, trust_xff, request_id):
    """Check a parsed client request and build the head sent upstream.

    Returns ``(error_status, flags, host, request_id, head)``. ``error_status`` is 0, or the status the
    proxy must answer with itself (400 malformed, 501 unsupported transfer coding, 417 unsupported
    expectation; see DESIGN.md "Error table"). A missing Host is not an error here: it depends on the
    HTTP version, which the caller knows (``flags & F_HAS_HOST``); so are the request-target's form and
    CONNECT (parse_request checks them).
    """
    for what, arg in (
        ("method", method),
        ("target", target),
        ("client_ip", client_ip),
        ("proto", proto),
        ("port", port),
        ("request_id", request_id),
    ):
        _check_bytes(what, arg)
    if not isinstance(headers, list):
        raise TypeError(_HEADERS_TYPE)
    status, flags, host, request_id, _, head = _request(
        method, target, headers, client_ip, proto, port, trust_xff, request_id, None, None
    )
    return status, flags, host, request_id, head


def _request(method, target, headers, client_ip, proto, port, trust_xff, request_id, minor, authority):
    """What request_head and parse_request share: classify the fields, check them, build the head.

    ``request_id``: bytes, or ``(prefix, counter)`` formatted only when the client sent none (issue 13).
    ``minor``: None when the caller knows the version and checks what depends on it (request_head),
    else 0 or 1: then the target's form, CONNECT, Host and Transfer-Encoding are checked against it too,
    and an HTTP/1.0 request without Host gets ``Host: authority`` (upstream is always HTTP/1.1).
    Returns ``(status, flags, host, request_id, content_length, head)``.
    """
    # The parser already checked the request line; these two checks only keep a caller bug from
    # turning into header injection upstream (RFC 9112 §3: method = token, target has no CTL or SP).
    bad = _bad_name(method) or not target or len(target.translate(None, _CTL_SP)) != len(target)
    host = None
    host_count = cl_count = te_count = 0
    cl_ok = te_chunked = te_misused = chunked_seen = False
    length = 0
    expect_seen = expect_bad = False
    options = set()
    upgrades = []
    forwarded_for = []
    client_request_id = None
    kinds = []
    lows = []
    values = []

    for item in headers:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(_HEADERS_TYPE)
        name, value = item
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise TypeError(_HEADERS_TYPE)
        low = name.lower()
        values.append(value)
        kind = _KINDS.get(low, _OTHER)
        if kind == _OTHER:
            alias = _alias(low)
            # Framing aliases are refused (DESIGN "Error table"); aliases of the fields we set are
            # dropped so they cannot shadow ours.
            if alias in (_HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING):
                bad = True
            elif alias in (_XFF, _XF_OTHER, _REQUEST_ID):
                kind = _DROP
        kinds.append(kind)
        lows.append(low)

        if kind == _OTHER or kind == _HOP or kind == _DROP or kind == _XF_OTHER:
            continue
        if kind == _HOST:
            # RFC 9112 §3.2: more than one Host field line is a 400.
            host_count += 1
            if host is None:
                host = value.strip(_OWS)
        elif kind == _CONTENT_LENGTH:
            cl_count += 1
            cl_ok = _valid_content_length(value)
            if cl_ok:
                length = int(value)
        elif kind == _TRANSFER_ENCODING:
            te_count += 1
            # RFC 9112 §7: coding names are case-insensitive, so "CHUNKED" is chunked.
            te_chunked = value.strip(_OWS).lower() == b"chunked"
            # RFC 9112 §6.1: chunked MUST be the final coding and MUST NOT be applied twice; a sender
            # that puts anything after it (another coding, an empty element, a second TE line) framed
            # the body in a way no recipient can delimit: 400, not 501 (as llhttp). No coding at all
            # is no valid Transfer-Encoding either.
            if not value.strip(_OWS):
                te_misused = True
            for element in value.split(b","):
                if chunked_seen:
                    te_misused = True
                if element.strip(_OWS).lower() == b"chunked":
                    chunked_seen = True
        elif kind == _CONNECTION:
            _connection_options(value, options)
        elif kind == _UPGRADE:
            value = value.strip(_OWS)
            if value:
                upgrades.append(value)
        elif kind == _EXPECT:
            # RFC 9110 §10.1.1: 100-continue is the only expectation defined; anything else gets 417.
            expect_seen = True
            if value.strip(_OWS).lower() != b"100-continue":
                expect_bad = True
        elif kind == _XFF:
            if trust_xff:
                value = value.strip(_OWS)
                if value:
                    forwarded_for.append(value)
        elif kind == _REQUEST_ID:
            if client_request_id is None:
                value = value.strip(_OWS)
                if value:
                    client_request_id = value

    if _bad_fields(lows, values):
        bad = True
    if host is not None and not _HOST_VALUE.fullmatch(host):
        bad = True  # RFC 9112 §3.2: an invalid Host field value (empty included: issue 14 item 8) is a 400
    bodyless = method in _BODYLESS
    if te_misused:
        bad = True
    if te_count and bodyless:
        # Issue 14 item 9: a GET/HEAD/TRACE body framed by Transfer-Encoding is refused, not normalised.
        # Normalising means buffering the whole body before the head can leave (its Content-Length
        # comes first), which costs unbounded memory or a limit of its own, for a request no client
        # needs to send; and a backend that ignores bodies on these methods reads the chunks as the
        # next request.
        bad = True

    flags = 0
    if cl_count == 1 and cl_ok:
        flags |= F_CONTENT_LENGTH
        if length and bodyless:
            flags |= F_AMBIGUOUS
    else:
        length = 0
    if te_count == 1 and te_chunked:
        flags |= F_CHUNKED
    if expect_seen and not expect_bad:
        flags |= F_EXPECT_CONTINUE
    if b"upgrade" in options and _upgrade_wanted(upgrades):
        flags |= F_UPGRADE
    if b"close" in options:
        flags |= F_CONN_CLOSE
    if b"keep-alive" in options:
        flags |= F_CONN_KEEPALIVE
    if host_count:
        flags |= F_HAS_HOST
    if client_request_id is not None:
        request_id = client_request_id
    elif isinstance(request_id, tuple):
        request_id = b"%s-%x" % request_id

    # Precedence: a framing error (400) hides everything else, then what we cannot decode (501), then
    # what depends on the request line, then the expectation (417: the only one after which the
    # connection may be kept).
    if bad or host_count > 1 or cl_count > 1 or (cl_count and not cl_ok) or (cl_count and te_count):
        # RFC 9112 §6.3 item 3: CL + TE "ought to be handled as an error"; a proxy that forwarded it
        # would have to pick one framing and hope the backend picks the same.
        return 400, flags, host, request_id, length, b""
    if te_count and not (te_count == 1 and te_chunked):
        # RFC 9112 §6.1: a server that receives a transfer coding it does not understand SHOULD answer
        # 501; we only decode chunked, applied once (§6.1: chunked MUST NOT be applied twice). When
        # chunked is not the final coding §6.3 item 4 says 400 instead; DESIGN's error table answers
        # 501 for every coding but chunked, and the connection closes either way.
        return 501, flags, host, request_id, length, b""
    if minor is not None:
        if method == b"CONNECT":
            return 405, flags, host, request_id, length, b""  # a load balancer is not a forward proxy
        if target[0] != 0x2F and not (target == b"*" and method == b"OPTIONS"):
            # absolute-form, authority-form and asterisk-form (outside OPTIONS) are refused: we route
            # on Host, and a target naming another host would make the two disagree (RFC 9112 §3.2).
            return 400, flags, host, request_id, length, b""
        if minor == 0 and te_count:
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message MUST be treated as faulty framing.
            return 400, flags, host, request_id, length, b""
        if minor and not host_count:
            return 400, flags, host, request_id, length, b""  # RFC 9112 §3.2: HTTP/1.1 requires Host
    if expect_bad:
        return 417, flags, host, request_id, length, b""

    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if not host_count and minor == 0:
        # We speak HTTP/1.1 upstream, which requires Host: name the authority the client reached.
        parts += (b"Host: ", authority, b"\r\n")
    for item, kind, low in zip(headers, kinds, lows, strict=True):
        if kind == _HOST or kind == _CONTENT_LENGTH or (kind in _LISTABLE and low not in options):
            parts += (item[0], b": ", item[1], b"\r\n")
    parts.append(b"X-Forwarded-For: ")
    if forwarded_for:
        parts += (b", ".join(forwarded_for), b", ")
    parts += (client_ip, b"\r\nX-Forwarded-Proto: ", proto, b"\r\nX-Forwarded-Port: ", port, b"\r\n")
    if host is not None:
        parts += (b"X-Forwarded-Host: ", host, b"\r\n")
    parts += (b"X-Request-ID: ", request_id, b"\r\n")
    if flags & F_CHUNKED:
        # We forward the body re-chunked as we decode it (TE is hop-by-hop, RFC 9110 §7.6.1).
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if flags & F_UPGRADE:
        # RFC 9110 §7.8: a proxy forwarding an upgrade must say so in its own Connection field.
        parts += (b"Upgrade: ", b", ".join(upgrades), b"\r\nConnection: upgrade\r\n")
    parts.append(b"\r\n")
    return 0, flags, host, request_id, length, b"".join(parts)


def parse_response(data, start, end, head_request, chunk_ok, close, max_header_bytes, max_headers):
    """Check one raw backend response head and build the head sent to the client: ``response_head``
    from the bytes ``data[start:end]`` (status line to just after the first CRLFCRLF).

    Returns ``(status, flags, content_length, head)``: ``status`` is the response's status code, or -1
    when the head is malformed, cannot be delimited or is over the limits (the caller answers 502,
    RFC 9112 §6.3 item 5). ``max_header_bytes`` bounds the whole head, status line included.
    """
    _check_bytes("data", data)
    _check_int("start", start, 0, len(data))
    _check_int("end", end, start, len(data))
    for what, arg in (("max_header_bytes", max_header_bytes), ("max_headers", max_headers)):
        _check_int(what, arg, 0, _MAX_LIMIT)
    head = data[start:end]
    if not head.endswith(b"\r\n\r\n") or len(head) > max_header_bytes:
        return -1, 0, 0, b""
    eol = head.find(b"\r\n")
    line = head[:eol]
    # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]. The SP before an
    # empty reason is often left out by servers; h11 and llhttp accept that, and so do we.
    if len(line) < 12 or line[8] != 0x20 or (len(line) > 12 and line[12] != 0x20):
        return -1, 0, 0, b""
    version, digits, reason = line[:8], line[9:12], line[13:]
    if not version.startswith(b"HTTP/1.") or not 0x30 <= version[7] <= 0x39 or not digits.isdigit() \
            or len(reason.translate(None, _VALUE_CTL)) != len(reason):
        return -1, 0, 0, b""  # reason-phrase = *( HTAB / SP / VCHAR / obs-text )
    if head.count(b"\r\n", eol + 2) - 1 > max_headers:
        return -1, 0, 0, b""
    fields = _split_fields(head, eol + 2)
    if fields is None:
        return -1, 0, 0, b""
    http10 = version[7] == 0x30
    status, flags, length, out = _response(int(digits), reason, fields, head_request, chunk_ok, close)
    if http10:
        flags |= F_HTTP10
        if flags & F_CHUNKED:
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message MUST be treated as faulty framing.
            status = 502
    if status:
        return -1, flags, 0, b""
    return int(digits), flags, length, out


def response_head(status, reason, headers, head_request, chunk_ok, close):
    """Check a parsed backend response and build the head sent to the client.

    Returns ``(error_status, flags, head)``; ``error_status`` is 0 or 502 (RFC 9112 §6.3 item 5: a proxy
    that receives a response it cannot delimit MUST answer 502). ``chunk_ok``: the client may receive
    chunked (HTTP/1.1, RFC 9112 §6.1); ``close``: the caller will close the client connection after this
    response.
    """
    if not isinstance(status, int):
        raise TypeError("status must be an int")
    _check_bytes("reason", reason)
    if not isinstance(headers, list):
        raise TypeError(_HEADERS_TYPE)
    error, flags, _, head = _response(status, reason, headers, head_request, chunk_ok, close)
    return error, flags, head


def _response(status, reason, headers, head_request, chunk_ok, close):
    """What response_head and parse_response share. Returns ``(error_status, flags, content_length,
    head)``."""
    # RFC 9112 §4: status-code = 3DIGIT; reason-phrase excludes CR/LF (and NUL: see _bad_value).
    bad = status < 100 or status > 999 or _bad_value(reason)
    cl_count = te_count = 0
    cl_ok = te_chunked = False
    length = 0
    options = set()
    upgrades = []
    kinds = []
    lows = []
    values = []
    for item in headers:
        if not isinstance(item, tuple) or len(item) != 2:
            raise TypeError(_HEADERS_TYPE)
        name, value = item
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise TypeError(_HEADERS_TYPE)
        low = name.lower()
        values.append(value)
        kind = _RESPONSE_KINDS.get(low, _OTHER)
        kinds.append(kind)
        lows.append(low)
        if kind == _CONTENT_LENGTH:
            cl_count += 1
            cl_ok = _valid_content_length(value)
            if cl_ok:
                length = int(value)
        elif kind == _TRANSFER_ENCODING:
            te_count += 1
            te_chunked = value.strip(_OWS).lower() == b"chunked"
        elif kind == _CONNECTION:
            _connection_options(value, options)
        elif kind == _UPGRADE:
            value = value.strip(_OWS)
            if value:
                upgrades.append(value)

    if _bad_fields(lows, values):
        bad = True

    flags = 0
    if cl_count == 1 and cl_ok:
        flags |= F_CONTENT_LENGTH
    else:
        length = 0
    if te_count == 1 and te_chunked:
        flags |= F_CHUNKED
    if b"close" in options:
        flags |= F_CONN_CLOSE
    if b"keep-alive" in options:
        flags |= F_CONN_KEEPALIVE
    if status == 101 and upgrades:
        # RFC 9110 §15.2.2: the 101 names the protocol in Upgrade; the caller switches to a tunnel.
        flags |= F_UPGRADE
    if 100 <= status < 200 or status == 204 or status == 304 or head_request:
        # RFC 9112 §6.3 item 1: these responses end with the header section whatever their fields say.
        flags |= F_NO_BODY
    elif not cl_count and not te_count:
        # RFC 9112 §6.3 item 8: no framing fields, the body runs until the backend closes.
        flags |= F_UNTIL_CLOSE

    # Unlike gzip in a request (501), a backend TE other than plain chunked is legal (RFC 9112 §6.1)
    # but we would have to decode it to re-frame the body: refuse it rather than guess.
    if bad or cl_count > 1 or (cl_count and not cl_ok) or (cl_count and te_count) or (
        te_count and not (te_count == 1 and te_chunked)
    ):
        return 502, flags, length, b""

    if not reason or reason == _REASONS.get(status):
        line = _STATUS_LINES.get(status)
        if line is None:
            line = b"HTTP/1.1 %d \r\n" % status
    else:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    parts = [line]
    for item, kind, low in zip(headers, kinds, lows, strict=True):
        if kind == _CONTENT_LENGTH or (kind == _OTHER and low not in options):
            parts += (item[0], b": ", item[1], b"\r\n")
    streamed = flags & (F_CHUNKED | F_UNTIL_CLOSE) and not flags & F_NO_BODY
    if streamed and chunk_ok:
        # We decode the backend's chunks (or read until its close) and chunk again towards the client.
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if flags & F_UPGRADE:
        parts += (b"Upgrade: ", b", ".join(upgrades), b"\r\nConnection: upgrade\r\n")
    elif close or (streamed and not chunk_ok):
        # An HTTP/1.0 client cannot receive chunked: the end of the connection delimits the body
        # (RFC 9112 §6.3 item 8), so the caller closes after it and says so.
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return 0, flags, length, b"".join(parts)


def head_end(data, start):
    """Where the head that begins at ``data[start]`` ends: the offset just past its CRLFCRLF (RFC 9112
    §2.1: a blank line ends the field section), or -1 when the bytes end before it.

    What ``data.find(b"\\r\\n\\r\\n", start) + 4`` says, as one C call per head: bytes.find is a
    varargs method, and parsing its arguments cost more than the search on the data path (issue 13).
    """
    _check_bytes("data", data)
    _check_int("start", start, 0, len(data))
    found = data.find(b"\r\n\r\n", start)
    return found + 4 if found >= 0 else -1


def head_and_body(head, data, start, stop):
    """``head + data[start:stop]`` as one new bytes object: a response head and the body bytes that came
    in the same read leave in one write, without a slice object and a join per response (issue 13)."""
    _check_bytes("head", head)
    _check_bytes("data", data)
    _check_int("start", start, 0, len(data))
    _check_int("stop", stop, start, len(data))
    return head + data[start:stop]


def find_field(data, start, end, name):
    """The value of the first field line named ``name`` in the head ``data[start:end]``, or None.

    For a head parse_request or parse_response built (or accepted): a field line begins after a CRLF,
    its name compares case-insensitively (RFC 9110 §5.1) and is followed by the colon at once (RFC 9112
    §5.1); the value runs to the next CRLF, without the OWS around it (RFC 9110 §5.5). So a balancer
    hashing on a header reads it from the upstream head without lowercasing a copy of it.
    """
    _check_bytes("data", data)
    _check_int("start", start, 0, len(data))
    _check_int("end", end, start, len(data))
    _check_bytes("name", name)
    key = b"\r\n" + name.lower() + b":"
    head = data[start:end]
    found = head.lower().find(key) if name else -1
    if found < 0:
        return None
    found += len(key)
    stop = head.find(b"\r\n", found)
    return head[found:stop if stop >= 0 else len(head)].strip(_OWS)


# FNV-1a 64 (Fowler/Noll/Vo, draft-eastlake-fnv §6): offset basis and prime.
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF


def hash64(data):
    """Stable 64-bit hash: FNV-1a 64, then MurmurHash3's fmix64 finaliser.

    No seed, so every worker, every machine and every restart agrees (hash routing must not move when
    a process restarts; Python's hash() is randomised per process). FNV-1a alone mixes its last bytes
    poorly into the high bits; fmix64 gives every input bit a ~50% chance to flip every output bit.
    """
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    h ^= h >> 33
    return h


# --- Host-wide rate limiting (issue 17) -----------------------------------------------------------------
#
# A GCRA token bucket (the generic cell rate algorithm, ITU-T I.371; what nginx's limit_req computes)
# keeps one number per key, its theoretical arrival time (TAT): a request at `now` is allowed if
# max(TAT, now) + interval - now <= burst * interval, and then that becomes the TAT.  One number per key
# means one 64-bit word per key, which every worker can update with one compare-and-swap in shared
# memory: the 16 high bits tag the key, the 48 low bits hold the TAT in microseconds (8.9 years).
# The table is set-associative: a key's hash picks a set of RATE_WAYS words; a key not found takes the
# word with the oldest TAT, so memory is bounded and the least recently seen key is evicted first (and
# a TAT already in the past is a full bucket: evicting it forgets nothing).
RATE_WAYS = 8
_TAT_BITS = 48
_TAT_MASK = (1 << _TAT_BITS) - 1
# The twin has no compare-and-swap: a POSIX semaphore serialises its read-modify-write instead.  Made
# at import, so it exists in the master (which imports this module to build the tables) before the
# fork, and every worker shares it.
_RATE_LOCK = _multiprocessing.get_context("fork").Lock()


def rate_take(table, key_hash, now_us, interval_us, burst_us):
    """Take one token for the key hashing to ``key_hash`` from the shared ``table``.

    ``table`` is a writable buffer of 64-bit words (a ``memoryview`` cast to ``"Q"``, its length a
    multiple of ``RATE_WAYS`` and a power of two). ``now_us`` is the caller's clock in microseconds,
    below 2**48; ``interval_us`` (> 0) is one token's time; ``burst_us`` = burst x interval.
    Returns 0 when the request is allowed, else how many microseconds until it would be.
    """
    if not isinstance(table, memoryview) or table.format != "Q" or table.readonly:
        raise TypeError("table must be a writable memoryview of format 'Q'")
    size = len(table)
    if size < RATE_WAYS or size & (size - 1):
        raise ValueError("table length must be a power of two, at least RATE_WAYS")
    _check_int("key_hash", key_hash, 0, _MASK64)
    _check_int("now_us", now_us, 0, _TAT_MASK)
    _check_int("interval_us", interval_us, 1, _TAT_MASK)
    _check_int("burst_us", burst_us, 0, _TAT_MASK)
    base = key_hash & (size - RATE_WAYS)
    tag = (key_hash >> _TAT_BITS) or 1  # 0 marks an empty word
    with _RATE_LOCK:
        victim, oldest = base, None
        for i in range(base, base + RATE_WAYS):
            word = table[i]
            if word >> _TAT_BITS == tag:
                tat = word & _TAT_MASK
                victim = i
                break
            if oldest is None or word & _TAT_MASK < oldest:
                victim, oldest = i, word & _TAT_MASK
        else:
            tat = 0
        tat = max(tat, now_us) + interval_us
        if tat - now_us > burst_us:
            return tat - now_us - burst_us
        table[victim] = tag << _TAT_BITS | min(tat, _TAT_MASK)
        return 0


_MAX_WEIGHT = 0x7FFFFFFF
_MAX_TABLE = 0x7FFFFFFF


def _is_prime(n):
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    d = 3
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


def _check_maglev_args(names, weights, size):
    if not isinstance(names, list) or not isinstance(weights, list):
        raise TypeError("names and weights must be lists")
    if not isinstance(size, int):
        raise TypeError("size must be an int")
    if len(names) != len(weights):
        raise ValueError("names and weights must have the same length")
    # Maglev's permutations only visit every slot when skip and size are coprime: a prime size makes
    # that true for every skip in [1, size-1] (paper §3.4).
    if not 2 <= size <= _MAX_TABLE or not _is_prime(size):
        raise ValueError("size must be a prime in [2, 2**31-1]")
    for name in names:
        if not isinstance(name, bytes):
            raise TypeError("names must be bytes")
    for weight in weights:
        if not isinstance(weight, int):
            raise TypeError("weights must be ints")
        if not 0 <= weight <= _MAX_WEIGHT:
            raise ValueError("weights must be in [0, 2**31-1]")


def maglev_table(names, weights, size):
    """Maglev lookup table (Eisenbud et al., NSDI 2016, §3.4) of ``size`` entries, each an index into
    ``names``; ``[]`` when no server has a positive weight.

    Server i's preference list is the permutation ``(offset + j*skip) % size`` with
    ``offset = hash64(name) % size`` and ``skip = hash64(name + b"#skip") % (size - 1) + 1``: it depends
    only on the name, so a server keeps its slots when others come and go, which is what bounds the
    disruption of a change to about 1/N of the keys.

    Weights use Envoy's weighted Maglev (source/common/upstream/maglev_lb.cc): the servers take turns
    in rounds 1, 2, 3...; in round t a server of weight w claims its next free preferred slot only while
    ``t * w >= claims * max_weight``, so over the build it claims slots in proportion to w, and a server
    of maximal weight behaves exactly as in unweighted Maglev. Weight 0: never placed.
    """
    _check_maglev_args(names, weights, size)
    servers = [i for i, weight in enumerate(weights) if weight > 0]
    if not servers:
        return []
    max_weight = max(weights)
    position = []
    skip = []
    for i in servers:
        position.append(hash64(names[i]) % size)
        skip.append(hash64(names[i] + b"#skip") % (size - 1) + 1)
    target = [0] * len(servers)
    table = [-1] * size
    filled = 0
    turn = 0
    while True:
        turn += 1
        for k, i in enumerate(servers):
            if turn * weights[i] < target[k]:
                continue
            target[k] += max_weight
            slot = position[k]
            while table[slot] >= 0:
                slot += skip[k]
                if slot >= size:
                    slot -= size
            table[slot] = i
            slot += skip[k]
            position[k] = slot - size if slot >= size else slot
            filled += 1
            if filled == size:
                return table


def maglev_lookup(table, key_hash):
    """The server index for a 64-bit key hash, or -1 when the table is empty."""
    if not isinstance(table, list):
        raise TypeError("table must be a list")
    if not isinstance(key_hash, int):
        raise TypeError("key_hash must be an int")
    if key_hash < 0 or key_hash > _MASK64:
        raise OverflowError("key_hash must be in [0, 2**64)")
    if not table:
        return -1
    return table[key_hash % len(table)]


# --- TLS ClientHello (issue 15: SNI passthrough) -------------------------------------------------------
#
# The front door peeks at the first bytes of a TLS connection without consuming them, to route on the
# server name before any decryption. Everything here reads attacker bytes: every length is checked
# against what is left before it is used, and no input makes it raise.

HELLO_MORE = 0  # a prefix of a ClientHello: read more, then call again with all the bytes so far
HELLO_OK = 1
HELLO_NOT_TLS = 2  # the first bytes are no TLS handshake record (e.g. plain HTTP sent to a TLS port)
HELLO_BAD = 3  # malformed, or not complete within HELLO_MAX bytes
# The records carrying the ClientHello (their 5-byte headers included) must end within the first
# HELLO_MAX bytes of the connection. One number bounds both the message and the caller's buffer; real
# ClientHellos are 0.2-2 KiB (1.8 KiB with an X25519MLKEM768 key share), and 16 KiB is also the most one
# record may carry (RFC 8446 §5.1), which is what OpenSSL reads in one go.
HELLO_MAX = 16384

_HANDSHAKE = 0x16  # ContentType handshake (RFC 8446 §5.1)
_CLIENT_HELLO = 1  # HandshakeType client_hello (RFC 8446 §4)
_EXT_SERVER_NAME = 0  # RFC 6066 §3
_EXT_ALPN = 16  # RFC 7301 §3.1
# RFC 6066 §3: HostName is an ASCII DNS name ("A-labels" for IDNs), no trailing-dot rule enforced. "_"
# is accepted because internal names use it; anything else (NUL, SP, "/", obs-text) is a malformed name.
_SNI_CHARS = b"-._0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_HOST_NAME_MAX = 255  # RFC 1035 §2.3.4, and OpenSSL's TLSEXT_MAXLEN_host_name
_NO_HELLO = (HELLO_BAD, None, ())


def _check_buffer(data):
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("data must be bytes or bytearray")


def parse_client_hello(data):
    """Read the TLS ClientHello at the start of ``data`` (the bytes received so far, from the first).

    Returns ``(status, sni, alpn)``: ``sni`` is the host_name of the server_name extension lowercased
    (RFC 6066 §3), or None; ``alpn`` the protocol names of the ALPN extension (RFC 7301 §3.1), ``()`` if
    absent. Both are None/``()`` unless status is HELLO_OK.

    The ClientHello may be fragmented over several handshake records (RFC 8446 §5.1) and those over TCP
    segments: records are reassembled first. Refused as HELLO_BAD: a later record that is not a
    handshake record of version 3.x, a zero-length or over-2^14 record (§5.1 MUST NOTs), a handshake
    message that is not a ClientHello, bytes after the ClientHello in its last record (a client's first
    flight is the ClientHello alone, §4.1.2), any length that overruns its container, an extensions block
    that does not fill the message exactly, a repeated server_name or ALPN extension (§4.2), a
    server_name that is not exactly one valid host_name (what OpenSSL accepts), an empty ALPN name.
    """
    _check_buffer(data)
    n = len(data)
    if n == 0:
        return HELLO_MORE, None, ()
    if data[0] != _HANDSHAKE or (n > 1 and data[1] != 3):
        return HELLO_NOT_TLS, None, ()
    message = bytearray()
    promised = 0  # message bytes the records seen so far announce (some may not have arrived)
    pos = 0
    while True:
        if n - pos < 5:
            if n > pos and (data[pos] != _HANDSHAKE or (n > pos + 1 and data[pos + 1] != 3)):
                return _NO_HELLO
            return HELLO_MORE, None, ()
        length = data[pos + 3] << 8 | data[pos + 4]
        if data[pos] != _HANDSHAKE or data[pos + 1] != 3 or length == 0 or pos + 5 + length > HELLO_MAX:
            return _NO_HELLO
        message += data[pos + 5:pos + 5 + length]
        promised += length
        pos += 5 + length
        if len(message) >= 1 and message[0] != _CLIENT_HELLO:
            return _NO_HELLO
        if len(message) >= 4:
            size = 4 + (message[1] << 16 | message[2] << 8 | message[3])
            if promised > size or 5 + size > HELLO_MAX:
                return _NO_HELLO
            if promised == size:
                if pos > n:
                    return HELLO_MORE, None, ()
                return _hello_body(bytes(message[4:]))
        if pos >= n:
            return HELLO_MORE, None, ()


def _hello_body(body):
    # RFC 8446 §4.1.2 (and RFC 5246 §7.4.1.2, whose extensions block may be absent): legacy_version,
    # random[32], legacy_session_id<0..32>, cipher_suites<2..2^16-2>, legacy_compression_methods<1..2^8-1>,
    # extensions<8..2^16-1>.
    end = len(body)
    if end < 35 or body[0] != 3:
        return _NO_HELLO
    pos = 35 + body[34]
    if body[34] > 32 or pos + 2 > end:
        return _NO_HELLO
    suites = body[pos] << 8 | body[pos + 1]
    pos += 2 + suites
    if suites < 2 or suites & 1 or pos + 1 > end:
        return _NO_HELLO
    methods = body[pos]
    pos += 1 + methods
    if methods < 1 or pos > end:
        return _NO_HELLO
    sni = None
    alpn = ()
    if pos == end:
        return HELLO_OK, sni, alpn
    if pos + 2 > end or pos + 2 + (body[pos] << 8 | body[pos + 1]) != end:
        return _NO_HELLO
    pos += 2
    seen_sni = seen_alpn = False
    while pos < end:
        if pos + 4 > end:
            return _NO_HELLO
        kind = body[pos] << 8 | body[pos + 1]
        size = body[pos + 2] << 8 | body[pos + 3]
        pos += 4
        if pos + size > end:
            return _NO_HELLO
        value = body[pos:pos + size]
        pos += size
        if kind == _EXT_SERVER_NAME:
            if seen_sni:
                return _NO_HELLO
            seen_sni = True
            sni = _server_name(value)
            if sni is None:
                return _NO_HELLO
        elif kind == _EXT_ALPN:
            if seen_alpn:
                return _NO_HELLO
            seen_alpn = True
            alpn = _alpn_names(value)
            if alpn is None:
                return _NO_HELLO
    return HELLO_OK, sni, alpn


def _server_name(value):
    # RFC 6066 §3: ServerNameList server_name_list<1..2^16-1> of (NameType name_type, HostName name).
    # Only host_name(0) exists, and the list "MUST NOT contain more than one name of the same
    # name_type": so exactly one entry, as OpenSSL requires. None when malformed.
    if len(value) < 5 or (value[0] << 8 | value[1]) != len(value) - 2 or value[2] != 0:
        return None
    size = value[3] << 8 | value[4]
    name = value[5:]
    if size != len(name) or not 0 < size <= _HOST_NAME_MAX or name.translate(None, _SNI_CHARS):
        return None
    return name.lower().decode("ascii")


def _alpn_names(value):
    # RFC 7301 §3.1: ProtocolName protocol_name_list<2..2^16-1>, ProtocolName<1..2^8-1> ("empty strings
    # MUST NOT be included"). None when malformed.
    if len(value) < 4 or (value[0] << 8 | value[1]) != len(value) - 2:
        return None
    names = []
    pos = 2
    while pos < len(value):
        size = value[pos]
        if size == 0 or pos + 1 + size > len(value):
            return None
        names.append(value[pos + 1:pos + 1 + size])
        pos += 1 + size
    return tuple(names)


# --- PROXY protocol v1 and v2 (issue 15) ---------------------------------------------------------------
#
# The spec is HAProxy's doc/proxy-protocol.txt ("the spec" below). A trusted L4 balancer in front of
# fastlb prepends one header to the connection; its addresses replace the socket's. Attacker-facing
# too (a listener only accepts it from trusted_proxies, but it parses before it knows the header is
# right), so the same rules as the ClientHello: bounds-checked, never raises on bytes.

PROXY_MORE = 0  # a prefix of a header: read more, then call again with all the bytes so far
PROXY_OK = 1
PROXY_LOCAL = 2  # valid, but keep the socket's own addresses (LOCAL, UNKNOWN, UNSPEC, UNIX, DGRAM)
PROXY_BAD = 3  # can no longer become a header: the spec says abort the connection
PROXY_V1_MAX = 107  # the spec §2.1: the longest v1 line, CRLF included

PP2_TYPE_CRC32C = 0x03  # the spec §2.2.3
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
# v2 address block sizes by family (the spec §2.2): UNSPEC, INET (2*4 + 2*2), INET6 (2*16 + 2*2), UNIX.
_V2_ADDRESS_SIZES = (0, 12, 36, 216)
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_HEX_ADDRESS = frozenset(b"0123456789abcdefABCDEF:.")
# "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", the longest text inet_pton(AF_INET6) accepts.
_IPV6_TEXT_MAX = 45
_PROXY_BAD = (PROXY_BAD, 0, None, 0, None, 0, ())
_PROXY_MORE = (PROXY_MORE, 0, None, 0, None, 0, ())

# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of RFC 4960 Appendix B.
_CRC32C_TABLE = []
for _i in range(256):
    _crc = _i
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1
    _CRC32C_TABLE.append(_crc)
del _i, _crc


def _crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def parse_proxy_header(data):
    """Read the PROXY protocol header (v1 or v2) at the start of ``data`` (the bytes received so far).

    Returns ``(status, consumed, src_ip, src_port, dst_ip, dst_port, tlvs)``. ``consumed`` is the header's
    length when status is PROXY_OK or PROXY_LOCAL (what follows it is the client's data), else 0.
    Addresses are in inet_ntop's canonical text (an IPv4-mapped IPv6 address stays IPv6) and set only
    for PROXY_OK. ``tlvs``: the v2 TLVs after the address block as ``(type, value)`` pairs, in order,
    for a v2 PROXY command (a LOCAL command's block is skipped unread, as the spec says to discard it).

    PROXY_LOCAL: a v2 LOCAL command, a v1 "PROXY UNKNOWN" line, or a v2 PROXY command for a family or
    transport fastlb does not proxy (UNSPEC, UNIX, DGRAM): the spec's fallback is the real endpoints.
    PROXY_BAD: anything else that is not a prefix of a header, and: a v1 line without its CRLF within 107
    bytes, a bare CR or LF in it, leading zeros, more than one space; a v2 version other than 2, a
    command, family or transport the spec leaves unassigned, an address block longer than the header,
    a TLV that overruns it, a CRC32C TLV that is not 4 bytes, repeated, or does not match (verified: the
    spec's MUST when the receiver supports it, and a wrong one means the header was damaged or forged).
    """
    _check_buffer(data)
    if not data:
        return _PROXY_MORE
    if data[0] == 0x0D:
        return _proxy_v2(bytes(data[:65551]))  # 16 + the largest 16-bit length: all a header can use
    return _proxy_v1(bytes(data[:PROXY_V1_MAX]))


def _proxy_v2(data):
    n = len(data)
    if data[:12] != _V2_SIGNATURE[:n]:
        return _PROXY_BAD
    if n < 13:
        return _PROXY_MORE
    if data[12] >> 4 != 2 or data[12] & 0xF > 1:  # version 2; LOCAL (0) or PROXY (1)
        return _PROXY_BAD
    if n < 14:
        return _PROXY_MORE
    family, transport = data[13] >> 4, data[13] & 0xF
    if family > 3 or transport > 2:
        return _PROXY_BAD
    if n < 16:
        return _PROXY_MORE
    end = 16 + (data[14] << 8 | data[15])
    if data[12] & 0xF == 0:
        # LOCAL: "discard the protocol block including the family"; the length still says how much.
        return (PROXY_LOCAL, end, None, 0, None, 0, ()) if n >= end else _PROXY_MORE
    pos = 16 + _V2_ADDRESS_SIZES[family]
    if pos > end:
        return _PROXY_BAD
    if n < end:
        return _PROXY_MORE
    tlvs = []
    crc_at = -1
    while pos < end:
        if pos + 3 > end:
            return _PROXY_BAD
        kind = data[pos]
        size = data[pos + 1] << 8 | data[pos + 2]
        if pos + 3 + size > end:
            return _PROXY_BAD
        if kind == PP2_TYPE_CRC32C:
            if size != 4 or crc_at >= 0:
                return _PROXY_BAD
            crc_at = pos + 3
        tlvs.append((kind, data[pos + 3:pos + 3 + size]))
        pos += 3 + size
    if crc_at >= 0:
        expected = int.from_bytes(data[crc_at:crc_at + 4], "big")
        if _crc32c(data[:crc_at] + b"\0\0\0\0" + data[crc_at + 4:end]) != expected:
            return _PROXY_BAD
    if transport != 1 or family not in (1, 2):
        # UNSPEC, UNIX, DGRAM: "falls back to the UNSPEC mode for the valid combinations above that it
        # does not support" (the spec §2.2), i.e. the real endpoints.
        return PROXY_LOCAL, end, None, 0, None, 0, tuple(tlvs)
    af, size = (_socket.AF_INET, 4) if family == 1 else (_socket.AF_INET6, 16)
    src = _socket.inet_ntop(af, data[16:16 + size])
    dst = _socket.inet_ntop(af, data[16 + size:16 + 2 * size])
    ports = 16 + 2 * size
    src_port = data[ports] << 8 | data[ports + 1]
    dst_port = data[ports + 2] << 8 | data[ports + 3]
    return PROXY_OK, end, src, src_port, dst, dst_port, tuple(tlvs)


def _proxy_v1(data):
    if data[:6] != _V1_PREFIX[:len(data)]:
        return _PROXY_BAD
    eol = data.find(b"\r\n")
    line = data[:eol] if eol >= 0 else data
    if eol < 0:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > PROXY_V1_MAX - 2:
            return _PROXY_BAD  # its CRLF could no longer end within the first 107 bytes
    if b"\r" in line or b"\n" in line:
        return _PROXY_BAD  # the spec §2.1: a single CR or LF never ends the line
    words = line[6:].split(b" ")
    complete = eol >= 0
    # The proto: "TCP4", "TCP6" or "UNKNOWN" (for UNKNOWN "the receiver must ignore anything presented
    # before the CRLF").
    if words[0] == b"UNKNOWN" and (complete or len(words) > 1):
        return (PROXY_LOCAL, eol + 2, None, 0, None, 0, ()) if complete else _PROXY_MORE
    if len(words) > 5 or (complete and len(words) != 5):
        return _PROXY_BAD
    if len(words) == 1:
        if complete or not any(p.startswith(words[0]) for p in _V1_PROTOCOLS):
            return _PROXY_BAD
        return _PROXY_MORE
    if words[0] not in (b"TCP4", b"TCP6"):
        return _PROXY_BAD
    af = _socket.AF_INET if words[0] == b"TCP4" else _socket.AF_INET6
    addresses = []
    for i, word in enumerate(words[1:], 1):
        last = i == len(words) - 1 and not complete
        if i <= 2:
            if last:
                return _PROXY_MORE if _address_prefix(word, af) else _PROXY_BAD
            address = _address(word, af)
            if address is None:
                return _PROXY_BAD
            addresses.append(address)
        elif not _port_prefix(word) or (not last and not word):
            return _PROXY_BAD
    if not complete:
        return _PROXY_MORE
    return PROXY_OK, eol + 2, addresses[0], int(words[3]), addresses[1], int(words[4]), ()


def _address(word, af):
    # The spec §2.1: IPv4 as four decimal numbers without leading zeros, IPv6 as RFC 4291 text; glibc's
    # inet_pton accepts exactly that (it refuses "01.2.3.4", "1.2.3" and "0x1.2.3.4").
    if not word or not set(word) <= _HEX_ADDRESS:
        return None
    try:
        return _socket.inet_ntop(af, _socket.inet_pton(af, word.decode("ascii")))
    except OSError:
        return None


def _address_prefix(word, af):
    # Can `word` still grow into an address of family `af`? Exact for IPv4; for IPv6 only the alphabet
    # and the length (the line is judged again when its CRLF arrives, within 107 bytes anyway).
    if not set(word) <= _HEX_ADDRESS:
        return False
    if af == _socket.AF_INET6:
        return len(word) <= _IPV6_TEXT_MAX
    parts = word.split(b".")
    if len(parts) > 4:
        return False
    for i, part in enumerate(parts):
        if not part:
            if i != len(parts) - 1:
                return False
        elif not part.isdigit() or len(part) > 3 or (len(part) > 1 and part[0] == 0x30) or int(part) > 255:
            return False
    return True


def _port_prefix(word):
    # The spec §2.1: a port is a decimal integer in [0..65535] without leading zeros. Also true for
    # every prefix of one (the empty word included).
    if not word:
        return True
    return word.isdigit() and len(word) <= 5 and (len(word) == 1 or word[0] != 0x30) and int(word) <= 65535


def _address_bytes(ip, what):
    if not isinstance(ip, str):
        raise TypeError(f"{what} must be a str")
    for af in (_socket.AF_INET, _socket.AF_INET6):
        try:
            return af, _socket.inet_pton(af, ip)
        except (OSError, ValueError):  # ValueError: an embedded NUL
            pass
    raise ValueError(f"{what} is not an IP address: {ip!r}")


def _proxy_endpoints(src_ip, src_port, dst_ip, dst_port):
    src_af, src = _address_bytes(src_ip, "src_ip")
    dst_af, dst = _address_bytes(dst_ip, "dst_ip")
    for what, port in (("src_port", src_port), ("dst_port", dst_port)):
        if not isinstance(port, int):
            raise TypeError(f"{what} must be an int")
        if not 0 <= port <= 65535:
            raise ValueError(f"{what} must be in [0, 65535]")
    if src_af != dst_af:
        # The header carries one family; an IPv4 address is written as its IPv4-mapped IPv6 form
        # (RFC 4291 §2.5.5.2), which is what a dual-stack socket reports for it anyway.
        if src_af == _socket.AF_INET:
            src = b"\0" * 10 + b"\xff\xff" + src
        else:
            dst = b"\0" * 10 + b"\xff\xff" + dst
    return (_socket.AF_INET6 if src_af != dst_af else src_af), src, dst


def proxy_header_v1(src_ip, src_port, dst_ip, dst_port):
    """The PROXY protocol v1 line for a TCP connection (the spec §2.1), addresses in canonical text."""
    af, src, dst = _proxy_endpoints(src_ip, src_port, dst_ip, dst_port)
    return b"PROXY %s %s %s %d %d\r\n" % (
        b"TCP4" if af == _socket.AF_INET else b"TCP6",
        _socket.inet_ntop(af, src).encode("ascii"),
        _socket.inet_ntop(af, dst).encode("ascii"),
        src_port,
        dst_port,
    )


def proxy_header_v2(src_ip, src_port, dst_ip, dst_port):
    """The PROXY protocol v2 header for a TCP connection (the spec §2.2): PROXY command, STREAM, no TLV."""
    af, src, dst = _proxy_endpoints(src_ip, src_port, dst_ip, dst_port)
    family = b"\x11\x00\x0c" if af == _socket.AF_INET else b"\x21\x00\x24"
    return _V2_SIGNATURE + b"\x21" + family + src + dst + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
