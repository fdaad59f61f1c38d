"""Plain DNS (RFC 1035) over UDP, with TCP when the answer is truncated.

Plain DNS is what censors read and forge, so sidestep uses it only where it is the honest
choice (a LAN resolver, the lab, a router's upstream) and checks every answer it accepts:

* a fresh socket per query, so the source port is random (the kernel picks it) and a forged
  answer cannot be aimed at a port we reuse;
* a random 16-bit ID per query;
* an answer must come from the server's address and match our ID and question exactly
  (dnspython's ``is_response``), anything else is ignored and we keep listening;
* a truncated (TC) answer is asked again over TCP.

A and AAAA are asked in parallel; the name resolves when either has addresses.
:meth:`PlainResolver.forward` relays a client's whole query (any type, its EDNS and flags as
they are) under the same rules and gives the answer back with the client's ID; the question is
compared case-insensitively, so a server that does not echo 0x20 letter case is still heard.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import trio

from proxy.errors import ResolveError
from proxy.inbound.base import IPAddress
from proxy.resolve.base import ip_literal

_MAX_UDP = 4096


class PlainResolver:
    """Resolve names by asking ``servers`` (``(ip, port)`` pairs) in order."""

    def __init__(self, servers: Sequence[tuple[str, int]], *, timeout: float = 5.0) -> None:
        if not servers:
            raise ValueError("PlainResolver needs at least one server")
        self.servers = [(str(ipaddress.ip_address(h)), p) for h, p in servers]
        self.timeout = timeout

    async def resolve(self, host: str) -> list[IPAddress]:
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        try:
            name = dns.name.from_text(host.rstrip(".") + ".")
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise ResolveError(f"{host}: not a valid name ({exc})") from None
        answers: dict[int, list[IPAddress] | ResolveError] = {}

        async def ask(rdtype: int) -> None:
            try:
                answers[rdtype] = await self.query_addresses(name, rdtype)
            except ResolveError as exc:
                answers[rdtype] = exc

        with trio.move_on_after(self.timeout):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, dns.rdatatype.AAAA)
                await ask(dns.rdatatype.A)
        v4 = answers.get(dns.rdatatype.A)
        v6 = answers.get(dns.rdatatype.AAAA)
        addrs = [a for part in (v4, v6) if isinstance(part, list) for a in part]
        if addrs:
            return addrs
        for part in (v4, v6):
            if isinstance(part, ResolveError):
                raise part
        raise ResolveError(f"{host}: no answer from {self._names()} within {self.timeout:g} s")

    async def query_addresses(self, name: dns.name.Name, rdtype: int) -> list[IPAddress]:
        """A or AAAA addresses of ``name`` (empty when the name has none of that type)."""
        response = await self.query(name, rdtype)
        rcode = response.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            raise ResolveError(f"{name.to_text(True)}: no such name (NXDOMAIN)")
        if rcode != dns.rcode.NOERROR:
            raise ResolveError(f"{name.to_text(True)}: server answered {dns.rcode.to_text(rcode)}")
        out: list[IPAddress] = []
        for rrset in response.answer:
            if rrset.rdtype == rdtype:
                out.extend(ipaddress.ip_address(r.address) for r in rrset)
        return out

    async def query(self, name: dns.name.Name, rdtype: int) -> dns.message.Message:
        """Ask each server in turn; the first valid response wins."""
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=_MAX_UDP)
        return await self._exchange(query, name.to_text(True))

    async def forward(self, query: dns.message.Message) -> dns.message.Message:
        """Relay a client's ``query`` under a random ID; the answer carries the client's ID.

        Raises :class:`ResolveError` when no server gives a matching answer in time.
        """
        if len(query.question) != 1:
            raise ResolveError("plain DNS forwards queries with exactly one question")
        ours = dns.message.from_wire(query.to_wire())
        response = await self._exchange(ours, query.question[0].name.to_text(True))
        response.id = query.id
        return response

    async def _exchange(self, query: dns.message.Message, label: str) -> dns.message.Message:
        failures: list[str] = []
        per_server = self.timeout / max(1, len(self.servers))
        for server in self.servers:
            query.id = secrets.randbelow(1 << 16)
            with trio.move_on_after(per_server):
                try:
                    response = await _ask_udp(query, server)
                    if response.flags & dns.flags.TC:
                        response = await _ask_tcp(query, server)
                    return response
                except (OSError, dns.exception.DNSException) as exc:
                    failures.append(f"{server[0]}:{server[1]}: {exc}")
                    continue
            failures.append(f"{server[0]}:{server[1]}: no answer")
        raise ResolveError(f"{label}: " + "; ".join(failures))

    def _names(self) -> str:
        return ", ".join(f"{h}:{p}" for h, p in self.servers)


async def _ask_udp(query: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    wire = query.to_wire()
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect(server)  # the kernel now drops datagrams from anyone else
        await sock.send(wire)
        while True:
            data = await sock.recv(65535)
            try:
                response = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue  # garbage: keep waiting for the real answer
            if query.is_response(response):
                return response


async def _ask_tcp(query: dns.message.Message, server: tuple[str, int]) -> dns.message.Message:
    wire = query.to_wire()
    stream = await trio.open_tcp_stream(server[0], server[1])
    async with stream:
        await stream.send_all(len(wire).to_bytes(2, "big") + wire)
        buf = bytearray()
        while True:
            if len(buf) >= 2:
                size = int.from_bytes(buf[:2], "big")
                if len(buf) >= 2 + size:
                    response = dns.message.from_wire(bytes(buf[2 : 2 + size]))
                    if not query.is_response(response):
                        raise dns.exception.FormError("TCP answer does not match the question")
                    return response
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise dns.exception.FormError("server closed the TCP connection mid-answer")
            buf += chunk
