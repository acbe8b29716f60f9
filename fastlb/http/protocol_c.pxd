# Augments protocol_py.py (through the protocol_c.py symlink) when Cython compiles it: the three
# protocol objects as typed cdef classes, their per-request methods as C calls.
cimport cython

from fastlb.http.framing_c cimport ChunkedBody
from fastlb.lb.backend_c cimport Backend, Server
from fastlb.lb.balance_c cimport Balancer
from fastlb.lb.router_c cimport Route, Router

cdef bint _DEBUG
cdef int _F_CHUNKED, _F_CONN_CLOSE, _F_CONN_KEEPALIVE, _F_NO_BODY, _F_UNTIL_CLOSE, _F_UPGRADE
cdef int _F_HTTP10, _F_AMBIGUOUS
cdef object intern, _parse_request, _parse_response, _head_end, _head_and_body, _ChunkedBody, _request_start_problem
cdef Py_ssize_t _CHUNKED_BAD
cdef int C_HEAD, C_BODY, C_CHUNKED, C_HELD, C_TUNNEL, C_DONE, C_CLOSED
cdef int X_NEW, X_WAITING, X_CONNECTING, X_SENT, X_STREAMING, X_DONE
cdef int U_IDLE, U_HEAD, U_LENGTH, U_CHUNKED, U_UNTIL_CLOSE, U_TUNNEL, U_CLOSED
cdef int PAUSE_UPSTREAM, PAUSE_BODY, PAUSE_PIPELINE, PAUSE_UPGRADE, PAUSE_FAILED
cdef frozenset _IDEMPOTENT
cdef bytes _CHUNK_END, _HEAD_END
cdef Py_ssize_t _BODY_BUFFER_CAP, _RESPONSE_HEAD_FACTOR, _MAX_PRIVATE
cdef int _IDLE, _HEADER, _BODY
cdef double DRAIN_GRACE

cdef bint _bare_cr_or_lf(bytearray buf, Py_ssize_t start) except -1
cdef bytes _joined(list payload)
cdef bytes _chunk(bytes data)
cdef tuple _BUCKETS
cdef Py_ssize_t _HIST_SUM
@cython.locals(bound=double, i=Py_ssize_t)
cdef void _observe(double[:] area, Py_ssize_t base, double seconds) noexcept

cdef class Exchange
cdef class UpstreamConnection


@cython.final
cdef class Shared:
    cdef public double[:] area
    cdef public long long max_connections, max_body_bytes
    # Python ints: handed to the parsers as they are, not boxed into new int objects per request.
    cdef public object max_request_line, max_header_bytes, max_headers, max_response_head, max_response_headers
    cdef public double header_timeout, body_timeout, idle_timeout, send_timeout
    cdef public Router router
    cdef public Route no_route
    cdef public object access_log
    cdef public bytes rid_prefix
    cdef public long long rid
    cdef public double now
    cdef public bytes date
    cdef public str iso_time
    cdef public bint draining
    cdef public object acme

    cpdef bytes next_request_id(self)


@cython.final
cdef class ClientConnection:
    cdef public object worker, listener, transport
    cdef bytes proto, port, authority
    cdef public Shared shared
    cdef public bytes client_ip
    cdef bytearray pending
    cdef long long body_left
    cdef ChunkedBody chunked
    cdef public Exchange incoming, active
    cdef public object queue
    cdef public double deadline, send_deadline
    cdef public object held, tunnel, tls_version
    cdef public bytes client_cert, xfcc
    cdef public object sni
    cdef public list private
    # The 4-byte fields together after the 8-byte ones: no padding between them (the object's size is
    # paid per connection, idle ones included).
    cdef public int state, paused, deadline_kind, failed
    cdef bint redirect, checked
    cdef public bint trust_xff, write_paused

    cdef void _to(self, int state) except *
    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, stop=Py_ssize_t, found=Py_ssize_t, now=double)
    cpdef void data_received(self, object data) except *
    cdef void _partial_head(self, bytes data, Py_ssize_t pos, double now) except *
    @cython.locals(shared=Shared)
    cdef Py_ssize_t _head_end(self, bytearray pending, bytes data) except -2
    @cython.locals(shared=Shared, ex=Exchange, route=Route, status=int, flags=int, length="long long")
    cdef bint _request(self, bytes data, Py_ssize_t start, Py_ssize_t stop, double now) except -1
    @cython.locals(ex=Exchange)
    cdef bint _body(self, bytes data, Py_ssize_t size, double now) except -1
    @cython.locals(ex=Exchange)
    cdef void _request_read(self) except *
    cpdef void fail(self, int status) except *
    cpdef void close(self) except *
    cpdef void abort(self) except *
    cpdef void pause(self, int reason) except *
    cpdef void resume(self, int reason) except *
    cpdef void exchange_done(self, Exchange ex) except *
    cdef void start_tunnel(self, Exchange ex, UpstreamConnection conn) except *


@cython.final
@cython.freelist(64)
cdef class Exchange:
    cdef public ClientConnection client
    cdef public int state
    cdef public bytes method, head, request_id
    cdef public int flags
    cdef public Route route
    cdef public Backend backend
    cdef public bint keep_alive, chunk_ok, is_head
    cdef public Server server, last_server
    cdef public tuple tried
    cdef public UpstreamConnection upstream
    cdef public list body
    cdef public Py_ssize_t body_size
    cdef public bint body_sent
    cdef public object key
    cdef public double queued_at, t0, upstream_time
    cdef public int status, attempts
    cdef public object host, target
    cdef public long long bytes_in, bytes_out, body_received
    cdef public object answer, policy, hook_req

    cdef void begin(self, ClientConnection client, bytes method, bytes head, int flags, bytes request_id,
                    Route route, double now) except *
    cdef void _to(self, int state) except *
    cpdef void start(self) except *
    @cython.locals(balancer=Balancer, server=Server)
    cpdef void try_next(self) except *
    @cython.locals(client=ClientConnection, conn=UpstreamConnection, private=list)
    cdef void use(self, Server server, bint pooled) except *
    @cython.locals(server=Server)
    cpdef void release_server(self) except *
    cpdef void upstream_failed(self, Server server, str kind, bint sent, bint stale=*) except *
    cdef void forward(self, bytes data) except *
    cpdef void respond_local(self, int status) except *
    @cython.locals(route=Route, client=ClientConnection, shared=Shared)
    cdef void response_done(self, double now) except *


@cython.final
cdef class UpstreamConnection:
    cdef public object worker, transport
    cdef public Shared shared
    cdef public Server server
    cdef public int state
    cdef public Exchange ex
    cdef bytearray pending
    cdef long long body_left
    cdef ChunkedBody chunked
    cdef bint got_bytes, keep, down_chunked, reused
    cdef public double deadline, idle_since, sent_at
    cdef public ClientConnection tunnel, owner
    cdef public object tls_name
    cdef public bint refused

    cdef void _to(self, int state) except *
    cpdef void attach(self, Exchange ex, bint reused) except *
    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, stop=Py_ssize_t, found=Py_ssize_t, before=Py_ssize_t)
    cpdef void data_received(self, object data) except *
    @cython.locals(server=Server, shared=Shared, status=int, flags=int, length="long long")
    cdef bint _head(self, bytes data, Py_ssize_t start, Py_ssize_t stop, list out) except -1
    cdef void _flush(self, list out) except *
    cdef void _complete(self, list out, bint dirty) except *
    cdef void _fail_response(self, str kind) except *
    cdef void _start_tunnel(self, Exchange ex) except *
    cpdef void timed_out(self) except *
