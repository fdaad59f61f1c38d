"""On-path DNS injection for the lab, the way the Great Firewall does it (research C.7 INJECT_RACE).

A :class:`DnsInjector` owns an address the client believes is a resolver (a "public resolver"
such as 127.53.8.8:53, or an address where no resolver exists at all) and stands for the censor's
tap on the path to it:

* a query for a listed name gets 1-3 forged answers at once, each with its own TTL, flags and an
  address from the name's pool (taken in turn, so repeated queries see the pool cycle);
* when a real resolver sits behind (``upstream``), every query is also forwarded and the genuine
  reply relayed afterwards (after ``relay_delay`` for injected queries), so the forgery wins the
  race but the real answer still arrives, as on a real on-path injector;
* unlisted names are only forwarded, or meet silence when nothing is behind;
* optionally the client's UDP source port is boxed for ``penalty`` seconds after an injection:
  every later query from that (ip, port) is dropped (OONI's reason for "a new socket per query").

Only UDP is intercepted. Every injection and penalty drop is appended to :attr:`DnsInjector.log`.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import trio

from proxy.lab.dnsserver import (
    Address,
    Clock,
    DnsLogEntry,
    DnsMode,
    QueryContext,
    log_entry,
    require_loopback,
)

logger = logging.getLogger(__name__)

#: header flags of the successive forged answers: each forgery looks a little different
_FORGED_FLAGS = (
    dns.flags.QR | dns.flags.RA,
    dns.flags.QR | dns.flags.AA | dns.flags.RA,
    dns.flags.QR,
)


@dataclass(frozen=True, slots=True)
class InjectionPolicy:
    """Which names are injected and how.

    ``names`` maps a name suffix to its pool of forged addresses (A answers use the IPv4 ones,
    AAAA the IPv6 ones; a query type with no address in the pool is not injected).
    """

    names: Mapping[str, Sequence[str]]
    count: int = 2  # forged answers per query, 1-3
    ttls: tuple[int, ...] = (60, 173, 252)  # one per forged answer, all distinct
    relay_delay: float = 0.05  # seconds the genuine answer is held back after an injection
    penalty: float = 0.0  # seconds a client's UDP source port stays boxed; 0 = off
    upstream_timeout: float = 3.0
    _table: tuple[tuple[dns.name.Name, str, tuple[str, ...]], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= 3:
            raise ValueError("an injector forges 1 to 3 answers per query")
        if len(set(self.ttls[: self.count])) != self.count:
            raise ValueError(f"need {self.count} distinct TTLs, got {self.ttls}")
        table = []
        for suffix, pool in self.names.items():
            if not pool:
                raise ValueError(f"{suffix}: empty address pool")
            addresses = tuple(str(ipaddress.ip_address(a)) for a in pool)
            name = dns.name.root if suffix in ("", ".") else dns.name.from_text(suffix)
            table.append((name, suffix, addresses))
        table.sort(key=lambda item: len(item[0]), reverse=True)
        object.__setattr__(self, "names", MappingProxyType(dict(self.names)))
        object.__setattr__(self, "_table", tuple(table))

    def pool_for(self, qname: dns.name.Name) -> tuple[str, tuple[str, ...]] | None:
        """``(suffix, pool)`` of the longest listed suffix covering ``qname``."""
        for name, suffix, pool in self._table:
            if qname.is_subdomain(name):
                return suffix, pool
        return None


class DnsInjector:
    """A UDP on-path injector at ``listen``, optionally in front of a real resolver."""

    def __init__(
        self,
        policy: InjectionPolicy,
        listen: Address,
        *,
        upstream: Address | None = None,
        now: Clock | None = None,
    ) -> None:
        require_loopback(listen[0])
        self.policy = policy
        self.listen = listen
        self.upstream = upstream
        self._now = now or trio.current_time
        #: every injection and penalty drop, in order
        self.log: list[DnsLogEntry] = []
        #: the bound address, once :meth:`serve` has started
        self.address: Address | None = None
        self._cursor: dict[str, int] = {}
        self._boxed: dict[Address, float] = {}

    def forge(self, query: dns.message.Message) -> list[bytes]:
        """The forged answers for ``query`` (empty when the name or type is not injected)."""
        if len(query.question) != 1:
            return []
        question = query.question[0]
        family = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
        found = self.policy.pool_for(question.name)
        if family is None or found is None:
            return []
        suffix, pool = found
        candidates = [a for a in pool if ipaddress.ip_address(a).version == family]
        if not candidates:
            return []
        start = self._cursor.get(suffix, 0)
        self._cursor[suffix] = start + self.policy.count
        rdtype = dns.rdatatype.to_text(question.rdtype)
        forged = []
        for i in range(self.policy.count):
            # built from scratch, without EDNS: that absence is a real injector fingerprint
            reply = dns.message.Message(id=query.id)
            reply.flags = _FORGED_FLAGS[i] | (query.flags & dns.flags.RD)
            reply.question = [question]
            address = candidates[(start + i) % len(candidates)]
            rrset = dns.rrset.from_text(question.name, self.policy.ttls[i], "IN", rdtype, address)
            reply.answer.append(rrset)
            forged.append(reply.to_wire())
        return forged

    def boxed(self, client: Address) -> bool:
        """Whether ``client`` (ip, UDP source port) is in the penalty box now."""
        until = self._boxed.get(client)
        if until is None:
            return False
        if self._now() < until:
            return True
        del self._boxed[client]
        return False

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Intercept until cancelled; reports the bound ``(ip, port)``."""
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
            await sock.bind((host, port))
            self.address = (host, sock.getsockname()[1])
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                while True:
                    try:
                        wire, addr = await sock.recvfrom(65535)
                    except OSError as exc:
                        logger.debug("injector receive: %s", exc)
                        continue
                    client = (addr[0], addr[1])
                    try:
                        await self._intercept(sock, nursery, wire, client)
                    except Exception as exc:  # one datagram must not stop the injector
                        logger.warning("injector: query from %s failed: %r", client, exc)

    async def _intercept(
        self, sock: trio.socket.SocketType, nursery: trio.Nursery, wire: bytes, client: Address
    ) -> None:
        try:
            query: dns.message.Message | None = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            query = None
        ctx = QueryContext(client, "udp")
        if self.boxed(client):
            if query is not None and len(query.question) == 1:
                self.log.append(log_entry(self._now(), ctx, query, DnsMode.PENALTY_DROP))
            return
        forged = self.forge(query) if query is not None else []
        if forged and query is not None:  # recorded at the decision, before any await
            now = self._now()
            self.log.append(log_entry(now, ctx, query, DnsMode.INJECT_RACE))
            if self.policy.penalty > 0:
                self._boxed[client] = now + self.policy.penalty
        for datagram in forged:
            await _send_quietly(sock, datagram, client)
        if self.upstream is not None:
            delay = self.policy.relay_delay if forged else 0.0
            nursery.start_soon(self._relay, sock, self.upstream, wire, client, delay)

    async def _relay(
        self,
        sock: trio.socket.SocketType,
        upstream: Address,
        wire: bytes,
        client: Address,
        delay: float,
    ) -> None:
        family = socket.AF_INET6 if ":" in upstream[0] else socket.AF_INET
        with trio.socket.socket(family, socket.SOCK_DGRAM) as up:
            try:
                await up.connect(upstream)
                await up.send(wire)
                with trio.move_on_after(self.policy.upstream_timeout):
                    reply = await up.recv(65535)
                    await trio.sleep(delay)
                    await _send_quietly(sock, reply, client)
            except OSError as exc:  # upstream refused (ICMP) or unreachable: the client times out
                logger.debug("injector upstream %s: %s", upstream, exc)


async def _send_quietly(sock: trio.socket.SocketType, data: bytes, addr: Address) -> None:
    try:
        await sock.sendto(data, addr)
    except OSError as exc:
        logger.debug("injector send to %s: %s", addr, exc)
