"""Several upstream resolvers behind one: ordered fallback or staggered racing, with health.

A :class:`ResolverChain` holds :class:`ChainMember` s, each one upstream that can ``forward`` a
DNS message (a DoH or DoT resolver reached at one address, a plain server). Health is kept per
:class:`EndpointKey` - address, port, transport and SNI - because a censor may block a DoH
provider on one of its addresses and not another, or by the name in the ClientHello only. So a
secure endpoint with two bootstrap addresses becomes two members (:func:`secure_members`).

How a query travels:

* the members that are *available* are used in configured order; a member that failed is skipped
  until its back-off ends (1 s, doubling to 5 min), after which exactly one query probes it;
* when every member is backing off, the one whose last failure is oldest is tried anyway: the
  chain never fails without asking somebody;
* ``mode = "fallback"`` asks one member at a time; ``"race"`` starts the next member every
  ``stagger`` seconds while the earlier ones are still pending, and the first valid answer wins
  (the others are cancelled), as Happy Eyeballs does for connections;
* a *valid* answer is NOERROR or NXDOMAIN: those are facts about the name. SERVFAIL, REFUSED, a
  transport error or a timeout count against the member.

:meth:`ResolverChain.status` is a snapshot of every member's health for ``sidestep probe dns``
and status pages.
"""

from __future__ import annotations

import ipaddress
import secrets
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import dns.message
import dns.name
import dns.rcode
import trio

from proxy.errors import ResolveError
from proxy.inbound.base import IPAddress
from proxy.resolve.doh import PAYLOAD, DohResolver, resolve_both
from proxy.resolve.dot import DotResolver

if TYPE_CHECKING:
    from proxy.config import DnsConfig, DnsEndpointConfig

ChainMode = Literal["fallback", "race"]

#: first back-off after a failure, and the longest one
BACKOFF_BASE = 1.0
BACKOFF_CAP = 300.0
#: rcodes that answer the question (anything else is the server's problem)
_ANSWERED = frozenset({dns.rcode.NOERROR, dns.rcode.NXDOMAIN})


class Forwarder(Protocol):
    """An upstream that answers one DNS message with another (ResolveError on failure)."""

    async def forward(self, query: dns.message.Message) -> dns.message.Message: ...


class EndpointKey(NamedTuple):
    """What health is tracked by: one way of reaching one server."""

    address: str
    port: int
    #: "doh", "dot" or "udp"
    transport: str
    #: the name sent in the TLS ClientHello ("" for none or plain DNS)
    sni: str

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        sni = f" sni={self.sni}" if self.sni else ""
        return f"{self.transport} {host}:{self.port}{sni}"


@dataclass(slots=True)
class EndpointHealth:
    """The record of one endpoint."""

    key: EndpointKey
    label: str
    successes: int = 0
    #: failures since the last success
    failures: int = 0
    last_success: float | None = None
    last_failure: float | None = None
    #: the endpoint is skipped until this time
    retry_at: float = 0.0
    #: a query is probing the endpoint after its back-off: others keep skipping it
    probing: bool = False
    last_error: str = ""
    #: seconds the last successful exchange took
    last_latency: float | None = None
    #: when the first success came (chain clock), for "how fast did we get going"
    first_success: float | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "endpoint": self.label,
            "address": self.key.address,
            "port": self.key.port,
            "transport": self.key.transport,
            "sni": self.key.sni,
            "state": self.state(now),
            "successes": self.successes,
            "failures": self.failures,
            "retry_in": round(max(0.0, self.retry_at - now), 3) if self.failures else 0.0,
            "last_error": self.last_error,
            "latency_ms": None if self.last_latency is None else round(self.last_latency * 1000),
        }

    def state(self, now: float) -> str:
        """ "unused", "up", "backing-off" or "retrying"."""
        if self.failures == 0:
            return "up" if self.successes else "unused"
        return "retrying" if now >= self.retry_at else "backing-off"


