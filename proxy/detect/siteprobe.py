"""Probing sites now through every strategy: what ``sidestep probe SITE`` and ``sidestep check``
print (that printing lives in :mod:`proxy.detect.dnsprobe_cli` and :mod:`proxy.checkcli`).

For one site, each strategy in turn opens its path and sends what a browser would send first: a
ClientHello for the site's name (https) or a ``GET`` (plain http). The first answer is judged as
the dispatcher judges it (:func:`~proxy.route.policy.attempt`), and the failures get their
verdicts from the same controls (:func:`~proxy.route.control.judge_attempts`): did another
strategy reach the site, does the address answer a ClientHello for an innocuous name, does a
secure resolver's view of the name share an address with the local one. A site no strategy and
no control reaches is ``site-down``, not censored.

Strategies run one after another for a site, in the router's order (``direct``, the built-in
tricks, then the config's): a censor with residual blocking punishes the next attempt for the
previous one, and a probe must see what sidestep itself would see. Two kinds of attempt are left
out, as the policy leaves them out: a trick with nothing to re-frame in this first flight (an
HTTP-only variant for a TLS hello), and, once ``direct`` could not connect or resolve, the other
strategies that dial the same address (they only re-frame a hello that never gets sent).

Sites are probed concurrently, at most :data:`CONCURRENCY` at a time. Nothing here learns or
writes evidence: a probe is a look, not a connection sidestep served.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from proxy.app import make_resolver
from proxy.config import Config
from proxy.detect.outcome import Outcome
from proxy.detect.verdict import Verdict
from proxy.errors import ConfigError, ResolveError
from proxy.inbound.base import IPAddress, Target
from proxy.protocols.tls_hello import build_client_hello
from proxy.resolve.base import Resolver
from proxy.resolve.chain import secure_chain
from proxy.route.control import ControlProbes, ControlResult, judge_attempts
from proxy.route.policy import (
    UNREACHED,
    AttemptRecord,
    _AttemptFailed,  # the policy's own failure carrier: a probe catches what the policy catches
    applies,
    attempt,
    dials_target,
    resolve_once,
)
from proxy.route.router import Router
from proxy.strategies.base import Strategy
from proxy.strategies.direct import DirectStrategy

__all__ = [
    "CONCURRENCY", "EXIT_CIRCUMVENTED", "EXIT_DIRECT", "EXIT_UNREACHABLE", "EXIT_USAGE",
    "ProbeEnv", "ProbeSetup", "Site", "SiteReport", "StrategyResult", "exit_status", "open_setup",
    "parse_site", "probe_site", "probe_sites", "read_sites",
]  # fmt: skip

#: sites probed at the same time
CONCURRENCY = 8

#: exit statuses shared by ``sidestep probe SITE`` and ``sidestep check``
EXIT_DIRECT, EXIT_CIRCUMVENTED, EXIT_UNREACHABLE, EXIT_USAGE = 0, 1, 2, 3

#: what a site's probe concluded
Status = Literal["direct", "circumvented", "unreachable"]

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


# --- sites ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Site:
    """A place to probe: a host, a port, and whether it speaks TLS."""

    host: str
    port: int
    tls: bool = True
    #: the path of the ``GET`` for plain http
    path: str = "/"

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def target(self) -> Target:
        return Target.parse(self.host, self.port)

    def __str__(self) -> str:
        return str(self.target)

    def first_flight(self, default_port: int) -> bytes:
        """A browser's first bytes: a ClientHello naming the site, or a plain-HTTP ``GET``.

        ``default_port`` is the scheme's usual port, left out of the ``Host`` header.
        """
        target = self.target
        if self.tls:
            return build_client_hello(None if target.ip is not None else target.host)
        host = f"[{target.host}]" if ":" in target.host else target.host
        if self.port != default_port:
            host += f":{self.port}"
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sidestep-probe\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n"
        ).encode()


def _valid_host(host: str) -> bool:
    target = Target.parse(host, 0)
    if target.ip is not None:
        return True
    name = target.host
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def parse_site(text: str, *, https_port: int = 443, http_port: int = 80) -> Site:
    """``host``, ``host:port``, ``[v6]:port`` or an ``http(s)://`` URL; raises ValueError.

    Without a scheme the site is https; ``http://`` means plain HTTP. Without a port the
    scheme's (``https_port``/``http_port``, 443 and 80 unless a lab says otherwise).
    """
    raw = text.strip()
    if not raw or any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw):
        raise ValueError(f"{text!r} is not a host, host:port or URL")
    tls, rest = True, raw
    scheme, sep, after = raw.partition("://")
    if sep:
        if scheme.lower() not in ("http", "https"):
            raise ValueError(f"{text!r}: only http:// and https:// URLs can be probed")
        tls, rest = scheme.lower() == "https", after
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, path = rest[:end], rest[end:].split("#", 1)[0] or "/"
    if not path.startswith("/"):
        path = "/" + path
    if "@" in netloc:
        raise ValueError(f"{text!r}: user names are not part of a site")
    port_text = ""
    if netloc.startswith("["):
        host, bracket, after_host = netloc[1:].partition("]")
        if not bracket or (after_host and not after_host.startswith(":")):
            raise ValueError(f"{text!r}: unbalanced [ ] around an IPv6 address")
        port_text = after_host[1:]
        if Target.parse(host, 0).ip is None or ":" not in host:
            raise ValueError(f"{text!r}: only an IPv6 address goes inside [ ]")
    elif netloc.count(":") > 1:
        host = netloc  # a bare IPv6 address: no port can follow it
        if Target.parse(host, 0).ip is None:
            raise ValueError(f"{text!r} is not a host, host:port or URL")
    else:
        host, colon, port_text = netloc.partition(":")
        if colon and not port_text:
            raise ValueError(f"{text!r}: a ':' with no port after it")
    if not host or not _valid_host(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    port = https_port if tls else http_port
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
        port = int(port_text)
    return Site(Target.parse(host, port).host, port, tls, path if not tls else "/")


def read_sites(text: str, *, https_port: int = 443, http_port: int = 80) -> list[Site]:
    """Sites one a line; ``#`` starts a comment, blank lines are skipped. ValueError names the
    line of the first bad one."""
    sites = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            sites.append(parse_site(entry, https_port=https_port, http_port=http_port))
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return sites


# --- what a probe needs ------------------------------------------------------------------------

ResolveHost = Callable[[str], Awaitable[Sequence[IPAddress]]]


@dataclass(slots=True)
class ProbeSetup:
    """The strategies, resolvers and limits one config gives a probe."""

    #: the strategies to try, in order
    strategies: Sequence[Strategy]
    #: the resolver sidestep itself would use
    resolver: Resolver
    #: a resolver the local network cannot tamper with (the config's secure endpoints), or None
    dns_control: Resolver | None = None
    #: seconds one attempt may take to connect and get its first answer (the policy's)
    attempt_timeout: float = 8.0
    #: seconds a control may take
    control_timeout: float = 5.0
    #: seconds a lookup may take
    resolve_timeout: float = 5.0
    #: the config's control sites, to tell a broken upstream proxy from a blocked site
    controls: ControlProbes | None = None
    #: the usual ports of https and http (a lab may move them)
    https_port: int = 443
    http_port: int = 80

    async def resolve(self, host: str) -> Sequence[IPAddress]:
        target = Target.parse(host, 0)
        ip = target.ip
        if ip is not None:
            return [ip]
        with trio.move_on_after(self.resolve_timeout):
            found = await self.resolver.resolve(target.host)
            if not found:
                raise ResolveError(f"{target.host}: no addresses")
            return found
        raise ResolveError(f"{target.host}: resolver timed out")


def select(router: Router, only: Sequence[str] = ()) -> list[Strategy]:
    """The router's strategies in order, or just ``only`` (in the order given); a name the
    config does not define is a :class:`ConfigError`."""
    if not only:
        return list(router.strategies.values())
    unknown = [name for name in only if name not in router.strategies]
    if unknown:
        known = ", ".join(router.strategies)
        raise ConfigError(f"unknown strategy {unknown[0]!r}; this config has: {known}")
    return [router.strategies[name] for name in dict.fromkeys(only)]


@asynccontextmanager
async def open_setup(
    config: Config,
    *,
    only: Sequence[str] = (),
    attempt_timeout: float | None = None,
    env: ProbeEnv | None = None,
) -> AsyncIterator[ProbeSetup]:
    """The :class:`ProbeSetup` of ``config`` (already :attr:`ProbeEnv.prepare`-d), its secure
    resolvers running while it is open.

    ``attempt_timeout`` overrides the one of the config's default policy; ``env.adapt`` may
    change the setup before use (the lab keeps resolvers and tricks inside itself this way).
    """
    router = Router(config, network="probe")
    strategies = select(router, only)
    resolver, managed = make_resolver(config, strategies=router.strategies)
    dns_control: Resolver | None = None
    async with AsyncExitStack() as stack:
        if config.dns.endpoints:
            chain, parts = secure_chain(config.dns)
            managed = [*managed, *parts]
            dns_control = chain
        for part in managed:
            await stack.enter_async_context(part)
        policy = router.policies[config.router.default_policy]
        setup = ProbeSetup(
            strategies,
            resolver,
            dns_control,
            attempt_timeout=attempt_timeout or policy.attempt_timeout,
            control_timeout=router.control_timeout,
            resolve_timeout=config.dns.timeout,
            controls=router.control,
        )
        if env is not None:
            setup.https_port, setup.http_port = env.https_port, env.http_port
            if env.adapt is not None:
                env.adapt(setup)
        yield setup


@dataclass(frozen=True, slots=True)
class ProbeEnv:
    """Where a probe runs: the real network (the defaults) or a lab (``sidestep lab --probe``).

    ``prepare`` rewrites the config before use, ``adapt`` the setup built from it; the ports are
    what a SITE without a port means.
    """

    prepare: Callable[[Config], Config] = field(default=lambda config: config)
    adapt: Callable[[ProbeSetup], None] | None = None
    https_port: int = 443
    http_port: int = 80


# --- probing -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StrategyResult:
    """What one strategy got for one site."""

    strategy: str
    #: "ok", an :class:`~proxy.detect.outcome.Outcome` value, or "skipped"
    outcome: str
    #: a :class:`~proxy.detect.verdict.Verdict` value, or "-" when skipped
    verdict: str
    #: seconds until the first answer or the failure (0 when skipped)
    time: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == Outcome.OK.value

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "outcome": self.outcome,
            "verdict": self.verdict,
            "time": round(self.time, 3),
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class SiteReport:
    """Every strategy's result for one site."""

    site: Site
    results: tuple[StrategyResult, ...]
    #: the addresses the configured resolver gave (empty for remote-DNS-only probes or errors)
    addresses: tuple[str, ...] = ()
    #: names of the strategies that connect plainly (``direct`` and its aliases)
    plain: frozenset[str] = field(default_factory=frozenset)

    @property
    def working(self) -> list[str]:
        return [r.strategy for r in self.results if r.ok]

    @property
    def status(self) -> Status:
        """``direct`` when a plain connection got through, ``circumvented`` when only another
        strategy did, ``unreachable`` when none did."""
        if any(r.ok and r.strategy in self.plain for r in self.results):
            return "direct"
        return "circumvented" if self.working else "unreachable"

    @property
    def verdict(self) -> str:
        """The plain connection's verdict (the first tried strategy's without one)."""
        tried = [r for r in self.results if r.outcome != "skipped"]
        plain = [r for r in tried if r.strategy in self.plain]
        first = (plain or tried or [None])[0]
        return first.verdict if first is not None else "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "site": str(self.site),
            "host": self.site.host,
            "port": self.site.port,
            "scheme": self.site.scheme,
            "status": self.status,
            "verdict": self.verdict,
            "working": self.working,
            "addresses": list(self.addresses),
            "strategies": [r.to_json() for r in self.results],
        }


