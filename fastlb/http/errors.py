"""Responses fastlb itself answers with (DESIGN.md error table), pre-encoded at import time.

Only the Date and X-Request-ID values change per response, so each status keeps two byte prefixes
(keep-alive and close) and the per-response work is one join.
"""

from http import HTTPStatus

_STATUSES = (400, 403, 404, 405, 408, 413, 414, 417, 431, 500, 501, 502, 503, 504, 505)


def _encode(status: int, close: bool) -> tuple[bytes, bytes]:
    phrase = HTTPStatus(status).phrase.encode()
    body = b"%d %s\n" % (status, phrase)
    head = (
        b"HTTP/1.1 %d %s\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Cache-Control: no-store\r\n"
        b"%s"
        b"Date: " % (status, phrase, len(body), b"Connection: close\r\n" if close else b"")
    )
    return head, body


_PREFIX = {(s, c): _encode(s, c) for s in _STATUSES for c in (False, True)}


def error_response(status: int, request_id: bytes, date: bytes, close: bool, head_request: bool = False) -> bytes:
    """head_request: the answer to HEAD has the same head but no body (RFC 9110 §9.3.2)."""
    head, body = _PREFIX[(status, close)]
    return b"".join((head, date, b"\r\nX-Request-ID: ", request_id, b"\r\n\r\n",
                     b"" if head_request else body))


def redirect_response(location: bytes, request_id: bytes, date: bytes, close: bool) -> bytes:
    """308 keeps the method and body (RFC 9110 §15.4.9), unlike 301, so a POST is not turned into a GET."""
    return b"".join((
        b"HTTP/1.1 308 Permanent Redirect\r\nLocation: ", location,
        b"\r\nContent-Length: 0\r\n", b"Connection: close\r\n" if close else b"",
        b"Date: ", date, b"\r\nX-Request-ID: ", request_id, b"\r\n\r\n",
    ))


def local_response(status: int, fields: bytes, body: bytes, request_id: bytes, date: bytes, close: bool,
                   head_request: bool = False) -> bytes:
    """An answer a route policy or a hook made (401, 429, a hook's Response): `fields` are its own
    field lines, each ending in CRLF; fastlb adds the framing, Date and X-Request-ID."""
    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""  # RFC 9112 §4: the reason phrase may be empty
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, phrase), fields, b"Content-Length: %d\r\n" % len(body),
        b"Connection: close\r\n" if close else b"", b"Date: ", date, b"\r\nX-Request-ID: ", request_id,
        b"\r\n\r\n", b"" if head_request else body,
    ))
