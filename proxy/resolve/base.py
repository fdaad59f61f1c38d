"""The resolver interface every name-resolution backend implements.

A resolver turns a host name into the addresses to dial. The system resolver (getaddrinfo) is
the first implementation; DNS-over-HTTPS/TLS resolvers, caches and chains plug in behind the same
method so the dialer never knows where an answer came from.
"""

from __future__ import annotations

import ipaddress
from typing import Protocol

from proxy.inbound.base import IPAddress


class Resolver(Protocol):
    """Something that maps a host name to addresses."""

    async def resolve(self, host: str) -> list[IPAddress]:
        """Return the addresses of ``host``, best first, without duplicates.

        An IP literal is returned as the only address without any lookup. Raises
        :class:`~proxy.errors.ResolveError` when the name has no usable address or the lookup
        fails or takes too long.
        """
        ...


def ip_literal(host: str) -> IPAddress | None:
    """``host`` as an address when it is an IP literal (IPv6 may be bracketed), else ``None``."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
