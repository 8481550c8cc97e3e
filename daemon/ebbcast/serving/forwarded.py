"""Which address a client connects from, when a reverse proxy stands in between.

A proxy names the client in ``X-Forwarded-For`` (a list; each proxy appends the
address it was reached from) or ``X-Real-IP``. Anyone can send those headers, so
they count only when the peer is one of server.trusted_proxies; then the client
is the rightmost address of ``X-Forwarded-For`` that is not a trusted proxy
itself (as nginx's ``real_ip_recursive`` reads it), else ``X-Real-IP``. Anything
unparsable leaves the peer's address. Pure: every rule is tested by calling it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from ebbcast.values import parse_network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """The proxies whose forwarding headers name the client."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks = [parse_network(n) for n in networks]

    def trusts(self, address: Address | None) -> bool:
        return address is not None and any(address in n for n in self.networks)

    def client_address(self, peer: str, headers: Mapping[str, str]) -> str:
        """The client's address: the peer's, or the one a trusted proxy forwarded.

        ``headers`` is looked up by lower-case names."""
        if not self.networks or not self.trusts(_address(peer)):
            return peer
        forwarded = headers.get("x-forwarded-for")
        if forwarded:
            hops = [_address(hop) for hop in forwarded.split(",")]
            for hop in reversed(hops):
                if hop is None:
                    return peer  # a hop that is no address: believe none of it
                if not self.trusts(hop):
                    return str(hop)
            return str(hops[0]) if hops[0] is not None else peer  # proxies all the way
        real = _address(headers.get("x-real-ip", ""))
        return str(real) if real is not None else peer