def exit_status(reports: Sequence[SiteReport]) -> int:
    """0 every site reached plainly, 1 some only through circumvention, 2 some unreachable."""
    statuses = {r.status for r in reports}
    if "unreachable" in statuses:
        return EXIT_UNREACHABLE
    return EXIT_CIRCUMVENTED if "circumvented" in statuses else EXIT_DIRECT


async def probe_site(setup: ProbeSetup, site: Site) -> SiteReport:
    """Try every strategy of ``setup`` for ``site`` and judge the failures."""
    target = site.target
    default_port = setup.https_port if site.tls else setup.http_port
    flight = site.first_flight(default_port)
    resolve = resolve_once(lambda: setup.resolve(target.host))
    results: dict[str, StrategyResult] = {}
    failed: list[AttemptRecord] = []
    answer: bytes | None = None
    unreached: str | None = None
    for strategy in setup.strategies:
        name = strategy.name
        if not applies(strategy, flight):
            results[name] = _skipped(
                name, f"nothing to re-frame in this {site.scheme} first flight"
            )
            continue
        if unreached is not None and dials_target(strategy):
            results[name] = _skipped(name, f"dials the same address, which {unreached} could not")
            continue
        start = trio.current_time()
        try:
            winner = await attempt(
                strategy,
                target,
                resolve,
                flight,
                tls=site.tls,
                timeout=setup.attempt_timeout,
                wait_response=True,
            )
        except _AttemptFailed as exc:
            failed.append(exc.record)
            results[name] = StrategyResult(name, exc.record.outcome.value, "", exc.record.duration,
                                           exc.record.detail)  # fmt: skip
            if exc.record.outcome in UNREACHED and dials_target(strategy):
                unreached = name
            continue
        took = trio.current_time() - start
        await trio.aclose_forcefully(winner.stream)
        if answer is None:
            answer = winner.response
        results[name] = StrategyResult(name, Outcome.OK.value, Verdict.OK.value, took)
    judged, _ = await judge_attempts(
        failed,
        target=target,
        tls=site.tls,
        response=answer,
        resolve=resolve,
        remote_dns=lambda name: any(s.remote_dns for s in setup.strategies if s.name == name),
        dns_control=setup.dns_control,
        timeout=setup.control_timeout,
    )
    verdicts = {a.strategy: a.verdict for a in judged}
    broken = await _broken_upstreams(setup, judged)
    for name, result in list(results.items()):
        if result.verdict:
            continue
        if name in broken:
            detail = f"{result.detail}; it reaches no control site either"
            verdict = Verdict.PATH_FAILED.value
        else:
            detail = result.detail
            # judge_attempts leaves out a "block page" that was the site's own answer
            verdict = verdicts.get(name, Verdict.OK.value)
        results[name] = StrategyResult(name, result.outcome, verdict, result.time, detail)
    addresses: tuple[str, ...] = ()
    if any(not s.remote_dns for s in setup.strategies):
        try:
            addresses = tuple(str(a) for a in await resolve())
        except ResolveError:
            pass
    plain = frozenset(s.name for s in setup.strategies if isinstance(s, DirectStrategy))
    ordered = tuple(results[s.name] for s in setup.strategies)
    return SiteReport(site, ordered, addresses, plain)