class HealthBook:
    """Health of endpoints with exponential back-off; ``clock`` defaults to trio's."""

    def __init__(
        self,
        *,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_CAP,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if base <= 0 or cap < base:
            raise ValueError("back-off needs 0 < base <= cap")
        self.base = base
        self.cap = cap
        self.clock = clock or trio.current_time
        self._records: dict[EndpointKey, EndpointHealth] = {}

    def record(self, key: EndpointKey, label: str = "") -> EndpointHealth:
        found = self._records.get(key)
        if found is None:
            found = self._records[key] = EndpointHealth(key, label or str(key))
        return found

    def claim(self, key: EndpointKey) -> bool:
        """Whether a query may use ``key`` now; the first one after a back-off probes it."""
        rec = self.record(key)
        if rec.failures == 0:
            return True
        if rec.probing or self.clock() < rec.retry_at:
            return False
        rec.probing = True
        return True

    def success(self, key: EndpointKey, latency: float) -> None:
        rec = self.record(key)
        now = self.clock()
        rec.successes += 1
        rec.failures = 0
        rec.probing = False
        rec.retry_at = 0.0
        rec.last_success = now
        rec.last_latency = latency
        if rec.first_success is None:
            rec.first_success = now
        rec.last_error = ""

    def failure(self, key: EndpointKey, error: str, *, hold: float = 0.0) -> None:
        """Count a failure; the endpoint is skipped for the back-off, or ``hold`` seconds when
        that is longer (a check that found it blocked by a censor)."""
        rec = self.record(key)
        now = self.clock()
        rec.failures += 1
        rec.probing = False
        rec.last_failure = now
        rec.last_error = error
        backoff = min(self.cap, self.base * 2 ** min(rec.failures - 1, 30))
        rec.retry_at = now + max(backoff, hold)

    def release(self, key: EndpointKey) -> None:
        """A claimed probe was cancelled before it could tell anything."""
        self.record(key).probing = False

    def is_down(self, key: EndpointKey) -> bool:
        """The endpoint failed last time and its back-off has not ended."""
        rec = self._records.get(key)
        return rec is not None and rec.failures > 0 and self.clock() < rec.retry_at

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock()
        return [rec.to_json(now) for rec in self._records.values()]


@dataclass(frozen=True, slots=True)
class ChainMember:
    """One upstream of a chain and the endpoint its health is kept under."""

    label: str
    key: EndpointKey
    upstream: Forwarder


class ResolverChain:
    """Ask ``members`` in order (``mode = "fallback"``) or staggered (``"race"``)."""

    def __init__(
        self,
        members: Sequence[ChainMember],
        *,
        mode: ChainMode = "fallback",
        stagger: float = 0.25,
        timeout: float = 5.0,
        health: HealthBook | None = None,
    ) -> None:
        if not members:
            raise ValueError("a resolver chain needs at least one member")
        if mode not in ("fallback", "race"):
            raise ValueError(f"mode must be 'fallback' or 'race', not {mode!r}")
        self.members = list(members)
        self.mode = mode
        self.stagger = stagger
        self.timeout = timeout
        self.health = health or HealthBook()
        for m in self.members:
            self.health.record(m.key, m.label)

    # --- the resolver interface -----------------------------------------------------------------

    async def resolve(self, host: str) -> list[IPAddress]:
        return await resolve_both(host, self.query, self.timeout)

    async def query(self, name: str | dns.name.Name, rdtype: int | str) -> dns.message.Message:
        """Ask one question (random ID, EDNS(0)); the first valid response."""
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=PAYLOAD)
        query.id = secrets.randbelow(1 << 16)
        return await self.forward(query)

    async def forward(self, query: dns.message.Message) -> dns.message.Message:
        """The first valid answer to ``query`` from a member, carrying the query's ID."""
        if len(query.question) != 1:
            raise ResolveError("a resolver chain forwards queries with exactly one question")
        qname = query.question[0].name.to_text(True)
        failures: list[str] = []
        members = self.candidates()
        deadline = trio.current_time() + self.timeout
        if self.mode == "race" and len(members) > 1:
            response = await self._race(members, query, failures, deadline)
        else:
            response = await self._in_order(members, query, failures, deadline)
        if response is not None:
            response.id = query.id
            return response
        why = "; ".join(failures) or f"no answer within {self.timeout:g} s"
        raise ResolveError(f"{qname}: every resolver of the chain failed ({why})")

    # --- choosing members -----------------------------------------------------------------------

    def candidates(self) -> list[ChainMember]:
        """Members to ask now, in order: the available ones, else the least recently failed."""
        usable = [m for m in self.members if self.health.claim(m.key)]
        if usable:
            return usable
        oldest = min(
            self.members, key=lambda m: self.health.record(m.key).last_failure or float("-inf")
        )
        return [oldest]

    def status(self) -> list[dict[str, Any]]:
        """Every member's health, in chain order (JSON-ready)."""
        now = self.health.clock()
        return [self.health.record(m.key, m.label).to_json(now) for m in self.members]

    @property
    def all_down(self) -> bool:
        """Every member is backing off after a failure."""
        return all(self.health.is_down(m.key) for m in self.members)

    # --- asking ---------------------------------------------------------------------------------

    async def _ask(
        self,
        member: ChainMember,
        query: dns.message.Message,
        failures: list[str],
        limit: float,
    ) -> dns.message.Message | None:
        """One member's answer within ``limit`` seconds, or None (its failure recorded)."""
        start = trio.current_time()
        error = f"no answer within {limit:.3g} s"
        response: dns.message.Message | None = None
        try:
            with trio.move_on_after(max(0.0, limit)):
                try:
                    response = await member.upstream.forward(query)
                except ResolveError as exc:
                    error = str(exc)
        except BaseException:  # cancelled from outside: a race was won elsewhere
            self.health.release(member.key)
            raise
        if response is not None and response.rcode() not in _ANSWERED:
            error = f"answered {dns.rcode.to_text(response.rcode())}"
            response = None
        if response is None:
            self.health.failure(member.key, error)
            failures.append(f"{member.label}: {error}")
            return None
        self.health.success(member.key, trio.current_time() - start)
        return response

    async def _in_order(
        self,
        members: list[ChainMember],
        query: dns.message.Message,
        failures: list[str],
        deadline: float,
    ) -> dns.message.Message | None:
        # each member gets an equal share of what is left, so a silent first one cannot eat
        # the whole budget (a plain resolver shares its timeout among servers the same way)
        try:
            for i, member in enumerate(members):
                left = deadline - trio.current_time()
                if left <= 0:
                    return None
                response = await self._ask(member, query, failures, left / (len(members) - i))
                if response is not None:
                    return response
            return None
        finally:
            for rest in members:
                rec = self.health.record(rest.key)
                if rec.probing:  # claimed but never asked
                    self.health.release(rest.key)

    async def _race(
        self,
        members: list[ChainMember],
        query: dns.message.Message,
        failures: list[str],
        deadline: float,
    ) -> dns.message.Message | None:
        winner: list[dns.message.Message] = []
        try:
            async with trio.open_nursery() as nursery:
                failed = [trio.Event() for _ in members]

                async def attempt(i: int) -> None:
                    left = deadline - trio.current_time()
                    response = await self._ask(members[i], query, failures, left)
                    if response is not None and not winner:
                        winner.append(response)
                        nursery.cancel_scope.cancel()
                    failed[i].set()

                for i in range(len(members)):
                    if trio.current_time() >= deadline:
                        break
                    nursery.start_soon(attempt, i)
                    if i + 1 < len(members):
                        # the next member starts after the stagger, or at once if this one failed
                        with trio.move_on_after(self.stagger):
                            await failed[i].wait()
        finally:
            for rest in members:
                if self.health.record(rest.key).probing:
                    self.health.release(rest.key)
        return winner[0] if winner else None


