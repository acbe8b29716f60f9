# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``fastlb._core_py``: the per-request computations of the proxy.

Read ``_core_py.py`` first: it states every rule in plain Python and is the reference. This module
implements the same rules with C loops; tests/test_core.py checks with hypothesis that both return
identical values and raise the same exception types for any input.

How it stays fast:
- One pass over the header list classifies every field with a switch on the name length and a memcmp
  against lowercase names (no ``bytes.lower()``, no dict), validating name and value on the way.
  Everything it learns goes into a C array of ``_Field`` records and a few C counters.
- Connection options are not collected into a set: the rare request that lists an end-to-end field in
  Connection pays a rescan of its Connection values per candidate field instead, and every other
  request pays nothing.
- The head is written into one ``bytes`` object allocated at its exact final size.
- Between the first read of ``headers`` and the last, nothing runs that could execute Python code (no
  container is allocated, so the cyclic GC cannot start and run finalisers): the raw pointers into the
  caller's ``bytes`` stay valid without copying or pinning the list.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_SIZE
from libc.stdint cimport int32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from http import HTTPStatus

# Same values as fastlb._core_py (a test compares them); see there for their meaning.
F_CONTENT_LENGTH = 1
F_CHUNKED = 2
F_EXPECT_CONTINUE = 4
F_UPGRADE = 8
F_CONN_CLOSE = 16
F_CONN_KEEPALIVE = 32
F_HAS_HOST = 64
F_NO_BODY = 128
F_UNTIL_CLOSE = 256

cdef enum:
    C_CONTENT_LENGTH = 1
    C_CHUNKED = 2
    C_EXPECT_CONTINUE = 4
    C_UPGRADE = 8
    C_CONN_CLOSE = 16
    C_CONN_KEEPALIVE = 32
    C_HAS_HOST = 64
    C_NO_BODY = 128
    C_UNTIL_CLOSE = 256

cdef enum Kind:
    K_OTHER = 0
    K_HOST
    K_CONTENT_LENGTH
    K_TRANSFER_ENCODING
    K_CONNECTION
    K_UPGRADE
    K_EXPECT
    K_HOP            # other hop-by-hop fields (RFC 9110 §7.6.1): dropped, nothing to interpret
    K_XFF
    K_XF_OTHER       # X-Forwarded-Proto/Port/Host: always replaced by ours
    K_REQUEST_ID
    K_DROP           # X_Forwarded_For & co (see the underscore rule in _core_py.request_head)

ctypedef struct _Field:
    const unsigned char *name
    const unsigned char *value
    Py_ssize_t name_len
    Py_ssize_t value_len
    int kind
    bint keep

cdef enum:
    # Headers per message that fit the stack array; more (up to the 100 the worker allows, or any
    # number from a direct caller) use the heap.
    STACK_FIELDS = 64
    # Longest name _classify knows ("transfer-encoding", "x-forwarded-proto").
    MAX_KNOWN_NAME = 17
    # 18 digits always fit in the int64 body counters; 19 may not.
    MAX_CL_DIGITS = 18
    MAX_WEIGHT = 0x7FFFFFFF
    MAX_TABLE = 0x7FFFFFFF

cdef extern from *:
    """
    #define FASTLB_FNV_OFFSET 0xCBF29CE484222325ULL
    #define FASTLB_FNV_PRIME 0x100000001B3ULL
    #define FASTLB_FMIX_C1 0xFF51AFD7ED558CCDULL
    #define FASTLB_FMIX_C2 0xC4CEB9FE1A85EC53ULL
    """
    const uint64_t FNV_OFFSET "FASTLB_FNV_OFFSET"
    const uint64_t FNV_PRIME "FASTLB_FNV_PRIME"
    const uint64_t FMIX_C1 "FASTLB_FMIX_C1"
    const uint64_t FMIX_C2 "FASTLB_FMIX_C2"

# _TCHAR_LOWER[c]: c lowercased if c is a tchar (RFC 9110 §5.6.2), else 0. _LOWER: ASCII-only
# lowercasing, like bytes.lower().
cdef unsigned char _TCHAR_LOWER[256]
cdef unsigned char _LOWER[256]


