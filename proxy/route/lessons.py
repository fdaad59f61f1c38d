"""What a connection's attempts teach, and where it is written down.

The dispatcher (:mod:`proxy.route.dispatcher`) runs a connection; :class:`Lessons` turns what
happened into knowledge: verdicts for failed attempts (a control tells censorship from an
outage, :func:`~proxy.route.control.judge_attempts`), the learned memory and the evidence log
(through the :class:`~proxy.route.router.Router`, now or after a control probe in the
background), the link monitor of a relayed winner, and the per-network throughput baselines
that throttling is judged against.

Verdicts (:mod:`proxy.detect.verdict`). Before anything is learned, every failed attempt is
classified with a control that tells censorship from an outage:

* when another strategy got a first response, the site is up and the failures were done to the
  paths (sni-reset, sni-timeout, ip-blocked, blockpage). The winner's first response is always
  awaited before this, also for the last strategy of a policy (which is not cut off for being
  slow): a strategy is only stored as working for a site once the site answered through it;
* when every strategy failed, the same address is sent a ClientHello for an innocuous name
  (:func:`~proxy.detect.verdict.neutral_hello`; a plain TCP connect and a neutral request for
  plain HTTP): if it answers, the server is up and the name is blocked, otherwise the failures
  are ``site-down``, which the memory never learns;
* with :attr:`Lessons.dns_control` (a resolver the local network cannot tamper with), a failure
  whose addresses share nothing with that resolver's view is ``dns-tampering``.

A plain-HTTP answer that looks like a block page only counts as one when the strategy that
got through answered differently; when it answered the same, nothing about the connection is
learned (an ordinary cross-site redirect must not pin a trick on the site).

While the winner is relayed, a :class:`~proxy.net.monitor.LinkMonitor` watches its counters
(policies with more than one strategy only): a freeze is recorded as a failure of that strategy
for the site at once, so the browser's next connections already take the next strategy, and
the frozen connection itself is cut with a reset both ways, which makes the client retry now
instead of hanging until its own timeout. Throttling is recorded the same way, but the
connection goes on (slow data is still data). Transfers that were not degraded teach the
per-network, per-strategy throughput baseline that throttling is judged against.

What the attempts taught is recorded once judged. When control sites are configured, the failed
strategies are also checked against a control (:meth:`Router.settle`); that runs in ``probes``,
a nursery the app owns, so the client's connection never waits for it, and shutdown cancels
whatever is still probing. The verdict goes into the evidence log and into the connection's log
line (``verdict=``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

from proxy.detect.evidence import EvidenceEvent
from proxy.detect.verdict import Verdict
from proxy.errors import ResolveError
from proxy.inbound.base import Target
from proxy.net.monitor import Baseline, Degradation, LinkMonitor, RecordTracker
from proxy.resolve.base import Resolver
from proxy.route.control import ResolveHost, judge_attempts, probe_address
from proxy.route.firstflight import FirstFlight
from proxy.route.policy import AttemptRecord, Resolve, Winner, dials_target
from proxy.route.router import Decision, Router

log = logging.getLogger("sidestep.conn")


class Lessons:
    """Judging and recording for the dispatcher; one per dispatcher, shared by its
    connections. Every method takes the router of the moment (a reload replaces it)."""

    def __init__(self, resolve_host: ResolveHost) -> None:
        #: where control probes run in the background; None: failures are recorded unchecked
        self.probes: trio.Nursery | None = None
        #: connections whose record waits for a control probe
        self.settling = 0
        #: a resolver the local network cannot tamper with (DoH/DoT), asked for its view of a
        #: name when attempts failed; None: no dns-tampering verdicts
        self.dns_control: Resolver | None = None
        #: throughput of undegraded bulk transfers, per (network, strategy)
        self.baselines: dict[tuple[str, str], Baseline] = {}
        self._resolve_host = resolve_host

    def address_check(
        self, router: Router, target: Target, resolve: Resolve, flight: FirstFlight
    ) -> Callable[[], Awaitable[bool]]:
        """The neutral-name control of the target's first address, for
        :func:`~proxy.route.policy.run_policy`."""
        timeout = router.control_timeout

        async def answers() -> bool:
            try:
                addresses = await resolve()
            except ResolveError:
                return False
            tls = flight.hello is not None
            return await probe_address(addresses[0], target.port, tls=tls, timeout=timeout)

        return answers

    async def judge(
        self,
        router: Router,
        target: Target,
        flight: FirstFlight,
        attempts: Sequence[AttemptRecord],
        response: bytes | None,
        resolve: Resolve,
    ) -> tuple[list[AttemptRecord], bool]:
        """Verdicts for the failed attempts (:func:`~proxy.route.control.judge_attempts`)."""

        def remote_dns(name: str) -> bool:
            strategy = router.strategies.get(name)
            return strategy is not None and strategy.remote_dns

        return await judge_attempts(
            attempts,
            target=target,
            tls=flight.hello is not None,
            response=response,
            resolve=resolve,
            remote_dns=remote_dns,
            dns_control=self.dns_control,
            timeout=router.control_timeout,
        )

    def monitor(
        self, router: Router, decision: Decision, flight: FirstFlight, winner: Winner
    ) -> LinkMonitor | None:
        """A monitor for the winner's relay, when there is another strategy to switch to."""
        settings = router.monitor
        if len(decision.strategies) < 2 or not settings.enabled:
            return None
        records: RecordTracker | None = None
        if flight.hello is not None:
            records = RecordTracker()
            records.feed(winner.response)
        # the fragment variants travel the plain path once the hello is through: they share
        # its baseline (what they reach is not slower for being re-framed)
        strategy = next((s for s in decision.strategies if s.name == winner.strategy), None)
        path = "direct" if strategy is not None and dials_target(strategy) else winner.strategy
        baseline = self.baselines.setdefault((router.network, path), Baseline())
        return LinkMonitor(
            settings,
            trio.current_time(),
            baseline=baseline,
            records=records,
            down_before=len(winner.response),
        )

    def learn_rate(self, monitor: LinkMonitor, relayed: int) -> None:
        """An undegraded transfer ended: let the baseline learn its rate (if it was bulk)."""
        rate = monitor.finish(relayed, trio.current_time())
        if rate is not None and monitor.baseline is not None:
            monitor.baseline.learn(rate)

    def record_degraded(
        self,
        router: Router,
        decision: Decision,
        target: Target,
        sni: str | None,
        strategy: str,
        found: Degradation,
    ) -> None:
        """A relayed connection degraded: the next connections to the site try another way."""
        verdict = Verdict(found.value)
        log.warning(
            "%s through %s is %s: the next connections to %s try the next strategy",
            target,
            strategy,
            verdict.value,
            decision.site,
        )
        if router.memory is not None and router.learn:
            for name in sharing_the_fate(decision, strategy, found):
                router.memory.record_failure(router.network, decision.site, name, verdict.value)
        if router.evidence is not None:
            router.evidence.write(
                EvidenceEvent(
                    time=time.time(),
                    network=router.network,
                    site=decision.site,
                    host=target.host,
                    outcome=verdict.value,
                    sni=sni,
                    strategy=strategy,
                )
            )

    def record(
        self,
        router: Router,
        decision: Decision,
        target: Target,
        sni: str | None,
        attempts: Sequence[AttemptRecord],
        worked: str | None,
    ) -> None:
        """Record now, or after a background control check when there is one to make.

        Nothing is recorded when the policy's own first choice got through at once: it teaches
        nothing the configured order does not already say, and the memory (a file on disk)
        must not become a list of every site the user visits.
        """
        first = decision.policy.strategies[0]
        if not attempts and worked == first and decision.strategies[0].name == first:
            return
        if self.probes is None or not router.to_check(attempts, worked):
            router.record(decision, target, sni, attempts, worked)
            return
        self.settling += 1
        self.probes.start_soon(self._settle, router, decision, target, sni, attempts, worked)

    async def _settle(
        self,
        router: Router,
        decision: Decision,
        target: Target,
        sni: str | None,
        attempts: Sequence[AttemptRecord],
        worked: str | None,
    ) -> None:
        try:
            await router.settle(decision, target, sni, attempts, worked, self._resolve_host)
        except Exception as exc:  # a background task: never take the app down with it
            log.warning("recording the attempts for %s failed: %r", target, exc)
        finally:
            self.settling -= 1


def sharing_the_fate(decision: Decision, strategy: str, found: Degradation) -> list[str]:
    """The strategies a degradation of ``strategy`` is learned for.

    A freeze is done to the flow by destination (foreign hosting), not by name: when it hits a
    strategy that dials the target itself, every other such strategy of the policy (the
    ``fragment`` variants only re-frame the hello) would freeze the same way, so the next
    connection skips them all and goes to a way that changes the path. Throttling is done by
    name, which a trick may hide: it is learned for ``strategy`` alone.
    """
    names = [strategy]
    winner = next((s for s in decision.strategies if s.name == strategy), None)
    if found is Degradation.FROZEN and winner is not None and dials_target(winner):
        names += [s.name for s in decision.strategies if s.name != strategy and dials_target(s)]
    return names
