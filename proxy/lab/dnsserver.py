"""Plain DNS for the censor lab: zone data, an honest server, and an ISP resolver that lies.

Pieces, from the data outwards:

* :class:`Zone` holds the lab's names (A/AAAA, optional CNAME or any record given as text) and
  answers a parsed query from them: NXDOMAIN for unknown names, NOERROR with no answer for a
  name that exists without the asked type, an SOA in the authority section of negative answers.
* :class:`DnsPolicy` is the ISP's lie table: name suffix -> :class:`DnsMode` (or a
  :class:`DnsRule` when the lie needs its own addresses). :func:`answer_with_policy` applies it in
  front of any :data:`Answerer`.
* :class:`DnsServer` serves an answerer (a :class:`Zone` or any callable) over UDP and
  length-prefixed TCP on one loopback address. With a policy it is the "ISP resolver" and records
  every lie in :attr:`DnsServer.log`. Garbage gets FORMERR; oversized UDP answers get the TC bit.

Every message is parsed and built with dnspython; only the two-byte TCP length prefix and the
query ID of unparseable garbage are read by hand. The on-path injector lives in
``proxy/lab/dnsinject.py``.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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

logger = logging.getLogger(__name__)

Address = tuple[str, int]
Clock = Callable[[], float]

#: EDNS payload size our responses advertise (DNS Flag Day 2020)
OUR_PAYLOAD = 1232
#: how far a CNAME chain is followed inside the zone before giving up with SERVFAIL
MAX_CHAIN = 8

_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")


def require_loopback(host: str) -> None:
    """Raise ``ValueError`` unless ``host`` is in 127.0.0.0/8 or is ``::1``.

    Lab servers impersonate real resolvers; they must never be reachable from outside the machine.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"the lab only uses loopback IP literals, not {host!r}") from None
    ok = ip in _LOOPBACK_V4 if ip.version == 4 else ip == ipaddress.IPv6Address("::1")
    if not ok:
        raise ValueError(f"the lab only uses loopback (127.0.0.0/8 or ::1), not {host}")


def loopback_address(addr: tuple[str, int]) -> tuple[str, int]:
    """``addr`` with its host checked by :func:`require_loopback` and written canonically."""
    require_loopback(addr[0])
    return str(ipaddress.ip_address(addr[0])), addr[1]


@dataclass(frozen=True, slots=True)
class QueryContext:
    """Who asked, and how."""

    client: Address
    transport: str  # "udp", "tcp" or "doh"


#: answers a parsed query; ``None`` means "send nothing" (the query is dropped)
Answerer = Callable[[dns.message.Message, QueryContext], dns.message.Message | None]


def _name(text: str | dns.name.Name) -> dns.name.Name:
    if isinstance(text, dns.name.Name):
        return text
    return dns.name.root if text in ("", ".") else dns.name.from_text(text)


def name_text(name: dns.name.Name) -> str:
    """``name`` as lower-case text without the final dot ("." for the root)."""
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else "."