# --- building members from the config ---------------------------------------------------------


def endpoint_members(
    ep: DnsEndpointConfig, *, timeout: float
) -> list[tuple[ChainMember, DohResolver | DotResolver]]:
    """One member per bootstrap address of a configured secure endpoint (health is per
    address), each with the resolver that must be entered (``async with``) before use."""
    url = urllib.parse.urlsplit(ep.url)
    pins = ep.pin_sha256 or None
    host = url.hostname or ""
    out: list[tuple[ChainMember, DohResolver | DotResolver]] = []
    for ip in ep.bootstrap:
        address = str(ipaddress.ip_address(ip))
        resolver: DohResolver | DotResolver
        if url.scheme == "https":
            resolver = DohResolver(
                ep.url, [address], timeout=timeout, cafile=ep.cafile, pin_sha256=pins
            )
            key = EndpointKey(address, resolver.port, "doh", resolver.server_name)
        else:
            resolver = DotResolver(
                host, [address], url.port or 853, timeout=timeout, cafile=ep.cafile, pin_sha256=pins
            )
            key = EndpointKey(address, resolver.port, "dot", resolver.sni)
        label = ep.url if len(ep.bootstrap) == 1 else f"{ep.url} at {address}"
        out.append((ChainMember(label, key, resolver), resolver))
    return out


def secure_chain(
    dns_config: DnsConfig, *, health: HealthBook | None = None
) -> tuple[ResolverChain, list[DohResolver | DotResolver]]:
    """The chain of ``[dns] endpoints`` and the resolvers to enter before it is used."""
    members: list[ChainMember] = []
    managed: list[DohResolver | DotResolver] = []
    for ep in dns_config.endpoints:
        for member, resolver in endpoint_members(ep, timeout=dns_config.timeout):
            members.append(member)
            managed.append(resolver)
    chain = ResolverChain(
        members,
        mode=dns_config.order,
        stagger=dns_config.stagger,
        timeout=dns_config.timeout,
        health=health,
    )
    return chain, managed
