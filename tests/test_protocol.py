"""The data path in process: the protocol objects driven with fake transports, no subprocess, no socket.

As uvicorn's tests/protocols/test_http.py does: a real Worker (router, backends, metrics area) is built
from a config, a ClientConnection gets a fake transport, and the "backend" is a fake transport under an
UpstreamConnection taken from the server's idle pool; h11 reads what goes upstream and answers it.  So
the whole corpus runs byte by byte in milliseconds, against the uncompiled source (protocol_py) and, in
the compiled build, against protocol_c too: the same behaviour is required of both.
"""

import asyncio
import contextlib
import ctypes
import gc
import importlib
import logging
import os
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import h11
import pytest
from corpus import load, split
from test_hardening import parse_response
from tlsutil import DEFAULT_NAMES, make_pems

from fastlb import config, core
from fastlb.http import front
from fastlb.http import protocol as chosen
from fastlb.net import biomem, tlsbio
from fastlb.obs import metrics
from fastlb.process import shm as shm_mod
from fastlb.process.worker import Worker

MODULES = ["fastlb.http.protocol_py"] + (["fastlb.http.protocol_c"] if core.EXTENSION else [])
COMPILED = {"fastlb.http.protocol": "ClientConnection", "fastlb.http.framing": "ChunkedBody",
            "fastlb.lb.router": "Router"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(params=MODULES)
def protocol(request):
    return importlib.import_module(request.param)


class FakeTransport:
    def __init__(self, protocol=None):
        self.protocol = protocol
        self.out = bytearray()
        self.closing = False
        self.aborted = False
        self.reading = True
        self.lost = False
        self.total = 0  # bytes ever written
        self.writes = 0  # write calls: each is a system call on a real transport

    def write(self, data):
        assert not self.closing, f"write after close: {bytes(data)[:80]!r}"
        self.out += data
        self.total += len(data)
        self.writes += 1

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = self.aborted = True

    def is_closing(self):
        return self.closing

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 40000)}.get(name, default)

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data


class Harness:
    """One client connection to a worker whose only backend answers through fake upstream transports."""

    def __init__(self, protocol, env=None, path=None):
        # A config file brings its own backends; without one, a single-server backend from the environment.
        base = {} if path else {"FASTLB_BACKENDS": "127.0.0.1:9"}
        cfg = config.load(path, {**base, **(env or {})}, {})
        layout = metrics.Layout()
        layout.extend(cfg, [])
        self.store = metrics.Store()
        shm = shm_mod.SharedBlock(2)
        sockets = [(spec, None) for spec in cfg.listeners]
        self.worker = Worker(cfg, 0, sockets, {}, shm, os.getpid(), logging.getLogger("test"), layout,
                             self.store.area(0))
        self.protocol = protocol
        self.server = next(iter(self.worker.backends.values())).servers[0]
        self.upstreams = []   # (UpstreamConnection, FakeTransport, h11 server Connection)
        self.forwarded = []   # (method, target, headers, body) as h11 reads them upstream
        self.current = {}     # UpstreamConnection -> the request h11 is reading on it
        self.respond = lambda request: OK
        self.client, self.transport = self.connect()

    def connect(self):
        client = self.protocol.ClientConnection(self.worker, self.worker.listeners[0])
        transport = FakeTransport(client)
        client.connection_made(transport)
        return client, transport

    def _spare(self) -> None:
        """An open idle upstream connection in every server's pool, for whichever the pick chooses."""
        for server in self.server.backend.servers:
            if not any(not conn.transport.is_closing() for conn in server.idle):
                conn = self.protocol.UpstreamConnection(self.worker, server)
                transport = FakeTransport(conn)
                conn.connection_made(transport)
                server.idle.append(conn)
                self.upstreams.append((conn, transport, h11.Connection(h11.SERVER)))

    def feed(self, data: bytes) -> None:
        self._spare()
        self.client.data_received(data)
        self.pump()

    def pump(self) -> None:
        """Answer every request that arrived upstream; deliver the connection losses transports owe."""
        busy = True
        while busy:
            busy = False
            for conn, transport, parser in list(self.upstreams):
                data = transport.take()
                if data:
                    parser.receive_data(data)
                while True:
                    try:
                        event = parser.next_event()
                    except h11.RemoteProtocolError:
                        break
                    if event is h11.NEED_DATA or event is h11.PAUSED:
                        break
                    if isinstance(event, h11.Request):
                        self.current[conn] = [event.method, event.target, event.headers, b""]
                    elif isinstance(event, h11.Data):
                        self.current[conn][3] += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        # A backend acts on whole requests only (as tests/backend.py records them).
                        current = self.current.pop(conn)
                        self.forwarded.append(current)
                        self._spare()
                        answer = self.respond(current)
                        if conn.ex is not None and answer:
                            conn.data_received(answer)
                        # h11 only keeps the state: what the proxy got is `answer`.
                        parser.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                        parser.send(h11.EndOfMessage())
                        if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
                            parser.start_next_cycle()
                        busy = True
                if transport.closing and not transport.lost:
                    transport.lost = True
                    conn.connection_lost(None)
                    busy = True
            if self.transport.closing and not self.transport.lost:
                self.transport.lost = True
                self.client.connection_lost(None)

    def responses(self, no_body=()) -> list:
        buf = bytes(self.transport.out)
        out = []
        while buf:
            got = parse_response(buf, len(out) in no_body, self.transport.closing)
            if got is None:
                break
            resp, used = got
            buf = buf[used:]
            if not resp.interim:
                out.append(resp)
        return out


