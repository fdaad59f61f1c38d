"""From config to decisions: which policy and which strategies, in which order, for a target.

:class:`Router` is built once per config (and again on reload): it compiles the rules, builds
the named strategies and policies, and consults the learned memory so a strategy that worked
for this site on this network is tried first. It also writes what happened to the evidence log
and back into the memory. Connections keep the router they started with across a reload.

With ``[router] control`` sites configured, a failure is only learned once the failed strategy
has been checked against a control (:mod:`proxy.route.control`): the dispatcher runs
:meth:`Router.settle` in the background instead of calling :meth:`Router.record` directly. A
strategy that cannot reach a control either is broken on this network, not blocked for the site:
it is marked unhealthy in the memory (tried last, its successes not stored) and its failure is
neither learned for the site nor written to the evidence log, where ``sidestep report`` would
count it as a block. The connection's closing ``recovered``/``exhausted`` event is left out too
when every failure was such a strategy.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.config import Config
from proxy.detect.evidence import EXHAUSTED, RECOVERED, EvidenceEvent, EvidenceLog
from proxy.errors import ConfigError
from proxy.inbound.base import Target
from proxy.net.monitor import MonitorSettings
from proxy.protocols.splits import FragmentPolicy, SplitPoint
from proxy.route.control import ControlProbes, ControlResult, ResolveHost
from proxy.route.learn import LearnedMemory
from proxy.route.policy import AttemptRecord, Policy
from proxy.route.rules import Match, RuleSet, RuleSpec
from proxy.route.site import site_of
from proxy.routerconfig import BUILTIN_POLICIES, BUILTIN_STRATEGIES, StrategyConfig, split_server
from proxy.strategies.base import Strategy
from proxy.strategies.direct import DirectStrategy
from proxy.strategies.fragment import FragmentStrategy
from proxy.strategies.upstream import HttpConnectStrategy, Socks5Strategy, tor_strategy

log = logging.getLogger("sidestep.route")

DIRECT_POLICY = Policy("direct", ("direct",))


@dataclass(frozen=True, slots=True)
class Decision:
    """What the router chose for one connection."""

    policy: Policy
    strategies: tuple[Strategy, ...]
    match: Match
    site: str
    #: the matching rule's resolver choice ("default", "secure", "system")
    resolver: str = "default"

    @property
    def plain_direct(self) -> bool:
        """Just the direct strategy and the usual resolver: the dispatcher can keep its
        connect-then-reply path."""
        return (
            len(self.strategies) == 1
            and isinstance(self.strategies[0], DirectStrategy)
            and self.resolver == "default"
        )


def build_strategy(cfg: StrategyConfig, direct: DirectStrategy) -> Strategy:
    if cfg.type == "direct":
        return DirectStrategy(cfg.name, direct.connect_timeout, direct.happy_eyeballs_delay)
    if cfg.type in ("fragment", "disorder", "oob"):
        policy = FragmentPolicy(
            tuple(SplitPoint.parse(p) for p in cfg.split),
            records=cfg.records,
            segments=cfg.segments,
            host_header=cfg.host_header,
            host_space=cfg.host_space,
        )
        return FragmentStrategy(
            cfg.name,
            policy,
            "split" if cfg.type == "fragment" else cfg.type,
            delay=cfg.delay,
            ttl=cfg.ttl,
            connect_timeout=direct.connect_timeout,
            happy_eyeballs_delay=direct.happy_eyeballs_delay,
        )
    timeout = direct.connect_timeout
    if cfg.type == "bridge":
        from proxy.bridge.identity import parse_bridge_uri
        from proxy.strategies.bridge import BridgeStrategy

        assert cfg.uri is not None  # checked by StrategyConfig.validate
        uri = parse_bridge_uri(cfg.uri)
        return BridgeStrategy(
            cfg.name, uri, connect_timeout=timeout, cafile=cfg.cafile, rotate_after=cfg.rotate_after
        )
    if cfg.type == "front":
        from proxy.bridge.identity import parse_bridge_uri
        from proxy.strategies.front import FrontStrategy, fronts_of

        assert cfg.uri is not None  # checked by StrategyConfig.validate
        uri = parse_bridge_uri(cfg.uri)
        front = FrontStrategy(
            cfg.name, uri, fronts=fronts_of(uri, cfg.fronts), carriers=cfg.carriers,
            connect_timeout=timeout, cafile=cfg.cafile,
        )  # fmt: skip
        front.rotate_after = cfg.rotate_after
        return front
    if cfg.type == "tor":
        server = split_server(cfg.server) if cfg.server else ("127.0.0.1", 9050)
        return tor_strategy(
            cfg.name, server, username=cfg.username, password=cfg.password, connect_timeout=timeout
        )
    assert cfg.server is not None  # checked by StrategyConfig.validate
    kind = Socks5Strategy if cfg.type == "socks5" else HttpConnectStrategy
    return kind(
        cfg.name,
        split_server(cfg.server),
        username=cfg.username,
        password=cfg.password,
        remote_dns=cfg.remote_dns,
        connect_timeout=timeout,
    )


class Router:
    """Rules, policies and strategies of one config, plus the shared memory and evidence."""

    def __init__(
        self,
        config: Config,
        *,
        memory: LearnedMemory | None = None,
        evidence: EvidenceLog | None = None,
        network: str = "unknown",
        base_dir: Path | None = None,
    ) -> None:
        """``base_dir`` is where the config file lives: relative list files are found there."""
        direct = DirectStrategy(
            "direct", config.outbound.connect_timeout, config.outbound.happy_eyeballs_delay
        )
        self.strategies: dict[str, Strategy] = {"direct": direct}
        for cfg in BUILTIN_STRATEGIES:
            self.strategies[cfg.name] = build_strategy(cfg, direct)
        for i, cfg in enumerate(config.strategy):
            try:
                self.strategies[cfg.name] = build_strategy(cfg, direct)
            except ConfigError as exc:
                raise ConfigError(exc.message, key=f"strategy[{i}]") from None
        self.policies: dict[str, Policy] = {"direct": DIRECT_POLICY}
        for p in (*BUILTIN_POLICIES, *config.policy):
            self.policies[p.name] = Policy(
                p.name, p.strategies, p.mode, p.stagger, p.attempt_timeout, p.on_all_failed
            )
        specs = [
            RuleSpec(
                policy=r.policy,
                name=r.name,
                domain=r.domain,
                domain_suffix=r.domain_suffix,
                domain_keyword=r.domain_keyword,
                domain_regex=r.domain_regex,
                ip_cidr=r.ip_cidr,
                port=r.port,
                inbound=r.inbound,
                domain_list=tuple(_beside(base_dir, f) for f in r.domain_list),
                ip_list=tuple(_beside(base_dir, f) for f in r.ip_list),
            )
            for r in config.rule
        ]
        #: each rule's resolver choice, by rule position
        self.rule_resolvers = tuple(r.resolver for r in config.rule)
        try:
            self.rules = RuleSet.compile(specs, config.router.default_policy)
        except ValueError as exc:
            raise ConfigError(str(exc), key="rule") from None
        self.learn = config.router.learn
        self.memory = memory
        self.evidence = evidence
        self.network = network
        for strategy in self.strategies.values():
            use_memory = getattr(strategy, "use_memory", None)  # bridge and front strategies
            if use_memory is not None and memory is not None and self.learn:
                use_memory(memory, network)
        #: how relayed connections are watched for freezes and throttling
        self.monitor = MonitorSettings(
            freeze_min=config.router.freeze_min_bytes,
            freeze_max=config.router.freeze_max_bytes,
            freeze_stall=config.router.freeze_stall,
            throttle_factor=config.router.throttle_factor,
        )
        #: seconds the dispatcher's own controls (the neutral-name probe) may take
        self.control_timeout = config.router.control_timeout
        #: strategy objects per ordered tuple of names (a policy's, or the memory's order)
        self._by_names: dict[tuple[str, ...], tuple[Strategy, ...]] = {}
        #: the control sites and their cached results; None when none are configured
        self.control: ControlProbes | None = None
        if config.router.control:
            controls = [Target.parse(*split_server(c)) for c in config.router.control]
            self.control = ControlProbes(controls, config.router.control_timeout)

    def direct_policies(self) -> set[str]:
        """Names of the policies that are a plain direct connection and nothing else."""
        return {
            name
            for name, policy in self.policies.items()
            if len(policy.strategies) == 1
            and isinstance(self.strategies.get(policy.strategies[0]), DirectStrategy)
        }

    def decide(self, target: Target, inbound: str) -> Decision:
        self.rules.maybe_refresh(trio.current_time())
        ip = target.ip
        match = self.rules.match(None if ip is not None else target.host, ip, target.port, inbound)
        policy = self.policies[match.policy]
        names: tuple[str, ...] = policy.strategies
        index = match.rule_index
        resolver = self.rule_resolvers[index] if index is not None else "default"
        if len(names) == 1:  # nothing to order or learn: skip the site lookup (hot path)
            return Decision(policy, (self.strategies[names[0]],), match, target.host, resolver)
        site = _site(target)
        memory = self.memory
        if self.learn and memory is not None and memory.reorders(self.network, site):
            names = tuple(memory.order(self.network, site, names))
        strategies = self._by_names.get(names)
        if strategies is None:
            strategies = tuple(self.strategies[n] for n in names)
            if len(self._by_names) < 256:  # orders are few: policies times learned reorders
                self._by_names[names] = strategies
        return Decision(policy, strategies, match, site, resolver)

    def to_check(self, attempts: Sequence[AttemptRecord], worked: str | None) -> list[str]:
        """The strategies to check against a control before recording (none without controls).

        Every strategy that failed, and the one that worked if it is marked unhealthy: its
        success is only stored once a control gets through it again.
        """
        if self.control is None:
            return []
        names = list(dict.fromkeys(a.strategy for a in attempts if a.strategy in self.strategies))
        memory = self.memory
        if (
            worked is not None
            and worked in self.strategies
            and memory is not None
            and memory.is_unhealthy(self.network, worked)
        ):
            names.append(worked)
        return names

    async def settle(
        self,
        decision: Decision,
        target: Target,
        sni: str | None,
        attempts: Sequence[AttemptRecord],
        worked: str | None,
        resolve: ResolveHost,
    ) -> None:
        """Check the strategies of :meth:`to_check` against a control, then :meth:`record`."""
        control = self.control
        results: dict[str, ControlResult] = {}
        if control is not None:

            async def check(name: str) -> None:
                results[name] = await control.check(self.network, self.strategies[name], resolve)

            async with trio.open_nursery() as nursery:
                for name in self.to_check(attempts, worked):
                    nursery.start_soon(check, name)
        down = {name for name, result in results.items() if result is ControlResult.FAILED}
        memory = self.memory
        if memory is not None and self.learn:
            for name, result in results.items():
                unhealthy = memory.is_unhealthy(self.network, name)
                if result is ControlResult.FAILED and not unhealthy:
                    log.warning(
                        "strategy %s reaches no control site on network %s: not learning its "
                        "failures, trying it last",
                        name,
                        self.network,
                    )
                    memory.mark_unhealthy(self.network, name)
                elif result is ControlResult.REACHED and unhealthy:
                    log.info("strategy %s reaches a control site again", name)
                    memory.mark_healthy(self.network, name)
        self.record(decision, target, sni, attempts, worked, down=down)

    def record(
        self,
        decision: Decision,
        target: Target,
        sni: str | None,
        attempts: Sequence[AttemptRecord],
        worked: str | None,
        *,
        down: Collection[str] = (),
    ) -> None:
        """Write what the attempts of one connection taught us (memory and evidence).

        Failures of the strategies in ``down`` (they failed a control too) are left out.
        """
        if down:
            attempts = [a for a in attempts if a.strategy not in down]
            if not attempts and worked is None:
                return  # every failure was a broken strategy: nothing to say about the site
        if not attempts and (worked is None or len(decision.strategies) == 1):
            return  # nothing failed and nothing to choose between: nothing to remember
        now = time.time()
        site = decision.site if len(decision.strategies) > 1 else _site(target)
        if self.memory is not None and self.learn:
            for a in attempts:
                self.memory.record_failure(self.network, site, a.strategy, a.label)
            if worked is not None:
                self.memory.record_success(self.network, site, worked)
        if self.evidence is None:
            return
        for a in attempts:
            self.evidence.write(
                EvidenceEvent(
                    time=now,
                    network=self.network,
                    site=site,
                    host=target.host,
                    outcome=a.label,
                    sni=sni,
                    strategy=a.strategy,
                    duration_ms=int(a.duration * 1000),
                    worked=worked,
                )
            )
        if attempts:
            self.evidence.write(
                EvidenceEvent(
                    time=now,
                    network=self.network,
                    site=site,
                    host=target.host,
                    outcome=RECOVERED if worked else EXHAUSTED,
                    sni=sni,
                    strategy=worked,
                    worked=worked,
                )
            )


def _beside(base_dir: Path | None, name: str) -> str:
    """A list file named relative to the config file is looked up next to it."""
    path = Path(name).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    return str(path)


def _site(target: Target) -> str:
    return _site_of_host(target.host)


# A failed IP parse (every name) raises inside site_of: clients repeat a few hosts.
@functools.lru_cache(maxsize=4096)
def _site_of_host(host: str) -> str:
    try:
        return site_of(host)
    except ValueError:
        return host
