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

What the attempts taught is recorded right after they end. When control sites are configured,
the failed strategies are first checked against a control (:meth:`Router.settle`); that runs in
``probes``, a nursery the app owns, so the client's connection never waits for it, and shutdown
cancels whatever is still probing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from proxy.errors import ProxyError, ResolveError, UpstreamError
from proxy.inbound.base import (
    InboundSettings,
    IPAddress,
    Replier,
    Request,
    Target,
)
from proxy.net.dial import open_tcp
from proxy.net.relay import relay
from proxy.net.stream import TcpStream
from proxy.resolve.base import Resolver
from proxy.route.firstflight import FirstFlight, read_first_flight
from proxy.route.policy import AllFailed, AttemptRecord, resolve_once, run_policy
from proxy.route.router import Decision, Router

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
        #: where control probes run in the background; None: failures are recorded unchecked
        self.probes = probes
        #: tunnels currently open (for drain on shutdown and for status)
        self.active = 0
        #: connections whose record waits for a control probe
        self.settling = 0

    def context(self, inbound: InboundSettings) -> InboundContextImpl:
        """The context handed to one inbound's handlers."""
        return InboundContextImpl(self, inbound)

    async def resolve(self, host: str) -> Sequence[IPAddress]:
        target = Target.parse(host, 0)
        ip = target.ip
        if ip is not None:
            return [ip]
        with trio.move_on_after(self.settings.resolve_timeout):
            addrs = await self.resolver.resolve(target.host)
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
                await self._tunnel_policy(request, replier, decision)
                return
        await self._tunnel_direct(request, replier)

    async def _tunnel_policy(self, request: Request, replier: Replier, decision: Decision) -> None:
        """Steps 2-6 with a policy: optimistic reply, first flight, attempts with replay."""
        assert self.router is not None
        start = trio.current_time()
        self.active += 1
        flight = FirstFlight(b"")
        up = down = 0
        outcome = "ok"
        strategy = "-"
        tried = ""
        target = request.target

        async def lookup() -> Sequence[IPAddress]:
            return await self.resolve(target.host)

        resolve = resolve_once(lookup)
        try:
            if target.ip is None and not any(x.remote_dns for x in decision.strategies):
                # every way out needs the address: a name that does not resolve gets the
                # protocol's own error while the client can still be told
                try:
                    await resolve()
                except ResolveError as exc:
                    outcome = f"{_kind(exc)}: {exc}"
                    await _quietly(replier.fail(exc))
                    return
            # The client must send its first flight before any strategy can be judged, so the
            # answer is "connected" now; a failure later is a clean close.
            await replier.succeed(None)
            flight = await self._first_flight(request)
            try:
                winner = await run_policy(
                    decision.policy,
                    decision.strategies,
                    target,
                    resolve,
                    flight.data,
                    tls=flight.hello is not None,
                    direct=self.router.strategies["direct"],
                )
            except AllFailed as exc:
                tried = _tried(exc.attempts)
                outcome = f"all-failed: {exc}"
                self._record(decision, target, flight.sni, exc.attempts, None)
                return
            strategy = winner.strategy
            tried = _tried(winner.attempts)
            self._record(decision, target, flight.sni, winner.attempts, winner.strategy)
            async with winner.stream:
                up, down, outcome = await self._pump(
                    request, winner.stream, flight.data, winner.response, sent=True
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            outcome = f"client gone: {exc.__class__.__name__}"
        except ProxyError as exc:
            outcome = f"{_kind(exc)}: {exc}"
        finally:
            self.active -= 1
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
            )

    def _record(
        self,
        decision: Decision,
        target: Target,
        sni: str | None,
        attempts: Sequence[AttemptRecord],
        worked: str | None,
    ) -> None:
        """Record now, or after a background control check when there is one to make."""
        router = self.router
        assert router is not None
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
            await router.settle(decision, target, sni, attempts, worked, self.resolve)
        except Exception as exc:  # a background task: never take the app down with it
            log.warning("recording the attempts for %s failed: %r", target, exc)
        finally:
            self.settling -= 1

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
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            return up, down, f"closed: {exc.__class__.__name__}"
        outcome = "idle-timeout" if stats.idle_timeout else "ok"
        return up + stats.a_to_b, down + stats.b_to_a, outcome

    async def _tunnel_direct(self, request: Request, replier: Replier) -> None:
        """The plain path: connect first so errors reach the client as protocol replies."""
        start = trio.current_time()
        self.active += 1
        flight = FirstFlight(b"")
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
            async with upstream:
                try:
                    bound = upstream.socket.getsockname()
                    await replier.succeed((bound[0], bound[1]))
                    flight = await self._first_flight(request)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    outcome = f"closed: {exc.__class__.__name__}"
                    return
                up, down, outcome = await self._pump(
                    request, upstream, flight.data, b"", sent=False
                )
        except ProxyError as exc:
            outcome = f"{_kind(exc)}: {exc}"
        finally:
            self.active -= 1
            _log_connection(
                request, flight, strategy, up, down, trio.current_time() - start, outcome
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
    return ", ".join(f"{a.strategy}: {a.outcome.value}" for a in attempts)


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
) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
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
    }
    log.info(
        "%s -> %s via %s/%s sni=%s strategy=%s up=%d down=%d time=%.3fs %s",
        fields["client"],
        fields["target"],
        request.inbound,
        request.protocol,
        flight.sni or "-",
        strategy,
        up,
        down,
        duration,
        outcome,
        extra={"fields": fields},
    )
