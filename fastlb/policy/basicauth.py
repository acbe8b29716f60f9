"""HTTP Basic authentication (RFC 7617) against an htpasswd file of bcrypt hashes.

bcrypt is slow on purpose (tens to hundreds of milliseconds at the usual cost 10-12), so it never runs
in the worker's loop: `RoutePolicy` holds the request and `verify` runs in the loop's default thread
pool (the bcrypt binding releases the GIL while it hashes), and the loop keeps serving everyone else.
A credential that verified is remembered (the exact Authorization value, in a bounded LRU), so a
client that keeps sending it pays the hash once, not per request.  A wrong one is never remembered and
pays the full hash every time, which is what makes guessing expensive; an unknown user is hashed
against a dummy of the same cost, so the answer's timing does not tell which users exist.  The file
is read at config load (and on every reload).
"""

import base64
import binascii
import re
from collections import OrderedDict

import bcrypt

_CACHE = 1024
# $2a$, $2b$, $2y$: the bcrypt variants htpasswd -B and the bcrypt library write; then the cost.
_BCRYPT = re.compile(rb"\$2[aby]\$([0-3][0-9])\$[./A-Za-z0-9]{53}")


def read_htpasswd(path: str) -> dict:
    """user -> bcrypt hash (bytes); ValueError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    users = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, colon, hashed = line.partition(b":")
        if not colon or not user:
            raise ValueError(f"{path}:{number}: expected user:hash")
        if not _BCRYPT.fullmatch(hashed):
            # MD5-crypt ($apr1$), SHA-1 ({SHA}) and crypt(3) are the other htpasswd formats; all of them
            # are fast to brute-force, so only bcrypt (htpasswd -B) is accepted.
            raise ValueError(f"{path}:{number}: user {user.decode('latin-1')!r} is not a bcrypt hash "
                             "(create it with htpasswd -B)")
        users[user] = hashed
    if not users:
        raise ValueError(f"{path}: no user")
    return users


_DUMMIES: dict = {}


def _dummy(cost: int) -> bytes:
    """A hash of that cost to check unknown users against; one per cost and process, since making it
    takes as long as a check (a quarter second at cost 12)."""
    if cost not in _DUMMIES:
        _DUMMIES[cost] = bcrypt.hashpw(b"", bcrypt.gensalt(rounds=cost))
    return _DUMMIES[cost]


def _credentials(authorization: bytes):
    """(user, password) of a Basic Authorization value (RFC 7617 §2), or None."""
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        user, colon, password = base64.b64decode(token.strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    return (user, password) if colon else None


class BasicAuth:
    __slots__ = ("users", "challenge", "_dummy", "_ok")

    def __init__(self, path: str, realm: str):
        self.users = read_htpasswd(path)
        # RFC 7617 §2: the challenge names the realm; §2.1: charset="UTF-8" says how user-ids are sent.
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        self.challenge = f'WWW-Authenticate: Basic realm="{quoted}", charset="UTF-8"\r\n'.encode()
        cost = max(int(_BCRYPT.fullmatch(h).group(1)) for h in self.users.values())
        self._dummy = _dummy(max(cost, 4))
        self._ok: OrderedDict = OrderedDict()

    def known(self, authorization):
        """True: verified before; False: refused without hashing (absent, not Basic, malformed);
        None: `verify` must decide."""
        if authorization is None:
            return False
        if authorization in self._ok:
            self._ok.move_to_end(authorization)
            return True
        return None if _credentials(authorization) is not None else False

    def verify(self, authorization: bytes) -> bool:
        """The bcrypt check; runs in a thread, so it touches nothing shared (see `remember`)."""
        user, password = _credentials(authorization)
        hashed = self.users.get(user)
        if hashed is None:
            bcrypt.checkpw(password, self._dummy)  # the same time as a wrong password
            return False
        return bcrypt.checkpw(password, hashed)

    def remember(self, authorization: bytes) -> None:
        self._ok[authorization] = True
        if len(self._ok) > _CACHE:
            self._ok.popitem(last=False)
