"""Name resolution through the operating system (``getaddrinfo``).

This is what a plain client would see: it honours /etc/hosts and nsswitch, and it is also exactly
what a censor that poisons the ISP resolver controls. trio runs ``getaddrinfo`` in a worker thread;
a timeout abandons the thread rather than waiting for it.

:meth:`SystemResolver.forward` lets the local DNS server and the cache sit in front of the
system resolver although ``getaddrinfo`` speaks no DNS: it answers A and AAAA questions (class
IN) by making up a response from the addresses the system gives, each record with TTL
:data:`SYSTEM_TTL` (the system does not say how long its answers live). One ``getaddrinfo``
for both families tells the cases apart: no address at all is NXDOMAIN; addresses of the other
family only is NOERROR with no records (NODATA). Neither negative answer carries an SOA record.
Every other type (MX, TXT, HTTPS, ...) and class is answered NOTIMP, since the system has no
way to look them up; a lookup that fails for another reason (no network, a timeout) raises
:class:`~proxy.errors.ResolveError`, which the DNS service turns into SERVFAIL or a stale
answer.
"""

from __future__ import annotations

import ipaddress
import socket

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

from proxy.errors import ResolveError
from proxy.inbound.base import IPAddress
from proxy.resolve.base import ip_literal

#: TTL of the records :meth:`SystemResolver.forward` makes up
SYSTEM_TTL = 60

#: getaddrinfo errors that mean "this name has no address"
_NO_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


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
        return _addresses(host, await self._getaddrinfo(host, self.family))

    async def forward(self, query: dns.message.Message) -> dns.message.Message:
        """Answer an A or AAAA ``query`` from ``getaddrinfo`` (see the module docstring)."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        question = query.question[0]
        wanted = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
        if wanted is None or question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.NOTIMP)
            return response
        host = question.name.to_text(omit_final_dot=True)
        if not host or host == ".":
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        try:
            infos = await self._getaddrinfo(host, socket.AF_UNSPEC, name_errors=False)
        except _NoSuchName:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        addresses = [a for a in _addresses(host, infos, strict=False) if a.version == wanted]
        if addresses:
            rrset = dns.rrset.from_text_list(
                question.name,
                SYSTEM_TTL,
                dns.rdataclass.IN,
                question.rdtype,
                [str(a).split("%", 1)[0] for a in addresses],
            )
            response.answer.append(rrset)
        return response

    async def _getaddrinfo(
        self, host: str, family: int, *, name_errors: bool = True
    ) -> list[tuple[object, ...]]:
        """getaddrinfo in a worker thread, under the timeout; errors as ResolveError.

        With ``name_errors`` false, "no such name" raises :class:`_NoSuchName` instead.
        """
        infos: list[tuple[object, ...]] = []
        with trio.move_on_after(self.timeout) as scope:
            try:
                infos = await trio.socket.getaddrinfo(
                    host, None, family=family, type=socket.SOCK_STREAM
                )
            except socket.gaierror as exc:
                if not name_errors and exc.errno in _NO_NAME:
                    raise _NoSuchName(host) from None
                raise ResolveError(f"cannot resolve {host!r}: {exc.strerror}") from exc
            except (UnicodeError, OSError) as exc:
                raise ResolveError(f"cannot resolve {host!r}: {exc}") from exc
        if scope.cancelled_caught:
            raise ResolveError(f"cannot resolve {host!r}: no answer within {self.timeout:g} s")
        return infos


class _NoSuchName(Exception):
    """getaddrinfo said the name does not exist."""


def _addresses(
    host: str, infos: list[tuple[object, ...]], *, strict: bool = True
) -> list[IPAddress]:
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
    if not result and strict:
        raise ResolveError(f"cannot resolve {host!r}: no IPv4 or IPv6 address")
    return result
