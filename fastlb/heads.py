"""Editing a head that core.parse_request or core.parse_response already built, for the routes that ask
(a hook's set_header, remove_header and path; a route's header rules and rewrite).

A head here is always one fastlb wrote: a start line, field lines ``Name: value`` each ended by CRLF,
and the empty line.  So an edit is a split on CRLF, list work, and a join; it runs only for a route with
header rules, a rewrite or a hook, and the head of every other route is never touched.

Framing and hop-by-hop fields cannot be set or removed (RFC 9112 §6.1 and §6.3, RFC 9110 §7.6.1):
fastlb framed the message it forwards and decides the connection's life, so a rule or a hook that
changed them would desynchronise the two sides, the request smuggling a proxy exists to prevent.
"""

import re

# RFC 9110 §5.6.2 token: what a field name may be.
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# RFC 9110 §5.5: a field value never holds CR, LF or NUL (obs-text is allowed).
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
PROTECTED = frozenset((
    b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"te", b"trailer",
    b"upgrade", b"proxy-connection",
))


def field_name(name) -> bytes:
    """A header name as bytes, checked: a token, and not one of the framing fields."""
    raw = name.encode("latin-1") if isinstance(name, str) else bytes(name)
    if not _TOKEN.fullmatch(raw):
        raise ValueError(f"invalid header name {name!r}")
    if raw.lower() in PROTECTED:
        raise ValueError(f"{name!r} frames the message or the connection: fastlb owns it")
    return raw


def field_value(value) -> bytes:
    raw = value.encode("latin-1") if isinstance(value, str) else bytes(value)
    if _BAD_VALUE.search(raw):
        raise ValueError(f"invalid header value {value!r}: CR, LF and NUL are not allowed")
    return raw.strip(b" \t")


class Head:
    """A head split into its start line and its fields, edited, then joined once."""

    __slots__ = ("start", "fields")

    def __init__(self, head: bytes):
        lines = head[:-4].split(b"\r\n")
        self.start = lines[0]
        self.fields = [line.split(b":", 1) for line in lines[1:]]

    def get(self, name: bytes):
        """The first value of field `name` (lowercase bytes), OWS stripped, or None."""
        for field in self.fields:
            if field[0].lower() == name:
                return field[1].strip(b" \t")
        return None

    def get_all(self, name: bytes) -> list:
        return [f[1].strip(b" \t") for f in self.fields if f[0].lower() == name]

    def remove(self, name: bytes) -> None:
        low = name.lower()
        self.fields = [f for f in self.fields if f[0].lower() != low]

    def set(self, name: bytes, value: bytes) -> None:
        self.remove(name)
        self.fields.append([name, b" " + value])

    def target(self) -> bytes:
        return self.start.split(b" ", 2)[1]

    def set_target(self, target: bytes) -> None:
        method, _, version = self.start.split(b" ", 2)
        self.start = b" ".join((method, target, version))

    def bytes(self) -> bytes:
        parts = [self.start]
        parts.extend(b":".join(f) for f in self.fields)
        parts.append(b"\r\n")
        return b"\r\n".join(parts)
