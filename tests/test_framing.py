"""http/framing: where a request may begin, and where a chunked body ends on the wire and what it carries.

llhttp is the oracle: on every body llhttp accepts, ChunkedBody must end the body at the same byte and
decode the same payload, or refuse it (checked byte by byte).  The request-start rule is tested through
the real server by the corpus (tests/test_hardening.py); here only its offset arithmetic.  Runs against
the compiled module and the uncompiled source alike (whichever the build provides).
"""

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlb.http.framing import CHUNKED_BAD as BAD
from fastlb.http.framing import CHUNKED_MORE as MORE
from fastlb.http.framing import ChunkedBody, request_start_problem

HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("line", "status"),
    [
        (b"GET / HTTP/1.1\r\n", 0),
        (b"\r\nGET / HTTP/1.1\r\n", 0),  # RFC 9112 §2.2: one empty line before is fine
        (b"\r", None),  # maybe the start of that empty line
        (b"GET / HTTP/1.1", None),
        (b"\r\n\r\nGET / HTTP/1.1\r\n", 400),
        (b"\nGET / HTTP/1.1\r\n", 400),
        (b"\rGET / HTTP/1.1\r\n", 400),
        (b" GET / HTTP/1.1\r\n", 400),
        (b"GET / HTTP/1.1\n", 400),
        (b"GET  / HTTP/1.1\r\n", 400),
        (b"GET / HTTP/1.1 \r\n", 400),
        (b"GET /\r\n", 400),  # one separator: a missing version or target is a 400 (RFC 9112 §3)
        (b"GET\t/ HTTP/1.1\r\n", 400),
        (b"PRI * HTTP/2.0\r\n", 505),
        (b"PRI / HTTP/2.0\r\n", 505),
        (b"PRI * HTTP/1.1\r\n", 0),  # llhttp refuses it (400): PRI is only the h2 preface's method
    ],
)
@pytest.mark.parametrize("prefix", [b"", b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab"])
def test_request_start_problem_at_any_offset(line, status, prefix):
    assert request_start_problem(prefix + line, len(prefix)) == status


def scan_payload(data: bytes, cuts) -> tuple[int, bytes]:
    """Scan `data` delivered as reads cut at `cuts`: the end offset in `data` (or MORE / BAD), and the
    payload decoded up to there."""
    body = ChunkedBody(16384)
    out = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        piece = data[start:cut]
        end = body.scan(piece, 0, len(piece), out)
        if end == BAD:
            return BAD, b"".join(out)
        if end >= 0:
            return start + end, b"".join(out)
        start = cut
    return MORE, b"".join(out)


def scan_split(data: bytes, cuts) -> int:
    return scan_payload(data, cuts)[0]


@pytest.mark.parametrize(
    "body",
    [
        b"0\r\n\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"5;a=b\r\nhello\r\n0;last\r\n\r\n",
        b"A\r\n0123456789\r\n000\r\nX-Sum: 1\r\nY: 2\r\n\r\n",
        b"1\r\n\r\r\n1\r\n\n\r\n0\r\n\r\n",  # CR and LF as chunk data are data
    ],
)
def test_valid_bodies_end_exactly(body):
    for cut in range(len(body) + 1):
        assert scan_split(body + b"GET / HTTP/1.1\r\n", [cut]) == len(body)


@pytest.mark.parametrize(
    "body",
    [
        b"\r\n",  # no size
        b"x\r\n",
        b";a\r\n",
        b"5\nhello\r\n0\r\n\r\n",  # bare LF ending the size line
        b"5\rhello\r\n0\r\n\r\n",  # bare CR
        b"5;a\nb\r\nhello\r\n0\r\n\r\n",  # LF inside extensions
        b"5\r\nhello\n0\r\n\r\n",  # LF without CR after data
        b"5\r\nhelloX\r\n0\r\n\r\n",  # data longer than its size
        b"0\r\nX: y\n\r\n",  # bare LF in a trailer
        b"0\r\n\n",
        b"0\r\n\r\r",
        b"1" + b"0" * 16 + b"\r\n",  # 2**64: over 2**63 - 1
        b"1;" + b"e" * 4096 + b"\r\n",  # 4,097 bytes of extensions
        b"5x\r\nhello\r\n0\r\n\r\n",  # an extension must begin with ';' (RFC 9112 §7.1.1)
        b"5;a\x01\r\nhello\r\n0\r\n\r\n",  # control character in an extension
        b"0\r\n X: y\r\n\r\n",  # obs-fold in the trailer section (RFC 9112 §5.2)
        b"0\r\nBad Name: x\r\n\r\n",  # a trailer field name is a token
        b"0\r\nX : y\r\n\r\n",
        b"0\r\nX: " + b"y" * 16384 + b"\r\n\r\n",  # over the trailer budget
    ],
)
def test_malformed_framing_is_bad(body):
    assert scan_split(body, []) == BAD
    assert scan_split(body, range(len(body))) == BAD


def test_extension_budget_is_per_body():
    chunk = b"1;" + b"e" * 98 + b"\r\nx\r\n"  # 99 bytes of extensions per chunk
    forty_one = chunk * 41 + b"0\r\n\r\n"  # 4,059 bytes
    assert scan_split(forty_one, [500, 2000]) == len(forty_one)
    assert scan_split(chunk * 42 + b"0\r\n\r\n", [500, 2000]) == BAD


def test_largest_size_is_accepted_and_then_counted():
    body = ChunkedBody(100)
    out = []
    data = b"7" + b"f" * 15 + b"\r\nabc"
    assert body.scan(data, 0, len(data), out) == MORE  # 2**63 - 1 bytes announced
    assert out == [b"abc"]


def test_scan_after_the_end_returns_start():
    body = ChunkedBody(100)
    assert body.scan(b"0\r\n\r\nGET", 0, 8, []) == 5
    assert body.scan(b"GET", 1, 3, []) == 1


def test_scan_stops_at_end_not_at_the_buffer_end():
    body = ChunkedBody(100)
    out = []
    assert body.scan(b"XX5\r\nhelloYY", 2, 8, out) == MORE
    assert out == [b"hel"]


# --- against llhttp ------------------------------------------------------------------------------


class _Events:
    def __init__(self):
        self.complete = False
        self.body = []

    def on_body(self, data):
        self.body.append(data)

    def on_message_complete(self):
        self.complete = True


def llhttp_parse(body: bytes):
    """Where llhttp completes the message in `body` (fed byte by byte), or None if it refuses or
    needs more; and the payload it decoded."""
    events = _Events()
    parser = httptools.HttpRequestParser(events)
    try:
        parser.feed_data(HEAD)
        for i in range(len(body)):
            parser.feed_data(body[i:i + 1])
            if events.complete:
                return i + 1, b"".join(events.body)
    except httptools.HttpParserError:
        return None, None
    return None, None


def llhttp_end(body: bytes):
    return llhttp_parse(body)[0]


def serialize(chunks, trailers) -> bytes:
    out = []
    for data, size_text, ext in chunks:
        out.append(size_text(len(data)) + ext + b"\r\n" + data + b"\r\n")
    out.append(b"0\r\n")
    for name, value in trailers:
        out.append(name + b": " + value + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


size_texts = st.sampled_from([lambda n: b"%x" % n, lambda n: b"%X" % n, lambda n: b"00%x" % n])
extensions = st.sampled_from([b"", b";a", b";a=b", b';a="q;r"', b";a=b;c=d"])
chunks = st.lists(st.tuples(st.binary(min_size=1, max_size=40), size_texts, extensions), max_size=5)
trailers = st.lists(
    st.tuples(st.sampled_from([b"X-Sum", b"Y"]), st.sampled_from([b"1", b"abc", b""])), max_size=2
)
SETTINGS = settings(max_examples=300, deadline=None)


@SETTINGS
@given(chunks=chunks, trailers=trailers, cuts=st.lists(st.integers(0, 400), max_size=6), rest=st.binary(max_size=8))
def test_valid_bodies_agree_with_llhttp_for_any_split(chunks, trailers, cuts, rest):
    body = serialize(chunks, trailers)
    assert llhttp_parse(body) == (len(body), b"".join(data for data, _, _ in chunks))
    end, payload = scan_payload(body + rest, [c for c in cuts if c <= len(body) + len(rest)])
    assert (end, payload) == (len(body), b"".join(data for data, _, _ in chunks))


@st.composite
def mutated_bodies(draw):
    body = bytearray(serialize(draw(chunks), draw(trailers)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = draw(st.sampled_from([b"\r", b"\n", b"0", b"a", b";", b" ", b"\t", b"\x00", b"g"]))
        if action == "insert":
            body[at:at] = byte
        elif action == "delete" and at < len(body):
            del body[at]
        elif at < len(body):
            body[at:at + 1] = byte
    return bytes(body)


@settings(max_examples=1500, deadline=None)
@given(body=mutated_bodies())
def test_mutated_bodies_never_end_elsewhere_than_llhttp_says(body):
    """Where llhttp accepts a body, ChunkedBody ends it at the same byte or refuses it: never a
    different boundary (that would be a desync: bytes one parser reads as body, the other as a request)."""
    ours, payload = scan_payload(body, [])
    theirs, their_payload = llhttp_parse(body)
    if theirs is not None and ours != BAD:
        assert (ours, payload) == (theirs, their_payload)
    assert scan_payload(body, range(0, len(body), 3)) == (ours, payload)