async def _broken_upstreams(setup: ProbeSetup, judged: Sequence[AttemptRecord]) -> set[str]:
    """Failed upstream strategies that reach none of the config's control sites either."""
    controls = setup.controls
    if controls is None:
        return set()
    by_name = {s.name: s for s in setup.strategies}
    broken: set[str] = set()
    for record in judged:
        strategy = by_name.get(record.strategy)
        if strategy is None or dials_target(strategy):
            continue
        result = await controls.check("probe", strategy, setup.resolve)
        if result is ControlResult.FAILED:
            broken.add(record.strategy)
    return broken


def _skipped(name: str, why: str) -> StrategyResult:
    return StrategyResult(name, "skipped", "-", 0.0, why)


async def probe_sites(
    setup: ProbeSetup,
    sites: Sequence[Site],
    *,
    concurrency: int = CONCURRENCY,
    on_done: Callable[[SiteReport], None] | None = None,
) -> list[SiteReport]:
    """Probe ``sites``, ``concurrency`` at a time; reports in the order of ``sites``.

    ``on_done`` is called as each site finishes (a progress display).
    """
    limiter = trio.CapacityLimiter(max(1, concurrency))
    reports: dict[int, SiteReport] = {}

    async def one(i: int, site: Site) -> None:
        async with limiter:
            reports[i] = await probe_site(setup, site)
        if on_done is not None:
            on_done(reports[i])

    async with trio.open_nursery() as nursery:
        for i, site in enumerate(sites):
            nursery.start_soon(one, i, site)
    return [reports[i] for i in range(len(sites))]