def test_a_queued_request_handed_a_slot_it_cannot_use_keeps_its_place(protocol, tmp_path):
    """A slot freed on a server that went down meanwhile is no use to the head of the queue: it stays at
    the head, its queue_timeout still counted from when it began to wait, and the next usable slot is its."""
    cfg = tmp_path / "fastlb.toml"
    cfg.write_text('[backends.b]\nservers = ["127.0.0.1:9", "127.0.0.1:10"]\nbalance = "roundrobin"\n'
                   'max_connections = 1\nqueue_timeout = "60s"\n\n[[routes]]\nbackend = "b"\n')
    h = Harness(protocol, path=str(cfg))
    backend = h.server.backend
    held = {}  # path -> the upstream connection holding it unanswered

    def respond(request):
        path = request[1].decode()
        if path.startswith("/hold"):
            held[path] = next(c for c, _, _ in h.upstreams if c.ex is not None and c not in held.values())
            return b""
        return OK

    h.respond = respond
    clients = {}
    for path in ("/hold1", "/hold2", "/w3", "/w4"):
        clients[path] = h.connect()
        h._spare()
        clients[path][0].data_received(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        h.pump()
    assert sorted(held) == ["/hold1", "/hold2"] and len(backend.waiting) == 2
    first, second = backend.waiting
    queued_at = first.queued_at
    down = held["/hold1"].server
    down.up = False
    down.tick(time.monotonic())
    held["/hold1"].data_received(OK)  # frees a slot on the server that is down now
    h.pump()
    assert list(backend.waiting) == [first, second] and first.queued_at == queued_at
    held["/hold2"].data_received(OK)  # frees the one usable slot: the head of the queue takes it first
    h._spare()
    h.pump()
    assert [f[1] for f in h.forwarded] == [b"/hold1", b"/hold2", b"/w3", b"/w4"]
    assert not backend.waiting
    assert [parse_response(bytes(t.out), False, t.closing)[0].status for _, t in clients.values()] == [200] * 4


def _summary(forwarded) -> list:
    import hashlib

    return [(m.decode(), t.decode("latin-1"), len(b), hashlib.sha256(b).hexdigest()[:16])
            for m, t, _, b in forwarded]


@pytest.mark.parametrize("mode", ["whole", "bytes"])
@pytest.mark.parametrize("case", load("valid") + load("invalid"), ids=str)
def test_corpus_in_process(protocol, case, mode):
    h = Harness(protocol)
    for piece in split(case.data, mode):
        if h.transport.closing:
            break
        h.feed(piece)
    context = f"{case} sent {mode} ({case.expect['why']})"
    statuses = [r.status for r in h.responses(set(case.no_body))]
    assert statuses == case.responses, f"{context}: {bytes(h.transport.out)[:600]!r}"
    assert h.transport.closing == case.close, f"{context}: closed={h.transport.closing}"
    want = [(e["method"], e["target"], e["body_len"], e["body_sha256"][:16]) for e in case.forwarded]
    assert _summary(h.forwarded) == want, context


def test_keep_alive_reuses_the_upstream_connection(protocol):
    h = Harness(protocol)
    for _ in range(3):
        h.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r.status for r in h.responses()] == [200, 200, 200]
    assert len([t for _, t, _ in h.upstreams if t.total]) == 1 and not h.transport.closing


