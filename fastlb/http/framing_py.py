"""RFC 9112 message framing beyond the head: where a chunked body ends, and what it carries.

The one source of ``fastlb.http.framing``: compiled by Cython as ``framing_c`` (typed by
``framing_c.pxd``), and run as it is when ``FASTLB_NO_EXTENSIONS=1``.  ``core.parse_request`` and
``core.parse_response`` parse heads; this module walks what follows a head that says
``Transfer-Encoding: chunked``, on requests and responses alike, and hands back the decoded payload so
the proxy re-frames it itself (one framing on each side, ours: the peer never parses the sender's).
"""

# Bytes of chunk extensions (everything between a chunk size and its CRLF) allowed per message. They are
# dropped, never forwarded, so all a large amount can do is cost us parsing time (llhttp sets no limit).
CHUNK_EXTENSIONS_MAX = 4096
CHUNKED_MORE = -1  # ChunkedBody.scan: the data ended inside the body
CHUNKED_BAD = -2  # ChunkedBody.scan: the framing is malformed (answer 400, or 502 for a response)

# ChunkedBody states: where the next byte falls in RFC 9112 §7.1's grammar.
_C_SIZE_FIRST = 0  # first HEXDIG of a chunk-size
_C_SIZE = 1  # more HEXDIG, or the start of chunk-ext, or CR
_C_EXT = 2  # chunk-ext, up to CR
_C_SIZE_LF = 3  # LF ending the chunk-size line
_C_DATA = 4  # `size` bytes of chunk-data left
_C_DATA_CR = 5  # CR after chunk-data
_C_DATA_LF = 6
_C_TRAILER_START = 7  # a trailer field line, or the CR of the final CRLF
_C_TRAILER_NAME = 8  # inside a trailer field name, up to ':'
_C_TRAILER = 9  # inside a trailer field value, up to CR
_C_TRAILER_LF = 10
_C_END_LF = 11  # LF of the final CRLF
_C_DONE = 12
_C_BAD = 13

# HEXDIG value + 1 by byte (0: not a hex digit), and tchar (RFC 9110 §5.6.2) by byte.
_HEX = bytes(int(chr(c), 16) + 1 if chr(c) in "0123456789abcdefABCDEF" else 0 for c in range(256))
_TCHAR = bytes(chr(c) in "!#$%&'*+-.^_`|~" or chr(c).isalnum() and c < 128 for c in range(256))


def request_start_problem(line, start):
    """What fastlb refuses at the start of a request, checked as soon as the request line is complete
    (before the rest of the head has arrived): a bare CR or LF, or more than one empty line, before the
    request line (RFC 9112 §2.2 allows one CRLF), and a request line that is not exactly METHOD SP
    TARGET SP VERSION (§3: single spaces).  ``core.parse_request`` applies the same rules to a whole
    head; this early check only answers sooner a client that will never send a valid one.
    `line[start:]` is what the request begins with.  Returns the status to answer, 0 if fine, None
    if the request line is not complete yet."""
    skip = 2 if line.startswith(b"\r\n", start) else 0
    first = line[start + skip:start + skip + 1]
    if first in (b"\r", b"\n", b" ") and (skip or first != b"\r" or len(line) > start + 1):
        return 400  # a bare CR or LF, a second empty line, or a leading space
    start += skip
    end = line.find(b"\n", start)
    space = line.find(b" ", start, end if end >= 0 else len(line))
    for i in range(start, space if space >= 0 else (end if end >= 0 else len(line))):
        if not _TCHAR[line[i]] and line[i] != 13:
            return 400  # the method is a token (RFC 9112 §3.1): refused at its first wrong byte
    if end < 0:
        return None
    if line[end - 1] != 13 or end - 1 <= start:  # 13: CR
        return 400
    if line.find(b"\r", start, end - 1) >= 0:
        return 400  # a bare CR inside the line, refused before the version as core.parse_request does
    spaces = line.count(b" ", start, end - 1)
    if line.startswith(b"PRI ", start) and line.startswith(b"HTTP/2.0", end - 9):
        return 505  # HTTP/2 prior knowledge (RFC 9113 §3.4)
    if spaces != 2 or line.find(b"  ", start, end - 1) >= 0:
        return 400  # one separator (no target, or HTTP/0.9) is a 400 too (RFC 9112 §3)
    return 0


