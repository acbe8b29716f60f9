# Augments router_py.py (through the router_c.py symlink) when Cython compiles it: a match per request
# is dict lookups and bytes slicing in C, and the data path reads a Route's fields from the struct.
cimport cython


@cython.final
cdef class Route:
    cdef public str name
    cdef public object backend
    cdef public bint require_client_cert
    cdef public object policy
    cdef public tuple m_requests
    cdef public Py_ssize_t m_duration


@cython.final
cdef class _PathTable:
    cdef public dict exact
    cdef public dict prefix

    @cython.locals(route=Route, p=bytes, cut=Py_ssize_t)
    cdef Route match(self, bytes path)


@cython.final
cdef class Router:
    cdef public list routes
    cdef dict _exact, _wildcard, _hosts
    cdef _PathTable _any
    cdef Route _default

    @cython.locals(q=Py_ssize_t, path=bytes, tables=tuple, table=_PathTable, route=Route)
    cpdef Route match(self, bytes host, bytes target)
    cdef tuple _tables_for(self, bytes host)
