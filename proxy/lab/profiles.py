"""Censor profiles: named bundles of DPI rules and DNS lies, one per country and year.

A :class:`Profile` is what :func:`~proxy.lab.world.open_lab` needs to censor the world: the
middleboxes' rules (:mod:`proxy.lab.rules`), the ISP resolver's lie table
(:class:`~proxy.lab.dnsserver.DnsPolicy`) and, optionally, on-path DNS injection
(:class:`~proxy.lab.dnsinject.InjectionPolicy`). The presets follow research section C.8 (and
RU-5 for QUIC):

======== ================================================================================
none      nothing is censored: the no-censorship twin of every scenario
ru-2021   the Twitter slowdown: SNI globs ``*twitter*``, ``*twimg*``, ``*t.co*`` (which also
          hit microsoft.com.lab) throttled to 16 kbit/s, one segment inspected
ru-tspu   TSPU since 2022: first-record SNI reset or drop, HTTP redirect, IP reject, the ISP
          resolver points blocked names at a block page; QUIC v1 Initials dropped (UDP flows)
ru-2025   ru-tspu plus the freeze: TCP flows to "foreign hosting" stop after 16 KiB
cn        the GFW: DNS injection on the path, SNI reset with full reassembly and 120 s of
          residual blocking, the famous DoH service blocked by IP and by SNI
ir        bogon DNS (10.10.34.35) and NXDOMAIN hijack, a protocol allow-list, SNI blackhole
          per segment, an HTTP block page
allowlist only the CDN front and open.lab pass; everything else is silenced and DNS times out
======== ================================================================================

:func:`predict_tcp` and :func:`predict_dns` say what a profile would do to a fresh connection or
query, and :func:`predict_udp` what it does to a QUIC Initial, by running its rules on a
throwaway engine: the lab's table and the scenario runner use them, so the descriptions can never
drift from the rules.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import dns.name

from proxy.lab import world
from proxy.lab.clock import LabClock, ManualClock
from proxy.lab.dnsinject import InjectionPolicy
from proxy.lab.dnsserver import DnsMode, DnsPolicy
from proxy.lab.rules import (
    Action,
    ActionKind,
    AnyData,
    AnyOf,
    CensorEngine,
    Destination,
    Flow,
    HttpHost,
    NameMatch,
    Penalty,
    PenaltyKey,
    ProtocolAllowList,
    Reassembly,
    Rule,
    Sni,
)
from proxy.lab.triggers import QuicInitial, build_quic_initial
from proxy.protocols.tls_hello import build_client_hello

__all__ = ["PROFILES", "Profile", "get_profile", "predict_dns", "predict_tcp", "predict_udp"]

#: 16 kbit/s, the order of magnitude of Russia's 2021 and 2024 slowdowns
THROTTLE_RATE = 2000.0
#: the Russian 2025 cut-off for "foreign hosting" flows (reported between 14 and 22 KB)
FREEZE_LIMIT = 16 * 1024
#: GFW residual blocking is reported between 90 and 180 s
RESIDUAL_SECONDS = 120.0
#: TSPU drops QUIC v1 Initials from about this size up (IMC'22, research RU-5; to be verified)
TSPU_QUIC_MIN_SIZE = 1001


@dataclass(frozen=True, slots=True)
class Profile:
    """One censor: DPI rules, the ISP resolver's lies, and on-path DNS injection."""

    name: str
    #: one line for tables and ``--help``
    summary: str
    rules: tuple[Rule, ...] = ()
    isp: DnsPolicy = field(default_factory=DnsPolicy)
    #: forged answers for UDP queries to any resolver address (None: no injection)
    injection: InjectionPolicy | None = None

    def engine(self, clock: LabClock) -> CensorEngine:
        """A fresh censor running these rules (seeded, so probabilistic rules replay)."""
        return CensorEngine(self.rules, clock=clock, rng=random.Random(0))

    def with_isp(self, policy: DnsPolicy) -> Profile:
        """The same profile with another ISP resolver (tests exercising one DNS mode)."""
        return replace(self, isp=policy)


def _sni(*names: str, mode: NameMatch = NameMatch.SUFFIX) -> Sni:
    return Sni(names, mode)


def _none() -> Profile:
    return Profile("none", "no censorship: the twin every censored scenario is compared with")


def _ru_2021() -> Profile:
    throttle = Rule(
        "ru-throttle",
        Sni(("*twitter*", "*twimg*", "*t.co*", world.THROTTLED), NameMatch.GLOB),
        Action.throttle(THROTTLE_RATE, burst=4096),
        Reassembly.NONE,
    )
    return Profile(
        "ru-2021",
        "Russia 2021: SNI globs *twitter* *twimg* *t.co* (so microsoft.com.lab too) throttled "
        "to 16 kbit/s; one segment inspected",
        (throttle,),
    )


