"""`allow` / `deny` CIDR lists of a route, checked against the real client address.

`deny` is checked first: an address in it gets 403 whatever `allow` says; then, if `allow` is not
empty, an address must be in it.  An IPv4-mapped IPv6 address (::ffff:10.1.2.3, what a dual-stack
socket reports for an IPv4 client) is checked as the IPv4 address it is.  Verdicts are remembered per
address (bounded), so a keep-alive client costs one dict lookup per request after its first.
"""

import ipaddress

_CACHE = 4096


class Access:
    __slots__ = ("allow", "deny", "_seen")

    def __init__(self, allow, deny):
        self.allow = [ipaddress.ip_network(n) for n in allow]
        self.deny = [ipaddress.ip_network(n) for n in deny]
        self._seen: dict = {}

    def allowed(self, ip: bytes) -> bool:
        verdict = self._seen.get(ip)
        if verdict is None:
            verdict = self._decide(ip)
            if len(self._seen) >= _CACHE:
                self._seen.clear()
            self._seen[ip] = verdict
        return verdict

    def _decide(self, ip: bytes) -> bool:
        try:
            addr = ipaddress.ip_address(ip.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return not self.allow  # an unparseable address is in no list
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr in net for net in self.deny):
            return False
        return not self.allow or any(addr in net for net in self.allow)