class Zone:
    """Authoritative data for the lab.

    ``apexes`` are the suffixes the zone is authoritative for (default: the root, i.e. every
    name); questions outside them are REFUSED. Builder methods return the zone so calls chain.
    """

    def __init__(self, *apexes: str, ttl: int = 300, negative_ttl: int = 60) -> None:
        self.apexes = tuple(_name(a) for a in apexes) or (dns.name.root,)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._nodes: dict[dns.name.Name, dict[int, dns.rrset.RRset]] = {}

    def add(self, name: str, *addresses: str, ttl: int | None = None) -> Zone:
        """A and/or AAAA records for ``name``, by the family of each address."""
        if not addresses:
            raise ValueError(f"{name}: no addresses given")
        for addr in addresses:
            rdtype = "A" if ipaddress.ip_address(addr).version == 4 else "AAAA"
            self.add_record(name, rdtype, addr, ttl=ttl)
        return self

    def add_cname(self, name: str, target: str, *, ttl: int | None = None) -> Zone:
        """``name`` is an alias of ``target`` (which may lie outside the zone)."""
        return self.add_record(name, "CNAME", _name(target).to_text(), ttl=ttl)

    def add_record(self, name: str, rdtype: str, *texts: str, ttl: int | None = None) -> Zone:
        """Records of any type, each given in zone-file text (``"10 mx.example."``)."""
        owner = _name(name)
        if not any(owner.is_subdomain(apex) for apex in self.apexes):
            raise ValueError(f"{name} is outside this zone")
        rtype = dns.rdatatype.from_text(rdtype)
        node = self._nodes.setdefault(owner, {})
        if node and (rtype == dns.rdatatype.CNAME) != (dns.rdatatype.CNAME in node):
            raise ValueError(f"{name}: a CNAME cannot coexist with other records")
        new = dns.rrset.from_text_list(
            owner, self.ttl if ttl is None else ttl, "IN", rtype, list(texts)
        )
        old = node.get(rtype)
        if old is None:
            node[rtype] = new
        else:
            old.update(new)
        return self

    def names(self) -> list[str]:
        """Every owner name in the zone."""
        return sorted(name_text(n) for n in self._nodes)

    def lookup(
        self, qname: str | dns.name.Name, rdtype: int | str
    ) -> tuple[int, list[dns.rrset.RRset], list[dns.rrset.RRset]]:
        """``(rcode, answer, authority)`` for a question, following CNAMEs inside the zone."""
        name = _name(qname)
        rtype = dns.rdatatype.from_text(rdtype) if isinstance(rdtype, str) else rdtype
        if self._apex(name) is None:
            return dns.rcode.REFUSED, [], []
        answer: list[dns.rrset.RRset] = []
        for _ in range(MAX_CHAIN):
            apex = self._apex(name)
            if apex is None:  # the chain left our data: the client resolves the rest
                return dns.rcode.NOERROR, answer, []
            node = self._nodes.get(name)
            if node is None:
                exists = any(n.is_subdomain(name) for n in self._nodes)
                rcode = dns.rcode.NOERROR if exists else dns.rcode.NXDOMAIN
                return rcode, answer, [self._soa(apex)]
            if rtype in node:
                return dns.rcode.NOERROR, [*answer, node[rtype].copy()], []
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None:
                return dns.rcode.NOERROR, answer, [self._soa(apex)]
            answer.append(cname.copy())
            name = cname[0].target
        return dns.rcode.SERVFAIL, [], []

    def answer(
        self, query: dns.message.Message, ctx: QueryContext | None = None
    ) -> dns.message.Message:
        """The response to ``query`` (an :data:`Answerer`); ``ctx`` is not used."""
        response = new_response(query)
        question = query.question[0]
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        rcode, answer, authority = self.lookup(question.name, question.rdtype)
        response.set_rcode(rcode)
        response.answer.extend(answer)
        response.authority.extend(authority)
        return response

    def _apex(self, name: dns.name.Name) -> dns.name.Name | None:
        matches = [apex for apex in self.apexes if name.is_subdomain(apex)]
        return max(matches, key=len) if matches else None

    def _soa(self, apex: dns.name.Name) -> dns.rrset.RRset:
        ns = dns.name.Name(("ns", *apex.labels)).to_text()
        mbox = dns.name.Name(("hostmaster", *apex.labels)).to_text()
        text = f"{ns} {mbox} 1 3600 600 86400 {self.negative_ttl}"
        return dns.rrset.from_text(apex, self.negative_ttl, "IN", "SOA", text)


def new_response(query: dns.message.Message) -> dns.message.Message:
    """An empty NOERROR response to ``query`` as lab resolvers send it (RA set, EDNS echoed)."""
    return dns.message.make_response(query, recursion_available=True, our_payload=OUR_PAYLOAD)


def address_response(
    query: dns.message.Message, addresses: Iterable[str], ttl: int
) -> dns.message.Message:
    """A NOERROR response giving ``addresses`` of the query's family (A or AAAA).

    Addresses of the other family are skipped; any other question type gets an empty answer.
    """
    response = new_response(query)
    question = query.question[0]
    want = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(question.rdtype)
    texts = [a for a in addresses if ipaddress.ip_address(a).version == want]
    if texts:
        rdtype = dns.rdatatype.to_text(question.rdtype)
        response.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, texts))
    return response