def _tspu_rules() -> tuple[Rule, ...]:
    first = Reassembly.FIRST_RECORD
    return (
        Rule("tspu-ip", Destination((world.IP_BLOCKED_NET,)), Action.refuse()),
        # QUIC off since 2022-03 (research RU-5): the Initial gets no answer, TCP still works.
        # Real TSPU spares domestic servers and reads port 443 only; the lab has neither
        # distinction (its HTTPS port may be 10443), so every lab QUIC v1 Initial is dropped.
        Rule(
            "tspu-quic",
            QuicInitial(TSPU_QUIC_MIN_SIZE, versions=(1,)),
            Action.blackhole(),
        ),
        Rule("tspu-reset", _sni(world.BLOCKED, world.CDN_BACKEND), Action.reset(), first),
        Rule("tspu-drop", _sni(world.TWITTER), Action.blackhole(), first),
        Rule("tspu-throttle", _sni(world.THROTTLED), Action.throttle(THROTTLE_RATE), first),
        Rule(
            "tspu-http",
            HttpHost((world.HTTP_BLOCKED, world.BLOCKED), NameMatch.SUFFIX),
            Action.redirect(f"http://{world.BLOCKPAGE_NAME}/?blocked"),
            first,
        ),
    )


def _ru_dns() -> DnsPolicy:
    return DnsPolicy({world.POISONED: DnsMode.BLOCKPAGE_IP}, blockpage_ips=(world.BLOCKPAGE_IP,))


def _ru_tspu() -> Profile:
    return Profile(
        "ru-tspu",
        "Russia TSPU 2022-: first-record SNI reset/drop, HTTP redirect, IP reject, ISP DNS "
        "points at a block page; QUIC dropped",
        _tspu_rules(),
        _ru_dns(),
    )


def _ru_2025() -> Profile:
    # TCP only: QUIC to foreign hosting is dropped like all QUIC, not frozen
    foreign = Destination((world.FOREIGN_NET,), protos=("tcp",))
    freeze = Rule("ru-freeze", foreign, Action.freeze_after(FREEZE_LIMIT))
    rules = _tspu_rules()
    return Profile(
        "ru-2025",
        "Russia 2025: ru-tspu plus the freeze: TCP flows to foreign hosting (127.62/16) stop "
        "after 16 KiB",
        (rules[0], freeze, *rules[1:]),
        _ru_dns(),
    )


def _cn() -> Profile:
    full = Reassembly.FULL
    residual = Penalty(RESIDUAL_SECONDS, PenaltyKey.THREE_TUPLE, Action.blackhole())
    ip_blocked = (world.IP_BLOCKED_NET, f"{world.FAMOUS_DOH_IPS[0]}/32")
    listed = (world.BLOCKED, world.TWITTER, world.CDN_BACKEND, world.FAMOUS_DOH)
    rules = (
        Rule("gfw-ip", Destination(ip_blocked), Action.drop_syn()),
        Rule("gfw-sni", _sni(*listed), Action.reset(), full, residual),
        Rule(
            "gfw-http",
            HttpHost((world.HTTP_BLOCKED, world.BLOCKED), NameMatch.SUFFIX),
            Action.reset(),
            full,
            residual,
        ),
    )
    poisoned = (world.BLOCKED, world.TWITTER, world.POISONED, world.FAMOUS_DOH)
    injection = InjectionPolicy({name: world.FORGED_IPS for name in poisoned})
    return Profile(
        "cn",
        "China GFW: DNS injected on the path, SNI reset (full reassembly) + 120 s residual "
        "block, famous DoH blocked by IP and SNI",
        rules,
        DnsPolicy(),
        injection,
    )


def _ir() -> Profile:
    none = Reassembly.NONE
    rules = (
        Rule("ir-ip", Destination((world.IP_BLOCKED_NET,)), Action.blackhole()),
        Rule(
            "ir-protocols",
            ProtocolAllowList(("tls", "http", "dns")),
            Action.blackhole(),
            none,
            Penalty(60.0, PenaltyKey.CLIENT_SERVER),
        ),
        Rule("ir-sni", _sni(world.BLOCKED, world.TWITTER, world.CDN_BACKEND), Action.blackhole()),
        Rule(
            "ir-http",
            HttpHost((world.HTTP_BLOCKED, world.BLOCKED), NameMatch.SUFFIX),
            Action.blockpage(403),
            none,
        ),
    )
    dns_rules: dict[str, DnsMode] = {
        name: DnsMode.BOGON for name in (world.POISONED, world.BLOCKED, world.TWITTER)
    }
    dns_rules["."] = DnsMode.NXDOMAIN_HIJACK
    policy = DnsPolicy(dns_rules, bogon_ips=(world.BOGON_IP,), hijack_ips=(world.HIJACK_IP,))
    return Profile(
        "ir",
        "Iran: ISP DNS answers 10.10.34.35 and hijacks NXDOMAIN, protocol allow-list, SNI "
        "blackhole per segment, HTTP block page",
        rules,
        policy,
    )


