"""HTTP hardening: what fastlb refuses, what it forwards, and how it behaves under hostile clients/backends.

Everything runs against the real `fastlb serve` with raw sockets, so the bytes on the wire are the
subject: the request corpus (tests/data/requests/, see its README) fed whole, line by line and byte by
byte; a differential check of what goes upstream (h11 and httptools must read it the same way); the
limits (414/431/413/408, send timeout, connections per worker); Upgrade tunnels; misbehaving backends;
and a hypothesis property over random and mutated requests.

Expected answers follow DESIGN.md's error table, not whatever llhttp happens to do.
"""

import hashlib
import importlib.util
import itertools
import select
import signal
import socket
import threading
import time
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import h11
import httptools
import psutil
import pytest
from conftest import Backend, FastLB, free_port
from corpus import ROOT, Case, load, split
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

INVALID = load("invalid")
VALID = load("valid")
MODES = ["whole", "lines", "bytes"]
# Statuses fastlb may answer a client's request with by itself (DESIGN.md error table, client side), and
# those after which it keeps the connection.
CLIENT_ERRORS = {400, 404, 405, 408, 413, 414, 417, 431, 501, 505}
KEEPING_ERRORS = {404, 417}
CLOSING_ERRORS = CLIENT_ERRORS - KEEPING_ERRORS
OK_EMPTY = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
HOST = b"Host: example.test\r\n"


# --- servers ---------------------------------------------------------------------------------------


@contextmanager
def serving(tmp, env: dict[str, str]):
    """A `fastlb serve` for a whole module (conftest's fixtures are per test; the corpus needs hundreds)."""
    env = {"FASTLB_LISTEN": f"127.0.0.1:{free_port()}", "FASTLB_WORKERS": "2", **env}
    lb = FastLB(tmp, env).start()
    try:
        yield lb
    finally:
        if lb.proc.poll() is None:
            lb.stop(signal.SIGQUIT)
        for child in lb.children:
            assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, (
                f"child {child.pid} survived the master")


@contextmanager
def h11_backend(tmp, name: str):
    backend = Backend(tmp, name).start()
    try:
        yield backend
    finally:
        backend.stop()


class RawBackend:
    """A backend on raw sockets (one thread per connection) for behaviours tests/backend.py can't have.

    `handler(self, sock, index)` serves one connection; `self.recv(sock, index)` reads and keeps every
    byte received, per connection, in `self.streams[index]`.
    """

    def __init__(self, handler):
        self.handler = handler
        self.streams: list[bytearray] = []
        self.notes: list = []            # whatever a handler wants to tell the test
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stopped = False
        self.threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopped:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                index = len(self.streams)
                self.streams.append(bytearray())
            thread = threading.Thread(target=self._serve, args=(sock, index), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, sock, index) -> None:
        try:
            with sock:
                self.handler(self, sock, index)
        except OSError:
            pass

    def recv(self, sock, index, size: int = 65536) -> bytes:
        data = sock.recv(size)
        with self.lock:
            self.streams[index] += data
        return data

    def read_head(self, sock, index, buf: bytes = b"") -> tuple[bytes, bytes]:
        """(head including the blank line, bytes after it); (b"", buf) at EOF."""
        while b"\r\n\r\n" not in buf:
            data = self.recv(sock, index)
            if not data:
                return b"", buf
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        return head + b"\r\n\r\n", rest

    def snapshot(self) -> list[int]:
        with self.lock:
            return [len(s) for s in self.streams]

    def since(self, snapshot: list[int]) -> list[bytes]:
        """The bytes each connection received after `snapshot`, for connections that received any."""
        with self.lock:
            streams = [bytes(s) for s in self.streams]
        out = [s[snapshot[i]:] if i < len(snapshot) else s for i, s in enumerate(streams)]
        return [s for s in out if s]

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()


def capture_handler(backend: RawBackend, sock, index) -> None:
    """Read each request (h11 only finds where it ends), answer `200 OK` with an empty body."""
    conn = h11.Connection(h11.SERVER)
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if event is h11.NEED_DATA:
            data = backend.recv(sock, index)
            if not data:
                return
            conn.receive_data(data)
        elif isinstance(event, h11.EndOfMessage):
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            sock.sendall(OK_EMPTY)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return


@contextmanager
def raw_backend(handler):
    backend = RawBackend(handler)
    try:
        yield backend
    finally:
        backend.stop()


# --- a client that reads responses off raw bytes ---------------------------------------------------


class Response(SimpleNamespace):
    status: int
    headers: list
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    @property
    def local(self) -> bool:
        """Answered by fastlb itself (every backend in these tests names itself or answers bare)."""
        return self.header(b"X-Backend") is None and self.status >= 400


class Desync(Exception):
    """The bytes where a response should start are not one: the client lost track of the responses."""


