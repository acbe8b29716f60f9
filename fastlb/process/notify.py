"""sd_notify(3): tell systemd (a `Type=notify` unit) when the master is ready, reloading or stopping.

The protocol is one datagram per state change, `KEY=VALUE` lines, sent to the AF_UNIX socket named in
$NOTIFY_SOCKET (a path, or an abstract name written with a leading `@`).  Written here rather than
taken from a library: it is these few lines, the `sdnotify` package has been unmaintained since 2017,
and `systemd-python` needs libsystemd's headers and a compiler to install.

Without $NOTIFY_SOCKET (not started by systemd) every call does nothing.  Sending never raises: a
service manager that went away must not stop the load balancer.
"""

import logging
import os
import socket
import time

log = logging.getLogger("fastlb")


class Notifier:
    def __init__(self, address: str | None = None):
        """address: $NOTIFY_SOCKET, read once; the variable stays set for a binary upgrade's new
        master, which must be able to announce itself too."""
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace (unix(7))
        self.address = address or None
        self.sock = None

    def send(self, **fields) -> None:
        """One datagram: fields as KEY=VALUE lines, keys upper-cased (ready=1 sends READY=1)."""
        if self.address is None:
            return
        text = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.sendto(text.encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), exc)

    def ready(self, status: str, mainpid: int | None = None) -> None:
        """MAINPID names the new master after a binary upgrade (systemd accepts it from a process other
        than the main one only with NotifyAccess=all, as deploy/systemd/fastlb.service sets)."""
        if mainpid is None:
            self.send(ready=1, status=status)
        else:
            self.send(mainpid=mainpid, ready=1, status=status)

    def reloading(self) -> None:
        # MONOTONIC_USEC: Type=notify-reload (systemd 253+) matches the reload to the request with it.
        self.send(reloading=1, monotonic_usec=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                  status="reloading")

    def stopping(self) -> None:
        self.send(stopping=1, status="draining")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
