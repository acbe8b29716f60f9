"""Listening sockets: one SO_REUSEPORT socket per listener per worker slot, opened by the master.

The master keeps every socket open for its whole life.  With SO_REUSEPORT the kernel hashes each new
connection to one socket of the group (net/ipv4/inet_hashtables.c, reuseport_select_sock) and queues it
there; a socket whose worker died keeps its queue, and the respawned worker of that slot accepts from it,
so a crash or a reload never turns into refused connections.
"""

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


def open_listener(address: Address, reuseport: bool = True, sndbuf: int = CLIENT_SNDBUF) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