class DnsMode(enum.Enum):
    """What a lab resolver does with a query (research C.7)."""

    HONEST = "honest"
    BLOCKPAGE_IP = "blockpage_ip"  # answer the address of a block page
    BOGON = "bogon"  # answer an unroutable address (10.10.34.35, 127.0.0.1, 0.0.0.0, d0::11)
    NXDOMAIN = "nxdomain"
    SERVFAIL = "servfail"
    REFUSED = "refused"
    NOERROR_EMPTY = "noerror_empty"
    TIMEOUT = "timeout"  # drop the query
    NXDOMAIN_HIJACK = "nxdomain_hijack"  # honest, except NXDOMAIN becomes an ad/blockpage address
    INJECT_RACE = "inject_race"  # on-path forged answers (dnsinject)
    PENALTY_DROP = "penalty_drop"  # a query dropped while its UDP source port is boxed (dnsinject)


_RCODE_LIES = {
    DnsMode.NXDOMAIN: dns.rcode.NXDOMAIN,
    DnsMode.SERVFAIL: dns.rcode.SERVFAIL,
    DnsMode.REFUSED: dns.rcode.REFUSED,
    DnsMode.NOERROR_EMPTY: dns.rcode.NOERROR,
}


@dataclass(frozen=True, slots=True)
class DnsRule:
    """A mode with, optionally, its own addresses (for BLOCKPAGE_IP, BOGON, NXDOMAIN_HIJACK)."""

    mode: DnsMode
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for a in self.addresses:
            ipaddress.ip_address(a)