def parse_response(buf: bytes, no_body: bool, eof: bool):
    """(Response, bytes consumed), or None when buf does not hold a whole response yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise Desync(buf)
    status = int(parts[1])
    headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:]]
    resp = Response(status=status, headers=headers, body=b"", interim=100 <= status < 200 and status != 101)
    pos = end + 4
    if resp.interim or no_body or status in (101, 204, 304):
        return resp, pos
    te = resp.header(b"Transfer-Encoding")
    cl = resp.header(b"Content-Length")
    if te is not None and te.lower() == b"chunked":
        body = b""
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";")[0], 16)
            pos = line_end + 2
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", pos - 2)
                if trailer_end < 0:
                    return None
                resp.body = body
                return resp, trailer_end + 4
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos:pos + size]
            pos += size + 2
    if cl is not None:
        n = int(cl)
        if len(buf) < pos + n:
            return None
        resp.body = buf[pos:pos + n]
        return resp, pos + n
    if not eof:
        return None
    resp.body = buf[pos:]
    return resp, len(buf)


class Outcome(SimpleNamespace):
    responses: list      # final responses, interim 1xx left out
    closed: bool         # the server closed (FIN or RST) within the deadline
    leftover: bytes      # bytes after the last whole response
    send_error: str
    garbage: bytes       # where a response should have started but none did (e.g. a body after HEAD)

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    def describe(self) -> str:
        heads = [(r.status, r.body[:80]) for r in self.responses]
        return (f"responses={heads} closed={self.closed} leftover={self.leftover[:200]!r} "
                f"send_error={self.send_error}" + (f" GARBAGE={self.garbage[:200]!r}" if self.garbage else ""))


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def exchange(port: int, data: bytes, mode: str = "whole", want: int = 1, no_body=(), until_close: bool = True,
             deadline: float = 1.5, sock: socket.socket | None = None, cuts: list[int] | None = None) -> Outcome:
    """Send data as `mode` pieces (or cut at the offsets `cuts`), then read responses: `want` of them,
    and the close if until_close.

    Responses are read until they are all there (and the connection is closed, when until_close or
    after an error that closes) or `deadline` seconds pass. A send that fails because the server already answered and closed stops
    the sending; its answer is still read.
    """
    own = sock is None
    sock = sock or connect(port)
    send_error = ""
    if cuts is None:
        pieces = split(data, mode)
    else:
        bounds = sorted({0, *cuts, len(data)})
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    try:
        for piece in pieces:
            sock.sendall(piece)
            if (mode == "lines" or cuts) and len(pieces) > 1:
                time.sleep(0.001)  # let each piece be its own read, most of the time
    except OSError as exc:  # EPIPE/ECONNRESET: the server answered early and closed
        send_error = repr(exc)
    responses, buf, closed, garbage = [], b"", False, b""
    end = time.monotonic() + deadline
    while not garbage:
        while True:
            try:
                parsed = parse_response(buf, len(responses) in no_body, closed)
            except Desync:
                garbage = buf
                break
            if parsed is None:
                break
            resp, used = parsed
            buf = buf[used:]
            if not resp.interim:
                responses.append(resp)
            if closed and not buf:
                break
        refused = bool(responses) and responses[-1].local and responses[-1].status in CLOSING_ERRORS
        if closed or (len(responses) >= want and not until_close and not refused):
            break
        left = end - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed, chunk = True, b""
        if not chunk:
            closed = True
        buf += chunk
    if own:
        sock.close()
    return Outcome(responses=responses, closed=closed, leftover=buf, send_error=send_error, garbage=garbage)


# --- what the backend received -------------------------------------------------------------------


def summary(record: dict) -> tuple:
    return record["method"], record["target"], record["body_len"], record["body_sha256"][:16]


def check_forwarded(records: list[dict], expected: list[dict], context: str) -> None:
    got = [summary(r) for r in records]
    want = [summary(e) for e in expected]
    assert got == want, f"{context}: the backend received {got}, expected {want}"
    for record, exp in zip(records, expected, strict=True):
        headers = {}
        for name, value in record["headers"]:
            headers.setdefault(name.lower(), value)
        for name, value in exp.get("headers", {}).items():
            assert name in headers, f"{context}: upstream head lacks {name}: {record['headers']}"
            if value is not True:
                assert headers[name] == value, f"{context}: upstream {name}: {headers[name]!r} != {value!r}"
        for name in exp.get("absent", []):
            assert name not in headers, f"{context}: upstream head carries {name}: {headers[name]!r}"


def new_records(backend: Backend, before: int, settle: float = 0.0) -> list[dict]:
    if settle:
        time.sleep(settle)  # a request fastlb wrongly forwarded may reach the backend after our answer
    return backend.records()[before:]


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """fastlb in front of one h11 backend, default limits: the corpus and the protocol tests."""
    tmp = tmp_path_factory.mktemp("proxy")
    with h11_backend(tmp, "b1") as backend, serving(tmp, {"FASTLB_BACKENDS": backend.address}) as lb:
        yield SimpleNamespace(lb=lb, port=lb.port, backend=backend)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    """fastlb in front of a raw backend that keeps every upstream byte."""
    tmp = tmp_path_factory.mktemp("capture")
    with raw_backend(capture_handler) as backend, serving(tmp, {"FASTLB_BACKENDS": backend.address}) as lb:
        yield SimpleNamespace(lb=lb, port=lb.port, backend=backend)


LIMITS_ENV = {
    "FASTLB_WORKERS": "1",
    "FASTLB_LIMITS_MAX_HEADER_BYTES": "2KiB",
    "FASTLB_LIMITS_MAX_HEADERS": "10",
    "FASTLB_LIMITS_MAX_BODY_BYTES": "1KiB",
    "FASTLB_LIMITS_HEADER_TIMEOUT": "1s",
    "FASTLB_LIMITS_BODY_TIMEOUT": "1s",
    "FASTLB_LIMITS_SEND_TIMEOUT": "1s",
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """fastlb with small limits from the environment (one worker, so timings are its alone)."""
    tmp = tmp_path_factory.mktemp("limits")
    with h11_backend(tmp, "b1") as backend, serving(tmp, {"FASTLB_BACKENDS": backend.address, **LIMITS_ENV}) as lb:
        yield SimpleNamespace(lb=lb, port=lb.port, backend=backend)


# --- the corpus -----------------------------------------------------------------------------------


def test_corpus_files_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.stale() == [], "run python tests/data/requests/make_corpus.py"
    assert len(INVALID) >= 60 and len(VALID) >= 15


def run_case(port: int, backend: Backend, case: Case, mode: str) -> None:
    before = len(backend.records())
    out = exchange(port, case.data, mode, want=len(case.responses), no_body=set(case.no_body),
                   until_close=case.close)
    context = f"{case} sent {mode} ({case.expect['why']})"
    assert out.statuses == case.responses, f"{context}: {out.describe()}"
    if case.close:
        assert out.closed, f"{context}: connection left open after the responses: {out.describe()}"
        assert out.leftover == b"", f"{context}: bytes after the last response: {out.leftover[:200]!r}"
    for resp in out.responses:
        if resp.local:
            assert resp.header(b"X-Request-ID"), f"{context}: a {resp.status} without X-Request-ID"
    last = out.responses[-1]
    if case.close and last.local:
        # RFC 9112 §9.6: a server that is about to close says so.
        assert (last.header(b"Connection") or b"").lower() == b"close", f"{context}: no Connection: close"
    settle = 0.02 if case.kind == "invalid" else 0.0
    check_forwarded(new_records(backend, before, settle), case.forwarded, context)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", INVALID, ids=str)
def test_invalid_request_is_refused(proxy, case, mode):
    run_case(proxy.port, proxy.backend, case, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", VALID, ids=str)
def test_valid_request_is_forwarded_exactly(proxy, case, mode):
    run_case(proxy.port, proxy.backend, case, mode)


# --- differential: what goes upstream reads the same to two independent parsers ----------------------


def _ows(value: bytes) -> bytes:
    return value.strip(b" \t")


def parse_with_h11(stream: bytes) -> list[tuple]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    messages, current = [], None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
            assert current is None, f"h11: an incomplete request upstream: {stream[-300:]!r}"
            return messages
        if isinstance(event, h11.Request):
            current = [event.method, event.target, [(k, _ows(v)) for k, v in event.headers], b""]
        elif isinstance(event, h11.Data):
            current[3] += event.data
        elif isinstance(event, h11.EndOfMessage):
            messages.append(tuple(current[:2]) + (tuple(current[2]), current[3]))
            current = None
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.their_state is h11.MUST_CLOSE:
                return messages
            conn.start_next_cycle()


class _HttptoolsMessages:
    def __init__(self):
        self.messages: list[tuple] = []
        self.parser = httptools.HttpRequestParser(self)
        self.current = None

    def on_message_begin(self):
        self.current = [b"", b"", [], b""]

    def on_url(self, url):
        self.current[1] += url

    def on_header(self, name, value):
        self.current[2].append((name.lower(), _ows(value)))

    def on_headers_complete(self):
        self.current[0] = self.parser.get_method()

    def on_body(self, body):
        self.current[3] += body

    def on_message_complete(self):
        method, target, headers, body = self.current
        self.messages.append((method, target, tuple(headers), body))
        self.current = None


def parse_with_httptools(stream: bytes) -> list[tuple]:
    sink = _HttptoolsMessages()
    sink.parser.feed_data(stream)
    assert sink.current is None, f"httptools: an incomplete request upstream: {stream[-300:]!r}"
    return sink.messages


@pytest.mark.parametrize("case", VALID, ids=str)
def test_upstream_bytes_frame_identically_for_h11_and_httptools(capture, case):
    snapshot = capture.backend.snapshot()
    out = exchange(capture.port, case.data, "whole", want=len(case.responses), no_body=set(case.no_body),
                   until_close=case.close)
    assert out.statuses == [200] * len(case.forwarded), out.describe()
    streams = capture.backend.since(snapshot)
    by_h11, by_httptools = [], []
    for stream in streams:
        h11_messages = parse_with_h11(stream)
        httptools_messages = parse_with_httptools(stream)
        assert h11_messages == httptools_messages, f"h11 and httptools disagree on {stream!r}"
        by_h11 += h11_messages
        by_httptools += httptools_messages
    got = sorted((m.decode(), t.decode("latin-1"), len(b), hashlib.sha256(b).hexdigest()[:16])
                 for m, t, _, b in by_h11)
    want = sorted(summary(e) for e in case.forwarded)
    assert got == want, f"upstream carried {got}, expected {want}"
    upstream = b"".join(streams)
    for exp in case.forwarded:
        for text in exp.get("upstream_absent", []):
            assert text.encode("latin-1") not in upstream, f"{text!r} went upstream: {upstream!r}"
    for _, _, headers, _ in by_h11:
        names = [k for k, _ in headers]
        assert names.count(b"host") == 1, f"upstream Host fields: {headers}"
        assert not (b"content-length" in names and b"transfer-encoding" in names), headers


# --- connection handling ------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(proxy):
    reqs = (b"GET /sleep/0.3?i=0 HTTP/1.1\r\n" + HOST + b"\r\n"
            + b"POST /echo?i=1 HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc"
            + b"GET /sleep/0.1?i=2 HTTP/1.1\r\n" + HOST + b"\r\n"
            + b"HEAD /head?i=3 HTTP/1.1\r\n" + HOST + b"\r\n"
            + b"GET /last?i=4 HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
    out = exchange(proxy.port, reqs, want=5, no_body={3}, deadline=5)
    assert out.statuses == [200] * 5, out.describe()
    bodies = [r.body for i, r in enumerate(out.responses) if i != 3]
    assert [b'"target": "%s"' % t in body for t, body in zip(
        [b"/sleep/0.3?i=0", b"/echo?i=1", b"/sleep/0.1?i=2", b"/last?i=4"], bodies, strict=True)] == [True] * 4
    assert int(out.responses[3].header(b"Content-Length")) > 0 and out.responses[3].body == b""
    assert out.closed


def test_http10_client_is_closed_after_the_response(proxy):
    for extra in (b"", b"Connection: keep-alive\r\n"):
        with connect(proxy.port) as sock:
            out = exchange(proxy.port, b"GET /v10 HTTP/1.0\r\n" + extra + b"\r\n", sock=sock, deadline=3)
            assert out.statuses == [200] and out.closed, out.describe()
            assert (out.responses[0].header(b"Connection") or b"").lower() == b"close"


def continue_handler(backend: RawBackend, sock, index) -> None:
    """Answers 100 Continue to a head with Expect, then reads the body, then 200 naming its size."""
    buf = b""
    while True:
        head, buf = backend.read_head(sock, index, buf)
        if not head:
            return
        backend.notes.append(head)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if b"expect: 100-continue" in head.lower():
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buf) < length:
            data = backend.recv(sock, index)
            if not data:
                return
            buf += data
        body, buf = buf[:length], buf[length:]
        answer = b"got %d" % len(body)
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))


def test_expect_100_continue_is_relayed(tmp_path):
    with raw_backend(continue_handler) as backend, serving(tmp_path, {"FASTLB_BACKENDS": backend.address}) as lb:
        with connect(lb.port) as sock:
            sock.sendall(b"POST /upload HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 11\r\n\r\n")
            sock.settimeout(3)
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = sock.recv(65536)
                assert chunk, f"closed while waiting for 100 Continue: {got!r}"
                got += chunk
            assert got.startswith(b"HTTP/1.1 100 Continue\r\n"), got
            assert got.endswith(b"\r\n\r\n") and got.count(b"HTTP/1.1") == 1, f"more than the interim: {got!r}"
            out = exchange(lb.port, b"hello world", sock=sock, until_close=False, deadline=3)
            assert out.statuses == [200] and out.responses[0].body == b"got 11", out.describe()
        assert b"expect: 100-continue" in backend.notes[0].lower()


def early_handler(backend: RawBackend, sock, index) -> None:
    """Answers every request as soon as its head arrives, without reading the body; notes (conn, line)."""
    buf = b""
    while True:
        while True:
            start = min((buf.find(m) for m in (b"GET /", b"POST /") if m in buf), default=-1)
            if start >= 0 and b"\r\n\r\n" in buf[start:]:
                break
            data = backend.recv(sock, index)
            if not data:
                return
            buf += data
        head, buf = buf[start:].split(b"\r\n\r\n", 1)
        backend.notes.append((index, head.split(b"\r\n", 1)[0]))
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nContent-Length: 5\r\n\r\nearly")


def test_backend_that_answers_before_the_body_is_not_reused(tmp_path):
    with raw_backend(early_handler) as backend, \
            serving(tmp_path, {"FASTLB_BACKENDS": backend.address, "FASTLB_WORKERS": "1"}) as lb:
        with connect(lb.port) as sock:
            size = 200_000
            sock.sendall(b"POST /upload HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % size + b"x" * 1000)
            out = exchange(lb.port, b"", sock=sock, until_close=False, deadline=3)
            assert out.statuses == [200] and out.responses[0].body == b"early", out.describe()
            try:  # the rest of the body: fastlb reads and drops it, or has closed the client connection
                sock.sendall(b"x" * (size - 1000))
                out = exchange(lb.port, b"GET /next HTTP/1.1\r\n" + HOST + b"\r\n", sock=sock, until_close=False,
                               deadline=3)
                kept = out.statuses == [200]
            except OSError:
                kept = False
        if not kept:
            out = exchange(lb.port, b"GET /next HTTP/1.1\r\n" + HOST + b"\r\n", until_close=False, deadline=3)
            assert out.statuses == [200], out.describe()
    lines = dict((line, conn) for conn, line in backend.notes)
    assert set(lines) == {b"POST /upload HTTP/1.1", b"GET /next HTTP/1.1"}, backend.notes
    assert lines[b"GET /next HTTP/1.1"] != lines[b"POST /upload HTTP/1.1"], (
        "the request after an early answer went on the connection that still had a half-sent body")


def second_request_closes_handler(backend: RawBackend, sock, index) -> None:
    """Answers the first request of each connection (keep-alive), closes on the second without a word:
    the keep-alive race of RFC 9112 §9.3.1 (a server closing an idle connection as a request crosses it)."""
    head, rest = backend.read_head(sock, index)
    if not head:
        return
    backend.notes.append((index, head.split(b"\r\n", 1)[0]))
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]) if b"content-length:" in \
        head.lower() else 0
    while len(rest) < length:
        rest += backend.recv(sock, index)
    sock.sendall(b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nContent-Length: 2\r\n\r\nok")
    head, _ = backend.read_head(sock, index, rest[length:])
    if head:
        backend.notes.append((index, head.split(b"\r\n", 1)[0]))


def test_keepalive_race_replays_idempotent_requests_only(tmp_path):
    with raw_backend(second_request_closes_handler) as backend, \
            serving(tmp_path, {"FASTLB_BACKENDS": backend.address, "FASTLB_WORKERS": "1"}) as lb, \
            connect(lb.port) as sock:
        for target in (b"/one", b"/two"):
            out = exchange(lb.port, b"GET %s HTTP/1.1\r\n" % target + HOST + b"\r\n", sock=sock, until_close=False,
                           deadline=3)
            assert out.statuses == [200], f"GET {target}: {out.describe()} (backend saw {backend.notes})"
        # A POST can't be replayed (RFC 9110 §9.2.2): the backend closing on it is a 502.
        out = exchange(lb.port, b"POST /three HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\n\r\nhi", sock=sock,
                       until_close=False, deadline=3)
        assert out.statuses == [502], out.describe()
    lines = [line for _, line in backend.notes]
    assert lines.count(b"GET /two HTTP/1.1") == 2, f"/two was not replayed on a new connection: {backend.notes}"
    assert lines.count(b"POST /three HTTP/1.1") == 1, f"a POST was replayed: {backend.notes}"


# --- Upgrade -------------------------------------------------------------------------------------------


def test_websocket_echo_through_fastlb(tmp_path):
    from websockets.sync.client import connect as ws_connect
    from websockets.sync.server import serve as ws_serve

    def echo(ws):
        for message in ws:
            ws.send(message)

    port = free_port()
    server = ws_serve(echo, "127.0.0.1", port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with serving(tmp_path, {"FASTLB_BACKENDS": f"127.0.0.1:{port}"}) as lb:
            with ws_connect(f"ws://127.0.0.1:{lb.port}/chat", open_timeout=5, close_timeout=2) as ws:
                for message in ("hello", "x" * 100_000, b"\x00\x01\xff" * 1000):
                    ws.send(message)
                    assert ws.recv(timeout=5) == message
    finally:
        server.shutdown()
        thread.join(5)


def upgrade_handler(answer: bytes):
    """Reads an Upgrade request, watches the connection for 0.3 s (nothing may come before our answer),
    answers `answer`, then echoes whatever follows (a tunnel, if the answer was a 101)."""

    def handler(backend: RawBackend, sock, index) -> None:
        head, rest = backend.read_head(sock, index)
        if not head:
            return
        early = rest
        sock.settimeout(0.3)
        try:
            while data := backend.recv(sock, index):
                early += data
        except TimeoutError:
            pass
        sock.settimeout(5)
        backend.notes.append((head, early))
        sock.sendall(answer)
        if not answer.startswith(b"HTTP/1.1 101"):
            return
        while data := backend.recv(sock, index):
            sock.sendall(data)

    return handler


UPGRADE_REQUEST = (b"GET /tunnel HTTP/1.1\r\n" + HOST + b"Connection: Upgrade\r\nUpgrade: echo\r\n\r\n")


def test_tunnel_opens_only_after_the_backends_101(tmp_path):
    answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    with raw_backend(upgrade_handler(answer)) as backend, \
            serving(tmp_path, {"FASTLB_BACKENDS": backend.address}) as lb, connect(lb.port) as sock:
        sock.sendall(UPGRADE_REQUEST + b"early bytes")  # tunnel data sent before the 101
        sock.settimeout(3)
        got = b""
        while got.count(b"early bytes") < 1:
            chunk = sock.recv(65536)
            assert chunk, f"closed: {got!r}"
            got += chunk
        assert got.startswith(b"HTTP/1.1 101 "), got
        head, early = backend.notes[0]
        assert b"upgrade: echo" in head.lower()
        assert early == b"", f"tunnel bytes reached the backend before its 101: {early!r}"
        sock.sendall(b"more")
        assert sock.recv(65536) == b"more"


def test_refused_upgrade_does_not_open_a_tunnel(tmp_path):
    answer = b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nContent-Length: 2\r\n\r\nno"
    with raw_backend(upgrade_handler(answer)) as backend, \
            serving(tmp_path, {"FASTLB_BACKENDS": backend.address}) as lb:
        # After a refusal the bytes that followed are HTTP again: here, not a valid request.
        out = exchange(lb.port, UPGRADE_REQUEST + b"\x81\x85junk!", want=2, deadline=3)
        assert out.statuses == [200, 400] and out.closed, out.describe()
        head, early = backend.notes[0]
        assert early == b""
        time.sleep(0.1)
        assert b"junk" not in b"".join(backend.since([])), "bytes after a refused upgrade were tunnelled"


def test_h2c_upgrade_is_stripped(proxy):
    before = len(proxy.backend.records())
    out = exchange(proxy.port, b"GET /h2c HTTP/1.1\r\n" + HOST + b"Connection: Upgrade, HTTP2-Settings\r\n"
                   b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", until_close=False)
    assert out.statuses == [200], out.describe()
    (record,) = new_records(proxy.backend, before)
    names = {k.lower() for k, _ in record["headers"]}
    assert not names & {"upgrade", "http2-settings", "connection"}, record["headers"]


def test_local_answer_to_head_has_no_body(proxy):
    # RFC 9110 §9.3.2: whoever answers a HEAD sends no body, fastlb's own error responses included;
    # a body here is read by the client as the start of the next response.
    out = exchange(proxy.port, b"HEAD /x HTTP/1.1\r\n" + HOST + b"Expect: nope\r\n\r\n"
                   + b"GET /after HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n", want=2, no_body={0})
    assert out.statuses == [417, 200] and not out.garbage, out.describe()


def test_connect_is_refused_and_closed(proxy):
    before = len(proxy.backend.records())
    out = exchange(proxy.port, b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\nhello")
    assert out.statuses == [405] and out.closed, out.describe()
    assert new_records(proxy.backend, before, 0.05) == []


# --- limits ------------------------------------------------------------------------------------------


def head_with(fields: bytes, target: bytes = b"/") -> bytes:
    return b"GET %s HTTP/1.1\r\n%s%s\r\n" % (target, HOST, fields)


def test_request_line_over_8kib_is_414(proxy):
    out = exchange(proxy.port, head_with(b"", b"/" + b"a" * 8300))
    assert out.statuses == [414] and out.closed, out.describe()


def test_max_header_bytes_from_the_environment(limited):
    out = exchange(limited.port, head_with(b"X-Pad: %s\r\n" % (b"p" * 1000)), until_close=False)
    assert out.statuses == [200], out.describe()
    out = exchange(limited.port, head_with(b"X-Pad: %s\r\n" % (b"p" * 3000)))
    assert out.statuses == [431] and out.closed, out.describe()


def test_max_headers_from_the_environment(limited):
    nine = b"".join(b"X-H%d: v\r\n" % i for i in range(9))
    out = exchange(limited.port, head_with(nine), until_close=False)  # Host + 9 = 10
    assert out.statuses == [200], out.describe()
    out = exchange(limited.port, head_with(nine + b"X-H9: v\r\n"))
    assert out.statuses == [431] and out.closed, out.describe()


def post_cl(size: int) -> bytes:
    return b"POST /up HTTP/1.1\r\n" + HOST + b"Content-Length: %d\r\n\r\n" % size + b"b" * size


def post_chunked(*sizes: int) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (n, b"c" * n) for n in sizes) + b"0\r\n\r\n"
    return b"POST /up HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + body


@pytest.mark.parametrize("request_bytes", [post_cl(1024), post_chunked(512, 512)], ids=["cl", "chunked"])
def test_body_at_max_body_bytes_is_forwarded(limited, request_bytes):
    before = len(limited.backend.records())
    out = exchange(limited.port, request_bytes, until_close=False)
    assert out.statuses == [200], out.describe()
    assert [r["body_len"] for r in new_records(limited.backend, before)] == [1024]


def test_content_length_over_max_body_bytes_is_413_before_the_body(limited):
    before = len(limited.backend.records())
    with connect(limited.port) as sock:
        # Only the head: the answer must not wait for a body it is going to refuse.
        out = exchange(limited.port, post_cl(1025)[:-1025], sock=sock, deadline=2)
    assert out.statuses == [413] and out.closed, out.describe()
    assert new_records(limited.backend, before, 0.05) == []


def test_chunked_body_over_max_body_bytes_is_413(limited):
    before = len(limited.backend.records())
    out = exchange(limited.port, post_chunked(512, 513), deadline=2)
    assert out.statuses == [413] and out.closed, out.describe()
    assert new_records(limited.backend, before, 0.1) == [], "the backend got a complete oversized request"


def test_header_timeout_is_a_total_deadline(limited):
    # One byte every 200 ms: no read ever waits long, only a deadline on the whole head can stop it.
    head = head_with(b"X-Slow: " + b"s" * 100 + b"\r\n")
    with connect(limited.port) as sock:
        started = time.monotonic()
        answered = False
        for i in range(len(head)):
            try:
                sock.send(head[i:i + 1])
            except OSError:
                break
            if select.select([sock], [], [], 0.2)[0] or time.monotonic() - started > 4:
                answered = True
                break
        out = exchange(limited.port, b"", sock=sock, deadline=2)
        elapsed = time.monotonic() - started
    assert answered and out.statuses == [408] and out.closed, out.describe()
    assert 0.9 <= elapsed <= 2.5, f"408 after {elapsed:.2f} s with header_timeout=1s"


def test_stalled_body_is_408_after_body_timeout(limited):
    before = len(limited.backend.records())
    with connect(limited.port) as sock:
        started = time.monotonic()
        out = exchange(limited.port, post_cl(100)[:-90], sock=sock, deadline=4)  # 10 of 100 bytes, then nothing
        elapsed = time.monotonic() - started
    assert out.statuses == [408] and out.closed, out.describe()
    assert 0.9 <= elapsed <= 3, f"408 after {elapsed:.2f} s with body_timeout=1s"
    assert new_records(limited.backend, before, 0.05) == []


def test_slow_but_moving_body_is_not_cut(limited):
    # body_timeout is the time between two reads, not a total: 8 bytes 300 ms apart (2.4 s) is fine.
    with connect(limited.port) as sock:
        sock.sendall(b"POST /trickle HTTP/1.1\r\n" + HOST + b"Content-Length: 8\r\n\r\n")
        for _ in range(8):
            time.sleep(0.3)
            sock.sendall(b"t")
        out = exchange(limited.port, b"", sock=sock, until_close=False, deadline=3)
    assert out.statuses == [200], out.describe()


def test_client_that_does_not_read_is_closed_after_send_timeout(limited):
    size = 64 << 20
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", limited.port))
        sock.sendall(b"GET /big/%d HTTP/1.1\r\n" % size + HOST + b"\r\n")
        time.sleep(3)  # send_timeout=1s: fastlb gives up on us meanwhile
        got, closed = 0, False
        sock.settimeout(2)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(1 << 20)
            except ConnectionResetError:
                closed = True
                break
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            got += len(chunk)
    assert closed and got < size, f"received {got} of {size} bytes, closed={closed}"


def test_max_connections_per_worker(tmp_path, backends):
    (backend,) = backends("b1")
    env = {"FASTLB_BACKENDS": backend.address, "FASTLB_WORKERS": "1", "FASTLB_LIMITS_MAX_CONNECTIONS": "5"}
    ping = b"GET /ping HTTP/1.1\r\n" + HOST + b"\r\n"
    with serving(tmp_path, env) as lb, ExitStack() as stack:
        kept = [stack.enter_context(connect(lb.port)) for _ in range(5)]
        for sock in kept:
            assert exchange(lb.port, ping, sock=sock, until_close=False, deadline=3).statuses == [200]
        for _ in range(3):
            with connect(lb.port) as extra:
                out = exchange(lb.port, ping, sock=extra, until_close=False, deadline=1)
                assert out.statuses == [], f"connection over max_connections was served: {out.describe()}"
        for sock in kept:  # the ones in are not disturbed
            out = exchange(lb.port, ping, sock=sock, until_close=False, deadline=3)
            assert out.statuses == [200], out.describe()
        for sock in kept:
            sock.close()
        time.sleep(0.3)
        out = exchange(lb.port, ping, until_close=False, deadline=3)
        assert out.statuses == [200], f"the worker did not recover: {out.describe()}"


# --- misbehaving backends ------------------------------------------------------------------------------

CANNED = {
    "ok": b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nContent-Length: 2\r\n\r\nok",
    "head_over_1mib": b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\n"
                      + b"".join(b"X-Big-%d: %s\r\n" % (i, b"v" * 1000) for i in range(1100))
                      + b"Content-Length: 2\r\n\r\nok",
    "bare_lf": b"HTTP/1.1 200 OK\nX-Backend: raw\nContent-Length: 2\n\nok",
    "space_in_header_name": b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nBad Name: x\r\nContent-Length: 2\r\n\r\nok",
    "cl_and_te": b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"2\r\nok\r\n0\r\n\r\n",
    "two_content_lengths": b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
    "nul_in_value": b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "bad_status_line": b"HTTP/1.1 2OO OK\r\nX-Backend: raw\r\nContent-Length: 2\r\n\r\nok",
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-Backend: raw\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "not_http": b"SSH-2.0-OpenSSH_9.2\r\n",
}


def canned_handler(backend: RawBackend, sock, index) -> None:
    """Answers /resp/NAME with CANNED[NAME], then closes."""
    head, _ = backend.read_head(sock, index)
    if head:
        name = head.split(b" ", 2)[1].rsplit(b"/", 1)[-1].decode()
        sock.sendall(CANNED[name])


@pytest.fixture(scope="module")
def canned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canned")
    with raw_backend(canned_handler) as backend, serving(tmp, {"FASTLB_BACKENDS": backend.address}) as lb:
        yield SimpleNamespace(lb=lb, port=lb.port, backend=backend)


@pytest.mark.parametrize("name", [n for n in CANNED if n != "ok"])
def test_bad_backend_response_is_502_and_the_client_connection_kept(canned, name):
    with connect(canned.port) as sock:
        out = exchange(canned.port, b"GET /resp/%s HTTP/1.1\r\n" % name.encode() + HOST + b"\r\n", sock=sock,
                       until_close=False, deadline=5)
        assert out.statuses == [502], out.describe()
        out = exchange(canned.port, b"GET /resp/ok HTTP/1.1\r\n" + HOST + b"\r\n", sock=sock, until_close=False,
                       deadline=3)
        assert out.statuses == [200] and out.responses[0].body == b"ok", out.describe()


# --- property: fastlb refuses, or forwards exactly what an independent parser reads ------------------


def h11_reading(data: bytes) -> tuple[list[tuple], str]:
    """The complete requests h11 (as a server) finds in data, and why it stopped."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    requests, current = [], None
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return requests, "error"
        if event is h11.NEED_DATA:
            return requests, "need-data"
        if event is h11.PAUSED:
            return requests, "paused"
        if isinstance(event, h11.ConnectionClosed):
            return requests, "closed"
        if isinstance(event, h11.Request):
            if event.method == b"CONNECT":
                return requests, "closed"  # never forwarded: fastlb answers 405 and closes (DESIGN)
            current = [event.method.decode(), event.target.decode("latin-1"), hashlib.sha256(), 0]
        elif isinstance(event, h11.Data):
            current[2].update(event.data)
            current[3] += len(event.data)
        elif isinstance(event, h11.EndOfMessage):
            method, target, digest, size = current
            requests.append((method, target, size, digest.hexdigest()[:16]))
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.their_state is h11.MUST_CLOSE or conn.our_state is h11.SWITCHED_PROTOCOL:
                return requests, "closed"
            conn.start_next_cycle()