def test_response_framings_reach_the_client_reframed(protocol):
    bodies = {
        b"/cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nhe\r\n3\r\nllo\r\n0\r\nT: 1\r\n\r\n",
        b"/interim": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    }
    h = Harness(protocol)
    h.respond = lambda request: bodies[request[1]]
    for target in bodies:
        h.feed(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    responses = h.responses()
    assert [(r.status, r.body) for r in responses] == [(200, b"hello")] * 3
    assert b"103 Early Hints" in h.transport.out


def test_response_split_at_every_byte(protocol):
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    for cut in range(1, len(response)):
        h = Harness(protocol)
        h.respond = lambda request, cut=cut: b""
        h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        conn = h.upstreams[0][0]
        conn.data_received(response[:cut])
        conn.data_received(response[cut:])
        (resp,) = h.responses()
        assert (resp.status, resp.body) == (200, b"hello"), cut
        assert conn in h.server.idle  # clean end: pooled again


def test_malformed_request_after_a_refused_upgrade_is_400_not_500(protocol):
    """The old data path classified parser errors through exc.__context__, which Python replaces when
    the parser raises inside an except block: after an Upgrade the backend refused, a malformed byte was
    logged as a bug and answered 500.  Framing errors are now return values, never exceptions."""
    h = Harness(protocol)
    h.feed(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
    assert [r.status for r in h.responses()] == [200, 400]
    assert h.transport.closing


def test_backend_early_answer_closes_that_upstream_connection(protocol):
    h = Harness(protocol)
    h.respond = lambda request: OK
    h.feed(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    conn, transport, _ = h.upstreams[0]
    conn.data_received(OK)
    h.pump()
    h.feed(b"67890")
    assert [r.status for r in h.responses()] == [200]
    assert transport.closing and conn not in h.server.idle


def test_upstream_death_mid_body_aborts_the_client(protocol):
    h = Harness(protocol)
    h.respond = lambda request: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn, transport, _ = h.upstreams[0]
    transport.abort()
    h.pump()
    assert h.transport.aborted


_DEBUG_CHECK = """
import importlib, sys
sys.path.insert(0, "tests")
import test_protocol
from fastlb.http import protocol_py
module = importlib.import_module(sys.argv[1])
h = test_protocol.Harness(module)
h.feed(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" * 2)
assert [r.status for r in h.responses()] == [200, 200]
h.client.state = protocol_py.C_TUNNEL  # a tunnel never turns back into a failed HTTP stream
try:
    h.client.fail(400)
except AssertionError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("debug", ["1", ""])
def test_debug_build_checks_transitions(protocol, debug):
    """FASTLB_DEBUG=1 (read at import, so in a fresh process) makes every transition checked, in the
    compiled module too; without it an impossible transition is not looked for."""
    env = {**os.environ, "FASTLB_DEBUG": debug}
    run = subprocess.run([sys.executable, "-c", _DEBUG_CHECK, protocol.__name__], env=env, text=True,
                         capture_output=True, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr
    refused = "refused: state 4 -> 5 is not a transition of this machine" in run.stdout
    assert refused == bool(debug), run.stdout


@pytest.mark.parametrize("chooser", sorted(COMPILED))
def test_compiled_build_is_used_unless_disabled(chooser):
    """Fails if the extension was expected (no FASTLB_NO_EXTENSIONS=1) and did not build."""
    cls = getattr(importlib.import_module(chooser), COMPILED[chooser])
    if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
        assert cls.__module__ == chooser + "_py"
        return
    compiled = importlib.import_module(chooser + "_c")
    assert cls.__module__ == chooser + "_c" and compiled.__file__.endswith(".so")


@pytest.mark.parametrize("chooser", sorted(COMPILED))
def test_missing_extension_is_an_import_error_not_the_symlinked_source(tmp_path, chooser):
    """X_c.py is a symlink to the source: without the .so Python would import it uncompiled.  With
    FASTLB_NO_EXTENSIONS=1 the missing extension is not looked for."""
    name = chooser.rsplit(".", 1)[1]
    package = Path(__file__).resolve().parent.parent / "fastlb"
    shutil.copytree(package, tmp_path / "fastlb", symlinks=True,
                    ignore=shutil.ignore_patterns(f"{name}_c.*.so", "__pycache__"))
    run = subprocess.run([sys.executable, "-c", f"import {chooser}"], cwd=tmp_path, capture_output=True,
                         text=True)
    if os.environ.get("FASTLB_NO_EXTENSIONS") == "1":
        assert run.returncode == 0, run.stderr
    else:
        assert run.returncode == 1 and f"ImportError: {chooser}_c is not compiled" in run.stderr, run.stderr


@contextlib.contextmanager
def cyclic_garbage(names):
    """Yields a list that, after the block, holds the type names (among `names`) of the objects made in
    the block that only the cyclic GC would have freed (gc.DEBUG_SAVEALL keeps them in gc.garbage)."""
    gc.collect()
    flags = gc.get_debug()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found = []
    try:
        yield found
        gc.collect()
        found.extend(sorted(type(o).__name__ for o in gc.garbage if type(o).__name__ in names))
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)
        gc.enable()


def tls_contexts(tmp_path):
    pems = make_pems(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(*pems.default)
    return server_ctx, ssl.create_default_context(cafile=pems.ca)


def tls_client(fr, raw, client_ctx):
    """A client handshake with the Front `fr` over its fake transport: (SSLObject, incoming, outgoing)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_ctx.wrap_bio(incoming, outgoing, server_hostname=DEFAULT_NAMES[0])
    for _ in range(10):
        try:
            tls.do_handshake()
            return tls, incoming, outgoing
        except ssl.SSLWantReadError:
            fr.data_received(outgoing.read())
            incoming.write(raw.take())
    raise AssertionError("no handshake")


def test_a_closed_tls_connection_leaves_no_cycle_for_the_gc(tmp_path):
    """Front, TlsBio, the SSL object, its BIOs and the ClientConnection are freed by reference counting
    once the connection is lost: the cyclic GC finds nothing of theirs (the build's own Front and protocol,
    so each tox run checks its build)."""
    server_ctx, client_ctx = tls_contexts(tmp_path)
    h = Harness(chosen)
    with cyclic_garbage({"Front", "TlsBio", "ClientConnection", "Exchange", "MemoryBIO", "_SSLSocket"}) as left:
        fr = front.Front(h.worker, h.worker.listeners[0], server_ctx)
        raw = FakeTransport(fr)
        fr.connection_made(raw)
        tls, incoming, outgoing = tls_client(fr, raw, client_ctx)
        tls.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        h._spare()
        fr.data_received(outgoing.read())
        h.pump()
        incoming.write(raw.take())
        assert tls.read(4096).startswith(b"HTTP/1.1 200 OK\r\n")
        assert raw.closing  # Connection: close
        fr.connection_lost(None)
        raw.protocol = None  # as uvloop's transport drops its protocol after connection_lost
        del fr, raw, tls, incoming, outgoing
    assert left == []


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "close"])
def test_a_tls13_ticket_and_close_notify_go_out_with_the_response(tmp_path, close):
    """A TLS 1.3 server's session ticket waits for the first response, and the last response of a connection
    that closes goes out with the close_notify: one write each, where each took a write of its own (the
    build's own Front, TlsBio and protocol).  The client still gets a resumable session and the close."""
    server_ctx, client_ctx = tls_contexts(tmp_path)
    h = Harness(chosen)
    fr = front.Front(h.worker, h.worker.listeners[0], server_ctx)
    raw = FakeTransport(fr)
    fr.connection_made(raw)
    tls, incoming, outgoing = tls_client(fr, raw, client_ctx)
    assert tls.version() == "TLSv1.3"
    fr.data_received(outgoing.read())  # the client's Finished
    assert raw.writes == 1 and not raw.out  # the server's flight only; the ticket waits
    tls.write(b"GET / HTTP/1.1\r\nHost: x\r\n%s\r\n" % (b"Connection: close\r\n" if close else b""))
    h._spare()
    fr.data_received(outgoing.read())
    h.pump()
    assert raw.writes == 2 and raw.closing == close
    incoming.write(raw.take())
    assert tls.read(4096).startswith(b"HTTP/1.1 200 OK\r\n")
    assert tls.session.has_ticket
    if close:
        assert tls.read(4096) == b""  # the close_notify (without it: SSLWantReadError)
    else:
        tls.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        fr.data_received(outgoing.read())
        h.pump()
        assert raw.writes == 3 and not raw.closing


def test_a_tls12_server_sends_its_last_flight_at_once(tmp_path):
    """A TLS 1.2 client waits for the server's Finished: nothing of the handshake is held back."""
    server_ctx, client_ctx = tls_contexts(tmp_path)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    h = Harness(chosen)
    fr = front.Front(h.worker, h.worker.listeners[0], server_ctx)
    raw = FakeTransport(fr)
    fr.connection_made(raw)
    tls, incoming, outgoing = tls_client(fr, raw, client_ctx)  # fails unless the Finished came
    assert tls.version() == "TLSv1.2" and raw.writes == 2 and not raw.out


def bio_sizes(layer) -> tuple[int, int]:
    """The bytes each of a TlsBio's memory BIOs holds allocated (BUF_MEM.max), pending or not."""
    ctrl = biomem._FUNCTIONS[0]
    sizes = []
    for bio in (layer.incoming, layer.outgoing):
        buf = ctypes.c_void_p()
        ctrl(biomem._pointer(bio), 115, 0, ctypes.byref(buf))  # BIO_C_GET_BUF_MEM_PTR
        sizes.append(ctypes.c_size_t.from_address(buf.value + 2 * ctypes.sizeof(ctypes.c_size_t)).value)
    return sizes[0], sizes[1]


@contextlib.contextmanager
def ticking(h):
    """Yields the worker's own tick (Worker._tick, what its timer runs every TICK seconds) for `h`."""
    loop = asyncio.new_event_loop()
    h.worker.loop = loop            # where the tick schedules the next one (never run here)
    h.worker.master_pid = os.getppid()
    try:
        yield h.worker._tick
    finally:
        loop.close()


def test_an_idle_tls_connection_gives_back_what_its_bios_grew_to(tmp_path):
    """OpenSSL's memory BIOs keep the most they ever held: after a 64 KiB response the outgoing one still
    holds 64 KiB.  Once the connection has waited a whole tick for its next request, the worker's tick
    frees both (the build's own Front, TlsBio and protocol); the connection then serves as before."""
    assert biomem.WORKS
    server_ctx, client_ctx = tls_contexts(tmp_path)
    h = Harness(chosen)
    big = b"x" * 65536
    h.respond = lambda request: b"HTTP/1.1 200 OK\r\nContent-Length: 65536\r\n\r\n" + big
    fr = front.Front(h.worker, h.worker.listeners[0], server_ctx)
    raw = FakeTransport(fr)
    fr.connection_made(raw)
    tls, incoming, outgoing = tls_client(fr, raw, client_ctx)

    def get():
        tls.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        h._spare()
        fr.data_received(outgoing.read())
        h.pump()
        incoming.write(raw.take())
        got = b""
        while not got.endswith(big):
            got += tls.read(65536)
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")

    get()
    assert bio_sizes(fr.tls)[1] >= 65536
    with ticking(h) as tick:
        tick()  # idle at one tick may be a busy connection between two requests: kept
        assert bio_sizes(fr.tls)[1] >= 65536
        tick()  # idle for a whole tick: freed
        assert bio_sizes(fr.tls) == (0, 0)
        get()  # the BIOs grow again as they are used, and bytes received start the count again
        tick()
        tick()
        assert bio_sizes(fr.tls) == (0, 0)
        get()
        fr.tls.incoming.write(b"\x17")  # a record begun: nothing is freed under it
        tick()
        tick()
        assert bio_sizes(fr.tls)[1] >= 65536


class _Upstream:
    """Stands for an UpstreamConnection: it holds its transport, as that one does."""

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        pass


def test_idle_send_proxy_connections_close_after_the_backends_idle_timeout(protocol):
    """Connections kept for one client (send_proxy) are in no server's pool; the worker's tick closes them
    after their backend's idle_timeout as it closes pooled ones: the old one goes, the recent one stays."""
    h = Harness(protocol)
    timeout = h.server.backend.spec.idle_timeout
    conns = []
    for age in (timeout + 1, 0):
        conn = protocol.UpstreamConnection(h.worker, h.server)
        conn.connection_made(FakeTransport(conn))
        conn.owner = h.client  # as _complete keeps a send_proxy connection for its client
        conn.idle_since = time.monotonic() - age
        conns.append(conn)
    h.client.private = list(conns)
    with ticking(h) as tick:
        tick()
    old, recent = conns
    assert old.transport.closing and not recent.transport.closing
    assert h.client.private == [recent]


def backend_tls(app, client_ctx, server_ctx, loop):
    """A BackendTls for `app` over a fake transport, its handshake done with a server-side SSLObject:
    (layer, fake transport)."""
    layer = tlsbio.BackendTls(app, client_ctx, DEFAULT_NAMES[0], None, None, loop.create_future())
    raw = FakeTransport(layer)
    layer.connection_made(raw)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(incoming, outgoing, server_side=True)
    for _ in range(10):
        incoming.write(raw.take())
        try:
            server.do_handshake()
        except ssl.SSLWantReadError:
            pass
        layer.data_received(outgoing.read())
        if getattr(app, "transport", None) is layer:
            return layer, raw  # the handshake is done: the layer opened its app
    raise AssertionError("no handshake")


def test_a_closed_backend_tls_connection_leaves_no_cycle_for_the_gc(tmp_path):
    """The client side (BackendTls, issue 16): once the server's connection is lost, the layer, its app,
    the SSL object and its BIOs are freed by reference counting; the cyclic GC finds none of them."""
    server_ctx, client_ctx = tls_contexts(tmp_path)
    loop = asyncio.new_event_loop()
    try:
        with cyclic_garbage({"BackendTls", "_Upstream", "MemoryBIO", "_SSLSocket"}) as left:
            app = _Upstream()
            layer, raw = backend_tls(app, client_ctx, server_ctx, loop)
            layer.connection_lost(None)
            raw.protocol = None  # as uvloop's transport drops its protocol after connection_lost
            del app, layer, raw
    finally:
        loop.close()
    assert left == []


@pytest.mark.parametrize("kept", ["pooled", "private"])
def test_an_idle_backend_tls_connection_gives_back_what_its_bios_grew_to(tmp_path, protocol, kept):
    """The same for idle connections to a TLS backend: an UpstreamConnection over a BackendTls that sent
    64 KiB, idle for a whole tick, frees both BIOs at the worker's tick, whether it waits in its server's
    pool or (send_proxy) among the connections private to one client."""
    server_ctx, client_ctx = tls_contexts(tmp_path)
    h = Harness(protocol)
    loop = asyncio.new_event_loop()
    try:
        app = protocol.UpstreamConnection(h.worker, h.server)
        layer, _ = backend_tls(app, client_ctx, server_ctx, loop)
        layer.write(b"y" * 65536)
        app.idle_since = time.monotonic()
        if kept == "pooled":
            h.server.idle.append(app)  # back in its server's pool, as after a response
        else:
            app.owner = h.client  # as _complete keeps a send_proxy connection for its client
            h.client.private = [app]
        assert bio_sizes(layer)[1] >= 65536
        with ticking(h) as tick:
            tick()
            assert bio_sizes(layer)[1] >= 65536
            tick()
            assert bio_sizes(layer) == (0, 0)
    finally:
        loop.close()