def _allowlist() -> Profile:
    allowed = (world.CDN_FRONT, world.OPEN)
    rules = (
        Rule(
            "allow",
            AnyOf((Sni(allowed), HttpHost(allowed))),
            Action.forward(),
            Reassembly.FULL,
        ),
        Rule("deny", AnyData(), Action.blackhole()),
    )
    dns_rules: dict[str, DnsMode] = {".": DnsMode.TIMEOUT}
    dns_rules.update({name: DnsMode.HONEST for name in allowed})
    return Profile(
        "allowlist",
        "allow-list regime: only cdn.front.lab and open.lab pass; everything else is silenced "
        "and DNS for it times out",
        rules,
        DnsPolicy(dns_rules),
    )


PROFILES: MappingProxyType[str, Profile] = MappingProxyType(
    {p.name: p for p in (_none(), _ru_2021(), _ru_tspu(), _ru_2025(), _cn(), _ir(), _allowlist())}
)


def get_profile(name: str) -> Profile:
    """The preset called ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown censor profile {name!r}; choose one of {', '.join(PROFILES)}"
        ) from None


# --- predictions -------------------------------------------------------------------------------


def _say(action: Action, rule: Rule | None) -> str:
    kind = action.kind
    if kind is ActionKind.FORWARD:
        text = "pass"
    elif kind is ActionKind.THROTTLE:
        text = f"throttle to {action.rate * 8 / 1000:g} kbit/s"
    elif kind is ActionKind.FREEZE_AFTER:
        text = f"freeze after {action.limit // 1024} KiB"
    elif kind is ActionKind.BLOCKPAGE:
        text = f"block page {action.status}"
    elif kind is ActionKind.REDIRECT:
        text = f"redirect to {action.location}"
    else:
        text = kind.value.replace("_", " ")
    if rule is None:
        return text
    extra = f", then {rule.penalty.seconds:g} s residual" if rule.penalty else ""
    return f"{text} [{rule.name}{extra}]"


def predict_tcp(profile: Profile, name: str, address: tuple[str, int], scheme: str) -> str:
    """What ``profile`` does to a new ``scheme`` connection to ``name`` at ``address``."""
    engine = profile.engine(ManualClock())
    by_name = {r.name: r for r in profile.rules}
    static = engine.listener_action(*address)
    if static is not None:
        return _say(static, by_name.get(engine.log[-1].rule))
    flow = Flow("127.0.0.1", 40000, address[0], address[1])
    verdict = engine.on_connect(flow)
    if verdict.rule is None:
        if scheme == "https":
            first = build_client_hello(name, ("http/1.1",))
        else:
            first = f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()
        verdict = engine.on_client_segment(flow, first)
    if verdict.kind is ActionKind.FORWARD and verdict.rule is None:
        return "pass"
    return _say(verdict.action, by_name.get(verdict.rule or ""))


def predict_udp(profile: Profile, address: tuple[str, int]) -> str:
    """What ``profile`` does to a QUIC v1 Initial (1200 bytes) sent to ``address``."""
    engine = profile.engine(ManualClock())
    verdict = engine.on_datagram(Flow("127.0.0.1", 40000, *address, "udp"), build_quic_initial())
    if verdict.kind is ActionKind.FORWARD and verdict.rule is None:
        return "pass"
    rule = next((r for r in profile.rules if r.name == verdict.rule), None)
    if verdict.forward:
        return _say(verdict.action, rule)
    # a datagram cannot be reset or answered: whatever the rule does, it is dropped
    return _say(verdict.action, rule).replace(_say(verdict.action, None), "drop", 1)


def predict_dns(profile: Profile, name: str) -> str:
    """What ``profile`` does to an A query for ``name`` ("" when DNS is honest)."""
    parts = []
    if profile.injection is not None:
        found = profile.injection.pool_for(dns.name.from_text(name))
        if found is not None:
            pool = found[1]
            more = f" (+{len(pool) - 1} more)" if len(pool) > 1 else ""
            parts.append(f"dns injected -> {pool[0]}{more}")
    rule = profile.isp.rule_for(name)
    if rule is not None and rule.mode not in (DnsMode.HONEST, DnsMode.NXDOMAIN_HIJACK):
        addresses = profile.isp.addresses(rule)
        v4 = [a for a in addresses if ":" not in a]
        target = f" -> {', '.join(v4)}" if v4 else ""
        parts.append(f"isp dns {rule.mode.value}{target}")
    return "; ".join(parts)
