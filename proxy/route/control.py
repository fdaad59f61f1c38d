"""Control probes: is a strategy broken on this network, or is the site it failed censored?

When a strategy fails for a site, the failure only says something about the site if the strategy
can reach an uncensored *control* site (``[router] control``). A dead upstream proxy, a Tor client
that is not running or a trick that this network breaks fails every site alike: learning that as
"blocked" would push a working plain path aside and fill the evidence log with false reports
(research/dpi-proxies.md, section 6.4).

A probe opens a path through the strategy to a control with no first flight: a TCP-level connect
is enough (for an upstream proxy, its reply that it reached the control). Controls are tried in
turn, starting with a different one each probe, until one is reached or ``control_timeout`` is
spent, so one control site being down does not condemn every strategy.

Results are cached per (network, strategy) for :data:`CACHE_FOR` seconds on the trio clock, and a
probe already running is shared: a burst of failures through one dead strategy probes once.

The second kind of control is about the site, not the strategy: :func:`judge_attempts` gives the
failed attempts of one connection their verdicts (:mod:`proxy.detect.verdict`) from what the
connection itself showed (did another strategy reach the site?), from the neutral-name probe of
the site's address (:func:`probe_address`) when nothing reached it, and from a secure resolver's
view of the name when the dispatcher has one.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

import trio

from proxy.detect.outcome import Outcome
from proxy.detect.verdict import (
    NEUTRAL_NAME,
    Controls,
    classify,
    needs_address_control,
    neutral_hello,
)
from proxy.errors import ProxyError, ResolveError
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp
from proxy.resolve.base import Resolver
from proxy.route.policy import AttemptRecord, Resolve
from proxy.strategies.base import Strategy

log = logging.getLogger("sidestep.route")

#: seconds a control result is reused for the same (network, strategy)
CACHE_FOR = 60.0

#: looks a host name up (the dispatcher's resolver, with its timeout)
ResolveHost = Callable[[str], Awaitable[Sequence[IPAddress]]]


class ControlResult(enum.StrEnum):
    #: the strategy reached a control: it works here, its failures are about the site
    REACHED = "reached"
    #: the strategy reached no control in time: it is broken here
    FAILED = "failed"
    #: no control name could be resolved: nothing can be said about the strategy
    UNKNOWN = "unknown"


async def probe_control(
    strategy: Strategy, controls: Sequence[Target], resolve: ResolveHost, timeout: float
) -> ControlResult:
    """Try to open a path through ``strategy`` to one of ``controls`` within ``timeout``."""
    resolving = unresolved = False
    with trio.move_on_after(timeout) as scope:
        for control in controls:
            addresses: Sequence[IPAddress] = ()
            ip = control.ip
            if ip is not None:
                addresses = [ip]
            elif not strategy.remote_dns:
                resolving = True
                try:
                    addresses = await resolve(control.host)
                except ResolveError as exc:
                    log.debug("control %s: %s", control, exc)
                    unresolved = True
                    continue
                finally:
                    resolving = False
            try:
                stream = await strategy.connect(control, addresses, b"")
            except (ProxyError, OSError, trio.BrokenResourceError) as exc:
                log.debug("control %s through %s: %s", control, strategy.name, exc)
                continue
            await trio.aclose_forcefully(stream)
            return ControlResult.REACHED
    if unresolved or (scope.cancelled_caught and resolving):
        return ControlResult.UNKNOWN
    return ControlResult.FAILED


class ControlProbes:
    """The controls of one config and the cache of what probing them through strategies gave."""

    def __init__(
        self, controls: Sequence[Target], timeout: float, *, cache_for: float = CACHE_FOR
    ) -> None:
        if not controls:
            raise ValueError("no control sites")
        self.controls = tuple(controls)
        self.timeout = timeout
        self.cache_for = cache_for
        #: probes actually sent (cache misses), for tests and status
        self.probes_sent = 0
        self._results: dict[tuple[str, str], tuple[float, ControlResult]] = {}
        self._running: dict[tuple[str, str], trio.Event] = {}
        self._next = 0

    def cached(self, network: str, strategy: str) -> ControlResult | None:
        """The result of a probe less than ``cache_for`` seconds old, if any."""
        hit = self._results.get((network, strategy))
        if hit is None or trio.current_time() - hit[0] >= self.cache_for:
            return None
        return hit[1]

    async def check(self, network: str, strategy: Strategy, resolve: ResolveHost) -> ControlResult:
        """Whether ``strategy`` reaches a control: cached, shared with a running probe, or new."""
        key = (network, strategy.name)
        while True:
            cached = self.cached(network, strategy.name)
            if cached is not None:
                return cached
            running = self._running.get(key)
            if running is None:
                break
            await running.wait()  # if that probe was cancelled, the loop starts another
        done = self._running[key] = trio.Event()
        try:
            self.probes_sent += 1
            start = self._next
            self._next = (self._next + 1) % len(self.controls)
            order = self.controls[start:] + self.controls[:start]
            result = await probe_control(strategy, order, resolve, self.timeout)
            self._results[key] = (trio.current_time(), result)
        finally:
            del self._running[key]
            done.set()
        return result


async def probe_address(address: IPAddress, port: int, *, tls: bool, timeout: float) -> bool:
    """The neutral-name control: does ``address`` answer a request for an innocuous name?

    For TLS a ClientHello for :data:`~proxy.detect.verdict.NEUTRAL_NAME` is sent and any answer
    (a ServerHello, even an alert) counts: the address is reachable and a server is alive. For
    plain HTTP a ``HEAD`` request for that name.
    """
    if tls:
        probe = neutral_hello()
    else:
        probe = f"HEAD / HTTP/1.1\r\nHost: {NEUTRAL_NAME}\r\nConnection: close\r\n\r\n".encode()
    with trio.move_on_after(timeout):
        try:
            stream = await open_tcp([address], port, timeout=timeout)
        except (ProxyError, OSError):
            return False
        async with stream:
            try:
                await stream.send_all(probe)
                return bool(await stream.receive_some(1024))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return False
    return False


async def judge_attempts(
    attempts: Sequence[AttemptRecord],
    *,
    target: Target,
    tls: bool,
    response: bytes | None,
    resolve: Resolve,
    remote_dns: Callable[[str], bool],
    dns_control: Resolver | None,
    timeout: float,
) -> tuple[list[AttemptRecord], bool]:
    """Give every failed attempt of one connection its verdict.

    ``response`` is the first answer of the strategy that got through (None: every strategy
    failed); ``resolve`` the connection's shared lookup of the target; ``remote_dns(name)``
    whether strategy ``name`` resolves names itself. Controls take at most ``timeout`` seconds
    each. Returns the judged attempts and whether the winner may be stored as working: not when
    a "block page" turned out to be the site's own answer (the winner answered the same), in
    which case those attempts are dropped too.
    """
    if not attempts:
        return [], True
    reached = response is not None
    trusted = True
    if reached:
        head = _status_line(response or b"")
        own = [
            a for a in attempts if a.outcome is Outcome.BLOCKPAGE and _status_line(a.answer) == head
        ]
        if own:
            attempts = [a for a in attempts if a not in own]
            trusted = False

    def local(a: AttemptRecord) -> bool:
        return target.ip is None and not remote_dns(a.strategy)

    addresses: Sequence[IPAddress] = [target.ip] if target.ip is not None else []
    mismatch = False
    if target.ip is None and any(local(a) for a in attempts):
        with trio.move_on_after(timeout):
            try:
                addresses = await resolve()
            except ResolveError:
                addresses = []
            if dns_control is not None and addresses:
                try:
                    secure = await dns_control.resolve(target.host)
                except ResolveError:
                    secure = []
                mismatch = bool(secure) and not set(secure) & set(addresses)
    answers: bool | None = None
    if not reached and addresses and any(needs_address_control(a.outcome) for a in attempts):
        answers = await probe_address(addresses[0], target.port, tls=tls, timeout=timeout)
    controls = Controls(site_reached=reached, address_answers=answers, dns_mismatch=mismatch)
    judged = [
        replace(a, verdict=classify(a.outcome, controls, resolved_locally=local(a)).value)
        for a in attempts
    ]
    return judged, trusted


def _status_line(response: bytes) -> bytes:
    return response.partition(b"\r\n")[0]
