"""The router's config sections: ``[[strategy]]``, ``[[policy]]``, ``[[rule]]``, ``[router]``.

A *strategy* is one named way out (``direct``, an upstream ``socks5``/``http`` proxy, ``tor``).
A *policy* is an ordered list of strategies and how to try them. A *rule* sends matching
connections to a policy; the first matching rule wins and ``[router] default_policy`` takes the
rest. A strategy named ``direct`` and a policy named ``direct`` (just that strategy) always
exist, so the smallest config needs none of these sections.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from proxy.configschema import non_negative, not_empty, option, positive
from proxy.errors import ConfigError

StrategyType = Literal["direct", "socks5", "http", "tor"]


def _check_server(text: str) -> None:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep:
        raise ValueError(f'{text!r} is not "ip:port"; write one like "127.0.0.1:9050"')
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IP address; name upstream proxies by address so reaching "
            "them needs no DNS lookup"
        ) from None
    if not (port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"{port!r} is not a port; use a number from 1 to 65535")


def _check_control(text: str) -> None:
    host, sep, port = text.rpartition(":")
    bare = host.strip("[]")
    if not sep or not bare:
        raise ValueError(f'{text!r} is not "host:port"; write one like "example.org:443"')
    if ":" in bare and not host.startswith("["):
        raise ValueError(f'{text!r}: put an IPv6 address in brackets, like "[2001:db8::1]:443"')
    if ":" in bare:
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise ValueError(f"{bare!r} is not an IPv6 address") from None
    elif not re.fullmatch(r"[A-Za-z0-9_.-]+", bare) or ".." in bare:
        raise ValueError(f"{bare!r} is not a host name or IP address")
    if not (port.isdigit() and 0 < int(port) <= 65535):
        raise ValueError(f"{port!r} is not a port; use a number from 1 to 65535")


def _check_cidr(text: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f'{text!r} is not an IP network; write one like "10.0.0.0/8"') from None


def _check_regex(text: str) -> None:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"{text!r} is not a valid regular expression: {exc}") from None


def _check_port(text: str) -> None:
    low, _, high = text.partition("-")
    for part in (low, high or low):
        if not (part.isdigit() and 0 < int(part) <= 65535):
            raise ValueError(f'{text!r} is not a port or a range like "8000-8999"')
    if int(low) > int(high or low):
        raise ValueError(f"{text!r}: the range is backwards")


def split_server(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@dataclass(frozen=True, slots=True)
class StrategyConfig:
    """One named way out."""

    name: str = option(check=not_empty)
    #: direct | socks5 | http | tor (tor is socks5 to a local Tor client, names resolved by Tor)
    type: StrategyType = "direct"
    #: "ip:port" of the upstream proxy (socks5, http; tor defaults to 127.0.0.1:9050)
    server: str | None = option(None, check=_check_server)
    username: str | None = option(None, check=not_empty)
    password: str | None = option(None, check=not_empty, secret=True)
    #: let the upstream resolve names (no local DNS query for the target); tor always does
    remote_dns: bool = True

    def validate(self) -> None:
        if self.type in ("socks5", "http") and self.server is None:
            raise ConfigError(f'a {self.type} strategy needs server = "ip:port"', key="server")
        if self.type == "direct" and self.server is not None:
            raise ConfigError("a direct strategy has no server", key="server")
        if (self.username is None) != (self.password is None):
            raise ConfigError("give both username and password, or neither", key="username")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """An ordered list of strategies and how to try them."""

    name: str = option(check=not_empty)
    strategies: tuple[str, ...] = ("direct",)
    #: "fallback" tries one after another; "race" starts them staggered, first answer wins
    mode: Literal["fallback", "race"] = "fallback"
    #: seconds between race starts
    stagger: float = option(0.25, check=non_negative)
    #: seconds one attempt may take to connect and get the server's first answer
    attempt_timeout: float = option(8.0, check=positive)
    #: when every strategy failed: "fail" closes the connection, "direct" tries plain TCP
    on_all_failed: Literal["fail", "direct"] = "fail"

    def validate(self) -> None:
        if not self.strategies:
            raise ConfigError("a policy needs at least one strategy", key="strategies")
        seen: set[str] = set()
        for i, name in enumerate(self.strategies):
            if name in seen:
                raise ConfigError(f"{name!r} is listed twice", key=f"strategies[{i}]")
            seen.add(name)


@dataclass(frozen=True, slots=True)
class RuleConfig:
    """Connections matching this rule use ``policy``. Within a rule, destination criteria
    (domain*, ip_cidr, lists) are alternatives, and port and inbound, when given, must match
    too."""

    policy: str = option(check=not_empty)
    name: str = ""
    domain: tuple[str, ...] = ()
    domain_suffix: tuple[str, ...] = ()
    domain_keyword: tuple[str, ...] = ()
    domain_regex: tuple[str, ...] = option((), each=_check_regex)
    ip_cidr: tuple[str, ...] = option((), each=_check_cidr)
    #: ports or ranges as strings: ["443", "8000-8999"]
    port: tuple[str, ...] = option((), each=_check_port)
    inbound: tuple[str, ...] = ()
    #: files with one domain (suffix match) or CIDR per line; "#" starts a comment
    domain_list: tuple[str, ...] = ()
    ip_list: tuple[str, ...] = ()

    def validate(self) -> None:
        if not any(
            (
                self.domain,
                self.domain_suffix,
                self.domain_keyword,
                self.domain_regex,
                self.ip_cidr,
                self.port,
                self.inbound,
                self.domain_list,
                self.ip_list,
            )
        ):
            raise ConfigError(
                "a rule needs something to match (domain, domain_suffix, ip_cidr, port, ...)",
                key="policy",
            )


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """Which policy handles what is not matched by any rule, and learning."""

    default_policy: str = "direct"
    #: remember per site and network which strategy worked, and try it first next time
    learn: bool = True
    #: seconds a learned result stays valid
    learn_ttl: float = option(86400.0, check=positive)
    #: a name for the network you are on ("home", "office"); empty: derived from the gateway
    network: str = ""
    #: where learned results are kept; empty: the state directory
    state_file: str = ""
    #: JSON-lines log of blocking evidence; empty: the state directory
    evidence_file: str = ""
    #: rotate the evidence log at this size (bytes)
    evidence_max_bytes: int = option(10 * 1024 * 1024, check=positive)
    #: uncensored "host:port" sites: a strategy that fails a site is tried against one of these,
    #: and when it cannot reach that either it is broken here and nothing is learned about the site
    control: tuple[str, ...] = option((), each=_check_control)
    #: seconds a control probe may take
    control_timeout: float = option(5.0, check=positive)


def check_routing(
    strategies: tuple[StrategyConfig, ...],
    policies: tuple[PolicyConfig, ...],
    rules: tuple[RuleConfig, ...],
    router: RouterConfig,
) -> None:
    """Cross-references: names unique, policies name known strategies, rules known policies."""
    strategy_names = {"direct"}
    for i, s in enumerate(strategies):
        if s.name in strategy_names and s.name != "direct":
            raise ConfigError(f"strategy {s.name!r} is defined twice", key=f"strategy[{i}].name")
        if s.name == "direct" and s.type != "direct":
            raise ConfigError("the name 'direct' is reserved", key=f"strategy[{i}].name")
        strategy_names.add(s.name)
    policy_names = {"direct"}
    for i, p in enumerate(policies):
        if p.name in policy_names and p.name != "direct":
            raise ConfigError(f"policy {p.name!r} is defined twice", key=f"policy[{i}].name")
        policy_names.add(p.name)
        for j, name in enumerate(p.strategies):
            if name not in strategy_names:
                raise ConfigError(
                    f"no strategy is named {name!r}; known: {', '.join(sorted(strategy_names))}",
                    key=f"policy[{i}].strategies[{j}]",
                )
    for i, r in enumerate(rules):
        if r.policy not in policy_names:
            raise ConfigError(
                f"no policy is named {r.policy!r}; known: {', '.join(sorted(policy_names))}",
                key=f"rule[{i}].policy",
            )
    if router.default_policy not in policy_names:
        raise ConfigError(
            f"no policy is named {router.default_policy!r}; "
            f"known: {', '.join(sorted(policy_names))}",
            key="router.default_policy",
        )
