"""Who the client is behind trusted proxies (``server.trusted_proxies``).

A request's peer (or the address its PROXY protocol header carried) is the
client, unless that address is a trusted proxy: then ``X-Forwarded-For`` is
read from the right, each address a hop nearer the client, and the first
address that is not a trusted proxy is the client. What a client writes into
the header itself lies to the left of what its proxies appended, so it is
never reached while the hops on the right are trusted.

Malformed input is never an error: the walk stops at the first entry that is
not an address, and the client is then the last address it could vouch for.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from .addresses import Network, in_networks

# more hops than any real chain of proxies; an X-Forwarded-For of thousands of
# entries costs at most this many parses
MAX_HOPS = 32



class TrustedProxies:
    """The networks whose X-Forwarded-For the gateway believes."""

    __slots__ = ("_known", "_networks")

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        # address text -> trusted or not: a gateway sees the same few proxies all day;
        # bounded, so a flood of distinct addresses cannot grow it
        self._known: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    @property
    def networks(self) -> tuple[str, ...]:
        return tuple(str(n) for n in self._networks)

    def trusts(self, address: str) -> bool:
        known = self._known.get(address)
        if known is not None:
            return known
        trusted = in_networks(address, self._networks)
        if len(self._known) < 4096:
            self._known[address] = trusted
        return trusted

    def client(self, peer: str, forwarded_for: Sequence[str]) -> str:
        """The client address of a request from ``peer`` carrying these
        X-Forwarded-For header values (in the order received)."""
        if not forwarded_for or not self.trusts(peer):
            return peer
        client = peer
        hops = 0
        for value in reversed(forwarded_for):
            for entry in reversed(value.split(",")):
                address = _address(entry)
                if address is None:
                    return client
                client = address
                hops += 1
                if hops >= MAX_HOPS or not self.trusts(address):
                    return client
        return client


def _address(entry: str) -> str | None:
    """An X-Forwarded-For entry as an address, or None. Entries are addresses, an
    IPv6 one optionally in brackets; a port (``1.2.3.4:5678``, ``[::1]:80``) is
    dropped, as some proxies add one."""
    text = entry.strip(" \t")
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None
