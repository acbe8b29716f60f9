"""The ACME storage directory: account keys, certificates, challenge answers, order state and locks.

Layout under `[acme] storage` (every file written 0600 through a temporary file and rename(2), so a
reader sees the old file or the new one, never half of one; rename within one directory is atomic on
local file systems and on NFS):

    accounts/<directory host>-<hash>/key.pem     the account key for one CA directory URL
    certificates/<name>/certificate.pem         private key, then the chain (one file: key and
                                                certificate are replaced together, never mismatched)
    certificates/<name>/temporary.pem           self-signed stand-in served until the first issuance
    certificates/<name>/state.json              failures, next try, last error (survives a reload)
    certificates/<name>/lock                    who is ordering <name> now, until when
    challenges/http-01/<token>                  key authorizations (RFC 8555 section 8.3)
    challenges/tls-alpn-01/<name>.pem           challenge certificates (RFC 8737 section 3)

<name> is the certificate's first name.  Several fastlb nodes may share the directory (a
ReadWriteMany volume): the lock file makes one node order a name at a time, as Caddy's certmagic
storage lock does, and the others pick the certificate up from `certificate.pem`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import socket
import tempfile
import time
import urllib.parse

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fastlb.net import certs

# An order takes at most ORDER_TIMEOUT (client.py); a lock older than this was left by a node that
# died or lost the volume, and is broken.
LOCK_TTL = 300.0
TEMPORARY_VALIDITY = datetime.timedelta(days=7)
# RFC 8555 section 8.1: a token is base64url; refusing anything else keeps a path out of the name.
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_NAME = re.compile(r"[a-z0-9._-]{1,253}")


def default_directory() -> str:
    if os.geteuid() == 0:
        return "/var/lib/fastlb/acme"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "fastlb", "acme")


class Storage:
    def __init__(self, spec, owner: tuple[int, int] | None = None):
        """spec: the [acme] section.  owner: (uid, gid) the children run as, when the master (root)
        creates files they must later replace."""
        self.root = spec.storage or default_directory()
        self.owner = owner if owner is not None and os.geteuid() == 0 else None
        self.http01 = os.path.join(self.root, "challenges", "http-01")
        self.tls_alpn01 = os.path.join(self.root, "challenges", "tls-alpn-01")

    # -- files -------------------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        """path and its missing parents, 0700 each (os.makedirs gives the mode to the leaf only)."""
        if os.path.isdir(path):
            return
        parent = os.path.dirname(path)
        if parent != path:
            self.makedirs(parent)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            return
        if self.owner is not None and path.startswith(self.root):
            os.chown(path, *self.owner)

    def write(self, path: str, data: bytes) -> None:
        """Replace path with data, atomically, mode 0600."""
        directory = os.path.dirname(path)
        self.makedirs(directory)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")  # created 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if self.owner is not None:
                os.chown(tmp, *self.owner)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    def read(self, path: str) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    # -- paths ---------------------------------------------------------------------------------------
    def certificate_dir(self, name: str) -> str:
        return os.path.join(self.root, "certificates", name)

    def certificate_path(self, name: str) -> str:
        return os.path.join(self.certificate_dir(name), "certificate.pem")

    def account_key_path(self, directory_url: str) -> str:
        url = urllib.parse.urlsplit(directory_url)
        tag = re.sub(r"[^a-z0-9.-]", "_", (url.hostname or "ca").lower())
        digest = hashlib.sha256(directory_url.encode()).hexdigest()[:12]
        return os.path.join(self.root, "accounts", f"{tag}-{digest}", "key.pem")

    # -- certificates ------------------------------------------------------------------------------
    def usable_certificate(self, names: tuple[str, ...], now: float | None = None):
        """(path, leaf) of the stored certificate for names if it can be served: it parses, its key
        matches, it is valid now and its subjectAltName covers every name; else None."""
        path = self.certificate_path(names[0])
        try:
            leaf = certs.load_certificate_chain(path)[0]
            key = certs.load_private_key(path)
        except certs.CertificateFileError:
            return None
        when = datetime.datetime.fromtimestamp(now if now is not None else time.time(), datetime.UTC)
        if not certs.key_matches_certificate(leaf, key) or certs.validity_problem(leaf, when):
            return None
        if not set(names) <= set(certs.certificate_dns_names(leaf)):
            return None
        return path, leaf

    def temporary_certificate(self, names: tuple[str, ...]) -> str:
        """A self-signed certificate for names (made now if there is no usable one): what a managed
        name is served with until the CA has issued its certificate."""
        path = os.path.join(self.certificate_dir(names[0]), "temporary.pem")
        try:
            leaf = certs.load_certificate_chain(path)[0]
            left = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            if certs.certificate_dns_names(leaf) == list(names) and left > TEMPORARY_VALIDITY / 2:
                return path
        except certs.CertificateFileError:
            pass
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fastlb temporary ({names[0]})")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + TEMPORARY_VALIDITY)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256())
        )
        self.write(path, pem_bundle(key, [cert]))
        return path

    # -- order state -------------------------------------------------------------------------------
    def load_state(self, name: str) -> dict:
        data = self.read(os.path.join(self.certificate_dir(name), "state.json"))
        try:
            state = json.loads(data) if data else {}
        except ValueError:
            state = {}
        return state if isinstance(state, dict) else {}

    def save_state(self, name: str, state: dict) -> None:
        self.write(os.path.join(self.certificate_dir(name), "state.json"), json.dumps(state).encode())

    # -- the lock ------------------------------------------------------------------------------------
    def lock(self, name: str, now: float | None = None) -> bool:
        """Take the order lock of name, or False if a live holder has it.  The lock is a file created
        with O_EXCL (atomic on local file systems and on NFSv3 and later) naming host, pid and an
        expiry; one past its expiry, or left by a process of this host that is gone, is broken."""
        path = os.path.join(self.certificate_dir(name), "lock")
        self.makedirs(os.path.dirname(path))
        now = time.time() if now is None else now
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "expires": now + LOCK_TTL}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                if not self._break_stale(path, now):
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            return True
        return False

    def unlock(self, name: str) -> None:
        path = os.path.join(self.certificate_dir(name), "lock")
        holder = _lock_holder(path)
        if holder and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
            _unlink(path)

    def _break_stale(self, path: str, now: float) -> bool:
        holder = _lock_holder(path)
        if holder is None:
            return True  # gone meanwhile, or being written: the next O_EXCL tells
        expired = not isinstance(holder.get("expires"), (int, float)) or holder["expires"] < now
        dead = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
        if not (expired or dead):
            return False
        _unlink(path)
        return True

    # -- challenges ----------------------------------------------------------------------------------
    def sweep_challenges(self, older_than: float) -> None:
        """Remove answers left by a process that stopped in the middle of an order."""
        for directory in (self.http01, self.tls_alpn01):
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                try:
                    if entry.stat().st_mtime < older_than:
                        _unlink(entry.path)
                except FileNotFoundError:
                    pass

    def publish_http01(self, token: str, key_authorization: str) -> str:
        path = os.path.join(self.http01, token)
        self.write(path, key_authorization.encode())
        return path

    def publish_tls_alpn01(self, name: str, bundle: bytes) -> str:
        path = os.path.join(self.tls_alpn01, name + ".pem")
        self.write(path, bundle)
        return path


def pem_bundle(key, chain) -> bytes:
    """The key, then the certificates: one file both ssl.load_cert_chain and fastlb.net.certs read."""
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and ".." not in name


def _lock_holder(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
