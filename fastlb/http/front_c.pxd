# Augments front_py.py (through the front_c.py symlink) when Cython compiles it: the per-record path of
# fastlb's TLS layer as C calls (see front_py.py).
cimport cython

from fastlb.net.tlsbio_c cimport TlsBio

cdef int F_PROXY, F_HELLO, F_HANDSHAKE, F_OPEN, F_SPLICE, F_CLOSED
cdef bytes _ACME_TLS, _BODY, _NOT_TLS
cdef tuple _HTTP_REQUEST
cdef object _SSLError
cdef object _parse_proxy_header, _parse_client_hello
cdef int _PROXY_MORE, _PROXY_BAD, _PROXY_OK, _HELLO_MORE, _HELLO_OK

cdef class Splice


@cython.final
cdef class Front:
    cdef public object worker, listener, context, raw, app
    cdef public TlsBio tls
    cdef public Splice splice
    cdef public int state
    cdef bytes buffer
    cdef public object peer, local, sni
    cdef public double deadline

    cdef void _proxy_header(self, bytes data) except *
    cdef void _begin(self, bytes data) except *
    cdef void _hello(self, bytes data) except *
    cdef void _start_tls(self, bytes data, object context) except *
    cdef void _handshake(self) except *
    cdef void _refuse(self, str reason, bint plain_http) except *
    cdef void _give_up(self, str reason) except *
    cdef void _count(self, str reason) except *
    cdef void _open(self) except *


@cython.final
cdef class Splice:
    cdef public Front front
    cdef public object worker, backend, transport, server
    cdef tuple tried
    cdef list pending
    cdef public bint closed
    cdef Py_ssize_t m_in, m_out
