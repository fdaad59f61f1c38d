"""``[dns] resolver = "auto"``: plain DNS until it is caught lying, then only secure DNS.

An :class:`AutoResolver` starts on the plain path (the system resolver, or the configured plain
``servers``) and runs the checks of :mod:`proxy.detect.dnscheck` at start-up, every
``check_interval`` seconds, when the network changes (:func:`~proxy.route.site.network_id`) and
in-line: a plain answer holding a bogus or block-page address wakes the checker at once, and
that name is asked again securely. A plain lookup that fails is asked securely too, and the name
joins the next comparison, as do names whose plain answer was one address shared by several
unrelated sites (a sign of a block page, or just a CDN: the comparison decides).

When a check finds tampering, *secure mode* begins for this network: every name goes through
the secure chain (:class:`~proxy.resolve.chain.ResolverChain`), no plaintext query leaves -
not even the checks', which then only probe the secure endpoints - and the evidence log gets one
line per finding (outcome ``dns-<check>``, the resolver as address, ``secure-dns`` as what
worked). The one exception is ``decoy = true``: each name is also sent in plaintext and the
answer thrown away, for networks that police connections to addresses never resolved in
plaintext (reported in Iran). Secure mode is kept per network for the life of the process; a
network seen for the first time starts plain and is checked.

Endpoints the checks find blocked (by address or by SNI) are marked down in the chain's health,
so queries skip them. When every endpoint is down and ``via`` names strategies, DoH is carried
through them instead (an upstream SOCKS5/HTTP proxy or Tor): :class:`ViaDohResolver`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any, Self

import dns.message
import dns.rcode
import dns.rdatatype
import trio

from proxy.config import DnsConfig
from proxy.detect import dnscheck
from proxy.detect.dnscheck import Verdict
from proxy.detect.dnsplan import CheckPlan, check_plan, run_checks
from proxy.detect.evidence import EvidenceEvent, EvidenceLog
from proxy.errors import ResolveError
from proxy.inbound.base import IPAddress, Target
from proxy.resolve.base import ip_literal
from proxy.resolve.chain import ChainMember, EndpointKey, ResolverChain, secure_chain
from proxy.resolve.doh import DohResolver
from proxy.resolve.plain import PlainResolver
from proxy.resolve.system import SystemResolver
from proxy.route.site import site_of
from proxy.strategies.base import Strategy

log = logging.getLogger("sidestep.dns")

#: how often the network identity is re-read
NETWORK_POLL = 30.0
#: names that failed in plaintext, kept for the next comparison
_FAILED_KEPT = 16
#: single-address plain answers kept for the shared-address check
_SEEN_KEPT = 256
#: an in-line trigger starts a check at most this often
_TRIGGER_GAP = 10.0


# --- DoH carried by another strategy ----------------------------------------------------------


class ViaDohResolver(DohResolver):
    """A DoH endpoint whose TCP connection is opened through ``strategy`` (an upstream proxy);
    TLS, ALPN and pins are checked end to end as usual. A strategy that resolves names itself
    (``remote_dns``: Tor, most upstreams) is handed the endpoint's host name, so the far side's
    own DNS finds the server even where its bootstrap ``address`` is blocked on the way; other
    strategies get ``address``."""

    def __init__(self, url: str, address: str, strategy: Strategy, **kwargs: Any) -> None:
        super().__init__(url, [address], **kwargs)
        self.strategy = strategy

    @property
    def label(self) -> str:
        return f"{self.url} via {self.strategy.name}"

    def _dialer(self) -> Callable[[], Awaitable[trio.abc.Stream]]:
        async def dial() -> trio.abc.Stream:
            if self.strategy.remote_dns and ip_literal(self.host) is None:
                return await self.strategy.connect(Target.parse(self.host, self.port), [], b"")
            address = self.bootstrap[0]
            target = Target.parse(str(address), self.port)
            return await self.strategy.connect(target, [address], b"")

        return dial


def via_chain(
    config: DnsConfig, strategies: Mapping[str, Strategy]
) -> tuple[ResolverChain | None, list[DohResolver]]:
    """DoH endpoints reached through the ``via`` strategies (DoT cannot be: it is not HTTP)."""
    members: list[ChainMember] = []
    managed: list[DohResolver] = []
    for name in config.via:
        strategy = strategies.get(name)
        if strategy is None:
            continue
        for ep in config.endpoints:
            if not ep.url.startswith("https://"):
                continue
            address = ep.bootstrap[0]
            doh = ViaDohResolver(
                ep.url,
                address,
                strategy,
                timeout=config.timeout,
                cafile=ep.cafile,
                pin_sha256=ep.pin_sha256 or None,
            )
            key = EndpointKey(address, doh.port, f"doh-via-{name}", doh.server_name)
            members.append(ChainMember(f"{ep.url} via {name}", key, doh))
            managed.append(doh)
    if not members:
        return None, []
    chain = ResolverChain(members, mode="fallback", timeout=config.timeout)
    return chain, managed


# --- the switching resolver -------------------------------------------------------------------


class AutoResolver:
    """Plain DNS until a check finds tampering, then the secure chain; an async context
    manager that runs the checker in the background."""

    def __init__(
        self,
        plain: PlainResolver | SystemResolver,
        chain: ResolverChain,
        plan: CheckPlan,
        *,
        interval: float = 3600.0,
        decoy: bool = False,
        via: ResolverChain | None = None,
        evidence: EvidenceLog | None = None,
        network: Callable[[], str] = lambda: "unknown",
    ) -> None:
        self.plain = plain
        self.chain = chain
        self.plan = plan
        self.interval = interval
        self.decoy = decoy
        self.via = via
        self.evidence = evidence
        self.network = network
        self.current_network = network()
        #: networks where plain DNS was caught lying
        self.secure_networks: set[str] = set()
        #: the latest verdicts, and what put us in secure mode
        self.verdicts: list[Verdict] = []
        self.reasons: list[Verdict] = []
        #: set once the first check has finished
        self.checked = trio.Event()
        #: check runs so far
        self.checks = 0
        #: plain queries sent by the decoy option
        self.decoys = 0
        #: called when secure mode begins (the app empties the DNS cache there)
        self.on_switch: list[Callable[[], object]] = []
        self._failed: OrderedDict[str, None] = OrderedDict()
        #: recent plain answers holding a single address, for the shared-address check
        self._seen: OrderedDict[str, list[IPAddress]] = OrderedDict()
        self._wake = trio.Event()
        self._last_trigger = float("-inf")
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None

    @property
    def secure(self) -> bool:
        """Every name goes through secure DNS now."""
        return self.current_network in self.secure_networks

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        self._nursery.start_soon(self._run)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        stack, self._stack, nursery, self._nursery = self._stack, None, self._nursery, None
        if nursery is not None:
            nursery.cancel_scope.cancel()
        if stack is None:
            return None
        return await stack.__aexit__(exc_type, exc, tb)

    async def _run(self) -> None:
        reason = "start-up"
        while True:
            try:
                await self.check_now(reason)
            except Exception as exc:  # the checker must never take name resolution down
                log.warning("dns checks failed: %r", exc)
            self.checked.set()
            reason = await self._next_reason()

    async def _next_reason(self) -> str:
        deadline = trio.current_time() + self.interval
        while True:
            with trio.move_on_after(min(NETWORK_POLL, max(0.0, deadline - trio.current_time()))):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = trio.Event()
                return "a suspicious answer"
            now_on = self.network()
            if now_on != self.current_network:
                log.info("network changed (%s -> %s): checking DNS", self.current_network, now_on)
                self.current_network = now_on
                return "network change"
            if trio.current_time() >= deadline:
                return "periodic"

    # --- checking -------------------------------------------------------------------------------

    async def check_now(self, reason: str = "asked") -> list[Verdict]:
        """Run the checks (plaintext ones only while not in secure mode) and act on them."""
        names = list(self._failed)
        self._failed.clear()
        # one address answered alone for several unrelated sites: compare those names too
        shared = dnscheck.check_shared_address("plain DNS", self._seen)
        for v in shared:
            address = v.evidence[0].split(" ", 1)[0]
            names += [n for n, a in self._seen.items() if str(a[0]) == address][:_FAILED_KEPT]
        self._seen.clear()
        verdicts = await run_checks(self.plan, self.chain, plaintext=not self.secure, names=names)
        verdicts += shared
        self.checks += 1
        self.verdicts = verdicts
        tampered = [v for v in verdicts if v.status == "tampered" and v.check != "secure-answer"]
        blocked = [v for v in verdicts if v.status == "blocked"]
        for v in blocked:
            log.info("dns endpoint %s", v.line())
        if tampered and not self.secure:
            self.secure_networks.add(self.current_network)
            self.reasons = tampered
            log.warning(
                "plain DNS is tampered with on this network (%s): switching to secure DNS; %s",
                reason,
                "; ".join(v.line() for v in tampered[:3]),
            )
            for v in tampered:
                self._record(v, "secure-dns")
            for callback in self.on_switch:
                callback()
        for v in blocked:
            self._record(v, None)
        return verdicts

    def _record(self, verdict: Verdict, worked: str | None) -> None:
        if self.evidence is None:
            return
        host = verdict.name or verdict.subject
        try:
            site = site_of(host) if verdict.name else host
        except ValueError:
            site = host
        outcome = f"dns-{verdict.check}"
        if verdict.check == "endpoint" and verdict.evidence:
            outcome = f"dns-endpoint-{dnscheck.endpoint_state(verdict)}"
        self.evidence.write(
            EvidenceEvent(
                time=time.time(),
                network=self.current_network,
                site=site,
                host=host,
                outcome=outcome,
                address=verdict.subject,
                strategy="dns",
                worked=worked,
            )
        )

    def _trigger(self, name: str) -> None:
        self._remember_failed(name)
        now = trio.current_time()
        if now - self._last_trigger >= _TRIGGER_GAP:
            self._last_trigger = now
            self._wake.set()

    def _remember_answer(self, name: str, addresses: list[IPAddress]) -> None:
        if len(addresses) == 1:
            self._seen[name] = addresses
            self._seen.move_to_end(name)
            while len(self._seen) > _SEEN_KEPT:
                self._seen.popitem(last=False)

    def _remember_failed(self, name: str) -> None:
        self._failed[name] = None
        while len(self._failed) > _FAILED_KEPT:
            self._failed.popitem(last=False)

    # --- the resolver interface -----------------------------------------------------------------

    def secure_upstream(self) -> ResolverChain:
        """The chain to ask now: the direct one, or the one through ``via`` when every direct
        endpoint is down."""
        if self.via is not None and self.chain.all_down:
            return self.via
        return self.chain

    async def resolve(self, host: str) -> list[IPAddress]:
        literal = ip_literal(host)
        if literal is not None:
            await trio.lowlevel.checkpoint()
            return [literal]
        if self.secure:
            self._send_decoy(host)
            return await self.secure_upstream().resolve(host)
        try:
            addresses = await self.plain.resolve(host)
        except ResolveError:
            self._remember_failed(host)
            return await self.secure_upstream().resolve(host)
        if any(self.plan.policy.why_bogus(a) for a in addresses):
            log.info("%s: plain DNS answered a bogus address; asking secure DNS", host)
            self._trigger(host)
            return await self.secure_upstream().resolve(host)
        self._remember_answer(host, [a for a in addresses if a.version == 4])
        return addresses

    async def forward(self, query: dns.message.Message) -> dns.message.Message:
        if self.secure:
            if query.question:
                self._send_decoy(query.question[0].name.to_text(True))
            return await self.secure_upstream().forward(query)
        name = query.question[0].name.to_text(True) if query.question else ""
        try:
            response = await self.plain.forward(query)
        except ResolveError:
            self._remember_failed(name)
            return await self.secure_upstream().forward(query)
        if response.rcode() != dns.rcode.NOERROR:
            # a name the plain resolver cannot find may be one it hides: ask securely too
            self._remember_failed(name)
            try:
                return await self.secure_upstream().forward(query)
            except ResolveError:
                return response
        addresses = dnscheck.addresses_of(response)
        if any(self.plan.policy.why_bogus(a) for a in addresses):
            log.info("%s: plain DNS answered a bogus address; asking secure DNS", name)
            self._trigger(name)
            return await self.secure_upstream().forward(query)
        if query.question and query.question[0].rdtype == dns.rdatatype.A:
            self._remember_answer(name, addresses)
        return response

    def _send_decoy(self, host: str) -> None:
        if not self.decoy or self._nursery is None:
            return
        self.decoys += 1
        self._nursery.start_soon(self._decoy, host)

    async def _decoy(self, host: str) -> None:
        with trio.move_on_after(self.plan.timeout):
            try:
                await self.plain.resolve(host)  # the answer is thrown away
            except ResolveError:
                pass

    def status(self) -> dict[str, Any]:
        """JSON-ready: mode, why, endpoint health."""
        return {
            "mode": "secure" if self.secure else "plain",
            "network": self.current_network,
            "checks": self.checks,
            "reasons": [v.to_json() for v in self.reasons],
            "endpoints": self.chain.status(),
        }


def build_auto(
    config: DnsConfig,
    *,
    strategies: Mapping[str, Strategy] | None = None,
    evidence: EvidenceLog | None = None,
    network: Callable[[], str] = lambda: "unknown",
) -> tuple[AutoResolver, list[Any]]:
    """The auto resolver of ``[dns]`` and the parts to enter before use (itself last)."""
    chain, managed = secure_chain(config)
    plain: PlainResolver | SystemResolver
    if config.servers:
        plain = PlainResolver(config.server_addresses, timeout=config.timeout)
    else:
        plain = SystemResolver(timeout=config.timeout)
    via, via_managed = via_chain(config, strategies or {})
    auto = AutoResolver(
        plain,
        chain,
        check_plan(config),
        interval=config.check_interval,
        decoy=config.decoy,
        via=via,
        evidence=evidence,
        network=network,
    )
    return auto, [*managed, *via_managed, auto]
