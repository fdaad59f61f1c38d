"""The connection pipeline (DESIGN.md, "The connection pipeline").

For every tunnel an inbound produces:

1. resolve the target (IP literals need no lookup),
2. open the upstream with the ``direct`` strategy (Happy Eyeballs over the addresses),
3. tell the client "connected" through the inbound's :class:`Replier`,
4. read the client's first flight and parse its ClientHello (SNI, ALPN, offsets),
5. send the first flight upstream and relay both ways,
6. log one line: client, target, SNI, strategy, bytes each way, duration, outcome.

The router issue turns step 2 into a choice among strategies with replay of the first flight;
the shape of this module (resolve, attempt, reply, relay, one log line) stays.

What the attempts teach (verdicts, the learned memory, evidence, the link monitor of the
winner and the throughput baselines) is :mod:`proxy.route.lessons`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from proxy.detect.outcome import Outcome
from proxy.detect.verdict import Verdict
from proxy.errors import ProxyError, ResolveError, UpstreamError
from proxy.inbound.base import (
    InboundSettings,
    IPAddress,
    Replier,
    Request,
    Target,
)
from proxy.net.dial import open_tcp
from proxy.net.monitor import Baseline, Degradation, LinkMonitor
from proxy.net.relay import relay
from proxy.net.stream import FastStream, TcpStream, limited
from proxy.resolve.base import Resolver
from proxy.route.firstflight import NO_FLIGHT, FirstFlight, read_first_flight
from proxy.route.lessons import Lessons
from proxy.route.policy import (
    FIRST_RESPONSE_READ,
    AllFailed,
    AttemptRecord,
    EarlyDial,
    Resolve,
    Winner,
    dials_target,
    resolve_once,
    run_policy,
)
from proxy.route.router import Decision, Router
from proxy.status import ConnectionRegistry, LiveConnection
from proxy.strategies.direct import DirectStrategy
from proxy.strategies.fragment import FragmentStrategy

log = logging.getLogger("sidestep.conn")


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    """Knobs of the pipeline, built from the config by the app."""

    connect_timeout: float = 10.0
    happy_eyeballs_delay: float = 0.25
    first_flight_max: int = 16384
    first_flight_wait: float = 0.25
    first_flight_timeout: float = 5.0
    idle_timeout: float = 300.0
    buffer_size: int = 65536
    splice: bool = True
    resolve_timeout: float = 5.0


class Dispatcher:
    """Shared by every inbound: turns requests into relayed upstream connections."""

    def __init__(
        self,
        settings: DispatchSettings,
        resolver: Resolver,
        router: Router | None = None,
        *,
        probes: trio.Nursery | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        #: rules, policies, memory; None means every connection goes direct
        self.router = router
        #: judging and recording what the attempts taught (control probes, memory, baselines)
        self.lessons = Lessons(self.resolve)
        self.lessons.probes = probes
        #: tunnels currently open (for drain on shutdown and for status)
        self.active = 0
        #: resolvers a rule may choose instead of ``resolver`` ("secure", "system")
        self.resolvers: dict[str, Resolver] = {}
        #: open tunnels and totals for the status page (the app shares one across reloads)
        self.status = ConnectionRegistry()
        #: per policy name: does every strategy of it dial the target itself
        self._all_dial: dict[str, bool] = {}

    @property
    def probes(self) -> trio.Nursery | None:
        """Where control probes run in the background (None: failures recorded unchecked)."""
        return self.lessons.probes

    @probes.setter
    def probes(self, nursery: trio.Nursery | None) -> None:
        self.lessons.probes = nursery

    @property
    def dns_control(self) -> Resolver | None:
        """A resolver the local network cannot tamper with (DoH/DoT), asked for its view of a
        name when attempts failed; None: no dns-tampering verdicts."""
        return self.lessons.dns_control

    @dns_control.setter
    def dns_control(self, resolver: Resolver | None) -> None:
        self.lessons.dns_control = resolver

    @property
    def settling(self) -> int:
        """Connections whose record waits for a control probe."""
        return self.lessons.settling

    @property
    def baselines(self) -> dict[tuple[str, str], Baseline]:
        """Throughput of undegraded bulk transfers, per (network, strategy)."""
        return self.lessons.baselines

    def _dials_in_background(self, decision: Decision) -> bool:
        """Whether the early connection runs beside the reply and the first flight: the
        decision starts with a strategy that dials the target, and has another way out if that
        fails (when every strategy dials the target, the connection is opened before the
        client is answered)."""
        if not isinstance(decision.strategies[0], DirectStrategy | FragmentStrategy):
            return False
        name = decision.policy.name
        all_dial = self._all_dial.get(name)
        if all_dial is None:  # the memory only reorders a policy's strategies: once per policy
            all_dial = self._all_dial[name] = all(dials_target(s) for s in decision.strategies)
        return not all_dial

    def context(self, inbound: InboundSettings) -> InboundContextImpl:
        """The context handed to one inbound's handlers."""
        return InboundContextImpl(self, inbound)

    async def resolve(self, host: str, choice: str = "default") -> Sequence[IPAddress]:
        """Addresses of ``host`` from the resolver a rule chose (``choice``), else the usual."""
        target = Target.parse(host, 0)
        ip = target.ip
        if ip is not None:
            return [ip]
        resolver = self.resolvers.get(choice, self.resolver)
        with trio.move_on_after(self.settings.resolve_timeout):
            addrs = await resolver.resolve(target.host)
            if not addrs:
                raise ResolveError(f"{target.host}: no addresses")
            return addrs
        raise ResolveError(f"{target.host}: resolver timed out")

    async def connect(self, target: Target) -> TcpStream:
        """Open a direct TCP connection to ``target``."""
        ip = target.ip
        addrs = [ip] if ip is not None else await self.resolve(target.host)
        return await open_tcp(
            addrs,
            target.port,
            attempt_delay=self.settings.happy_eyeballs_delay,
            timeout=self.settings.connect_timeout,
        )

    async def tunnel(self, request: Request, replier: Replier) -> None:
        """Run the whole pipeline for one tunnel; always logs exactly one line."""
        if self.router is not None:
            decision = self.router.decide(request.target, request.inbound)
            if not decision.plain_direct:
                if self._dials_in_background(decision):
                    # the nursery runs the early connection while the client sends its flight
                    async with trio.open_nursery() as nursery:
                        await self._tunnel_policy(request, replier, decision, nursery)
                else:
                    await self._tunnel_policy(request, replier, decision, None)
                return
        await self._tunnel_direct(request, replier)

    async def _tunnel_policy(
        self,
        request: Request,
        replier: Replier,
        decision: Decision,
        nursery: trio.Nursery | None,
    ) -> None:
        """Steps 2-6 with a policy: optimistic reply, first flight, attempts with replay.

        When the first strategy dials the target itself (``direct``, a ``fragment`` variant; the
        memory may have put one first), its connection opens in ``nursery`` while the
        client is told "connected" and sends its first flight (:class:`EarlyDial`). When every
        strategy of the policy dials the target itself, the client is only answered once that
        connection is open, so a refused or unreachable address gets the protocol's own error
        (and ``nursery`` is None: nothing runs in the background).
        """
        router = self.router
        assert router is not None
        lessons = self.lessons
        start = trio.current_time()
        self.active += 1
        live = self._register(request, decision.policy.name, start)
        flight = NO_FLIGHT
        up = down = 0
        outcome = "ok"
        verdict = Verdict.OK.value
        strategy = "-"
        tried = ""
        target = request.target

        async def lookup() -> Sequence[IPAddress]:
            return await self.resolve(target.host, decision.resolver)

        resolve = _lookup_once(target, lookup)
        early: EarlyDial | None = None
        try:
            if target.ip is None and not any(x.remote_dns for x in decision.strategies):
                # every way out needs the address: a name that does not resolve gets the
                # protocol's own error while the client can still be told
                try:
                    await resolve()
                except ResolveError as exc:
                    outcome = f"{_kind(exc)}: {exc}"
                    verdict = "-"
                    await _quietly(replier.fail(exc))
                    return
            strategies = decision.strategies
            first = strategies[0]
            if isinstance(first, DirectStrategy | FragmentStrategy):
                early = EarlyDial(first, target, resolve)
                strategies = (early, *strategies[1:])
                if nursery is not None:
                    nursery.start_soon(early.run)
                else:
                    # every way out dials this address, so none can help when it refuses us:
                    # connect first, and a failure reaches the client as the protocol's own
                    # error, as on the plain path (the built-in fragment policy)
                    await early.dial()
                    error = await early.wait()
                    if error is not None:
                        strategy = first.name
                        outcome, verdict = f"{_kind(error)}: {error}", "-"
                        await _quietly(replier.fail(error))
                        return
            # The client must send its first flight before any strategy can be judged, so the
            # answer is "connected" now; a failure later is a clean close.
            await replier.succeed(None)
            flight = await self._first_flight(request)
            live.sni, live.up = flight.sni, len(flight.data)
            try:
                winner = await run_policy(
                    decision.policy,
                    strategies,
                    target,
                    resolve,
                    flight.data,
                    tls=flight.hello is not None,
                    direct=router.strategies["direct"],
                    address_answers=lessons.address_check(router, target, resolve, flight),
                )
                if flight.data and not winner.response:
                    await self._await_answer(winner)
            except AllFailed as exc:
                attempts, _ = await lessons.judge(
                    router, target, flight, exc.attempts, None, resolve
                )
                tried = _tried(attempts)
                verdict = attempts[0].label if attempts else "-"
                outcome = f"all-failed: {_all_failed(decision, attempts)}"
                lessons.record(router, decision, target, flight.sni, attempts, None)
                return
            strategy = live.strategy = winner.strategy
            live.down = len(winner.response)
            found: list[Degradation] = []

            def degraded(what: Degradation) -> bool:
                found.append(what)
                lessons.record_degraded(router, decision, target, flight.sni, winner.strategy, what)
                return what is Degradation.FROZEN

            try:
                attempts, trusted = [], True  # the first strategy got through: nothing to judge
                if winner.attempts:
                    attempts, trusted = await lessons.judge(
                        router, target, flight, winner.attempts, winner.response, resolve
                    )
                tried = _tried(attempts)
                if attempts:
                    verdict = attempts[0].label
                if trusted:
                    lessons.record(router, decision, target, flight.sni, attempts, winner.strategy)
                made: list[LinkMonitor] = []

                def make_monitor() -> LinkMonitor | None:
                    # only when there is a flow to watch (see relay())
                    monitor = lessons.monitor(router, decision, flight, winner)
                    if monitor is not None:
                        made.append(monitor)
                    return monitor

                up, down, outcome = await self._pump(
                    request,
                    winner.stream,
                    flight.data,
                    winner.response,
                    sent=True,
                    monitor=make_monitor,
                    on_degraded=degraded,
                )
            finally:
                await _close(winner.stream)
            if found:
                verdict = found[0].value
                if found[0] is Degradation.FROZEN:
                    outcome = f"frozen after {down} bytes: cut, next connections use another way"
            elif made:
                lessons.learn_rate(made[0], down - len(winner.response))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome = f"client gone: {exc.__class__.__name__}"
        except ProxyError as exc:
            outcome = f"{_kind(exc)}: {exc}"
        finally:
            if early is not None:
                await early.aclose()
            self.active -= 1
            self.status.close(
                live, strategy=strategy, up=up, down=down, outcome=outcome, verdict=verdict
            )
            if tried:
                strategy = f"{strategy} (after {tried})"
            _log_connection(
                request,
                flight,
                strategy,
                up,
                down,
                trio.current_time() - start,
                outcome,
                policy=decision.policy.name,
                verdict=verdict,
            )

    async def _await_answer(self, winner: Winner) -> None:
        """Wait for the first answer of a winner that was not judged (the last strategy of a
        fallback policy): it only counts as working once the site answered through it.

        There is no deadline but the idle timeout: a slow server is not cut off. Raises
        :class:`AllFailed` when the path closes or breaks before a byte arrives.
        """
        start = trio.current_time()
        outcome, detail = Outcome.TIMEOUT_AFTER_FIRST_FLIGHT, "no answer"
        stream = winner.stream
        try:
            try:
                winner.response = await limited(
                    stream, self.settings.idle_timeout, stream.receive_some(FIRST_RESPONSE_READ)
                )
            except trio.TooSlowError:
                pass
            except (trio.BrokenResourceError, OSError) as exc:
                outcome, detail = Outcome.RESET_AFTER_FIRST_FLIGHT, f"reset ({exc})"
            else:
                if winner.response:
                    return
                outcome, detail = Outcome.EOF_BEFORE_RESPONSE, "closed before answering"
        except BaseException:  # cancelled: never leak the stream
            await trio.aclose_forcefully(winner.stream)
            raise
        await trio.aclose_forcefully(winner.stream)
        record = AttemptRecord(winner.strategy, outcome, trio.current_time() - start, detail)
        attempts = [*winner.attempts, record]
        raise AllFailed(_tried(attempts), attempts, None)

    async def _first_flight(self, request: Request) -> FirstFlight:
        s = self.settings
        return await read_first_flight(
            request.stream,
            request.prefix,
            max_bytes=s.first_flight_max,
            wait=s.first_flight_wait,
            timeout=s.first_flight_timeout,
        )

    async def _pump(
        self,
        request: Request,
        upstream: trio.abc.HalfCloseableStream,
        first_flight: bytes,
        first_response: bytes,
        *,
        sent: bool,
        monitor: LinkMonitor | Callable[[], LinkMonitor | None] | None = None,
        on_degraded: Callable[[Degradation], bool] | None = None,
    ) -> tuple[int, int, str]:
        """Finish the exchange of the first bytes, then relay; (bytes up, bytes down, outcome).

        ``sent`` says whether the strategy already sent ``first_flight`` upstream;
        ``first_response`` are answer bytes an attempt already read (the client gets them first).
        """
        s = self.settings
        up, down = len(first_flight), len(first_response)
        try:
            if first_flight and not sent:
                await upstream.send_all(first_flight)
            if first_response:
                await request.stream.send_all(first_response)
            stats = await relay(
                request.stream,
                upstream,
                idle_timeout=s.idle_timeout,
                buffer_size=s.buffer_size,
                splice=s.splice,
                closing=True,
                monitor=monitor,
                on_degraded=on_degraded,
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            return up, down, f"closed: {exc.__class__.__name__}"
        outcome = "idle-timeout" if stats.idle_timeout else "ok"
        return up + stats.a_to_b, down + stats.b_to_a, outcome

    async def _tunnel_direct(self, request: Request, replier: Replier) -> None:
        """The plain path: connect first so errors reach the client as protocol replies."""
        start = trio.current_time()
        self.active += 1
        live = self._register(request, "direct", start)
        live.strategy = "direct"
        flight = NO_FLIGHT
        up = down = 0
        outcome = "ok"
        strategy = "direct"
        try:
            try:
                upstream = await self.connect(request.target)
            except UpstreamError as exc:
                outcome = f"{_kind(exc)}: {exc}"
                await _quietly(replier.fail(exc))
                return
            try:
                try:
                    bound = upstream.socket.getsockname()
                    await replier.succeed((bound[0], bound[1]))
                    flight = await self._first_flight(request)
                    live.sni, live.up = flight.sni, len(flight.data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    outcome = f"closed: {exc.__class__.__name__}"
                    return
                up, down, outcome = await self._pump(
                    request, upstream, flight.data, b"", sent=False
                )
            finally:
                await _close(upstream)
        except ProxyError as exc:
            outcome = f"{_kind(exc)}: {exc}"
        finally:
            self.active -= 1
            self.status.close(
                live,
                strategy=strategy,
                up=up,
                down=down,
                outcome=outcome,
                verdict="ok" if outcome == "ok" else None,
            )
            _log_connection(
                request, flight, strategy, up, down, trio.current_time() - start, outcome
            )

    def _register(self, request: Request, policy: str, now: float) -> LiveConnection:
        """Show a tunnel that just started on the status page."""
        return self.status.open(
            client=request.client,
            inbound=request.inbound,
            protocol=request.protocol,
            target=str(request.target),
            policy=policy,
            now=now,
            stream=request.stream,
        )


class InboundContextImpl:
    """The :class:`~proxy.inbound.base.InboundContext` for one inbound."""

    def __init__(self, dispatcher: Dispatcher, settings: InboundSettings) -> None:
        self.dispatcher = dispatcher
        self.settings = settings

    async def tunnel(self, request: Request, replier: Replier) -> None:
        await self.dispatcher.tunnel(request, replier)

    async def connect(self, target: Target, *, client: tuple[str, int]) -> TcpStream:
        return await self.dispatcher.connect(target)

    async def resolve(self, host: str) -> Sequence[IPAddress]:
        return await self.dispatcher.resolve(host)


def _lookup_once(target: Target, lookup: Resolve) -> Resolve:
    """The target's addresses for every attempt of one connection, looked up once.

    An IP literal is its own answer, and once a name is resolved the answer is handed out
    directly: only the first lookup of a name goes through :func:`resolve_once` (whose lock
    makes concurrent attempts share it), so the early dial and the attempt after it do not
    each cost a pass of the scheduler.
    """
    ip = target.ip
    if ip is not None:
        literal = (ip,)

        async def answer() -> Sequence[IPAddress]:
            return literal

        return answer

    known: list[Sequence[IPAddress]] = []
    shared = resolve_once(lookup)

    async def resolve() -> Sequence[IPAddress]:
        if known:
            return known[0]
        addresses = await shared()
        known.append(addresses)
        return addresses

    return resolve


async def _close(stream: trio.abc.AsyncResource) -> None:
    """Close an upstream the connection is done with; a plain TCP stream at once (its
    ``aclose`` would add a scheduler pass and has nothing to flush)."""
    if isinstance(stream, FastStream):
        stream.close_now()
    else:
        await stream.aclose()


def _kind(exc: BaseException) -> str:
    """A short, stable name for an error class ("connect-refused", "resolve-error", ...)."""
    name = exc.__class__.__name__
    out = [name[0].lower()]
    for ch in name[1:]:
        if ch.isupper():
            out.append("-")
        out.append(ch.lower())
    return "".join(out)


async def _quietly(aw: object) -> None:
    """Await a reply to a client that may already be gone."""
    try:
        await aw  # type: ignore[misc]
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _tried(attempts: Sequence[AttemptRecord]) -> str:
    return ", ".join(f"{a.strategy}: {a.label}" for a in attempts)


def _all_failed(decision: Decision, attempts: Sequence[AttemptRecord]) -> str:
    return f"every strategy of policy {decision.policy.name!r} failed ({_tried(attempts)})"


def _log_connection(
    request: Request,
    flight: FirstFlight,
    strategy: str,
    up: int,
    down: int,
    duration: float,
    outcome: str,
    *,
    policy: str = "direct",
    verdict: str | None = None,
) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    if verdict is None:  # the plain path judges nothing
        verdict = "ok" if outcome == "ok" else "-"
    fields = {
        "client": f"{request.client[0]}:{request.client[1]}",
        "inbound": request.inbound,
        "protocol": request.protocol,
        "target": str(request.target),
        "sni": flight.sni,
        "strategy": strategy,
        "policy": policy,
        "up": up,
        "down": down,
        "duration": round(duration, 3),
        "outcome": outcome,
        "verdict": verdict,
    }
    log.info(
        "%s -> %s via %s/%s sni=%s strategy=%s up=%d down=%d time=%.3fs verdict=%s %s",
        fields["client"],
        fields["target"],
        request.inbound,
        request.protocol,
        flight.sni or "-",
        strategy,
        up,
        down,
        duration,
        verdict,
        outcome,
        extra={"fields": fields},
    )
