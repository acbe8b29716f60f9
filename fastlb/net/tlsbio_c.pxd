# Augments tlsbio_py.py (through the tlsbio_c.py symlink) when Cython compiles it: fastlb's TLS records,
# for the listeners' Front and the backends' BackendTls, as C calls.
cimport cython

cdef object _RECORD  # an int object: sslobj.read(_RECORD) boxes nothing per record
cdef object _SSLWantReadError, _SSLZeroReturnError, _SSLError, _get_running_loop, _release
cdef int _IPPROTO_TCP, _TCP_QUICKACK
cdef int B_CONNECTING, B_HANDSHAKE, B_OPEN, B_CLOSED


cdef class TlsBio:
    cdef public object raw, app, peer, local
    cdef public object sslobj, incoming, outgoing
    cdef public object error
    # The flags after the objects: with quiet_ticks they fill 24 bytes, no padding (the object's size is
    # paid per TLS connection).
    cdef public bint opened, paused, closing, lazy, corked
    cdef public int quiet_ticks

    cdef void wrap(self, object context, bint server_side, object server_hostname, object session) except *
    cdef void feed(self, object data) except *
    cdef bint shake(self) except -1
    cdef void open(self) except *
    cdef void _read(self) except *
    cdef void _flush(self) except *
    cpdef void release_buffers(self) except *
    cpdef void write(self, object data) except *
    cpdef void close(self) except *
    cpdef void abort(self) except *
    cpdef bint is_closing(self) except -1
    cpdef void pause_reading(self) except *
    cpdef void resume_reading(self) except *


@cython.final
cdef class BackendTls(TlsBio):
    cdef public int state
    cdef object header, waiter

    cdef void _handshake(self) except *
