"""Name resolution through the operating system (``getaddrinfo``).

This is what a plain client would see: it honours /etc/hosts and nsswitch, and it is also exactly
what a censor that poisons the ISP resolver controls. trio runs ``getaddrinfo`` in a worker thread;
a timeout abandons the thread rather than waiting for it.
"""

from __future__ import annotations

import ipaddress
import socket

import trio

from proxy.errors import ResolveError
from proxy.inbound.base import IPAddress
from proxy.resolve.base import ip_literal


class SystemResolver:
    """Resolve names with the system's ``getaddrinfo``, IPv4 and IPv6 together.

    Addresses keep the order the system returns (RFC 6724 sorting by glibc), duplicates removed.
    ``family`` may restrict answers to ``socket.AF_INET`` or ``socket.AF_INET6``.
    """

    def __init__(self, *, timeout: float = 5.0, family: int = socket.AF_UNSPEC) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.family = family

    async def resolve(self, host: str) -> list[IPAddress]:
        literal = ip_literal(host)
        if literal is not None:
            await trio.lowlevel.checkpoint()
            return [literal]
        if not host or host.startswith(".") or ".." in host:
            await trio.lowlevel.checkpoint()
            raise ResolveError(f"cannot resolve {host!r}: not a valid host name")
        infos: list[tuple[object, ...]] = []
        with trio.move_on_after(self.timeout) as scope:
            try:
                infos = await trio.socket.getaddrinfo(
                    host, None, family=self.family, type=socket.SOCK_STREAM
                )
            except socket.gaierror as exc:
                raise ResolveError(f"cannot resolve {host!r}: {exc.strerror}") from exc
            except (UnicodeError, OSError) as exc:
                raise ResolveError(f"cannot resolve {host!r}: {exc}") from exc
        if scope.cancelled_caught:
            raise ResolveError(f"cannot resolve {host!r}: no answer within {self.timeout:g} s")
        return _addresses(host, infos)


def _addresses(host: str, infos: list[tuple[object, ...]]) -> list[IPAddress]:
    seen: set[IPAddress] = set()
    result: list[IPAddress] = []
    for info in infos:
        sockaddr = info[4]
        if not isinstance(sockaddr, tuple) or not sockaddr:
            continue
        text = str(sockaddr[0])
        if len(sockaddr) >= 4 and sockaddr[3] and "%" not in text:
            # link-local IPv6 with a scope: keep the zone so the address stays dialable
            text = f"{text}%{sockaddr[3]}"
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address not in seen:
            seen.add(address)
            result.append(address)
    if not result:
        raise ResolveError(f"cannot resolve {host!r}: no IPv4 or IPv6 address")
    return result