@dataclass(frozen=True, slots=True)
class DnsPolicy:
    """The ISP resolver's lie table: the longest matching name suffix decides.

    ``rules`` maps a suffix (``"blocked.lab"`` matches the name and every name below it; ``"."``
    matches everything) to a mode or a :class:`DnsRule`. The address lists are the defaults the
    address-answering modes use when a rule has none of its own; a question whose family has no
    address gets an empty NOERROR.
    """

    rules: Mapping[str, DnsMode | DnsRule] = field(default_factory=dict)
    blockpage_ips: tuple[str, ...] = ("127.5.3.17",)
    bogon_ips: tuple[str, ...] = ("10.10.34.35", "d0::11")
    hijack_ips: tuple[str, ...] = ("127.66.6.6",)
    ttl: int = 60
    _table: tuple[tuple[dns.name.Name, DnsRule], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for a in (*self.blockpage_ips, *self.bogon_ips, *self.hijack_ips):
            ipaddress.ip_address(a)
        table = []
        for suffix, rule in self.rules.items():
            r = rule if isinstance(rule, DnsRule) else DnsRule(DnsMode(rule))
            if r.mode in (DnsMode.INJECT_RACE, DnsMode.PENALTY_DROP):
                raise ValueError(f"{suffix}: {r.mode.name} is the injector's, not a resolver's")
            table.append((_name(suffix), r))
        table.sort(key=lambda item: len(item[0]), reverse=True)
        object.__setattr__(self, "rules", MappingProxyType(dict(self.rules)))
        object.__setattr__(self, "_table", tuple(table))

    def rule_for(self, qname: str | dns.name.Name) -> DnsRule | None:
        """The rule of the longest suffix that ``qname`` falls under, if any."""
        name = _name(qname)
        for suffix, rule in self._table:
            if name.is_subdomain(suffix):
                return rule
        return None

    def addresses(self, rule: DnsRule) -> tuple[str, ...]:
        """The addresses ``rule`` answers with."""
        if rule.addresses:
            return rule.addresses
        defaults = {
            DnsMode.BLOCKPAGE_IP: self.blockpage_ips,
            DnsMode.BOGON: self.bogon_ips,
            DnsMode.NXDOMAIN_HIJACK: self.hijack_ips,
        }
        return defaults.get(rule.mode, ())


def answer_with_policy(
    query: dns.message.Message, ctx: QueryContext, policy: DnsPolicy, answer: Answerer
) -> tuple[dns.message.Message | None, DnsMode]:
    """Apply ``policy`` in front of ``answer``: the response (None = drop) and the mode used."""
    rule = policy.rule_for(query.question[0].name)
    mode = rule.mode if rule is not None else DnsMode.HONEST
    if rule is None or mode is DnsMode.HONEST:
        return answer(query, ctx), DnsMode.HONEST
    if mode is DnsMode.TIMEOUT:
        return None, mode
    if mode is DnsMode.NXDOMAIN_HIJACK:
        honest = answer(query, ctx)
        if honest is None or honest.rcode() != dns.rcode.NXDOMAIN:
            return honest, DnsMode.HONEST
        return address_response(query, policy.addresses(rule), policy.ttl), mode
    if mode in _RCODE_LIES:
        response = new_response(query)
        response.set_rcode(_RCODE_LIES[mode])
        return response, mode
    return address_response(query, policy.addresses(rule), policy.ttl), mode


@dataclass(frozen=True, slots=True)
class DnsLogEntry:
    """One lie, injection or penalty drop, as tests compare them."""

    time: float
    client: Address
    qname: str  # lower case, no final dot
    qtype: str  # "A", "AAAA", ...
    mode: DnsMode
    transport: str = "udp"


def log_entry(
    now: float, ctx: QueryContext, query: dns.message.Message, mode: DnsMode
) -> DnsLogEntry:
    """A :class:`DnsLogEntry` for ``query``."""
    question = query.question[0]
    qtype = dns.rdatatype.to_text(question.rdtype)
    return DnsLogEntry(now, ctx.client, name_text(question.name), qtype, mode, ctx.transport)


def formerr_for(wire: bytes) -> bytes | None:
    """FORMERR for bytes dnspython cannot parse, or ``None`` when no reply is due.

    Only the ID is recovered. Nothing answers fewer than two bytes or something whose header
    claims to be a response (two lab servers must never bounce garbage at each other).
    """
    if len(wire) < 2 or (len(wire) > 2 and wire[2] & 0x80):
        return None
    reply = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    reply.flags = dns.flags.QR
    reply.set_rcode(dns.rcode.FORMERR)
    return reply.to_wire()


def udp_limit(query: dns.message.Message) -> int:
    """The largest UDP response the client accepts: its EDNS payload size, at least 512."""
    if query.edns < 0:
        return 512
    return min(max(512, query.payload), 65535)


def _truncated(query: dns.message.Message, rcode: int) -> bytes:
    reply = new_response(query)
    reply.set_rcode(rcode)
    reply.flags |= dns.flags.TC
    return reply.to_wire()


class DnsServer:
    """A DNS server on UDP and TCP at one loopback address.

    ``answer`` is a :class:`Zone` or any :data:`Answerer`. With ``policy`` the server is an ISP
    resolver: it lies as the policy says and appends every lie to :attr:`log` (timestamps from
    ``now``, trio's clock by default, so an autojump clock works).
    """

    def __init__(
        self,
        answer: Zone | Answerer,
        listen: Address = ("127.0.0.1", 0),
        *,
        policy: DnsPolicy | None = None,
        udp: bool = True,
        tcp: bool = True,
        now: Clock | None = None,
        tcp_idle_timeout: float = 30.0,
    ) -> None:
        require_loopback(listen[0])
        if not (udp or tcp):
            raise ValueError("a DNS server needs UDP or TCP")
        self._answer: Answerer = answer.answer if isinstance(answer, Zone) else answer
        self.listen = listen
        self.policy = policy
        self.udp = udp
        self.tcp = tcp
        self._now = now or trio.current_time
        self.tcp_idle_timeout = tcp_idle_timeout
        #: every lie told, in order
        self.log: list[DnsLogEntry] = []
        #: queries parsed and answered or dropped (lies included)
        self.queries = 0
        #: the bound address, once :meth:`serve` has started
        self.address: Address | None = None

    def handle_wire(self, wire: bytes, ctx: QueryContext) -> bytes | None:
        """The reply to one message (None = say nothing). UDP replies fit the client's limit."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return formerr_for(wire)
        if query.flags & dns.flags.QR:
            return None
        self.queries += 1
        response = self.respond(query, ctx)
        if response is None:
            return None
        if ctx.transport != "udp":
            try:
                return response.to_wire(max_size=65535)
            except dns.exception.TooBig:
                return _truncated(query, dns.rcode.SERVFAIL)
        try:
            return response.to_wire(max_size=udp_limit(query))
        except dns.exception.TooBig:
            return _truncated(query, response.rcode())

    def respond(self, query: dns.message.Message, ctx: QueryContext) -> dns.message.Message | None:
        """The response to a parsed query, after the policy; lies are logged."""
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response = new_response(query)
            bad_opcode = query.opcode() != dns.opcode.QUERY
            response.set_rcode(dns.rcode.NOTIMP if bad_opcode else dns.rcode.FORMERR)
            return response
        if self.policy is None:
            return self._answer(query, ctx)
        response, mode = answer_with_policy(query, ctx, self.policy, self._answer)
        if mode is not DnsMode.HONEST:
            self.log.append(log_entry(self._now(), ctx, query, mode))
        return response

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled; reports the bound ``(ip, port)``, shared by UDP and TCP."""
        udp_sock, tcp_sock, address = await self._bind()
        self.address = address
        try:
            async with trio.open_nursery() as nursery:
                if udp_sock is not None:
                    nursery.start_soon(self._serve_udp, udp_sock)
                if tcp_sock is not None:
                    listener = trio.SocketListener(tcp_sock)
                    nursery.start_soon(self._serve_tcp, listener, nursery)
                task_status.started(address)
        finally:
            for sock in (udp_sock, tcp_sock):
                if sock is not None:
                    sock.close()

    async def _bind(
        self,
    ) -> tuple[trio.socket.SocketType | None, trio.socket.SocketType | None, Address]:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for _attempt in range(20):
            udp_sock = tcp_sock = None
            try:
                bound = port
                if self.tcp:
                    tcp_sock = trio.socket.socket(family, socket.SOCK_STREAM)
                    tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    await tcp_sock.bind((host, bound))
                    tcp_sock.listen(64)
                    bound = tcp_sock.getsockname()[1]
                if self.udp:
                    udp_sock = trio.socket.socket(family, socket.SOCK_DGRAM)
                    await udp_sock.bind((host, bound))
                    bound = udp_sock.getsockname()[1]
            except OSError as exc:
                for sock in (udp_sock, tcp_sock):
                    if sock is not None:
                        sock.close()
                if port == 0 and exc.errno == errno.EADDRINUSE:
                    continue  # the TCP port is taken for UDP: pick another pair
                raise
            return udp_sock, tcp_sock, (host, bound)
        raise OSError(errno.EADDRINUSE, f"no free UDP+TCP port pair on {host}")

    async def _serve_udp(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                wire, addr = await sock.recvfrom(65535)
            except OSError as exc:  # e.g. ICMP errors reported on some systems
                logger.debug("dns udp receive: %s", exc)
                continue
            ctx = QueryContext((addr[0], addr[1]), "udp")
            reply = self._handle_safely(wire, ctx)
            if reply is not None:
                try:
                    await sock.sendto(reply, addr)
                except OSError as exc:
                    logger.debug("dns udp reply to %s: %s", addr, exc)

    async def _serve_tcp(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        await trio.serve_listeners(self._serve_tcp_conn, [listener], handler_nursery=nursery)

    async def _serve_tcp_conn(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        ctx = QueryContext((peer[0], peer[1]), "tcp")
        buf = bytearray()
        try:
            while True:
                with trio.move_on_after(self.tcp_idle_timeout):
                    data = await stream.receive_some(65536)
                    if data:
                        buf += data
                        await self._answer_tcp_messages(stream, buf, ctx)
                        continue
                return  # EOF or idle
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _answer_tcp_messages(
        self, stream: trio.SocketStream, buf: bytearray, ctx: QueryContext
    ) -> None:
        # RFC 7766 framing: each message preceded by its length; pipelined messages are
        # answered in order, a partial one waits for more bytes
        while len(buf) >= 2:
            size = int.from_bytes(buf[:2], "big")
            if len(buf) < 2 + size:
                return
            wire = bytes(buf[2 : 2 + size])
            del buf[: 2 + size]
            reply = self._handle_safely(wire, ctx)
            if reply is not None:
                await stream.send_all(len(reply).to_bytes(2, "big") + reply)

    def _handle_safely(self, wire: bytes, ctx: QueryContext) -> bytes | None:
        try:
            return self.handle_wire(wire, ctx)
        except Exception as exc:  # one bad message (or answerer bug) must not stop the server
            logger.warning("dns %s query from %s failed: %r", ctx.transport, ctx.client, exc)
            return formerr_for(wire)
