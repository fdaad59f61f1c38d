"""The DNS service: one answer cache in front of one upstream, shared by everything that asks.

Two kinds of askers use a :class:`DnsService`:

* the local DNS server (:mod:`proxy.inbound.dnsserver`) hands it client queries as wire bytes
  (:meth:`DnsService.answer_now`, then :meth:`DnsService.answer_miss` when upstream must be
  asked, or :meth:`DnsService.answer` for both);
* the dispatcher asks for a host's addresses (:meth:`DnsService.resolve`, the
  :class:`~proxy.resolve.base.Resolver` interface): an A and an AAAA query go through the very
  same cache, so a name a browser looked up through the DNS server is not asked again when the
  browser then connects through the proxy.

How a query is answered:

1. A cache hit is answered from bytes (:meth:`~proxy.resolve.cache.DnsCache.lookup`: ID,
   flags and the asker's own question patched in front of the cached rest); dnspython is not
   called. This is the hot path.
2. Otherwise the query is parsed once. What needs no upstream is answered at once: FORMERR for
   a malformed message whose header can be read (nothing at all when it cannot, or when it is a
   response), NOTIMP for opcodes other than QUERY and for meta types, REFUSED for zone
   transfers and TSIG-signed queries, BADVERS for EDNS versions above 0, and for ANY the minimal
   answer of RFC 8482 (one HINFO record "RFC8482", never forwarded, so ANY cannot be used to
   amplify floods).
3. A miss is forwarded upstream (:class:`Upstream`), at most one query per question at a time:
   identical misses that arrive while one is in flight wait for its answer (coalescing). The
   answer is stored when it is cacheable and returned.
4. When the upstream fails (an error, no answer within ``timeout``, or a SERVFAIL/REFUSED
   answer) an expired answer still inside the serve-stale window is given out (RFC 8767, TTL
   30 s); without one the client gets the upstream's own error answer, or SERVFAIL.

A background task (started by ``async with service``) looks every few seconds for popular names
(3 hits or more) whose answers expire within the next 10 seconds and asks for them again, so
their askers never wait for a miss. ``cache=None`` runs without a cache: every query goes
upstream (still coalesced) and :meth:`DnsService.resolve` is the upstream's own.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import struct
from collections.abc import Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

from proxy.errors import ResolveError
from proxy.inbound.base import IPAddress
from proxy.protocols.dnswire import QuestionKey, build_query, question_key, walk_records
from proxy.resolve.base import ip_literal
from proxy.resolve.cache import DnsCache
from proxy.resolve.doh import resolve_both

if TYPE_CHECKING:
    from proxy.config import DnsConfig

log = logging.getLogger("sidestep.dns")

#: RFC 8482 section 4.2: the TTL of the HINFO record answering ANY
ANY_TTL = 3600
#: EDNS payload size of the queries :meth:`DnsService.resolve` makes
PAYLOAD = 1232
#: seconds between two looks for names to prefetch, and how close to expiry they must be
PREFETCH_INTERVAL = 2.0
PREFETCH_WINDOW = 10.0
#: hits an entry needs since it was stored to be prefetched
PREFETCH_HITS = 3
#: prefetch queries in flight at most
PREFETCH_PARALLEL = 8
#: seconds a "no such name" answer without an SOA record is kept when it came from the system
#: resolver (which never gives one); forged answers over plain DNS look like that, so answers
#: from other upstreams without an SOA are not kept at all (RFC 2308 section 5)
SYSTEM_NEGATIVE_TTL = 30

_HEADER = struct.Struct(">HHHHHH")
_META_REFUSED = {dns.rdatatype.AXFR, dns.rdatatype.IXFR}


class Upstream(Protocol):
    """Where the service sends its misses: any resolver of :mod:`proxy.resolve`.

    :meth:`forward` sends a client's query (one question) and returns the answer with the
    query's ID, any rcode; it raises :class:`~proxy.errors.ResolveError` when no answer can be
    had. :meth:`resolve` is the :class:`~proxy.resolve.base.Resolver` method, used when the
    service has no cache.
    """

    async def forward(self, query: dns.message.Message) -> dns.message.Message: ...

    async def resolve(self, host: str) -> list[IPAddress]: ...


#: header of a recursive query with one question and an OPT record (what ``_query`` sends)
_CACHE_PROBE_HEAD = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 1)
#: per type: QTYPE, QCLASS IN, then the OPT record advertising PAYLOAD, DO clear
_CACHE_PROBE_TAIL = {
    rtype: struct.pack("!HH", rtype, 1) + b"\x00" + struct.pack("!HHIH", 41, PAYLOAD, 0, 0)
    for rtype in (1, 28)
}


def _wire_name(host: str) -> bytes | None:
    """``host`` as wire-format labels, for plain ASCII names only (None: use dnspython)."""
    name = host[:-1] if host.endswith(".") else host
    if not name or not name.isascii() or len(name) > 253:
        return None
    out = bytearray()
    for label in name.lower().split("."):
        if not 0 < len(label) < 64:
            return None
        out.append(len(label))
        out += label.encode("ascii")
    out.append(0)
    return bytes(out)


class _Flight:
    """One upstream query that identical misses wait for."""

    __slots__ = ("done", "error", "ok", "wire")

    def __init__(self) -> None:
        self.done = trio.Event()
        #: the answer (with the leader's ID), or None when there was none
        self.wire: bytes | None = None
        #: False when ``wire`` is an error answer (SERVFAIL/REFUSED) or missing
        self.ok = False
        #: why there is no usable answer
        self.error = "no answer"


class DnsService:
    """A :class:`~proxy.resolve.cache.DnsCache` (or none) in front of an :class:`Upstream`.

    :param timeout: seconds an upstream query may take before it counts as failed.
    :param prefetch: refresh popular names before they expire (needs ``async with``).
    """

    def __init__(
        self,
        upstream: Upstream,
        cache: DnsCache | None,
        *,
        timeout: float = 5.0,
        prefetch: bool = True,
        random_id: Callable[[], int] = lambda: secrets.randbelow(1 << 16),
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.upstream = upstream
        self.cache = cache
        self.timeout = timeout
        self.prefetch = prefetch and cache is not None
        self._random_id = random_id
        self._flights: dict[bytes, _Flight] = {}
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None
        #: counters, for tests and a status page
        self.upstream_queries = 0
        self.coalesced = 0
        self.failures = 0
        self.prefetched = 0

    @classmethod
    def from_config(cls, dns_config: DnsConfig, upstream: Upstream) -> DnsService:
        """The service ``[dns]`` describes around ``upstream``."""
        cache = None
        if dns_config.cache_size > 0:
            cache = DnsCache(
                max_entries=dns_config.cache_size,
                min_ttl=dns_config.min_ttl,
                max_ttl=dns_config.max_ttl,
                negative_ttl_default=(
                    SYSTEM_NEGATIVE_TTL if dns_config.resolver == "system" else 0
                ),
                stale_ttl=dns_config.serve_stale,
                max_negative_ttl=dns_config.negative_ttl,
            )
        return cls(upstream, cache, timeout=dns_config.timeout, prefetch=dns_config.prefetch)

    # -- lifetime: the prefetch task ---------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        if self.prefetch:
            nursery.start_soon(self._prefetch_loop)
        self._stack = stack
        self._nursery = nursery
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack = self._stack, None
        nursery, self._nursery = self._nursery, None
        if stack is None or nursery is None:
            return None
        nursery.cancel_scope.cancel()
        return await stack.__aexit__(exc_type, exc, tb)

    # -- the server path ---------------------------------------------------------------------

    async def answer(self, wire: bytes) -> bytes | None:
        """The reply to one client message (full size: fitting UDP is the server's job), or
        None when nothing should be sent."""
        now = self.answer_now(wire)
        if now is None or isinstance(now, bytes):
            return now
        reply, _ = await self.answer_miss(wire, now)
        return reply

    def answer_now(self, wire: bytes) -> bytes | dns.message.Message | None:
        """What can be answered without waiting: reply bytes, None (say nothing), or the
        parsed query when upstream must be asked (pass it to :meth:`answer_miss`)."""
        cache = self.cache
        if cache is not None:
            hit = cache.lookup(wire)
            if hit is not None:
                return hit
        return screen_query(wire)

    async def answer_miss(
        self, wire: bytes, query: dns.message.Message
    ) -> tuple[bytes, str | None]:
        """Ask upstream for ``query`` (``wire`` is its wire form): (reply, None) with a usable
        reply, or (error reply, why) when the upstream failed and nothing stale was left."""
        qk = question_key(wire)
        flight = await self._fly(qk, query)
        if flight.ok and flight.wire is not None:
            return _fit_to(flight.wire, wire, qk), None
        stale = self.cache.lookup_stale(wire) if self.cache is not None else None
        if stale is not None:
            log.debug("serving %s stale: %s", _label(query), flight.error)
            return stale, None
        self.failures += 1
        if flight.wire is not None:
            return _fit_to(flight.wire, wire, qk), flight.error
        return error_reply(query, dns.rcode.SERVFAIL), flight.error

    async def _fly(self, qk: QuestionKey | None, query: dns.message.Message) -> _Flight:
        """The upstream answer to ``query``, shared with identical queries in flight."""
        if qk is None:  # an unusual but valid layout: neither cached nor shared
            flight = _Flight()
            await self._forward(None, query, flight)
            return flight
        flight = self._flights.get(qk.key)
        if flight is not None:
            self.coalesced += 1
            await flight.done.wait()
            return flight
        flight = self._flights[qk.key] = _Flight()
        try:
            await self._forward(qk, query, flight)
        finally:
            del self._flights[qk.key]
            flight.done.set()
        return flight

    async def _forward(
        self, qk: QuestionKey | None, query: dns.message.Message, flight: _Flight
    ) -> None:
        self.upstream_queries += 1
        flight.error = f"{_label(query)}: no answer within {self.timeout:g} s"
        with trio.move_on_after(self.timeout):
            try:
                response = await self.upstream.forward(query)
                # the full answer: fitting it to a client's UDP size is the server's job
                wire = response.to_wire(max_size=65535)
            except ResolveError as exc:
                flight.error = str(exc)
                return
            except dns.exception.DNSException as exc:
                flight.error = f"{_label(query)}: {exc}"
                return
            flight.wire = wire
            rcode = response.rcode()
            if rcode in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
                flight.error = f"{_label(query)}: upstream answered {dns.rcode.to_text(rcode)}"
                return
            flight.ok = True
            if qk is not None and self.cache is not None:
                self.cache.store(qk, wire)

    # -- the dispatcher path -----------------------------------------------------------------

    async def resolve(self, host: str) -> list[IPAddress]:
        """A and AAAA addresses of ``host`` through the cache (the Resolver interface).

        Every connection to a name comes through here, so when both answers are cached the
        addresses are read straight from the cached bytes: no dnspython, no task. Anything
        else (a miss, an error answer, no address) takes the full path.
        """
        if self.cache is None:
            literal = ip_literal(host)
            if literal is not None:
                return [literal]
            return await self.upstream.resolve(host)
        cached = self._cached_addresses(host)
        if cached is not None:
            return cached
        return await resolve_both(host, self._query, self.timeout)

    def _cached_addresses(self, host: str) -> list[IPAddress] | None:
        """The A then AAAA addresses of ``host`` when both are cached, successful and not both
        empty; None otherwise. Asks the cache the same question :meth:`_query` would."""
        assert self.cache is not None
        qname = _wire_name(host)
        if qname is None:
            return None
        out: list[IPAddress] = []
        for rtype, size in ((1, 4), (28, 16)):
            reply = self.cache.lookup(_CACHE_PROBE_HEAD + qname + _CACHE_PROBE_TAIL[rtype])
            if reply is None or reply[3] & 0x0F:  # a miss, or not NOERROR
                return None
            records = walk_records(reply)
            if records is None:
                return None
            for r in records:
                if r.section == 0 and r.rtype == rtype and r.rclass == 1:
                    if r.rdata_end - r.rdata_start != size:
                        return None
                    out.append(ipaddress.ip_address(reply[r.rdata_start : r.rdata_end]))
        return list(dict.fromkeys(out)) or None

    async def _query(self, name: dns.name.Name, rdtype: int) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=PAYLOAD)
        query.id = self._random_id()
        wire = query.to_wire()
        assert self.cache is not None
        reply = self.cache.lookup(wire)
        if reply is None:
            reply, error = await self.answer_miss(wire, query)
            if error is not None:
                raise ResolveError(error)
        return dns.message.from_wire(reply)

    # -- prefetch ----------------------------------------------------------------------------

    async def _prefetch_loop(self) -> None:
        assert self.cache is not None
        limiter = trio.CapacityLimiter(PREFETCH_PARALLEL)
        async with trio.open_nursery() as nursery:
            while True:
                await trio.sleep(PREFETCH_INTERVAL)
                for key in self.cache.prefetch_candidates(
                    window=PREFETCH_WINDOW, min_hits=PREFETCH_HITS
                ):
                    if key.key not in self._flights:
                        nursery.start_soon(self._refresh, key, limiter)

    async def _refresh(self, key: QuestionKey, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            wire = build_query(key, self._random_id(), payload_size=PAYLOAD)
            query = dns.message.from_wire(wire)
            self.prefetched += 1
            flight = await self._fly(question_key(wire), query)
            if not flight.ok:
                log.debug("prefetch of %s failed: %s", key.name_text(), flight.error)


# --- answers that need no upstream ----------------------------------------------------------


def screen_query(wire: bytes) -> bytes | dns.message.Message | None:
    """Parse a client message: the parsed query when it should go upstream, reply bytes when
    it is answered here (see the module docstring), None when nothing is to be sent."""
    if len(wire) < 12 or wire[2] & 0x80:
        return None  # no readable header, or a response: never answer those
    try:
        query = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, UnicodeError, KeyError):
        return header_reply(wire, dns.rcode.FORMERR)
    if query.opcode() != dns.opcode.QUERY:
        return header_reply(wire, dns.rcode.NOTIMP)
    if len(query.question) != 1:
        return header_reply(wire, dns.rcode.FORMERR)
    if query.edns > 0:
        return error_reply(query, dns.rcode.BADVERS)
    if query.had_tsig:
        return header_reply(wire, dns.rcode.REFUSED)
    rdtype = query.question[0].rdtype
    if rdtype == dns.rdatatype.ANY:
        return any_reply(query)
    if rdtype in _META_REFUSED:
        return error_reply(query, dns.rcode.REFUSED)
    if dns.rdatatype.is_metatype(rdtype):
        return error_reply(query, dns.rcode.NOTIMP)
    return query


def header_reply(wire: bytes, rcode: int) -> bytes:
    """A bare reply (header only, no sections) to a message whose header is readable: its ID,
    opcode and RD bit, QR set, ``rcode`` (below 16)."""
    msg_id, flags = struct.unpack_from(">HH", wire)
    flags = 0x8000 | (flags & 0x7900) | dns.flags.RA | (rcode & 0xF)
    return _HEADER.pack(msg_id, flags, 0, 0, 0, 0)


def error_reply(query: dns.message.Message, rcode: int) -> bytes:
    """``query``'s question answered with ``rcode`` and nothing else."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.set_rcode(rcode)
    return response.to_wire()


def any_reply(query: dns.message.Message) -> bytes:
    """RFC 8482 section 4.2: a single synthesised HINFO record instead of every record."""
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    question = query.question[0]
    response.answer.append(
        dns.rrset.from_text(question.name, ANY_TTL, question.rdclass, "HINFO", '"RFC8482" ""')
    )
    return response.to_wire()


def _fit_to(reply: bytes, wire: bytes, qk: QuestionKey | None) -> bytes:
    """``reply`` (to an identical question) given the asker's ID, RD bit and letter case."""
    rqk = question_key(reply) if qk is not None else None
    if qk is None or rqk is None or rqk.end != qk.end or rqk.question != qk.question:
        return wire[:2] + reply[2:]
    flags = bytes(((reply[2] & 0xFE) | (wire[2] & 1),))
    return b"".join((wire[:2], flags, reply[3:12], wire[12 : qk.end], reply[qk.end :]))


def _label(query: dns.message.Message) -> str:
    if not query.question:
        return "query"
    q = query.question[0]
    return f"{q.name.to_text(True)} {dns.rdatatype.to_text(q.rdtype)}"
