# Augments backend_tls_py.py (through the backend_tls_c.py symlink) when Cython compiles it: the
# per-record path of fastlb's TLS to backends as C calls (see backend_tls_py.py).
cimport cython

cdef int B_CONNECTING, B_HANDSHAKE, B_OPEN, B_CLOSED
cdef Py_ssize_t _RECORD
cdef object _SSLWantReadError, _SSLZeroReturnError, _SSLError, _MemoryBIO


@cython.final
cdef class BackendTls:
    cdef public object app, raw
    cdef public int state
    cdef public object incoming, outgoing, sslobj
    cdef object header, waiter
    cdef public object error

    cdef void _handshake(self) except *
    cdef void _read(self) except *
    cdef void _flush(self) except *
    cpdef void write(self, object data) except *
    cpdef void close(self) except *
    cpdef void abort(self) except *
    cpdef bint is_closing(self) except -1
    cpdef void pause_reading(self) except *
    cpdef void resume_reading(self) except *
