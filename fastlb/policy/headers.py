"""A route's header rules (`request_headers`, `response_headers`) and path rewrite (`rewrite_prefix`),
applied to a head through fastlb/heads.py."""

from fastlb.heads import Head, field_name, field_value


class HeaderRules:
    """`request_headers` / `response_headers` of a route: names removed, then fields set."""

    __slots__ = ("remove", "set")

    def __init__(self, spec):
        self.remove = [field_name(n).lower() for n in spec.remove]
        self.set = [(field_name(n), field_value(v)) for n, v in spec.set]

    def apply(self, head: Head) -> None:
        for name in self.remove:
            head.remove(name)
        for name, value in self.set:
            head.set(name, value)


def rewrite_path(target: bytes, prefix: bytes, replacement: bytes) -> bytes:
    """target with the route's matched path prefix replaced (query kept).  The router matched whole
    segments, so the path is `prefix` itself or `prefix` + "/..." (a trailing slash on either side is
    not doubled): /api + /v2/ turns /api/users?x into /v2/users?x, /api into /v2/ and /api/ into /v2/;
    /api + /v2 turns /api into /v2 and /api/ into /v2/."""
    q = target.find(b"?")
    path, query = (target, b"") if q < 0 else (target[:q], target[q:])
    rest = path[len(prefix.rstrip(b"/")):]
    new = replacement if not rest else replacement.rstrip(b"/") + rest
    return (new or b"/") + query
