# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of ``fastlb._core_py``: the per-request computations of the proxy.

Read ``_core_py.py`` first: it states every rule in plain Python and is the reference. This module
implements the same rules with C loops; tests/test_core.py and tests/test_parse.py check with
hypothesis that both return identical values and raise the same exception types for any input.

One path per direction: ``request_head`` fills a C array of ``_Field`` records (pointers into the
caller's bytes) from llhttp's list, ``parse_request`` fills it by splitting the raw head in place (no
copy of the slice); ``_request`` then classifies, checks and rewrites either. The same for responses.

How it stays fast:
- One pass classifies every field with a switch on the name length and a case-insensitive compare
  against the names we know (no ``bytes.lower()``, no dict), validating name and value on the way (the
  raw splitter validates while it looks for the colon and the CR, eight value bytes per step).
  Everything it learns goes into the ``_Field`` records and a few C counters.
- Connection options are not collected into a set: the rare request that lists an end-to-end field in
  Connection pays a rescan of its Connection values per candidate field instead, and every other
  request pays nothing.
- The head is written into one ``bytes`` object allocated at its exact final size.
- Between the first read of ``headers`` and the last, nothing runs that could execute Python code (no
  container is allocated, so the cyclic GC cannot start and run finalisers): the raw pointers into the
  caller's ``bytes`` stay valid without copying or pinning the list.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_SIZE
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp, memcpy, memset

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
F_HTTP10 = 512
F_AMBIGUOUS = 1024

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
    C_HTTP10 = 512
    C_AMBIGUOUS = 1024

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
    K_XF_OTHER       # X-Forwarded-Proto/Port/Host/Client-Cert: always replaced by ours
    K_REQUEST_ID
    K_DROP           # X_Forwarded_For & co (see the underscore rule in _core_py.request_head)

ctypedef struct _Field:
    const unsigned char *name
    const unsigned char *value
    Py_ssize_t name_len
    Py_ssize_t value_len
    int kind
    bint keep
    bint runs        # the name has a "_" or a "--" (see _alias_kind)

cdef enum:
    # Headers per message that fit the stack array; more (up to the 100 the worker allows, or any
    # number from a direct caller) use the heap.
    STACK_FIELDS = 64
    # Longest name _classify knows ("x-forwarded-client-cert").
    MAX_KNOWN_NAME = 23
    # 18 digits always fit in the int64 body counters; 19 may not.
    MAX_CL_DIGITS = 18
    MAX_WEIGHT = 0x7FFFFFFF
    MAX_TABLE = 0x7FFFFFFF
    # Largest limit parse_request/parse_response take (_core_py._MAX_LIMIT).
    MAX_LIMIT = 0x7FFFFFFF

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
# _VALUE_OK: a field-value or reason-phrase byte (RFC 9110 §5.5: VCHAR, obs-text, SP, HTAB).
# _IP_LITERAL, _REG_NAME: the Host characters of _core_py._HOST_VALUE; _IP_LITERAL (hex digits, ':' and '.')
# is also _core_py._HEX_ADDRESS, the characters of a PROXY v1 address.
cdef bint _VALUE_OK[256]
cdef bint _IP_LITERAL[256]
cdef bint _REG_NAME[256]


cdef void _init_tables():
    cdef int c
    cdef bytes tchar = (b"!#$%&'*+-.^_`|~0123456789"
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    for c in range(256):
        _LOWER[c] = c + 32 if 65 <= c <= 90 else c
        _TCHAR_LOWER[c] = 0
    for c in tchar:
        _TCHAR_LOWER[c] = _LOWER[c]
    for c in range(256):
        _VALUE_OK[c] = c == 0x09 or (0x20 <= c and c != 0x7F)
        _IP_LITERAL[c] = False
        _REG_NAME[c] = False
    for c in b"0123456789ABCDEFabcdef:.":
        _IP_LITERAL[c] = True
    for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%!$&'()*+,;=":
        _REG_NAME[c] = True


_init_tables()

# parse_request returns these objects for the common methods (see _method).
cdef bytes _GET = b"GET", _HEAD = b"HEAD", _POST = b"POST", _PUT = b"PUT", _DELETE = b"DELETE"
cdef bytes _OPTIONS = b"OPTIONS", _PATCH = b"PATCH"

# Status lines by code for the standard phrases: "HTTP/1.1 200 OK\r\n" (STYLE: pre-encoded at import).
cdef list _REASON_BY_STATUS = [None] * 1000
for _s in HTTPStatus:
    _REASON_BY_STATUS[_s.value] = _s.phrase.encode("ascii")
del _s


cdef inline bint _is(const unsigned char *p, const char *lowercase_literal, Py_ssize_t n) noexcept nogil:
    # ASCII case-insensitive, like bytes.lower() (RFC 9110 §5.1); the first byte rejects most names.
    cdef Py_ssize_t i
    for i in range(n):
        if _LOWER[p[i]] != <unsigned char>lowercase_literal[i]:
            return False
    return True


cdef Kind _classify(const unsigned char *name, Py_ssize_t n) noexcept nogil:
    # `name`: a field name, in any case. Switching on the length first means most names are rejected
    # after one comparison, or none; no lowercased copy is made.
    if n == 2:
        if _is(name, b"te", 2):
            return K_HOP
    elif n == 4:
        if _is(name, b"host", 4):
            return K_HOST
    elif n == 6:
        if _is(name, b"expect", 6):
            return K_EXPECT
    elif n == 7:
        if _is(name, b"upgrade", 7):
            return K_UPGRADE
        if _is(name, b"trailer", 7):
            return K_HOP
    elif n == 10:
        if _is(name, b"connection", 10):
            return K_CONNECTION
        if _is(name, b"keep-alive", 10):
            return K_HOP
    elif n == 12:
        if _is(name, b"x-request-id", 12):
            return K_REQUEST_ID
    elif n == 14:
        if _is(name, b"content-length", 14):
            return K_CONTENT_LENGTH
    elif n == 15:
        if _is(name, b"x-forwarded-for", 15):
            return K_XFF
    elif n == 16:
        if _is(name, b"proxy-connection", 16):
            return K_HOP
        if _is(name, b"x-forwarded-port", 16) or _is(name, b"x-forwarded-host", 16):
            return K_XF_OTHER
    elif n == 17:
        if _is(name, b"transfer-encoding", 17):
            return K_TRANSFER_ENCODING
        if _is(name, b"x-forwarded-proto", 17):
            return K_XF_OTHER
    elif n == 23:
        if _is(name, b"x-forwarded-client-cert", 23):
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
    cdef Py_ssize_t i = 0, j, s, e
    cdef int options = 0
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
                kind = _classify(p + s, e - s)
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


cdef bint _te_misused(const unsigned char *p, Py_ssize_t n, bint *chunked_seen) noexcept nogil:
    # An empty Transfer-Encoding value, or any element after a "chunked" one (in this or an earlier
    # Transfer-Encoding field: `chunked_seen` carries over).
    cdef Py_ssize_t i = 0, j, s, e
    cdef bint misused = False
    _trim(p, n, &s, &e)
    if e == s:
        misused = True
    while i <= n:
        j = i
        while j < n and p[j] != c',':
            j += 1
        if chunked_seen[0]:
            misused = True
        _trim(p + i, j - i, &s, &e)
        if _ieq(p + i + s, e - s, b"chunked", 7):
            chunked_seen[0] = True
        i = j + 1
    return misused


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


cdef _Field *_fields_for(Py_ssize_t count, _Field *stack_fields) except NULL:
    # The caller's stack array (STACK_FIELDS records) when the fields fit, else the heap (_fields_done).
    if count <= STACK_FIELDS:
        return stack_fields
    cdef _Field *fields = <_Field *>malloc(count * sizeof(_Field))
    if fields == NULL:
        raise MemoryError()
    return fields


cdef inline void _fields_done(_Field *fields, _Field *stack_fields) noexcept:
    if fields != stack_fields:
        free(fields)


cdef int _fields_from_list(list headers, Py_ssize_t count, _Field *fields) except -1:
    cdef Py_ssize_t i
    for i in range(count):
        _field_at(headers, i, &fields[i])
    return 0


cdef inline bint _name_check(_Field *f) noexcept nogil:
    # One loop validates the name (RFC 9110 §5.1: field-name = token) and sets f.runs. Returns True
    # when the name is bad. (_split_fields does the same while it finds the colon.)
    cdef Py_ssize_t i, n = f.name_len
    cdef unsigned char ch, prev = 0
    cdef bint bad = n == 0
    f.runs = False
    for i in range(n):
        ch = _TCHAR_LOWER[f.name[i]]
        if ch == 0:
            bad = True
        elif ch == c'_' or (ch == c'-' and prev == c'-'):
            f.runs = True
        prev = ch
    return bad


cdef Kind _alias_kind(const _Field *f) noexcept nogil:
    # The kind of the name once runs of "-" and "_" become one "-" (see _core_py._alias).
    cdef unsigned char low[MAX_KNOWN_NAME]
    cdef unsigned char ch
    cdef Py_ssize_t i, n = 0
    cdef bint dash = False
    for i in range(f.name_len):
        ch = _LOWER[f.name[i]]
        if ch == c'-' or ch == c'_':
            if dash:
                continue
            ch = c'-'
            dash = True
        else:
            dash = False
        if n == MAX_KNOWN_NAME:
            return K_OTHER
        low[n] = ch
        n += 1
    return _classify(low, n)


cdef bint _valid_host(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # _core_py._HOST_VALUE: ( "[" 1*( HEXDIG / ":" / "." ) "]" / 1*reg-name-char ) [ ":" *DIGIT ].
    cdef Py_ssize_t i = 0
    if n == 0:
        return False
    if p[0] == c'[':
        i = 1
        while i < n and _IP_LITERAL[p[i]]:
            i += 1
        if i == 1 or i == n or p[i] != c']':
            return False
        i += 1
    else:
        while i < n and _REG_NAME[p[i]]:
            i += 1
        if i == 0:
            return False
    if i == n:
        return True
    if p[i] != c':':
        return False
    for i in range(i + 1, n):
        if p[i] < c'0' or p[i] > c'9':
            return False
    return True


cdef inline long long _digits_value(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # A Content-Length _valid_content_length accepted: at most 18 digits, so no overflow.
    cdef Py_ssize_t s, e, i
    cdef long long v = 0
    _trim(p, n, &s, &e)
    for i in range(s, e):
        v = v * 10 + (p[i] - c'0')
    return v


cdef bytes _format_request_id(bytes prefix, unsigned long long counter):
    # b"%s-%x" % (prefix, counter), written directly.
    cdef Py_ssize_t digits = 1, pl = PyBytes_GET_SIZE(prefix)
    cdef unsigned long long v = counter
    while v >= 16:
        v >>= 4
        digits += 1
    out = PyBytes_FromStringAndSize(NULL, pl + 1 + digits)
    cdef char *w = PyBytes_AS_STRING(out)
    memcpy(w, PyBytes_AS_STRING(prefix), pl)
    w[pl] = c'-'
    w += pl + 1 + digits
    v = counter
    while True:
        w -= 1
        w[0] = b"0123456789abcdef"[v & 15]
        v >>= 4
        if v == 0:
            break
    return <bytes>out


def request_head(method, target, headers, client_ip, proto, port, bint trust_xff, request_id):
    """See ``fastlb._core_py.request_head``."""
    if not (isinstance(method, bytes) and isinstance(target, bytes) and isinstance(client_ip, bytes)
            and isinstance(proto, bytes) and isinstance(port, bytes) and isinstance(request_id, bytes)):
        raise TypeError("method, target, client_ip, proto, port and request_id must be bytes")
    if not isinstance(headers, list):
        raise TypeError("headers must be a list of (name: bytes, value: bytes) tuples")

    cdef Py_ssize_t count = PyList_GET_SIZE(headers)
    cdef _Field stack_fields[STACK_FIELDS]
    cdef _Field *fields = _fields_for(count, stack_fields)
    cdef long long length
    try:
        _fields_from_list(<list>headers, count, fields)
        return _request(
            <const unsigned char *>PyBytes_AS_STRING(method), PyBytes_GET_SIZE(method),
            <const unsigned char *>PyBytes_AS_STRING(target), PyBytes_GET_SIZE(target), fields, count, False,
            <bytes>client_ip, <bytes>proto, <bytes>port, trust_xff, <bytes>request_id, None, 0, -1, None,
            &length)
    finally:
        _fields_done(fields, stack_fields)


cdef int _check_int(object value, Py_ssize_t low, Py_ssize_t high, Py_ssize_t *out) except -1:
    # _core_py._check_int: TypeError for a non-int, OverflowError outside [low, high].
    if not isinstance(value, int):
        raise TypeError("an int is required")
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or v < low or v > high:
        raise OverflowError(f"must be in [{low}, {high}]")
    out[0] = <Py_ssize_t>v
    return 0


cdef int _request_line(const unsigned char *p, Py_ssize_t start, Py_ssize_t max_request_line,
                       Py_ssize_t *method_end, Py_ssize_t *target_start, Py_ssize_t *target_end,
                       int *minor, Py_ssize_t *line_start, Py_ssize_t *fields_start) noexcept nogil:
    # _core_py._request_line, rule for rule and in the same order; `p[start:]` ends with CRLFCRLF, so
    # the first CRLF is always found. Returns the status (0: fine).
    cdef Py_ssize_t pos = start, i, eol, n, sp1 = -1, sp2 = -1
    cdef int spaces = 0
    cdef bint bare = False, double_space = False
    cdef const unsigned char *v
    if p[pos] == c'\r' and p[pos + 1] == c'\n':
        pos += 2  # RFC 9112 §2.2: one empty line before the request line is ignored
    i = pos
    while True:
        if p[i] == c'\r':
            if p[i + 1] == c'\n':
                break
            bare = True
        elif p[i] == c'\n':
            bare = True
        elif p[i] == c' ':
            spaces += 1
            if sp1 < 0:
                sp1 = i
            elif sp2 < 0:
                sp2 = i
            if i > pos and p[i - 1] == c' ':
                double_space = True
        i += 1
    eol = i
    n = eol - pos
    if n == 0 or p[pos] == c' ' or bare:
        return 400
    if n >= 8 and memcmp(p + pos, b"PRI ", 4) == 0 and memcmp(p + eol - 8, b"HTTP/2.0", 8) == 0:
        return 505  # HTTP/2 prior knowledge (RFC 9113 §3.4)
    if spaces != 2 or double_space:
        return 400  # RFC 9112 §3; one separator is malformed too, not HTTP/0.9 (issue 14 item 6)
    if _bad_token(p + pos, sp1 - pos):
        return 400  # before the length, as framing.request_start_problem refuses a method's first bad byte
    if n > max_request_line:
        return 414
    for i in range(sp1 + 1, sp2):
        if p[i] <= 0x20 or p[i] >= 0x7F:
            return 400  # RFC 9112 §3.2: visible ASCII only
    # RFC 9112 §2.3: HTTP-version = "HTTP/" DIGIT "." DIGIT, case-sensitive.
    v = p + sp2 + 1
    if eol - (sp2 + 1) != 8 or memcmp(v, b"HTTP/", 5) != 0 or v[6] != c'.' or not (
            c'0' <= v[5] <= c'9' and c'0' <= v[7] <= c'9'):
        return 400
    if v[5] != c'1':
        return 505
    minor[0] = 0 if v[7] == c'0' else 1  # RFC 9112 §2.3: HTTP/1.2+ is processed as 1.1 (14.7)
    line_start[0] = pos
    method_end[0] = sp1
    target_start[0] = sp1 + 1
    target_end[0] = sp2
    fields_start[0] = eol + 2
    return 0


cdef Py_ssize_t _count_crlf(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    # bytes.count(b"\r\n") over p[i:end].
    cdef Py_ssize_t n = 0
    cdef const unsigned char *q
    while i < end - 1:
        q = <const unsigned char *>memchr(p + i, c'\r', end - 1 - i)
        if q == NULL:
            break
        i = q - p
        if p[i + 1] == c'\n':
            n += 1
            i += 2
        else:
            i += 1
    return n


cdef inline Py_ssize_t _value_end(const unsigned char *p, Py_ssize_t j, Py_ssize_t end) noexcept nogil:
    # The first byte at or after j that is no field-value byte (_VALUE_OK); p[:end] ends with one.
    # Eight bytes per step while none is below 0x20 or DEL (the "hasless" bit trick, exact for the
    # question "is any byte below 0x20"), then the table for the step that holds the CR, an HTAB or a
    # CTL (bench/micro_core.py parse_request: 1,430 -> 1,200 ns of thread CPU time on the loaded VM).
    cdef uint64_t v
    while j + 8 <= end:
        memcpy(&v, p + j, 8)
        if ((v - <uint64_t>0x2020202020202020ULL) & ~v & <uint64_t>0x8080808080808080ULL) or _zero_byte(
                v ^ <uint64_t>0x7F7F7F7F7F7F7F7FULL):
            break
        j += 8
    while _VALUE_OK[p[j]]:
        j += 1
    return j


cdef bint _split_fields(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, _Field *fields,
                        Py_ssize_t *count) noexcept nogil:
    # _core_py._split_fields: the field lines of p[i:end] (which ends with CRLF CRLF) into `fields`,
    # values trimmed. Returns True when a line is malformed. One pass per line, two table loops: the
    # name runs over tchars to its colon, the value over value bytes to its CR; the head's final CRLF
    # stops both. (Measured on bench/micro_core.py's request: 3 memchr calls per line cost more.)
    cdef Py_ssize_t j, colon, s, e, n = 0
    cdef _Field *f
    cdef unsigned char ch, prev
    cdef bint runs
    while i < end - 2:
        j = i
        prev = 0
        runs = False
        while True:
            ch = _TCHAR_LOWER[p[j]]
            if ch == 0:
                break
            if ch == c'_' or (ch == c'-' and prev == c'-'):
                runs = True
            prev = ch
            j += 1
        # An empty name, no colon, whitespace before the colon (RFC 9112 §5.1) or at the start of the
        # line (obs-fold, §5.2), a non-token byte, or an empty line (a second CRLFCRLF).
        if j == i or p[j] != c':':
            return True
        colon = j
        j = _value_end(p, j + 1, end)
        if p[j] != c'\r' or p[j + 1] != c'\n':
            return True  # RFC 9110 §5.5: a CTL (bare CR and LF included) or DEL in the value
        _trim(p + colon + 1, j - colon - 1, &s, &e)
        f = &fields[n]
        f.name = p + i
        f.name_len = colon - i
        f.value = p + colon + 1 + s
        f.value_len = e - s
        f.keep = False
        f.runs = runs
        n += 1
        i = j + 2
    count[0] = n
    return False


def parse_request(data, start, end, client_ip, proto, port, bint trust_xff, rid_prefix, rid_counter, authority,
                  max_request_line, max_header_bytes, max_headers):
    """See ``fastlb._core_py.parse_request``."""
    cdef Py_ssize_t s, e, limit_line, limit_bytes, limit_fields
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    _check_int(start, 0, PyBytes_GET_SIZE(data), &s)
    _check_int(end, s, PyBytes_GET_SIZE(data), &e)
    if not (isinstance(client_ip, bytes) and isinstance(proto, bytes) and isinstance(port, bytes)
            and isinstance(rid_prefix, bytes) and isinstance(authority, bytes)):
        raise TypeError("client_ip, proto, port, rid_prefix and authority must be bytes")
    if not isinstance(rid_counter, int):
        raise TypeError("rid_counter must be an int")
    cdef unsigned long long counter = PyLong_AsUnsignedLongLong(rid_counter)  # OverflowError like the twin
    _check_int(max_request_line, 0, MAX_LIMIT, &limit_line)
    _check_int(max_header_bytes, 0, MAX_LIMIT, &limit_bytes)
    _check_int(max_headers, 0, MAX_LIMIT, &limit_fields)

    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t method_end = 0, target_start = 0, target_end = 0, line_start = 0, fields_start = 0
    cdef Py_ssize_t count = 0
    cdef int minor = 0, status
    cdef long long length = 0
    if e - s < 4 or memcmp(p + e - 4, b"\r\n\r\n", 4) != 0:
        status = 400
    else:
        status = _request_line(p, s, limit_line, &method_end, &target_start, &target_end, &minor, &line_start,
                               &fields_start)
    if not status:
        count = _count_crlf(p, fields_start, e) - 1
        if e - fields_start > limit_bytes or count > limit_fields:
            status = 431
    if status:
        return status, 0, b"", b"", None, _format_request_id(<bytes>rid_prefix, counter), 0, b""

    cdef _Field stack_fields[STACK_FIELDS]
    cdef _Field *fields = _fields_for(count, stack_fields)
    try:
        if _split_fields(p, fields_start, e, fields, &count):
            return 400, 0, b"", b"", None, _format_request_id(<bytes>rid_prefix, counter), 0, b""
        method = _method(p + line_start, method_end - line_start)
        target = PyBytes_FromStringAndSize(<const char *>p + target_start, target_end - target_start)
        status_, flags, host, request_id, head = _request(
            p + line_start, method_end - line_start, p + target_start, target_end - target_start, fields, count,
            True, <bytes>client_ip, <bytes>proto, <bytes>port, trust_xff, None, <bytes>rid_prefix, counter, minor,
            <bytes>authority, &length)
        if minor == 0:
            flags |= C_HTTP10
        return status_, flags, method, target, host, request_id, length, head
    finally:
        _fields_done(fields, stack_fields)


cdef bytes _method(const unsigned char *p, Py_ssize_t n):
    # The common methods as the same objects every time: no allocation (issue 13).
    if n == 3:
        if memcmp(p, b"GET", 3) == 0:
            return _GET
        if memcmp(p, b"PUT", 3) == 0:
            return _PUT
    elif n == 4:
        if memcmp(p, b"POST", 4) == 0:
            return _POST
        if memcmp(p, b"HEAD", 4) == 0:
            return _HEAD
    elif n == 5 and memcmp(p, b"PATCH", 5) == 0:
        return _PATCH
    elif n == 6 and memcmp(p, b"DELETE", 6) == 0:
        return _DELETE
    elif n == 7 and memcmp(p, b"OPTIONS", 7) == 0:
        return _OPTIONS
    return PyBytes_FromStringAndSize(<const char *>p, n)


cdef inline bint _bodyless(const unsigned char *mp, Py_ssize_t ml) noexcept nogil:
    # _core_py._BODYLESS: GET, HEAD, TRACE.
    return ((ml == 3 and memcmp(mp, b"GET", 3) == 0) or (ml == 4 and memcmp(mp, b"HEAD", 4) == 0)
            or (ml == 5 and memcmp(mp, b"TRACE", 5) == 0))


cdef tuple _request(const unsigned char *mp, Py_ssize_t ml, const unsigned char *tp, Py_ssize_t tl,
                    _Field *fields, Py_ssize_t count, bint checked, bytes client_ip, bytes proto, bytes port,
                    bint trust_xff, object request_id, bytes rid_prefix, unsigned long long rid_counter, int minor,
                    bytes authority, long long *length_out):
    # _core_py._request: `checked` when the splitter already refused CTLs in the values; `request_id`
    # None means format (rid_prefix, rid_counter) if the client sent none; `minor` -1 for request_head.
    # Returns (status, flags, host, request_id, head) and the Content-Length in length_out.
    cdef Py_ssize_t i, s, e
    cdef bint bad = False
    cdef int host_count = 0, cl_count = 0, te_count = 0
    cdef bint cl_ok = False, te_chunked = False, expect_seen = False, expect_bad = False
    cdef int options = 0, upgrade = 0, upgrade_count = 0
    cdef Py_ssize_t upgrade_len = 0, xff_len = 0
    cdef Py_ssize_t host_field = -1, rid_field = -1, rid_s = 0, rid_e = 0, host_s = 0, host_e = 0
    cdef long long length = 0
    cdef _Field *f
    cdef Kind alias
    cdef int flags = 0, error = 0
    cdef bint te_misused = False, chunked_seen = False
    cdef bint bodyless = _bodyless(mp, ml)

    # The parser already checked the request line; these two checks only keep a caller bug from turning
    # into header injection upstream (RFC 9112 §3: method = token, target without CTL or SP).
    bad = _bad_token(mp, ml) or tl == 0
    for i in range(tl):
        if tp[i] <= 0x20 or tp[i] == 0x7F:
            bad = True
            break

    for i in range(count):
        f = &fields[i]
        if not checked and (_name_check(f) or _bad_value(f.value, f.value_len)):
            bad = True
        f.kind = _classify(f.name, f.name_len)
        if f.kind == K_OTHER and f.runs:
            # Look-alikes of the names we interpret: see _core_py._alias for the rule.
            alias = _alias_kind(f)
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
            if cl_ok:
                length = _digits_value(f.value, f.value_len)
        elif f.kind == K_TRANSFER_ENCODING:
            te_count += 1
            # RFC 9112 §7: coding names are case-insensitive.
            te_chunked = _ieq_trimmed(f.value, f.value_len, b"chunked", 7)
            # RFC 9112 §6.1: chunked final and once, see _core_py._request.
            if _te_misused(f.value, f.value_len, &chunked_seen):
                te_misused = True
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

    if host_field >= 0 and not _valid_host(fields[host_field].value + host_s, host_e - host_s):
        bad = True  # RFC 9112 §3.2, empty included (14.8): see _core_py._HOST_VALUE
    if te_misused:
        bad = True
    if te_count and bodyless:
        bad = True  # 14.9: refused rather than normalised, see _core_py._request
    if cl_count == 1 and cl_ok:
        flags |= C_CONTENT_LENGTH
        if length and bodyless:
            flags |= C_AMBIGUOUS
    else:
        length = 0
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
    length_out[0] = length

    # Precedence as in _core_py: framing (400) > transfer coding (501) > the request line's form and
    # what depends on the version > expectation (417).
    if bad or host_count > 1 or cl_count > 1 or (cl_count and not cl_ok) or (cl_count and te_count):
        error = 400
    elif te_count and not (te_count == 1 and te_chunked):
        error = 501
    elif minor >= 0 and ml == 7 and memcmp(mp, b"CONNECT", 7) == 0:
        error = 405
    elif minor >= 0 and tp[0] != c'/' and not (tl == 1 and tp[0] == c'*' and ml == 7
                                                and memcmp(mp, b"OPTIONS", 7) == 0):
        error = 400
    elif minor == 0 and te_count:
        error = 400  # RFC 9112 §6.1
    elif minor == 1 and not host_count:
        error = 400  # RFC 9112 §3.2
    elif expect_bad:
        error = 417

    host = None
    if host_field >= 0:
        host = PyBytes_FromStringAndSize(<const char *>fields[host_field].value + host_s, host_e - host_s)
    if rid_field >= 0:
        request_id = PyBytes_FromStringAndSize(<const char *>fields[rid_field].value + rid_s, rid_e - rid_s)
    elif request_id is None:
        request_id = _format_request_id(rid_prefix, rid_counter)
    if error:
        return error, flags, host, request_id, b""

    # Size first, then one allocation and memcpy into it.
    cdef bint check_listed = (options & OPT_LISTS_FIELD) != 0
    cdef bint add_host = minor == 0 and not host_count
    cdef Py_ssize_t size = ml + tl + 12  # method SP target " HTTP/1.1\r\n"
    if add_host:
        size += 6 + PyBytes_GET_SIZE(authority) + 2                 # Host: ...\r\n
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
    if add_host:
        # We speak HTTP/1.1 upstream, which requires Host: name the authority the client reached.
        w = _put(w, b"Host: ", 6)
        w = _put(w, PyBytes_AS_STRING(authority), PyBytes_GET_SIZE(authority))
        w = _put(w, b"\r\n", 2)
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
    cdef _Field *fields = _fields_for(count, stack_fields)
    cdef long long length
    try:
        _fields_from_list(<list>headers, count, fields)
        error, flags, head = _response(code, <const unsigned char *>PyBytes_AS_STRING(reason),
                                       PyBytes_GET_SIZE(reason), fields, count, False, head_request, chunk_ok,
                                       close, &length)
        return error, flags, head
    finally:
        _fields_done(fields, stack_fields)


def parse_response(data, start, end, bint head_request, bint chunk_ok, bint close, max_header_bytes, max_headers):
    """See ``fastlb._core_py.parse_response``."""
    cdef Py_ssize_t s, e, limit_bytes, limit_fields, eol, n, i, count = 0
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    _check_int(start, 0, PyBytes_GET_SIZE(data), &s)
    _check_int(end, s, PyBytes_GET_SIZE(data), &e)
    _check_int(max_header_bytes, 0, MAX_LIMIT, &limit_bytes)
    _check_int(max_headers, 0, MAX_LIMIT, &limit_fields)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef const unsigned char *line = p + s
    if e - s < 4 or memcmp(p + e - 4, b"\r\n\r\n", 4) != 0 or e - s > limit_bytes:
        return -1, 0, 0, b""
    eol = s
    while not (p[eol] == c'\r' and p[eol + 1] == c'\n'):
        eol += 1
    n = eol - s
    # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ] (see the twin).
    if n < 12 or line[8] != c' ' or (n > 12 and line[12] != c' '):
        return -1, 0, 0, b""
    if memcmp(line, b"HTTP/1.", 7) != 0 or not c'0' <= line[7] <= c'9':
        return -1, 0, 0, b""
    for i in range(9, 12):
        if not c'0' <= line[i] <= c'9':
            return -1, 0, 0, b""
    for i in range(13, n):
        if not _VALUE_OK[line[i]]:
            return -1, 0, 0, b""
    count = _count_crlf(p, eol + 2, e) - 1
    if count > limit_fields:
        return -1, 0, 0, b""
    cdef long long code = (line[9] - c'0') * 100 + (line[10] - c'0') * 10 + (line[11] - c'0')
    cdef long long length = 0
    cdef _Field stack_fields[STACK_FIELDS]
    cdef _Field *fields = _fields_for(count, stack_fields)
    try:
        if _split_fields(p, eol + 2, e, fields, &count):
            return -1, 0, 0, b""
        error, flags, head = _response(code, line + 13 if n > 13 else line, n - 13 if n > 13 else 0, fields,
                                       count, True, head_request, chunk_ok, close, &length)
        if line[7] == c'0':
            flags |= C_HTTP10
            if flags & C_CHUNKED:
                error = 502  # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 is faulty framing
        if error:
            return -1, flags, 0, b""
        return code, flags, length, head
    finally:
        _fields_done(fields, stack_fields)


cdef tuple _response(long long status, const unsigned char *rp, Py_ssize_t rl, _Field *fields, Py_ssize_t count,
                     bint checked, bint head_request, bint chunk_ok, bint close, long long *length_out):
    # _core_py._response. Returns (error, flags, head) and the Content-Length in length_out.
    cdef Py_ssize_t i, s, e
    cdef int cl_count = 0, te_count = 0, upgrade_count = 0, options = 0, flags = 0
    cdef bint cl_ok = False, te_chunked = False
    cdef Py_ssize_t upgrade_len = 0
    cdef long long length = 0
    cdef _Field *f

    # RFC 9112 §4: status-code = 3DIGIT; the reason phrase excludes CR/LF (and NUL, as field values).
    cdef bint bad = status < 100 or status > 999 or _bad_value(rp, rl)
    for i in range(count):
        f = &fields[i]
        if not checked and (_name_check(f) or _bad_value(f.value, f.value_len)):
            bad = True
        f.kind = _response_kind(_classify(f.name, f.name_len))
        if f.kind == K_CONTENT_LENGTH:
            cl_count += 1
            cl_ok = _valid_content_length(f.value, f.value_len)
            if cl_ok:
                length = _digits_value(f.value, f.value_len)
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
    else:
        length = 0
    length_out[0] = length
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


def head_end(data, start):
    """See ``fastlb._core_py.head_end``."""
    cdef Py_ssize_t s
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    _check_int(start, 0, PyBytes_GET_SIZE(data), &s)
    cdef const char *p = PyBytes_AS_STRING(data)
    cdef const char *end = p + PyBytes_GET_SIZE(data)
    cdef const char *lf = p + s
    # Every CRLFCRLF holds an LF second: memchr (SIMD in libc) walks the LFs, one per line, and the
    # first one with CR before and CRLF after it ends the head (glibc's memmem took twice as long).
    while True:
        lf = <const char *>memchr(lf, c'\n', end - lf)
        if lf == NULL or lf + 2 >= end:
            return -1
        if lf[1] == c'\r' and lf[2] == c'\n' and lf > p + s and (lf - 1)[0] == c'\r':
            return lf + 3 - p
        lf += 1


def head_and_body(head, data, start, stop):
    """See ``fastlb._core_py.head_and_body``."""
    cdef Py_ssize_t s, e, n
    if not (isinstance(head, bytes) and isinstance(data, bytes)):
        raise TypeError("head and data must be bytes")
    _check_int(start, 0, PyBytes_GET_SIZE(data), &s)
    _check_int(stop, s, PyBytes_GET_SIZE(data), &e)
    n = PyBytes_GET_SIZE(head)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n + e - s)
    memcpy(PyBytes_AS_STRING(out), PyBytes_AS_STRING(head), n)
    memcpy(PyBytes_AS_STRING(out) + n, PyBytes_AS_STRING(data) + s, e - s)
    return out


def find_field(data, start, end, name):
    """See ``fastlb._core_py.find_field``."""
    cdef Py_ssize_t s, e, i, k, v, ve, vs, n
    if not isinstance(data, bytes):
        raise TypeError("data must be bytes")
    _check_int(start, 0, PyBytes_GET_SIZE(data), &s)
    _check_int(end, s, PyBytes_GET_SIZE(data), &e)
    if not isinstance(name, bytes):
        raise TypeError("name must be bytes")
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef const unsigned char *want = <const unsigned char *>PyBytes_AS_STRING(name)
    cdef const unsigned char *q
    n = PyBytes_GET_SIZE(name)
    if n == 0:
        return None
    i = s
    # The first CR LF name ":" (case-insensitive), as bytes.find over the lowered head.
    while i + 2 + n < e:
        q = <const unsigned char *>memchr(p + i, c'\r', e - i)
        if q == NULL:
            return None
        i = q - p
        if i + 2 + n >= e:
            return None
        if p[i + 1] == c'\n' and p[i + 2 + n] == c':':
            for k in range(n):
                if _LOWER[p[i + 2 + k]] != _LOWER[want[k]]:
                    break
            else:
                v = i + 3 + n
                ve = v
                while ve + 1 < e and not (p[ve] == c'\r' and p[ve + 1] == c'\n'):
                    ve += 1
                if ve + 1 >= e:
                    ve = e
                _trim(p + v, ve - v, &vs, &k)
                return PyBytes_FromStringAndSize(<const char *>p + v + vs, k - vs)
        i += 1
    return None


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


# Host-wide rate limiting: see _core_py.rate_take for the algorithm and the table's layout.  Here every
# word is read and replaced with the GCC/Clang __atomic builtins on the shared mapping: a worker that
# loses a race re-reads and tries again, and no lock exists that a dying worker could leave held.
cdef extern from *:
    """
    static inline unsigned long long fastlb_load64(unsigned long long *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline int fastlb_cas64(unsigned long long *p, unsigned long long expected,
                                   unsigned long long desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    }
    """
    unsigned long long _load64 "fastlb_load64"(unsigned long long *p) noexcept nogil
    bint _cas64 "fastlb_cas64"(unsigned long long *p, unsigned long long expected,
                               unsigned long long desired) noexcept nogil

RATE_WAYS = 8
# _RATE_TRIES: a word that keeps changing under us means other workers are taking tokens of the same
# set at that instant; after this many lost races the request is refused (429) rather than spinning.
cdef enum:
    _WAYS = 8
    _TAT_BITS = 48
    _RATE_TRIES = 64
cdef unsigned long long _TAT_MASK = (1ULL << _TAT_BITS) - 1


def rate_take(table, key_hash, now_us, interval_us, burst_us):
    """See ``fastlb._core_py.rate_take``."""
    cdef unsigned long long[::1] words
    cdef Py_ssize_t size, base, i, victim
    cdef unsigned long long key, now, interval, burst, tag, word, seen, tat, oldest
    cdef int attempt
    cdef bint found
    if not isinstance(table, memoryview) or table.format != "Q" or table.readonly:
        raise TypeError("table must be a writable memoryview of format 'Q'")
    words = table
    size = words.shape[0]
    if size < _WAYS or size & (size - 1):
        raise ValueError("table length must be a power of two, at least RATE_WAYS")
    for name, value, low in (("key_hash", key_hash, 0), ("now_us", now_us, 0),
                             ("interval_us", interval_us, 1), ("burst_us", burst_us, 0)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int")
        if value < low or value > (0xFFFFFFFFFFFFFFFF if name == "key_hash" else _TAT_MASK):
            raise ValueError(f"{name} out of range")
    key = key_hash
    now = now_us
    interval = interval_us
    burst = burst_us
    base = <Py_ssize_t>(key & <unsigned long long>(size - _WAYS))
    tag = key >> _TAT_BITS
    if tag == 0:
        tag = 1  # 0 marks an empty word
    cdef unsigned long long *p = &words[0]
    for attempt in range(_RATE_TRIES):
        victim = base
        found = False
        oldest = 0
        seen = 0
        for i in range(base, base + _WAYS):
            word = _load64(p + i)
            if word >> _TAT_BITS == tag:
                victim = i
                seen = word
                found = True
                break
            if i == base or (word & _TAT_MASK) < oldest:
                victim = i
                seen = word
                oldest = word & _TAT_MASK
        tat = (seen & _TAT_MASK) if found else 0
        if tat < now:
            tat = now
        tat += interval
        if tat - now > burst:
            return tat - now - burst
        if tat > _TAT_MASK:
            tat = _TAT_MASK
        if _cas64(p + victim, seen, (tag << _TAT_BITS) | tat):
            return 0
    return interval


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


# --- TLS ClientHello (issue 15: SNI passthrough); the rules are _core_py.parse_client_hello's -----------

cdef extern from "Python.h":
    object PyUnicode_DecodeASCII(const char *s, Py_ssize_t size, const char *errors)

# Same values as fastlb._core_py (a test compares them).
HELLO_MORE = 0
HELLO_OK = 1
HELLO_NOT_TLS = 2
HELLO_BAD = 3
HELLO_MAX = 16384

cdef enum:
    C_HELLO_MAX = 16384
    HANDSHAKE = 0x16
    HOST_NAME_MAX = 255

cdef bint _SNI_OK[256]  # _core_py._SNI_CHARS

_NO_HELLO = (HELLO_BAD, None, ())
_HELLO_MORE = (HELLO_MORE, None, ())


cdef const unsigned char *_buffer(object data, Py_ssize_t *n) except NULL:
    # bytes or bytearray (the caller's receive buffer), read in place: nothing below runs Python code
    # until the result is built, so the bytes cannot move.
    if isinstance(data, bytes):
        n[0] = PyBytes_GET_SIZE(data)
        return <const unsigned char *>PyBytes_AS_STRING(data)
    if isinstance(data, bytearray):
        n[0] = PyByteArray_GET_SIZE(data)
        return <const unsigned char *>PyByteArray_AS_STRING(data)
    raise TypeError("data must be bytes or bytearray")


cdef inline Py_ssize_t _u16(const unsigned char *p) noexcept nogil:
    return p[0] << 8 | p[1]


def parse_client_hello(data):
    """See ``fastlb._core_py.parse_client_hello``."""
    cdef Py_ssize_t n
    cdef const unsigned char *p = _buffer(data, &n)
    # The reassembled handshake message: it fits, since its records end within the first HELLO_MAX bytes.
    cdef unsigned char message[C_HELLO_MAX]
    cdef Py_ssize_t have = 0, promised = 0, pos = 0, length, take, size
    if n == 0:
        return _HELLO_MORE
    if p[0] != HANDSHAKE or (n > 1 and p[1] != 3):
        return (HELLO_NOT_TLS, None, ())
    while True:
        if n - pos < 5:
            if n > pos and (p[pos] != HANDSHAKE or (n > pos + 1 and p[pos + 1] != 3)):
                return _NO_HELLO
            return _HELLO_MORE
        length = _u16(p + pos + 3)
        if p[pos] != HANDSHAKE or p[pos + 1] != 3 or length == 0 or pos + 5 + length > C_HELLO_MAX:
            return _NO_HELLO
        take = n - pos - 5
        if take > length:
            take = length
        memcpy(message + have, p + pos + 5, take)
        have += take
        promised += length
        pos += 5 + length
        if have >= 1 and message[0] != 1:
            return _NO_HELLO
        if have >= 4:
            size = 4 + (message[1] << 16 | message[2] << 8 | message[3])
            if promised > size or 5 + size > C_HELLO_MAX:
                return _NO_HELLO
            if promised == size:
                if pos > n:
                    return _HELLO_MORE
                return _hello_body(message + 4, size - 4)
        if pos >= n:
            return _HELLO_MORE


cdef tuple _hello_body(const unsigned char *body, Py_ssize_t end):
    cdef Py_ssize_t pos, suites, methods, kind, size
    cdef Py_ssize_t sni_at = -1, sni_size = 0, alpn_at = -1, alpn_size = 0
    if end < 35 or body[0] != 3 or body[34] > 32:
        return _NO_HELLO
    pos = 35 + body[34]
    if pos + 2 > end:
        return _NO_HELLO
    suites = _u16(body + pos)
    pos += 2 + suites
    if suites < 2 or suites & 1 or pos + 1 > end:
        return _NO_HELLO
    methods = body[pos]
    pos += 1 + methods
    if methods < 1 or pos > end:
        return _NO_HELLO
    if pos == end:
        return (HELLO_OK, None, ())
    if pos + 2 > end or pos + 2 + _u16(body + pos) != end:
        return _NO_HELLO
    pos += 2
    while pos < end:
        if pos + 4 > end:
            return _NO_HELLO
        kind = _u16(body + pos)
        size = _u16(body + pos + 2)
        pos += 4
        if pos + size > end:
            return _NO_HELLO
        if kind == 0:  # server_name
            if sni_at >= 0 or not _server_name_ok(body + pos, size):
                return _NO_HELLO
            sni_at, sni_size = pos, size
        elif kind == 16:  # application_layer_protocol_negotiation
            if alpn_at >= 0 or not _alpn_ok(body + pos, size):
                return _NO_HELLO
            alpn_at, alpn_size = pos, size
        pos += size
    return (HELLO_OK, None if sni_at < 0 else _host_name(body + sni_at + 5, sni_size - 5),
            () if alpn_at < 0 else _alpn_tuple(body + alpn_at, alpn_size))


cdef bint _server_name_ok(const unsigned char *v, Py_ssize_t n) noexcept nogil:
    # Exactly one host_name entry filling the list (see _core_py._server_name).
    cdef Py_ssize_t i, size
    if n < 5 or _u16(v) != n - 2 or v[2] != 0:
        return False
    size = _u16(v + 3)
    if size != n - 5 or size == 0 or size > HOST_NAME_MAX:
        return False
    for i in range(5, n):
        if not _SNI_OK[v[i]]:
            return False
    return True


cdef str _host_name(const unsigned char *p, Py_ssize_t n):
    cdef char low[HOST_NAME_MAX]
    cdef Py_ssize_t i
    for i in range(n):
        low[i] = _LOWER[p[i]]
    return PyUnicode_DecodeASCII(low, n, NULL)


cdef bint _alpn_ok(const unsigned char *v, Py_ssize_t n) noexcept nogil:
    # RFC 7301 §3.1 (see _core_py._alpn_names).
    cdef Py_ssize_t pos = 2
    if n < 4 or _u16(v) != n - 2:
        return False
    while pos < n:
        if v[pos] == 0 or pos + 1 + v[pos] > n:
            return False
        pos += 1 + v[pos]
    return True


cdef tuple _alpn_tuple(const unsigned char *v, Py_ssize_t n):
    cdef Py_ssize_t pos = 2
    cdef list names = []
    while pos < n:
        names.append(PyBytes_FromStringAndSize(<const char *>v + pos + 1, v[pos]))
        pos += 1 + v[pos]
    return tuple(names)


# --- PROXY protocol v1 and v2 (issue 15); the rules are _core_py.parse_proxy_header's -------------------

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int AF_INET
    int AF_INET6

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

PROXY_MORE = 0
PROXY_OK = 1
PROXY_LOCAL = 2
PROXY_BAD = 3
PROXY_V1_MAX = 107
PP2_TYPE_CRC32C = 0x03

cdef enum:
    C_PROXY_V1_MAX = 107
    V2_MAX = 16 + 0xFFFF
    IPV6_TEXT_MAX = 45
    ADDRESS_TEXT = 46  # INET6_ADDRSTRLEN

cdef const unsigned char *_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
cdef const unsigned char *_V1_PREFIX = b"PROXY "
cdef Py_ssize_t[4] _V2_ADDRESS_SIZES = [0, 12, 36, 216]
_PROXY_BAD = (PROXY_BAD, 0, None, 0, None, 0, ())
_PROXY_MORE = (PROXY_MORE, 0, None, 0, None, 0, ())

cdef uint32_t _CRC32C[256]


cdef void _init_proxy_tables():
    cdef uint32_t crc
    cdef int c, k
    for c in range(256):
        _SNI_OK[c] = False
        crc = c
        for k in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        _CRC32C[c] = crc
    for c in b"-._0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
        _SNI_OK[c] = True


_init_proxy_tables()


cdef uint32_t _crc32c(uint32_t crc, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # CRC-32C, RFC 4960 Appendix B; pass 0xFFFFFFFF first and xor the result with it at the end.
    cdef Py_ssize_t i
    for i in range(n):
        crc = _CRC32C[(crc ^ p[i]) & 0xFF] ^ (crc >> 8)
    return crc


cdef str _address_text(int af, const void *address):
    cdef char text[ADDRESS_TEXT]
    inet_ntop(af, address, text, ADDRESS_TEXT)
    return text.decode("ascii")


def parse_proxy_header(data):
    """See ``fastlb._core_py.parse_proxy_header``."""
    cdef Py_ssize_t n
    cdef const unsigned char *p = _buffer(data, &n)
    if n == 0:
        return _PROXY_MORE
    if p[0] == 0x0D:
        return _proxy_v2(p, V2_MAX if n > V2_MAX else n)
    return _proxy_v1(p, C_PROXY_V1_MAX if n > C_PROXY_V1_MAX else n)


cdef tuple _proxy_v2(const unsigned char *p, Py_ssize_t n):
    cdef Py_ssize_t i, end, pos, size, crc_at = -1, address
    cdef int family, transport, af
    cdef uint32_t crc
    cdef unsigned char zeros[4]
    cdef list tlvs
    for i in range(12 if n > 12 else n):
        if p[i] != _V2_SIGNATURE[i]:
            return _PROXY_BAD
    if n < 13:
        return _PROXY_MORE
    if p[12] >> 4 != 2 or p[12] & 0xF > 1:
        return _PROXY_BAD
    if n < 14:
        return _PROXY_MORE
    family = p[13] >> 4
    transport = p[13] & 0xF
    if family > 3 or transport > 2:
        return _PROXY_BAD
    if n < 16:
        return _PROXY_MORE
    end = 16 + _u16(p + 14)
    if p[12] & 0xF == 0:
        return (PROXY_LOCAL, end, None, 0, None, 0, ()) if n >= end else _PROXY_MORE
    pos = 16 + _V2_ADDRESS_SIZES[family]
    if pos > end:
        return _PROXY_BAD
    if n < end:
        return _PROXY_MORE
    # Bounds first, objects after: a header that turns out bad allocates nothing.
    while pos < end:
        if pos + 3 > end:
            return _PROXY_BAD
        size = _u16(p + pos + 1)
        if pos + 3 + size > end:
            return _PROXY_BAD
        if p[pos] == PP2_TYPE_CRC32C:
            if size != 4 or crc_at >= 0:
                return _PROXY_BAD
            crc_at = pos + 3
        pos += 3 + size
    if crc_at >= 0:
        memset(zeros, 0, 4)
        crc = _crc32c(0xFFFFFFFF, p, crc_at)
        crc = _crc32c(crc, zeros, 4)
        crc = _crc32c(crc, p + crc_at + 4, end - crc_at - 4) ^ 0xFFFFFFFF
        if crc != (<uint32_t>p[crc_at] << 24 | <uint32_t>p[crc_at + 1] << 16 | <uint32_t>p[crc_at + 2] << 8
                   | <uint32_t>p[crc_at + 3]):
            return _PROXY_BAD
    tlvs = []
    pos = 16 + _V2_ADDRESS_SIZES[family]
    while pos < end:
        size = _u16(p + pos + 1)
        tlvs.append((p[pos], PyBytes_FromStringAndSize(<const char *>p + pos + 3, size)))
        pos += 3 + size
    if transport != 1 or (family != 1 and family != 2):
        return (PROXY_LOCAL, end, None, 0, None, 0, tuple(tlvs))
    af, size = (AF_INET, 4) if family == 1 else (AF_INET6, 16)
    address = 16 + 2 * size
    return (PROXY_OK, end, _address_text(af, p + 16), _u16(p + address), _address_text(af, p + 16 + size),
            _u16(p + address + 2), tuple(tlvs))


cdef bint _word_is(const unsigned char *p, Py_ssize_t n, const char *literal, Py_ssize_t literal_len) noexcept nogil:
    return n == literal_len and memcmp(p, literal, n) == 0


cdef bint _word_starts(const unsigned char *p, Py_ssize_t n, const char *literal, Py_ssize_t literal_len) noexcept nogil:
    return n <= literal_len and memcmp(p, literal, n) == 0


cdef bint _address(const unsigned char *p, Py_ssize_t n, int af, unsigned char *out) noexcept nogil:
    # _core_py._address: the alphabet, then glibc's inet_pton (the same function the twin reaches
    # through socket.inet_pton, so both accept exactly the same text).
    cdef char text[C_PROXY_V1_MAX + 1]
    cdef Py_ssize_t i
    if n == 0:
        return False
    for i in range(n):
        if not _IP_LITERAL[p[i]]:
            return False
    memcpy(text, p, n)
    text[n] = 0
    return inet_pton(af, text, out) == 1


cdef bint _address_prefix(const unsigned char *p, Py_ssize_t n, int af) noexcept nogil:
    # _core_py._address_prefix.
    cdef Py_ssize_t i, digits = 0, dots = 0
    cdef int value = 0
    for i in range(n):
        if not _IP_LITERAL[p[i]]:
            return False
    if af == AF_INET6:
        return n <= IPV6_TEXT_MAX
    for i in range(n):
        if p[i] == c'.':
            if digits == 0:
                return False
            dots += 1
            if dots > 3:
                return False
            digits = 0
            value = 0
        elif c'0' <= p[i] <= c'9':
            if digits == 1 and value == 0:
                return False
            digits += 1
            value = value * 10 + p[i] - c'0'
            if digits > 3 or value > 255:
                return False
        else:
            return False
    return True


cdef bint _port_prefix(const unsigned char *p, Py_ssize_t n, int *port) noexcept nogil:
    # _core_py._port_prefix; sets *port to the value.
    cdef Py_ssize_t i
    cdef int value = 0
    if n > 5 or (n > 1 and p[0] == c'0'):
        return False
    for i in range(n):
        if not c'0' <= p[i] <= c'9':
            return False
        value = value * 10 + p[i] - c'0'
    port[0] = value
    return value <= 65535


cdef tuple _proxy_v1(const unsigned char *p, Py_ssize_t n):
    cdef Py_ssize_t i, j, eol = -1, end, count = 0
    cdef Py_ssize_t starts[6]
    cdef Py_ssize_t ends[6]
    cdef unsigned char addresses[2][16]
    cdef int ports[2]
    cdef int af, k
    cdef bint complete, last
    for i in range(6 if n > 6 else n):
        if p[i] != _V1_PREFIX[i]:
            return _PROXY_BAD
    for i in range(n - 1):
        if p[i] == c'\r' and p[i + 1] == c'\n':
            eol = i
            break
    complete = eol >= 0
    if complete:
        end = eol
    else:
        end = n - 1 if n and p[n - 1] == c'\r' else n
        if end > C_PROXY_V1_MAX - 2:
            return _PROXY_BAD
    for i in range(end):
        if p[i] == c'\r' or p[i] == c'\n':
            return _PROXY_BAD
    # The words after "PROXY " (an empty one when the line stops inside the prefix); six are enough to
    # know there are too many.
    i = 6 if end > 6 else end
    while count < 6:
        j = i
        while j < end and p[j] != c' ':
            j += 1
        starts[count] = i
        ends[count] = j
        count += 1
        if j == end:
            break
        i = j + 1
    if _word_is(p + starts[0], ends[0] - starts[0], b"UNKNOWN", 7) and (complete or count > 1):
        return (PROXY_LOCAL, eol + 2, None, 0, None, 0, ()) if complete else _PROXY_MORE
    if count > 5 or (complete and count != 5):
        return _PROXY_BAD
    if count == 1:
        if complete or not (_word_starts(p + starts[0], ends[0] - starts[0], b"TCP4", 4)
                            or _word_starts(p + starts[0], ends[0] - starts[0], b"TCP6", 4)
                            or _word_starts(p + starts[0], ends[0] - starts[0], b"UNKNOWN", 7)):
            return _PROXY_BAD
        return _PROXY_MORE
    if _word_is(p + starts[0], ends[0] - starts[0], b"TCP4", 4):
        af = AF_INET
    elif _word_is(p + starts[0], ends[0] - starts[0], b"TCP6", 4):
        af = AF_INET6
    else:
        return _PROXY_BAD
    for k in range(1, count):
        last = k == count - 1 and not complete
        if k <= 2:
            if last:
                return _PROXY_MORE if _address_prefix(p + starts[k], ends[k] - starts[k], af) else _PROXY_BAD
            if not _address(p + starts[k], ends[k] - starts[k], af, addresses[k - 1]):
                return _PROXY_BAD
        elif not _port_prefix(p + starts[k], ends[k] - starts[k], &ports[k - 3]) or (
                not last and ends[k] == starts[k]):
            return _PROXY_BAD
    if not complete:
        return _PROXY_MORE
    return (PROXY_OK, eol + 2, _address_text(af, addresses[0]), ports[0], _address_text(af, addresses[1]),
            ports[1], ())


cdef int _endpoint(object ip, str what, unsigned char *out) except -1:
    # The family of `ip` (AF_INET or AF_INET6) with its bytes in out; ValueError/TypeError like the twin.
    if not isinstance(ip, str):
        raise TypeError(f"{what} must be a str")
    cdef bytes text
    if (<str>ip).isascii() and "\0" not in ip:
        text = (<str>ip).encode("ascii")
        if inet_pton(AF_INET, text, out) == 1:
            return AF_INET
        if inet_pton(AF_INET6, text, out) == 1:
            return AF_INET6
    raise ValueError(f"{what} is not an IP address: {ip!r}")


cdef int _check_port(object port, str what) except -1:
    if not isinstance(port, int):
        raise TypeError(f"{what} must be an int")
    if not 0 <= port <= 65535:
        raise ValueError(f"{what} must be in [0, 65535]")
    return port


cdef int _endpoints(src_ip, src_port, dst_ip, dst_port, unsigned char *src, unsigned char *dst) except -1:
    # Both addresses in one family (see _core_py._proxy_endpoints): returns it.
    cdef int src_af = _endpoint(src_ip, "src_ip", src)
    cdef int dst_af = _endpoint(dst_ip, "dst_ip", dst)
    _check_port(src_port, "src_port")
    _check_port(dst_port, "dst_port")
    if src_af == dst_af:
        return src_af
    cdef unsigned char *v4 = src if src_af == AF_INET else dst
    memcpy(v4 + 12, v4, 4)
    memset(v4, 0, 10)
    v4[10] = 0xFF
    v4[11] = 0xFF
    return AF_INET6


def proxy_header_v1(src_ip, src_port, dst_ip, dst_port):
    """See ``fastlb._core_py.proxy_header_v1``."""
    cdef unsigned char src[16]
    cdef unsigned char dst[16]
    cdef int af = _endpoints(src_ip, src_port, dst_ip, dst_port, src, dst)
    return b"PROXY %s %s %s %d %d\r\n" % (b"TCP4" if af == AF_INET else b"TCP6",
                                         _address_text(af, src).encode("ascii"),
                                         _address_text(af, dst).encode("ascii"), src_port, dst_port)


def proxy_header_v2(src_ip, src_port, dst_ip, dst_port):
    """See ``fastlb._core_py.proxy_header_v2``."""
    cdef unsigned char out[16 + 36]
    cdef int af = _endpoints(src_ip, src_port, dst_ip, dst_port, out + 16, out + 32)
    cdef Py_ssize_t size = 4 if af == AF_INET else 16
    cdef int sp = src_port, dp = dst_port
    memcpy(out, _V2_SIGNATURE, 12)
    out[12] = 0x21  # version 2, PROXY
    out[13] = 0x11 if af == AF_INET else 0x21  # INET or INET6, STREAM
    out[14] = 0
    out[15] = 2 * size + 4
    if size == 4:
        memcpy(out + 20, out + 32, 4)
    out[16 + 2 * size] = sp >> 8
    out[17 + 2 * size] = sp & 0xFF
    out[18 + 2 * size] = dp >> 8
    out[19 + 2 * size] = dp & 0xFF
    return PyBytes_FromStringAndSize(<const char *>out, 20 + 2 * size)