def is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


MUTABLE = [c.data for c in INVALID + VALID if len(c.data) <= 1024]
INTERESTING = [b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00", b"\x0b", b",", b":", b";", b"0", b"-", b"_", b"a",
               b"chunked", b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"\r\n\r\n", b"\xff"]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(MUTABLE)))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "truncate", "duplicate"]))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(INTERESTING))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 4))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 40))]
    return bytes(data)


BENIGN = [b"X-A: b", b"Accept: */*", b"Connection: keep-alive", b"Cookie: a=b; c=d", b"User-Agent: fuzz/1.0"]
SPICY = [b"Host: other.test", b"Content-Length: 5", b"Content-Length: 0", b"Transfer-Encoding: chunked",
         b"Transfer-Encoding: gzip", b"Connection: close", b"Expect: 100-continue", b"Expect: nope",
         b"Upgrade: h2c", b"Connection: upgrade", b"Content_Length: 3", b"TE: trailers", b"Trailer: X-T",
         b"Content-Length : 3", b"X-Folded: a\r\n b", b"Transfer-Encoding: chunked, gzip"]
# (framing field, body): matching, mismatched (the body overflows into the next request), or chunked.
FRAMINGS = [(None, b""), (b"Content-Length: 5", b"hello"), (b"Content-Length: 3", b"hello"),
            (b"Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"),
            (b"Transfer-Encoding: chunked", b"3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"),
            (b"Transfer-Encoding: chunked", b"0\r\n\r\n"), (b"Content-Length: 0", b"")]


