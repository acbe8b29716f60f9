"""Giving back what an idle connection's memory BIOs grew to.

OpenSSL's memory BIO never shrinks (crypto/bio/bss_mem.c): a read only moves a pointer, and a write
grows the buffer to the most it ever held, never less.  So the outgoing BIO of a keep-alive connection
that once carried a 64 KiB response keeps 64 KiB for as long as the connection lives, and one that only
shook hands keeps the handshake's flight (about 1 KiB), the incoming one the ClientHello.  nginx writes
records straight to the socket and keeps nothing of the kind.  `ssl.MemoryBIO` cannot free its buffer,
so `release` swaps an empty BIO's buffer for a new, empty one: BIO_C_SET_BUF_MEM frees the old one
(bss_mem.c `mem_ctrl`), called through ctypes in the libcrypto the `ssl` module itself uses.

Two things this relies on are outside any public API, and both are checked once, on import:
- CPython's `PySSLMemoryBIO` (Modules/_ssl.c) holds its `BIO *` right after the object header;
- the libcrypto mapped into the process (/proc/self/maps) is the one `_ssl` calls.
If a check fails, `WORKS` is False and `release` leaves the buffer where it is (memory, not behaviour,
is what changes).
"""

import ctypes
import ssl

# openssl/bio.h
_BIO_CTRL_PENDING = 10
_BIO_C_SET_BUF_MEM = 114
_BIO_CLOSE = 1
# The BIO pointer follows PyObject_HEAD, whose size is object's own.
_HEADER = object.__basicsize__


def _load():
    """(BIO_ctrl, BUF_MEM_new) of the libcrypto `_ssl` uses, once a probe BIO shows they work; else None."""
    if ssl.MemoryBIO.__basicsize__ < _HEADER + ctypes.sizeof(ctypes.c_void_p):
        return None
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "/libcrypto.so" in line), None)
        if path is None:  # OpenSSL linked into _ssl statically
            return None
        lib = ctypes.CDLL(path)  # already loaded by _ssl: the same handle, not a second copy
    except OSError:
        return None
    ctrl, new = lib.BIO_ctrl, lib.BUF_MEM_new
    ctrl.restype, ctrl.argtypes = ctypes.c_long, [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    new.restype, new.argtypes = ctypes.c_void_p, []
    probe = ssl.MemoryBIO()
    probe.write(b"probe")
    if ctrl(_pointer(probe), _BIO_CTRL_PENDING, 0, None) != 5:
        return None
    probe.read()
    _swap(ctrl, new, probe)
    probe.write(b"after")
    if ctrl(_pointer(probe), _BIO_CTRL_PENDING, 0, None) != 5 or probe.read() != b"after":
        return None
    return ctrl, new


def _pointer(bio) -> int:
    return ctypes.c_void_p.from_address(id(bio) + _HEADER).value


def _swap(ctrl, new, bio) -> None:
    buf = new()
    if buf:  # NULL only when malloc failed: then the old buffer simply stays
        ctrl(_pointer(bio), _BIO_C_SET_BUF_MEM, _BIO_CLOSE, buf)


_FUNCTIONS = _load()
WORKS = _FUNCTIONS is not None


def release(bio) -> None:
    """Free the buffer of `bio`, an `ssl.MemoryBIO` with nothing pending (the caller checks)."""
    if _FUNCTIONS is not None:
        _swap(*_FUNCTIONS, bio)
