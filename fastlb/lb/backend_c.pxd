# Augments backend_py.py (through the backend_c.py symlink) when Cython compiles it: typed fields, so
# the compiled balancers (balance_c.pxd cimports Server) read weight/active/cap/usable from the struct
# instead of through attribute lookups.  `public`: the data path in Python reads and writes them too.
cimport cython

cdef long long _NO_CAP


cdef class Backend


@cython.final
cdef class Server:
    cdef public Backend backend
    cdef public Py_ssize_t gid
    cdef public str name
    cdef public str host
    cdef public int port
    cdef public int weight
    cdef public int base_weight
    cdef public object states
    cdef public bint ejected
    cdef public double ejected_until
    cdef public int ejections
    cdef public int fails
    cdef public object recovering_since
    cdef public bint was_up
    cdef public bint usable
    cdef public long long active
    cdef public long long cap
    cdef public list idle
    cdef public Py_ssize_t m_upstream
    cdef public Py_ssize_t m_active
    cdef public dict m_errors
    cdef public object link

    cpdef bint failed(self, str kind, double now)
    cpdef object tick(self, double now)
    @cython.locals(usable=bint)
    cdef _tell(self, int old_weight)


@cython.final
cdef class Backend:
    cdef public str name
    cdef public object spec
    cdef public list servers
    cdef public object balancer
    cdef public object hash_key
    cdef public object waiting
    cdef public Py_ssize_t m_retries
    cdef public double response_timeout

    @cython.locals(server=Server)
    cpdef bint saturated(self)