cdef void _init_tables():
    cdef int c
    cdef bytes tchar = (b"!#$%&'*+-.^_`|~0123456789"
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    for c in range(256):
        _LOWER[c] = c + 32 if 65 <= c <= 90 else c
        _TCHAR_LOWER[c] = 0
    for c in tchar:
        _TCHAR_LOWER[c] = _LOWER[c]


_init_tables()

# Status lines by code for the standard phrases: "HTTP/1.1 200 OK\r\n" (STYLE: pre-encoded at import).
cdef list _REASON_BY_STATUS = [None] * 1000
for _s in HTTPStatus:
    _REASON_BY_STATUS[_s.value] = _s.phrase.encode("ascii")
del _s


cdef inline bint _is(const unsigned char *p, const char *lowercase_literal, Py_ssize_t n) noexcept nogil:
    return memcmp(p, lowercase_literal, n) == 0


cdef Kind _classify(const unsigned char *low, Py_ssize_t n) noexcept nogil:
    # `low` is the lowercased name. Switching on the length first means most names are rejected
    # after one comparison, or none.
    if n == 2:
        if _is(low, b"te", 2):
            return K_HOP
    elif n == 4:
        if _is(low, b"host", 4):
            return K_HOST
    elif n == 6:
        if _is(low, b"expect", 6):
            return K_EXPECT
    elif n == 7:
        if _is(low, b"upgrade", 7):
            return K_UPGRADE
        if _is(low, b"trailer", 7):
            return K_HOP
    elif n == 10:
        if _is(low, b"connection", 10):
            return K_CONNECTION
        if _is(low, b"keep-alive", 10):
            return K_HOP
    elif n == 12:
        if _is(low, b"x-request-id", 12):
            return K_REQUEST_ID
    elif n == 14:
        if _is(low, b"content-length", 14):
            return K_CONTENT_LENGTH
    elif n == 15:
        if _is(low, b"x-forwarded-for", 15):
            return K_XFF
    elif n == 16:
        if _is(low, b"proxy-connection", 16):
            return K_HOP
        if _is(low, b"x-forwarded-port", 16) or _is(low, b"x-forwarded-host", 16):
            return K_XF_OTHER
    elif n == 17:
        if _is(low, b"transfer-encoding", 17):
            return K_TRANSFER_ENCODING
        if _is(low, b"x-forwarded-proto", 17):
            return K_XF_OTHER
    return K_OTHER


cdef inline Kind _response_kind(Kind kind) noexcept nogil:
    # In a response only framing and hop-by-hop names mean something; Host, Expect or X-Forwarded-*
    # there are plain end-to-end fields.
    if kind == K_HOST or kind == K_EXPECT or kind == K_XFF or kind == K_XF_OTHER or kind == K_REQUEST_ID:
        return K_OTHER
    return kind


cdef inline bint _listable(Kind kind, bint response) noexcept nogil:
    # Kinds a Connection option removes (RFC 9110 §7.6.1). Never Host or Content-Length: see _LISTABLE
    # in _core_py. Every other kind is dropped anyway.
    if response:
        return kind == K_OTHER
    return kind == K_OTHER or kind == K_EXPECT


cdef inline uint64_t _zero_byte(uint64_t v) noexcept nogil:
    # Non-zero iff some byte of v is 0 (the classic "haszero" bit trick, exact for this use).
    return (v - <uint64_t>0x0101010101010101ULL) & ~v & <uint64_t>0x8080808080808080ULL


cdef inline bint _bad_value(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # RFC 9110 §5.5: CR, LF or NUL in a field value must be rejected (or replaced): forwarded, they
    # would split the field. Checked 8 bytes per step without branches (measured on the fields of
    # bench/micro_core.py: 4.0 ns per value, three memchr calls 4.9 ns, a table-driven byte loop 8.1 ns).
    cdef uint64_t v, bad = 0
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&v, p + i, 8)  # unaligned load; compiles to one mov
        bad |= _zero_byte(v) | _zero_byte(v ^ <uint64_t>0x0A0A0A0A0A0A0A0AULL) | _zero_byte(
            v ^ <uint64_t>0x0D0D0D0D0D0D0D0DULL)
        i += 8
    while i < n:
        if p[i] == 0 or p[i] == 10 or p[i] == 13:
            return True
        i += 1
    return bad != 0


cdef inline bint _bad_token(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if n == 0:
        return True
    for i in range(n):
        if _TCHAR_LOWER[p[i]] == 0:
            return True
    return False


cdef inline void _trim(const unsigned char *p, Py_ssize_t n, Py_ssize_t *start, Py_ssize_t *end) noexcept nogil:
    # OWS = *( SP / HTAB ) around a field value is not part of it (RFC 9110 §5.5).
    cdef Py_ssize_t s = 0, e = n
    while s < e and (p[s] == c' ' or p[s] == c'\t'):
        s += 1
    while e > s and (p[e - 1] == c' ' or p[e - 1] == c'\t'):
        e -= 1
    start[0] = s
    end[0] = e


cdef inline bint _ieq(const unsigned char *p, Py_ssize_t n, const char *lowercase_literal,
                      Py_ssize_t literal_len) noexcept nogil:
    cdef Py_ssize_t i
    if n != literal_len:
        return False
    for i in range(n):
        if _LOWER[p[i]] != <unsigned char>lowercase_literal[i]:
            return False
    return True


cdef inline bint _ieq_trimmed(const unsigned char *p, Py_ssize_t n, const char *lowercase_literal,
                              Py_ssize_t literal_len) noexcept nogil:
    cdef Py_ssize_t s, e
    _trim(p, n, &s, &e)
    return _ieq(p + s, e - s, lowercase_literal, literal_len)


cdef inline bint _valid_content_length(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # RFC 9110 §8.6: 1*DIGIT, and no list (RFC 9112 §6.3 item 5); 18 digits always fit in an int64.
    cdef Py_ssize_t s, e, i
    _trim(p, n, &s, &e)
    if e - s == 0 or e - s > MAX_CL_DIGITS:
        return False
    for i in range(s, e):
        if p[i] < c'0' or p[i] > c'9':
            return False
    return True


# Connection options that are not field names we drop anyway.
cdef enum:
    OPT_CLOSE = 1
    OPT_KEEPALIVE = 2
    OPT_UPGRADE = 4
    OPT_LISTS_FIELD = 8   # some option may name a field we would otherwise forward


cdef int _connection_options(const unsigned char *p, Py_ssize_t n, bint response) noexcept nogil:
    # RFC 9110 §7.6.1 + §5.6.1: comma-separated, case-insensitive tokens; empty elements are ignored.
    cdef Py_ssize_t i = 0, j, k, s, e
    cdef int options = 0
    cdef unsigned char low[MAX_KNOWN_NAME]
    cdef Kind kind
    while i <= n:
        j = i
        while j < n and p[j] != c',':
            j += 1
        _trim(p + i, j - i, &s, &e)
        s += i
        e += i
        if e > s:
            if _ieq(p + s, e - s, b"keep-alive", 10):
                options |= OPT_KEEPALIVE
            elif _ieq(p + s, e - s, b"upgrade", 7):
                options |= OPT_UPGRADE
            else:
                if _ieq(p + s, e - s, b"close", 5):
                    options |= OPT_CLOSE
                kind = K_OTHER
                if e - s <= MAX_KNOWN_NAME:
                    for k in range(e - s):
                        low[k] = _LOWER[p[s + k]]
                    kind = _classify(low, e - s)
                    if response:
                        kind = _response_kind(kind)
                if _listable(kind, response):
                    options |= OPT_LISTS_FIELD
        i = j + 1
    return options


cdef bint _listed(const _Field *fields, Py_ssize_t count, const unsigned char *name,
                  Py_ssize_t name_len) noexcept nogil:
    # Is `name` among the options of any Connection field? Rescanning is cheaper than building a set
    # because the answer is needed only when some option is not a well-known one (OPT_LISTS_FIELD).
    cdef Py_ssize_t f, i, j, k, s, e, n
    cdef const unsigned char *p
    for f in range(count):
        if fields[f].kind != K_CONNECTION:
            continue
        p = fields[f].value
        n = fields[f].value_len
        i = 0
        while i <= n:
            j = i
            while j < n and p[j] != c',':
                j += 1
            _trim(p + i, j - i, &s, &e)
            if e - s == name_len:
                s += i
                for k in range(name_len):
                    if _LOWER[p[s + k]] != _LOWER[name[k]]:
                        break
                else:
                    return True
            i = j + 1
    return False


cdef int _upgrade_protocol(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # First non-empty element of an Upgrade value: 0 = none in this value, 1 = a protocol we tunnel,
    # 2 = h2c (RFC 9113 §3.1 deprecated that upgrade; we would have to speak HTTP/2 to route it).
    cdef Py_ssize_t i = 0, j, s, e, slash
    while i <= n:
        j = i
        while j < n and p[j] != c',':
            j += 1
        _trim(p + i, j - i, &s, &e)
        s += i
        e += i
        if e > s:
            slash = s
            while slash < e and p[slash] != c'/':
                slash += 1
            return 2 if _ieq(p + s, slash - s, b"h2c", 3) else 1
        i = j + 1
    return 0


cdef inline char *_put(char *out, const void *src, Py_ssize_t n) noexcept nogil:
    memcpy(out, src, n)
    return out + n


cdef inline char *_put_field(char *out, const _Field *f) noexcept nogil:
    out = _put(out, f.name, f.name_len)
    out = _put(out, b": ", 2)
    out = _put(out, f.value, f.value_len)
    return _put(out, b"\r\n", 2)


cdef inline int _field_at(list headers, Py_ssize_t i, _Field *f) except -1:
    item = headers[i]
    if not isinstance(item, tuple) or PyTuple_GET_SIZE(item) != 2:
        raise TypeError("headers must be a list of (name: bytes, value: bytes) tuples")
    name = (<tuple>item)[0]
    value = (<tuple>item)[1]
    if not isinstance(name, bytes) or not isinstance(value, bytes):
        raise TypeError("headers must be a list of (name: bytes, value: bytes) tuples")
    # Borrowed: the list holds the tuple, the tuple holds the bytes, and nothing mutates them while we
    # run (see the module docstring).
    f.name = <const unsigned char *>PyBytes_AS_STRING(name)
    f.name_len = PyBytes_GET_SIZE(name)
    f.value = <const unsigned char *>PyBytes_AS_STRING(value)
    f.value_len = PyBytes_GET_SIZE(value)
    f.keep = False
    return 0


cdef inline bint _name_check_lower(_Field *f, unsigned char *low, bint *underscore) noexcept nogil:
    # One loop validates the name (RFC 9110 §5.1: field-name = token) and lowercases the prefix that
    # could be a name we know. Returns True when the name is bad.
    cdef Py_ssize_t i, n = f.name_len
    cdef unsigned char ch
    cdef bint bad = n == 0
    underscore[0] = False
    for i in range(n):
        ch = _TCHAR_LOWER[f.name[i]]
        if ch == 0:
            bad = True
        elif ch == c'_':
            underscore[0] = True
        if i < MAX_KNOWN_NAME:
            low[i] = ch
    return bad


def request_head(method, target, headers, client_ip, proto, port, bint trust_xff, request_id):
    """See ``fastlb._core_py.request_head``."""
    if not (isinstance(method, bytes) and isinstance(target, bytes) and isinstance(client_ip, bytes)
            and isinstance(proto, bytes) and isinstance(port, bytes) and isinstance(request_id, bytes)):
        raise TypeError("method, target, client_ip, proto, port and request_id must be bytes")
    if not isinstance(headers, list):
        raise TypeError("headers must be a list of (name: bytes, value: bytes) tuples")

    cdef Py_ssize_t count = PyList_GET_SIZE(headers)
    cdef _Field stack_fields[STACK_FIELDS]
    cdef _Field *fields = stack_fields
    if count > STACK_FIELDS:
        fields = <_Field *>malloc(count * sizeof(_Field))
        if fields == NULL:
            raise MemoryError()
    try:
        return _request_head(<bytes>method, <bytes>target, <list>headers, count, fields,
                             <bytes>client_ip, <bytes>proto, <bytes>port, trust_xff, <bytes>request_id)
    finally:
        if fields != stack_fields:
            free(fields)


cdef tuple _request_head(bytes method, bytes target, list headers, Py_ssize_t count, _Field *fields,
                         bytes client_ip, bytes proto, bytes port, bint trust_xff, bytes request_id):
    cdef const unsigned char *mp = <const unsigned char *>PyBytes_AS_STRING(method)
    cdef const unsigned char *tp = <const unsigned char *>PyBytes_AS_STRING(target)
    cdef Py_ssize_t ml = PyBytes_GET_SIZE(method), tl = PyBytes_GET_SIZE(target)
    cdef Py_ssize_t i, k, s, e
    cdef bint bad = False, underscore
    cdef int host_count = 0, cl_count = 0, te_count = 0
    cdef bint cl_ok = False, te_chunked = False, expect_seen = False, expect_bad = False
    cdef int options = 0, upgrade = 0, upgrade_count = 0
    cdef Py_ssize_t upgrade_len = 0, xff_len = 0
    cdef Py_ssize_t host_field = -1, rid_field = -1, rid_s = 0, rid_e = 0, host_s = 0, host_e = 0
    cdef unsigned char low[MAX_KNOWN_NAME]
    cdef _Field *f
    cdef Kind alias
    cdef int flags = 0, error = 0

    # The parser already checked the request line; these two checks only keep a caller bug from turning
    # into header injection upstream (RFC 9112 §3: method = token, target without CTL or SP).
    bad = _bad_token(mp, ml) or tl == 0
    for i in range(tl):
        if tp[i] <= 0x20 or tp[i] == 0x7F:
            bad = True
            break

    for i in range(count):
        f = &fields[i]
        _field_at(headers, i, f)
        if _name_check_lower(f, low, &underscore) or _bad_value(f.value, f.value_len):
            bad = True
        f.kind = _classify(low, f.name_len) if f.name_len <= MAX_KNOWN_NAME else K_OTHER
        if f.kind == K_OTHER and underscore and f.name_len <= MAX_KNOWN_NAME:
            # CGI/WSGI-style environs fold "-" and "_" together: see _core_py for the rule.
            for k in range(f.name_len):
                if low[k] == c'_':
                    low[k] = c'-'
            alias = _classify(low, f.name_len)
            if alias == K_HOST or alias == K_CONTENT_LENGTH or alias == K_TRANSFER_ENCODING:
                bad = True
            elif alias == K_XFF or alias == K_XF_OTHER or alias == K_REQUEST_ID:
                f.kind = K_DROP

        if f.kind == K_OTHER or f.kind == K_HOP or f.kind == K_DROP or f.kind == K_XF_OTHER:
            continue
        if f.kind == K_HOST:
            # RFC 9112 §3.2: more than one Host field line is a 400.
            host_count += 1
            if host_field < 0:
                host_field = i
                _trim(f.value, f.value_len, &host_s, &host_e)
        elif f.kind == K_CONTENT_LENGTH:
            cl_count += 1
            cl_ok = _valid_content_length(f.value, f.value_len)
        elif f.kind == K_TRANSFER_ENCODING:
            te_count += 1
            # RFC 9112 §7: coding names are case-insensitive.
            te_chunked = _ieq_trimmed(f.value, f.value_len, b"chunked", 7)
        elif f.kind == K_CONNECTION:
            options |= _connection_options(f.value, f.value_len, False)
        elif f.kind == K_UPGRADE:
            _trim(f.value, f.value_len, &s, &e)
            if e > s:
                upgrade_len += e - s
                upgrade_count += 1
                if upgrade == 0:
                    upgrade = _upgrade_protocol(f.value + s, e - s)
        elif f.kind == K_EXPECT:
            # RFC 9110 §10.1.1: 100-continue is the only expectation defined; anything else gets 417.
            expect_seen = True
            if not _ieq_trimmed(f.value, f.value_len, b"100-continue", 12):
                expect_bad = True
        elif f.kind == K_XFF:
            if trust_xff:
                _trim(f.value, f.value_len, &s, &e)
                if e > s:
                    xff_len += e - s + 2
        elif f.kind == K_REQUEST_ID:
            if rid_field < 0:
                _trim(f.value, f.value_len, &s, &e)
                if e > s:
                    rid_field = i
                    rid_s = s
                    rid_e = e

    if cl_count == 1 and cl_ok:
        flags |= C_CONTENT_LENGTH
    if te_count == 1 and te_chunked:
        flags |= C_CHUNKED
    if expect_seen and not expect_bad:
        flags |= C_EXPECT_CONTINUE
    if options & OPT_UPGRADE and upgrade == 1:
        flags |= C_UPGRADE
    if options & OPT_CLOSE:
        flags |= C_CONN_CLOSE
    if options & OPT_KEEPALIVE:
        flags |= C_CONN_KEEPALIVE
    if host_count:
        flags |= C_HAS_HOST

    # Precedence as in _core_py: framing (400) > transfer coding (501) > expectation (417).
    if bad or host_count > 1 or cl_count > 1 or (cl_count and not cl_ok) or (cl_count and te_count):
        error = 400
    elif te_count and not (te_count == 1 and te_chunked):
        error = 501
    elif expect_bad:
        error = 417

    host = None
    if host_field >= 0:
        host = PyBytes_FromStringAndSize(<const char *>fields[host_field].value + host_s, host_e - host_s)
    if rid_field >= 0:
        request_id = PyBytes_FromStringAndSize(<const char *>fields[rid_field].value + rid_s, rid_e - rid_s)
    if error:
        return error, flags, host, request_id, b""

    # Size first, then one allocation and memcpy into it.
    cdef bint check_listed = (options & OPT_LISTS_FIELD) != 0
    cdef Py_ssize_t size = ml + tl + 12  # method SP target " HTTP/1.1\r\n"
    for i in range(count):
        f = &fields[i]
        if f.kind == K_HOST or f.kind == K_CONTENT_LENGTH:
            f.keep = True
        elif f.kind == K_OTHER or f.kind == K_EXPECT:
            f.keep = not (check_listed and _listed(fields, count, f.name, f.name_len))
        if f.keep:
            size += f.name_len + f.value_len + 4
    size += 17 + xff_len + PyBytes_GET_SIZE(client_ip) + 2         # X-Forwarded-For: ...\r\n
    size += 19 + PyBytes_GET_SIZE(proto) + 2                        # X-Forwarded-Proto: ...\r\n
    size += 18 + PyBytes_GET_SIZE(port) + 2                         # X-Forwarded-Port: ...\r\n
    if host is not None:
        size += 18 + (host_e - host_s) + 2                          # X-Forwarded-Host: ...\r\n
    size += 14 + PyBytes_GET_SIZE(request_id) + 2                   # X-Request-ID: ...\r\n
    if flags & C_CHUNKED:
        size += 28                                                  # Transfer-Encoding: chunked\r\n
    if flags & C_UPGRADE:
        size += 9 + upgrade_len + 2 * (upgrade_count - 1) + 2 + 21  # Upgrade: ...\r\nConnection: upgrade\r\n
    size += 2

    head = PyBytes_FromStringAndSize(NULL, size)
    cdef char *start = PyBytes_AS_STRING(head)
    cdef char *w = start
    w = _put(w, mp, ml)
    w = _put(w, b" ", 1)
    w = _put(w, tp, tl)
    w = _put(w, b" HTTP/1.1\r\n", 11)
    for i in range(count):
        if fields[i].keep:
            w = _put_field(w, &fields[i])
    w = _put(w, b"X-Forwarded-For: ", 17)
    if xff_len:
        for i in range(count):
            if fields[i].kind == K_XFF:
                _trim(fields[i].value, fields[i].value_len, &s, &e)
                if e > s:
                    w = _put(w, fields[i].value + s, e - s)
                    w = _put(w, b", ", 2)
    w = _put(w, PyBytes_AS_STRING(client_ip), PyBytes_GET_SIZE(client_ip))
    w = _put(w, b"\r\nX-Forwarded-Proto: ", 21)
    w = _put(w, PyBytes_AS_STRING(proto), PyBytes_GET_SIZE(proto))
    w = _put(w, b"\r\nX-Forwarded-Port: ", 20)
    w = _put(w, PyBytes_AS_STRING(port), PyBytes_GET_SIZE(port))
    w = _put(w, b"\r\n", 2)
    if host is not None:
        w = _put(w, b"X-Forwarded-Host: ", 18)
        w = _put(w, fields[host_field].value + host_s, host_e - host_s)
        w = _put(w, b"\r\n", 2)
    w = _put(w, b"X-Request-ID: ", 14)
    w = _put(w, PyBytes_AS_STRING(request_id), PyBytes_GET_SIZE(request_id))
    w = _put(w, b"\r\n", 2)
    if flags & C_CHUNKED:
        w = _put(w, b"Transfer-Encoding: chunked\r\n", 28)
    if flags & C_UPGRADE:
        w = _put(w, b"Upgrade: ", 9)
        w = _write_upgrade(w, fields, count)
        w = _put(w, b"\r\nConnection: upgrade\r\n", 23)
    w = _put(w, b"\r\n", 2)
    if w - start != size:  # pragma: no cover - a sizing bug must never reach a socket
        raise AssertionError("request head size mismatch")
    return 0, flags, host, request_id, head


cdef char *_write_upgrade(char *w, const _Field *fields, Py_ssize_t count) noexcept nogil:
    # The Upgrade values, trimmed, non-empty, joined with ", " (RFC 9110 §5.3 list combination).
    cdef Py_ssize_t i, s, e
    cdef bint first = True
    for i in range(count):
        if fields[i].kind == K_UPGRADE:
            _trim(fields[i].value, fields[i].value_len, &s, &e)
            if e > s:
                if not first:
                    w = _put(w, b", ", 2)
                w = _put(w, fields[i].value + s, e - s)
                first = False
    return w


def response_head(status, reason, headers, bint head_request, bint chunk_ok, bint close):
    """See ``fastlb._core_py.response_head``."""
    if not isinstance(status, int):
        raise TypeError("status must be an int")
    if not isinstance(reason, bytes):
        raise TypeError("reason must be bytes")
    if not isinstance(headers, list):
        raise TypeError("headers must be a list of (name: bytes, value: bytes) tuples")
    cdef int overflow = 0
    cdef long long code = PyLong_AsLongLongAndOverflow(status, &overflow)
    if overflow:
        code = -1  # out of range: a 502 below, as in the twin

    cdef Py_ssize_t count = PyList_GET_SIZE(headers)
    cdef _Field stack_fields[STACK_FIELDS]
    cdef _Field *fields = stack_fields
    if count > STACK_FIELDS:
        fields = <_Field *>malloc(count * sizeof(_Field))
        if fields == NULL:
            raise MemoryError()
    try:
        return _response_head(code, <bytes>reason, <list>headers, count, fields, head_request, chunk_ok,
                              close)
    finally:
        if fields != stack_fields:
            free(fields)


cdef tuple _response_head(long long status, bytes reason, list headers, Py_ssize_t count, _Field *fields,
                          bint head_request, bint chunk_ok, bint close):
    cdef const unsigned char *rp = <const unsigned char *>PyBytes_AS_STRING(reason)
    cdef Py_ssize_t rl = PyBytes_GET_SIZE(reason)
    cdef Py_ssize_t i, s, e
    cdef bint underscore
    cdef int cl_count = 0, te_count = 0, upgrade_count = 0, options = 0, flags = 0
    cdef bint cl_ok = False, te_chunked = False
    cdef Py_ssize_t upgrade_len = 0
    cdef unsigned char low[MAX_KNOWN_NAME]
    cdef _Field *f

    # RFC 9112 §4: status-code = 3DIGIT; the reason phrase excludes CR/LF (and NUL, as field values).
    cdef bint bad = status < 100 or status > 999 or _bad_value(rp, rl)
    for i in range(count):
        f = &fields[i]
        _field_at(headers, i, f)
        if _name_check_lower(f, low, &underscore) or _bad_value(f.value, f.value_len):
            bad = True
        f.kind = _response_kind(_classify(low, f.name_len)) if f.name_len <= MAX_KNOWN_NAME else K_OTHER
        if f.kind == K_CONTENT_LENGTH:
            cl_count += 1
            cl_ok = _valid_content_length(f.value, f.value_len)
        elif f.kind == K_TRANSFER_ENCODING:
            te_count += 1
            te_chunked = _ieq_trimmed(f.value, f.value_len, b"chunked", 7)
        elif f.kind == K_CONNECTION:
            options |= _connection_options(f.value, f.value_len, True)
        elif f.kind == K_UPGRADE:
            _trim(f.value, f.value_len, &s, &e)
            if e > s:
                upgrade_len += e - s
                upgrade_count += 1

    if cl_count == 1 and cl_ok:
        flags |= C_CONTENT_LENGTH
    if te_count == 1 and te_chunked:
        flags |= C_CHUNKED
    if options & OPT_CLOSE:
        flags |= C_CONN_CLOSE
    if options & OPT_KEEPALIVE:
        flags |= C_CONN_KEEPALIVE
    if status == 101 and upgrade_count:
        flags |= C_UPGRADE
    if 100 <= status < 200 or status == 204 or status == 304 or head_request:
        # RFC 9112 §6.3 item 1.
        flags |= C_NO_BODY
    elif not cl_count and not te_count:
        # RFC 9112 §6.3 item 8.
        flags |= C_UNTIL_CLOSE

    if bad or cl_count > 1 or (cl_count and not cl_ok) or (cl_count and te_count) or (
            te_count and not (te_count == 1 and te_chunked)):
        return 502, flags, b""

    cdef bytes standard = <bytes>_REASON_BY_STATUS[status] if _REASON_BY_STATUS[status] is not None else b""
    if rl == 0:
        rp = <const unsigned char *>PyBytes_AS_STRING(standard)
        rl = PyBytes_GET_SIZE(standard)

    cdef bint check_listed = (options & OPT_LISTS_FIELD) != 0
    cdef bint streamed = (flags & (C_CHUNKED | C_UNTIL_CLOSE)) != 0 and not (flags & C_NO_BODY)
    cdef Py_ssize_t size = 13 + rl + 2  # "HTTP/1.1 200 " reason "\r\n"
    for i in range(count):
        f = &fields[i]
        if f.kind == K_CONTENT_LENGTH:
            f.keep = True
        elif f.kind == K_OTHER:
            f.keep = not (check_listed and _listed(fields, count, f.name, f.name_len))
        if f.keep:
            size += f.name_len + f.value_len + 4
    if streamed and chunk_ok:
        size += 28                                                   # Transfer-Encoding: chunked\r\n
    if flags & C_UPGRADE:
        size += 9 + upgrade_len + 2 * (upgrade_count - 1) + 2 + 21   # Upgrade: ...\r\nConnection: upgrade\r\n
    elif close or (streamed and not chunk_ok):
        size += 19                                                   # Connection: close\r\n
    size += 2

    head = PyBytes_FromStringAndSize(NULL, size)
    cdef char *start = PyBytes_AS_STRING(head)
    cdef char *w = _put(start, b"HTTP/1.1 ", 9)
    w[0] = <char>(c'0' + status // 100)
    w[1] = <char>(c'0' + status // 10 % 10)
    w[2] = <char>(c'0' + status % 10)
    w[3] = c' '
    w = _put(w + 4, rp, rl)
    w = _put(w, b"\r\n", 2)
    for i in range(count):
        if fields[i].keep:
            w = _put_field(w, &fields[i])
    if streamed and chunk_ok:
        # We decode the backend's chunks (or read until its close) and chunk again for the client.
        w = _put(w, b"Transfer-Encoding: chunked\r\n", 28)
    if flags & C_UPGRADE:
        w = _put(w, b"Upgrade: ", 9)
        w = _write_upgrade(w, fields, count)
        w = _put(w, b"\r\nConnection: upgrade\r\n", 23)
    elif close or (streamed and not chunk_ok):
        # HTTP/1.0 client: the end of the connection delimits the body (RFC 9112 §6.3 item 8).
        w = _put(w, b"Connection: close\r\n", 19)
    w = _put(w, b"\r\n", 2)
    if w - start != size:  # pragma: no cover - a sizing bug must never reach a socket
        raise AssertionError("response head size mismatch")
    return 0, flags, head


# FNV-1a 64 (draft-eastlake-fnv §6) then MurmurHash3 fmix64: see _core_py.hash64 for why.
cdef inline uint64_t _fnv1a(uint64_t h, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * FNV_PRIME
    return h


cdef inline uint64_t _fmix64(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= FMIX_C1
    h ^= h >> 33
    h *= FMIX_C2
    h ^= h >> 33
    return h


def hash64(data):
    """See ``fastlb._core_py.hash64``."""
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    return _fmix64(_fnv1a(FNV_OFFSET, <const unsigned char *>PyBytes_AS_STRING(data),
                          PyBytes_GET_SIZE(data)))


cdef bint _is_prime(long long n):
    cdef long long d = 3
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 2
    return True


cdef long long _as_bounded(object value, long long high):
    # -1 for an int outside [0, high] (the twin compares Python ints: no OverflowError either way).
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or v < 0 or v > high:
        return -1
    return v


def maglev_table(names, weights, size):
    """See ``fastlb._core_py.maglev_table``."""
    if not isinstance(names, list) or not isinstance(weights, list):
        raise TypeError("names and weights must be lists")
    if not isinstance(size, int):
        raise TypeError("size must be an int")
    if len(names) != len(weights):
        raise ValueError("names and weights must have the same length")
    cdef long long m = _as_bounded(size, MAX_TABLE)
    if m < 2 or not _is_prime(m):
        raise ValueError("size must be a prime in [2, 2**31-1]")
    for name in names:
        if not isinstance(name, bytes):
            raise TypeError("names must be bytes")
    for weight in weights:
        if not isinstance(weight, int):
            raise TypeError("weights must be ints")
        if _as_bounded(weight, MAX_WEIGHT) < 0:
            raise ValueError("weights must be in [0, 2**31-1]")

    cdef Py_ssize_t n = len(names), i, active = 0
    cdef uint64_t max_weight = 0, w
    for i in range(n):
        w = <uint64_t>_as_bounded(weights[i], MAX_WEIGHT)
        if w > 0:
            active += 1
        if w > max_weight:
            max_weight = w
    if active == 0:
        return []

    # One block for the per-server state, one for the table.
    cdef uint64_t *state = <uint64_t *>malloc(active * 5 * sizeof(uint64_t))
    cdef int32_t *table = <int32_t *>malloc(m * sizeof(int32_t))
    cdef uint64_t *server = state                 # index into names
    cdef uint64_t *share = state + active        # the server's weight
    cdef uint64_t *position = state + 2 * active  # next slot of the server's permutation
    cdef uint64_t *skip = state + 3 * active
    cdef uint64_t *target = state + 4 * active    # claims so far * max_weight (Envoy's target_weight_)
    cdef Py_ssize_t k = 0
    cdef const unsigned char *p
    cdef Py_ssize_t plen
    cdef uint64_t h, slot, turn = 0, filled = 0, um = <uint64_t>m
    try:
        if state == NULL or table == NULL:
            raise MemoryError()
        for i in range(n):
            w = <uint64_t>_as_bounded(weights[i], MAX_WEIGHT)
            if w == 0:
                continue
            name = names[i]
            p = <const unsigned char *>PyBytes_AS_STRING(name)
            plen = PyBytes_GET_SIZE(name)
            h = _fnv1a(FNV_OFFSET, p, plen)
            server[k] = i
            share[k] = w
            position[k] = _fmix64(h) % um
            # hash64(name + b"#skip"): FNV-1a is a running hash, so continue it over the suffix.
            skip[k] = _fmix64(_fnv1a(h, <const unsigned char *>b"#skip", 5)) % (um - 1) + 1
            target[k] = 0
            k += 1
        with nogil:
            for slot in range(um):
                table[slot] = -1
            while filled < um:
                turn += 1
                for k in range(active):
                    if turn * share[k] < target[k]:
                        continue
                    target[k] += max_weight
                    slot = position[k]
                    while table[slot] >= 0:
                        slot += skip[k]
                        if slot >= um:
                            slot -= um
                    table[slot] = <int32_t>server[k]
                    slot += skip[k]
                    position[k] = slot - um if slot >= um else slot
                    filled += 1
                    if filled == um:
                        break
        indexes = [i for i in range(n)]
        result = PyList_New(m)
        for slot in range(um):
            item = indexes[table[slot]]
            Py_INCREF(item)
            PyList_SET_ITEM(result, slot, item)
        return result
    finally:
        free(state)
        free(table)


def maglev_lookup(table, key_hash):
    """See ``fastlb._core_py.maglev_lookup``."""
    if not isinstance(table, list):
        raise TypeError("table must be a list")
    if not isinstance(key_hash, int):
        raise TypeError("key_hash must be an int")
    cdef unsigned long long key = PyLong_AsUnsignedLongLong(key_hash)  # OverflowError like the twin
    cdef Py_ssize_t n = PyList_GET_SIZE(table)
    if n == 0:
        return -1
    return (<list>table)[<Py_ssize_t>(key % <unsigned long long>n)]
