# Augments framing_py.py (through the framing_c.py symlink) when Cython compiles it: typed state, and
# scan callable from the protocol module without a Python call.
cimport cython

cdef bytes _HEX
cdef bytes _TCHAR


@cython.final
cdef class ChunkedBody:
    cdef public int state
    cdef public long long size
    cdef public Py_ssize_t extensions
    cdef public Py_ssize_t trailers
    cdef public Py_ssize_t trailer_max

    @cython.locals(state=int, size="long long", pos=Py_ssize_t, stop=Py_ssize_t, step=Py_ssize_t,
                   byte="unsigned char", digit=int)
    cpdef Py_ssize_t scan(self, bytes data, Py_ssize_t start, Py_ssize_t end, list out) except? -3


@cython.locals(stop=Py_ssize_t)
cdef Py_ssize_t _line_end(bytes data, Py_ssize_t start, Py_ssize_t end) except -2


@cython.locals(i=Py_ssize_t, c="unsigned char")
cdef bint _has_ctl(bytes data, Py_ssize_t start, Py_ssize_t stop)
