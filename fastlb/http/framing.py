"""RFC 9112 message framing that fastlb checks itself, before llhttp parses the bytes.

httptools hands the worker parsed parts but never says where a message ends in the bytes it was given,
and llhttp forgives a few things at the start of a request.  So http/client.py finds every boundary
itself (a head ends at its CRLFCRLF, a body after Content-Length bytes or where ChunkedBody says) and
feeds llhttp one unit at a time; this module holds the two rules that need more than a `find`.
"""


def request_start_problem(line: bytes, start: int) -> int | None:
    """What llhttp forgives at the start of a request, and fastlb refuses before it parses it: a bare
    CR or LF, or more than one empty line, before the request line (RFC 9112 §2.2 allows one CRLF),
    and a request line that is not exactly METHOD SP TARGET SP VERSION (§3: single spaces).
    `line[start:]` is what the request begins with.  Returns the status to answer, 0 if fine, None
    if the request line is not complete yet.  Runs once per request: offsets, so nothing is copied."""
    skip = 2 if line.startswith(b"\r\n", start) else 0
    first = line[start + skip:start + skip + 1]
    if first in (b"\r", b"\n", b" ") and (skip or first != b"\r" or len(line) > start + 1):
        return 400  # a bare CR or LF, a second empty line, or a leading space
    start += skip
    end = line.find(b"\n", start)
    if end < 0:
        return None
    if line[end - 1] != 13 or end - 1 <= start:  # 13: CR
        return 400
    spaces = line.count(b" ", start, end - 1)
    if spaces == 1:
        return 505  # HTTP/0.9: METHOD SP TARGET and no version
    if line.startswith(b"PRI ", start) and line.startswith(b"HTTP/2.0", end - 9):
        # HTTP/2 prior knowledge (RFC 9113 §3.4). llhttp only says so after the preface's "SM" line,
        # past the head boundary fastlb feeds it up to.
        return 505
    if spaces != 2 or line.find(b"  ", start, end - 1) >= 0:
        return 400
    return 0


# Bytes of chunk extensions (everything between a chunk size and its CRLF) allowed per message. They are
# dropped, never forwarded, so all a large amount can do is cost us parsing time (llhttp sets no limit).
CHUNK_EXTENSIONS_MAX = 4096
CHUNKED_MORE = -1  # ChunkedBody.scan: the data ended inside the body
CHUNKED_BAD = -2  # ChunkedBody.scan: the framing is malformed (answer 400)

# ChunkedBody states: where the next byte falls in RFC 9112 §7.1's grammar.
_C_SIZE_FIRST = 0  # first HEXDIG of a chunk-size
_C_SIZE = 1  # more HEXDIG, or the start of chunk-ext, or CR
_C_EXT = 2  # chunk-ext, up to CR
_C_SIZE_LF = 3  # LF ending the chunk-size line
_C_DATA = 4  # `size` bytes of chunk-data left
_C_DATA_CR = 5  # CR after chunk-data
_C_DATA_LF = 6
_C_TRAILER_START = 7  # a trailer field line, or the CR of the final CRLF
_C_TRAILER = 8  # inside a trailer field line, up to CR
_C_TRAILER_LF = 9
_C_END_LF = 10  # LF of the final CRLF
_C_DONE = 11
_C_BAD = 12

_HEXDIG = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


class ChunkedBody:
    """Finds where a chunked request body ends on the wire (RFC 9112 §7.1), across any split into reads.

    httptools reports decoded body bytes but not where a message ends in the bytes it was given, so
    the worker walks the framing itself and feeds llhttp no further than the end of the body: the bytes
    after it are the next request, which fastlb checks before llhttp parses them. The two parsers must
    agree on that boundary (http/client.py checks that llhttp completes the message exactly there).

    Only the framing is checked here: hex digits (at most a signed 64-bit size), CRLF line ends (a bare
    CR or LF is refused, as llhttp does), and at most CHUNK_EXTENSIONS_MAX bytes of extensions per body.
    The syntax of extensions and trailer fields is llhttp's to check.
    """

    __slots__ = ("state", "size", "extensions")

    def __init__(self):
        self.state = _C_SIZE_FIRST
        self.size = 0
        self.extensions = 0

    def scan(self, data, start):
        """Walk ``data[start:]``. Returns the offset just past the body's final CRLF, CHUNKED_MORE if
        the body goes on after ``data``, or CHUNKED_BAD. Once the body ended, returns ``start``."""
        end = len(data)
        state = self.state
        size = self.size
        pos = start
        while pos < end and state < _C_DONE:
            if state == _C_DATA:
                step = min(size, end - pos)
                size -= step
                pos += step
                if not size:
                    state = _C_DATA_CR
                continue
            if state == _C_EXT or state == _C_TRAILER:
                # Jump to the CR that ends the line; an LF before it is a bare LF.
                cr = data.find(b"\r", pos)
                stop = end if cr < 0 else cr
                if data.find(b"\n", pos, stop) >= 0:
                    state = _C_BAD
                    break
                if state == _C_EXT:
                    self.extensions += stop - pos
                    if self.extensions > CHUNK_EXTENSIONS_MAX:
                        state = _C_BAD
                        break
                pos = stop
                if cr >= 0:
                    state = _C_SIZE_LF if state == _C_EXT else _C_TRAILER_LF
                    pos += 1
                continue
            byte = data[pos]
            pos += 1
            if state == _C_SIZE_FIRST or state == _C_SIZE:
                digit = _HEXDIG.get(byte)
                if digit is not None:
                    if size >> 59:
                        state = _C_BAD  # the next digit would take it past 2**63 - 1
                    else:
                        size = size * 16 + digit
                        state = _C_SIZE
                elif state == _C_SIZE_FIRST or byte == 10:
                    state = _C_BAD
                elif byte == 13:
                    state = _C_SIZE_LF
                else:
                    state = _C_EXT
                    pos -= 1  # this byte is the first of the extensions
            elif state == _C_SIZE_LF:
                if byte != 10:
                    state = _C_BAD
                elif size:
                    state = _C_DATA
                else:
                    state = _C_TRAILER_START
            elif state == _C_DATA_CR:
                state = _C_DATA_LF if byte == 13 else _C_BAD
            elif state == _C_DATA_LF:
                state = _C_SIZE_FIRST if byte == 10 else _C_BAD
            elif state == _C_TRAILER_START:
                if byte == 13:
                    state = _C_END_LF
                elif byte == 10:
                    state = _C_BAD
                else:
                    state = _C_TRAILER
            elif state == _C_TRAILER_LF:
                state = _C_TRAILER_START if byte == 10 else _C_BAD
            else:  # _C_END_LF
                if byte != 10:
                    state = _C_BAD
                else:
                    state = _C_DONE
                    self.state = state
                    self.size = 0
                    return pos
        self.state = state
        self.size = size
        if state == _C_BAD:
            return CHUNKED_BAD
        if state == _C_DONE:
            return start
        return CHUNKED_MORE
