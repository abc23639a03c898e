"""Listen and server addresses: ``host:port`` and ``[v6]:port`` as written in the
configuration and on the command line; a client address against networks."""

from __future__ import annotations

import ipaddress
import re

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

HOST_RE = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*", re.ASCII)
IPV6_RE = re.compile(r"[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[A-Za-z0-9_.\-]+)?", re.ASCII)


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port`` (host returned without brackets).

    Raises ValueError whose text says what was expected.
    """
    malformed = ValueError('an address "host:port" (IPv6 as "[::1]:8080")')
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not IPV6_RE.fullmatch(host):
            raise malformed
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not HOST_RE.fullmatch(host):
            raise malformed
    if not re.fullmatch(r"[0-9]+", port, re.ASCII):
        raise malformed
    if int(port) > 65535:
        raise ValueError("an address with a port <= 65535")
    return host, int(port)


def in_networks(address: str, networks: tuple[Network, ...]) -> bool:
    """Whether a client address (as a transport gives it: a zone possible) is in one of
    ``networks``; an IPv4 client of a listener on "::" shows as ::ffff:a.b.c.d and is
    matched as the IPv4 address it is. Not an address: False."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in networks)