@st.composite
def assembled(draw):
    """One to three requests, mostly well-formed, with a spicy field now and then."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        eol = draw(st.sampled_from([b"\r\n"] * 9 + [b"\n"]))
        line = b"%s %s %s" % (draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS"])),
                              draw(st.sampled_from([b"/", b"/a?b=c", b"/%41/x", b"*", b"/a b"])),
                              draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/1.2"])))
        fields = draw(st.sampled_from([[b"Host: example.test"]] * 6 + [[], [b"Host: a", b"Host: b"]]))
        framing, body = draw(st.sampled_from(FRAMINGS))
        fields += [framing] if framing else []
        fields += draw(st.lists(st.sampled_from(BENIGN), max_size=2))
        if draw(st.integers(0, 2)) == 0:
            fields.insert(draw(st.integers(0, len(fields))), draw(st.sampled_from(SPICY)))
        out += line + eol + b"".join(f + eol for f in fields) + eol + body
    return out


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with h11_backend(tmp, "fz") as backend, serving(tmp, {"FASTLB_BACKENDS": backend.address}) as lb:
        yield SimpleNamespace(lb=lb, port=lb.port, backend=backend)


@settings(max_examples=100, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Found by this test (kept as explicit examples): a bare CR, or a bare LF left over from the previous
# body, before a request line is skipped and the request forwarded; a local answer to HEAD carries a
# body, which the client reads as the next response.
@example(data=b"\rPOST /legacy HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc")
@example(data=b"POST / HTTP/1.1\r\nHost: example.test\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n"
              b"Host: example.test\r\n\r\n")
@example(data=b"HEAD * HTTP/1.1\r\nHost: example.test\r\n\r\nGET / HTTP/1.1\r\nHost: example.test\r\n\r\n")
@given(data=st.one_of(st.binary(max_size=300), mutated(), mutated(), assembled(), assembled(), assembled()))
def test_fastlb_refuses_or_forwards_what_h11_reads(fuzz_target, data):
    expected, why = h11_reading(data)
    heads = {i for i, r in enumerate(expected) if r[0] == "HEAD"}
    before = len(fuzz_target.backend.records())
    # Read every answer h11 says is due; when the bytes end mid-request, also give fastlb a moment.
    out = exchange(fuzz_target.port, data, want=len(expected), no_body=heads, deadline=1.0,
                   until_close=why in ("error", "closed"))
    if why == "need-data" and not out.closed:
        time.sleep(0.05)
    errors = [r.status for r in out.responses if r.local]
    records = new_records(fuzz_target.backend, before, 0.05 if errors else 0.0)
    got = [summary(r) for r in records]
    context = f"{data!r}: h11 reads {expected} then {why}; fastlb {out.describe()}; backend got {got}"
    assert not out.garbage, f"the client can't find the next response: {context}"
    event(f"h11: {len(expected)} then {why}; fastlb: {'refused ' + str(errors[-1]) if errors else 'forwarded'}")
    assert not set(errors) - CLIENT_ERRORS, f"fastlb answered a client error as a gateway error: {context}"
    if why == "paused":  # h11 stops at an Upgrade; fastlb carries on when the backend refuses it
        assert got[:len(expected)] == expected, context
    elif not errors:
        assert got == expected, f"forwarded differently from h11's reading: {context}"
        assert len(out.responses) == len(expected), f"a request h11 reads got no answer: {context}"
    else:
        assert is_subsequence(got, expected), f"forwarded something h11 does not read: {context}"
        if errors[-1] not in KEEPING_ERRORS:
            assert out.closed, f"the connection stayed open after a {errors[-1]}: {context}"


VALID_FRAMINGS = [(None, b""), (b"Content-Length: 5", b"hello"), (b"Content-Length: 0", b""),
                  (b"Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"),
                  (b"Transfer-Encoding: chunked", b"3;x=y\r\nabc\r\n00A;q=\"r;s\"\r\n0123456789\r\n0\r\nT: 1\r\n\r\n"),
                  (b"Transfer-Encoding: chunked", b"0\r\n\r\n")]


@st.composite
def pipelined(draw):
    """Two to five valid keep-alive requests, and where the client's writes cut them."""
    out = b""
    for i in range(draw(st.integers(2, 5))):
        framing, body = draw(st.sampled_from(VALID_FRAMINGS))
        # A body on GET is refused (chunked) or closes the connection (Content-Length): issue 14's
        # ambiguous-request rule, tested in the corpus. Here only methods that carry bodies carry them.
        method = draw(st.sampled_from([b"POST", b"PUT"] if framing else [b"GET", b"POST", b"PUT", b"DELETE"]))
        fields = [HOST.strip()] + ([framing] if framing else []) + draw(st.lists(st.sampled_from(BENIGN), max_size=2))
        out += b"%s /p%d HTTP/1.1\r\n" % (method, i) + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body
    cuts = draw(st.lists(st.integers(1, len(out) - 1), max_size=8))
    return out, cuts


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=pipelined())
def test_valid_pipelined_requests_survive_any_split(fuzz_target, case):
    """fastlb frames each request itself wherever the reads cut it: valid traffic is never refused, and
    every request reaches the backend once, as h11 reads it."""
    data, cuts = case
    expected, why = h11_reading(data)
    assert why == "need-data" and expected, why
    before = len(fuzz_target.backend.records())
    out = exchange(fuzz_target.port, data, want=len(expected), until_close=False, deadline=3.0, cuts=cuts)
    context = f"{data!r} cut at {sorted(cuts)}: fastlb {out.describe()}"
    assert out.statuses == [200] * len(expected), context
    assert [summary(r) for r in new_records(fuzz_target.backend, before)] == expected, context