class ChunkedBody:
    """Walks a chunked body (RFC 9112 §7.1) across any split into reads: finds where it ends on the wire
    and collects its payload.

    Checked here, since no other parser sees these bytes: hex digits (at most a signed 64-bit size),
    CRLF line ends (a bare CR or LF is refused), extensions that begin with ';' or whitespace (§7.1.1)
    and hold no control character, at most CHUNK_EXTENSIONS_MAX bytes of them per body, and trailer
    field lines that are `token ":" value` without obs-fold (§7.1.2, §5.2), at most `trailer_max` bytes.
    Extensions and trailers are checked and dropped: a proxy may discard trailers (§7.1.2).
    """

    def __init__(self, trailer_max):
        self.state = _C_SIZE_FIRST
        self.size = 0
        self.extensions = 0
        self.trailers = 0
        self.trailer_max = trailer_max

    def scan(self, data, start, end, out):
        """Walk ``data[start:end]``, appending the chunk-data found to ``out``.  Returns the offset just
        past the body's final CRLF, CHUNKED_MORE if the body goes on after ``end``, or CHUNKED_BAD."""
        state = self.state
        size = self.size
        pos = start
        while pos < end and state < _C_DONE:
            if state == _C_DATA:
                step = end - pos
                if size < step:
                    step = size
                out.append(data if step == len(data) else data[pos:pos + step])
                size -= step
                pos += step
                if not size:
                    state = _C_DATA_CR
                continue
            byte = data[pos]
            pos += 1
            if state == _C_SIZE_FIRST or state == _C_SIZE:
                digit = _HEX[byte]
                if digit:
                    if size >> 59:
                        state = _C_BAD  # the next digit would take it past 2**63 - 1
                    else:
                        size = size * 16 + digit - 1
                        state = _C_SIZE
                elif state == _C_SIZE_FIRST:
                    state = _C_BAD
                elif byte == 13:
                    state = _C_SIZE_LF
                elif byte == 59 or byte == 32 or byte == 9:  # ';' or BWS before it
                    state = _C_EXT
                    self.extensions += 1
                else:
                    state = _C_BAD
            elif state == _C_EXT:
                stop = _line_end(data, pos - 1, end)
                self.extensions += stop - pos + 1
                if stop < 0 or self.extensions > CHUNK_EXTENSIONS_MAX:
                    state = _C_BAD
                elif stop < end:
                    pos = stop + 1
                    state = _C_SIZE_LF
                else:
                    pos = end
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
                elif _TCHAR[byte]:  # a leading SP or HTAB would be obs-fold (RFC 9112 §5.2)
                    state = _C_TRAILER_NAME
                    self.trailers += 1
                else:
                    state = _C_BAD
            elif state == _C_TRAILER_NAME:
                self.trailers += 1
                if byte == 58:  # ':'
                    state = _C_TRAILER
                elif not _TCHAR[byte] or self.trailers > self.trailer_max:
                    state = _C_BAD
            elif state == _C_TRAILER:
                stop = _line_end(data, pos - 1, end)
                self.trailers += stop - pos + 1
                if stop < 0 or self.trailers > self.trailer_max:
                    state = _C_BAD
                elif stop < end:
                    pos = stop + 1
                    state = _C_TRAILER_LF
                else:
                    pos = end
            elif state == _C_TRAILER_LF:
                state = _C_TRAILER_START if byte == 10 else _C_BAD
            else:  # _C_END_LF
                state = _C_DONE if byte == 10 else _C_BAD
        self.state = state
        self.size = size
        if state == _C_DONE:
            return pos
        if state == _C_BAD:
            return CHUNKED_BAD
        return CHUNKED_MORE


def _line_end(data, start, end):
    """Where the CR that ends the line going on at data[start] is (end if not in this read), or -1 if a
    control character other than HTAB comes first (a bare LF above all: RFC 9110 §5.5 field values;
    §7.1.1 extensions are tokens and quoted strings, which admit none either)."""
    stop = data.find(b"\r", start, end)
    if stop < 0:
        stop = end
    return -1 if _has_ctl(data, start, stop) else stop


def _has_ctl(data, start, stop):
    """A control character other than HTAB in data[start:stop]."""
    for i in range(start, stop):
        c = data[i]
        if (c < 32 and c != 9) or c == 127:
            return True
    return False
