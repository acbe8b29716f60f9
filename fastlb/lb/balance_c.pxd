# Augments balance_py.py (through the balance_c.py symlink) when Cython compiles it: the balancers are
# cdef classes over typed Server fields, and `pick` is a cpdef method a compiled caller reaches
# without a Python call.
cimport cython

from fastlb.lb.backend_c cimport Server

cdef Py_ssize_t _MAX_TABLES


cdef class Balancer:
    cdef public list servers
    cdef public list usable

    cpdef server_changed(self, Server server)
    cpdef object pick(self, tuple exclude=*, object key=*)


cdef class SmoothRoundRobin(Balancer):
    cdef long long[::1] current

    cpdef object pick(self, tuple exclude=*, object key=*)

    @cython.locals(usable=list, server=Server, i=Py_ssize_t, best=Py_ssize_t, total=cython.longlong,
                   weight=cython.longlong)
    cpdef object next_of(self, tuple exclude, long long tie_active, long long tie_weight)


cdef class LeastConn(SmoothRoundRobin):
    @cython.locals(server=Server, best_active=cython.longlong, best_weight=cython.longlong)
    cpdef object pick(self, tuple exclude=*, object key=*)


cdef class WeightedRandom(Balancer):
    cdef public long long total

    cpdef object pick(self, tuple exclude=*, object key=*)

    @cython.locals(usable=list, server=Server, chosen=Server, point=cython.double, total=cython.longlong)
    cpdef object draw(self, tuple exclude, object other)


cdef class PowerOfTwo(WeightedRandom):
    @cython.locals(a=Server, b=Server)
    cpdef object pick(self, tuple exclude=*, object key=*)


cdef class MaglevHash(SmoothRoundRobin):
    cdef public Py_ssize_t size
    cdef public list names
    cdef public dict tables
    cdef public list table

    @cython.locals(table=list, servers=list, server=Server, size=Py_ssize_t, slot=Py_ssize_t)
    cpdef object pick(self, tuple exclude=*, object key=*)
