"""Listening sockets: one SO_REUSEPORT socket per listener per worker slot, opened by the master.

The master keeps every socket open for its whole life.  With SO_REUSEPORT the kernel hashes each new
connection to one socket of the group (net/ipv4/inet_hashtables.c, reuseport_select_sock) and queues it
there; a socket whose worker died keeps its queue, and the respawned worker of that slot accepts from it,
so a crash or a reload never turns into refused connections.

SO_REUSEPORT also lets any other process of the same user join the group and take a share of the
connections (net/ipv4/inet_connection_sock.c, inet_csk_bind_conflict: same euid is all it asks).  So
before the master opens the first socket of an address it binds a probe without SO_REUSEPORT, which
fails if anything listens there (claim_address); only `--allow-shared-ports` skips that.
"""

import errno
import os
import socket

from fastlb.config import Address

# Large enough for bursts of new TLS connections while a slot's worker is being replaced; the kernel
# clamps it to net.core.somaxconn.
BACKLOG = 4096
# Accepted sockets inherit the listener's send buffer (tcp(7)).  Fixed rather than autotuned (up to
# tcp_wmem's 4 MiB), so that a client that stops reading fills it and meets send_timeout instead of
# parking a whole response in the kernel; 1 MiB (the kernel doubles it) still allows ~20 MB/s per
# connection at 100 ms RTT.
CLIENT_SNDBUF = 1 << 20
_TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10


class AddressInUse(OSError):
    """A listener's address is taken; ``str(e)`` names the setting, the address and, where /proc
    tells, the process holding it: ``admin.address 127.0.0.1:9900: address already in use by ...``."""


def open_listener(address: Address, reuseport: bool = True, sndbuf: int = CLIENT_SNDBUF,
                  name: str = "listener") -> socket.socket:
    """name: the setting the address comes from (``listeners[0].address``), for the error."""
    sock = _socket(address)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        _bind(sock, address, name)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def claim_address(address: Address, name: str) -> None:
    """Refuse an address another process listens on, even in an SO_REUSEPORT group it would let us
    join.  The probe has SO_REUSEADDR so that connections of a previous run in TIME_WAIT do not count,
    and without SO_REUSEPORT it conflicts with any listener (inet_csk_bind_conflict)."""
    with _socket(address) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            _bind(probe, address, name)
        except AddressInUse as exc:
            if _joinable(address):
                raise AddressInUse(f"{exc}; pass --allow-shared-ports to share it") from None
            raise


def _socket(address: Address) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


def _bind(sock: socket.socket, address: Address, name: str) -> None:
    try:
        sock.bind((address.host, address.port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        raise AddressInUse(f"{name} {address}: address already in use{_held_by(address)}") from None


def _joinable(address: Address) -> bool:
    """Whether the holder is an SO_REUSEPORT group we could join (then the flag would help)."""
    with _socket(address) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError:
            return False
    return True


def _held_by(address: Address) -> str:
    """' by pid N (command line)' for the processes listening on address, as far as /proc shows: the
    inodes of listening sockets are in /proc/net/tcp{,6} (world-readable), the processes holding them
    in /proc/PID/fd (readable for our own processes, or all of them as root)."""
    inodes = _listening_inodes(address)
    if not inodes:
        return ""
    holders = {}
    for pid in filter(str.isdigit, _listdir("/proc")):
        for fd in _listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                holders[int(pid)] = _parent(pid)
                break
    # A fastlb master and its workers all hold the socket: name the processes whose parent does not.
    top = sorted(pid for pid, ppid in holders.items() if ppid not in holders)
    if not top:
        uids = sorted(set(inodes.values()))
        return f" by a process of uid {', '.join(uids)}"
    return " by " + ", ".join(f"pid {pid} ({_cmdline(pid)})" for pid in top[:3])


def _listening_inodes(address: Address) -> dict[str, str]:
    """{inode: uid} of the listening sockets that conflict with address (same port, same address or
    either one the wildcard)."""
    wanted = address.host
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, uid, inode = fields[1], fields[3], fields[7], fields[9]
            host_hex, port_hex = local.rsplit(":", 1)
            if state != _TCP_LISTEN or int(port_hex, 16) != address.port:
                continue
            host = _unhex(host_hex)
            if host == wanted or host in ("0.0.0.0", "::") or wanted in ("0.0.0.0", "::"):
                found[inode] = uid
    return found


def _unhex(host_hex: str) -> str:
    """An address of /proc/net/tcp{,6}: the in-memory bytes of the address printed as 32-bit words in
    host byte order (net/ipv4/tcp_ipv4.c, get_tcp4_sock)."""
    raw = bytes.fromhex(host_hex)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, raw)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _parent(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode("utf-8", "replace") for a in args)[:120]
