"""The router's config sections: ``[[strategy]]``, ``[[policy]]``, ``[[rule]]``, ``[router]``.

A *strategy* is one named way out (``direct``, an upstream ``socks5``/``http`` proxy, ``tor``,
or a ``fragment``/``disorder``/``oob`` re-framing of the client's first flight).
A *policy* is an ordered list of strategies and how to try them. A *rule* sends matching
connections to a policy; the first matching rule wins and ``[router] default_policy`` takes the
rest. A strategy named ``direct`` and a policy named ``direct`` (just that strategy) always
exist, so the smallest config needs none of these sections; so do the fragment strategies of
:data:`BUILTIN_STRATEGIES` and the policy ``fragment`` that tries them after ``direct``.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass
from typing import Literal

from proxy.configschema import between, non_negative, not_empty, option, positive
from proxy.errors import ConfigError
from proxy.protocols.splits import SplitPoint

StrategyType = Literal[
    "direct", "socks5", "http", "tor", "fragment", "disorder", "oob", "bridge", "front"
]
#: the carriers a front strategy can try, in their default order
FRONT_CARRIERS = ("ws", "split", "poll")
#: the strategy types that re-frame the client's first flight
FRAGMENT_TYPES = ("fragment", "disorder", "oob")


def _check_bridge_uri(text: str) -> None:
    from proxy.bridge.identity import parse_bridge_uri

    try:
        parse_bridge_uri(text)
    except ConfigError as exc:  # its message names the bad part, never the secret
        raise ValueError(f"not a valid bridge URI: {exc.key}: {exc.message}") from None


def _check_front(text: str) -> None:
    """a CDN name, or NAME@ADDRESS[:PORT] to dial that address ("cdn.example@192.0.2.9")."""
    from proxy.strategies.front import check_front

    check_front(text)


def _check_front_carrier(text: str) -> None:
    """one of "ws", "split", "poll" (in the order to try them)."""
    if text not in FRONT_CARRIERS:
        raise ValueError(f"{text[:20]!r} is not one of {', '.join(FRONT_CARRIERS)}")


def _check_rotate_after(value: int | str) -> None:
    if isinstance(value, int) and not (value == 0 or 4096 <= value <= 1 << 40):
        raise ValueError(f'must be "auto", 0 (never) or a number of bytes from 4096; got {value}')


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


def _factor(value: float) -> None:
    if value != 0 and value <= 1:
        raise ValueError(f"{value!r} must be 0 (off) or above 1, such as 8")


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


def _check_split(text: str) -> None:
    SplitPoint.parse(text)  # its ValueError says what is allowed


def _check_delay(value: float) -> None:
    if not 0 <= value <= 2:
        raise ValueError(f"must be from 0 to 2 seconds, got {value!r}")


def _check_host_header(text: str) -> None:
    if text.lower() != "host":
        raise ValueError(f'{text!r} is not "host" in some letter case, like "hOsT"')


def _check_host_space(text: str) -> None:
    if text.strip(" \t") or len(text) > 8:
        raise ValueError(f"{text!r} may only be up to 8 spaces or tabs (or empty)")


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
    #: bridge: the "sidestep://..." URI its operator gave you (a secret, masked in renders)
    uri: str | None = option(None, check=_check_bridge_uri, secret=True)
    #: bridge (ws carrier) and front: trust this CA file for the certificates, not the system's
    cafile: str | None = option(None, check=not_empty)
    #: front: the CDN names to reach the bridge through, tried in order ("NAME" or
    #: "NAME@ADDRESS[:PORT]"); empty: the URI's own front
    fronts: tuple[str, ...] = option((), each=_check_front)
    #: front: the carriers to try, in order
    carriers: tuple[str, ...] = option(FRONT_CARRIERS, each=_check_front_carrier)
    #: fragment/disorder/oob: where to cut the first flight ("sni-middle", "start+2", ...)
    split: tuple[str, ...] = option((), each=_check_split)
    #: fragment: cut the TLS ClientHello into several TLS records at the split points
    records: bool = False
    #: fragment: send the pieces as separate TCP segments
    segments: bool = True
    #: seconds to wait between pieces
    delay: float = option(0.0, check=_check_delay)
    #: disorder: the TTL (IPv6 hop limit) of the first piece, low enough to die on the way
    ttl: int = option(1, check=between(1, 255))
    #: plain HTTP: spell the Host header name like this ("hOsT")
    host_header: str | None = option(None, check=_check_host_header)
    #: plain HTTP: put exactly these spaces/tabs between "Host:" and the name
    host_space: str | None = option(None, check=_check_host_space)
    #: bridge and front: open a new carrier connection (the session carries on) before the
    #: current one has carried this many bytes either way; "auto": before the amount after
    #: which a connection froze on this network, once that happened; 0: never
    rotate_after: int | Literal["auto"] = option("auto", check=_check_rotate_after)

    def validate(self) -> None:
        self._validate_fragment()
        if self.type in ("socks5", "http") and self.server is None:
            raise ConfigError(f'a {self.type} strategy needs server = "ip:port"', key="server")
        if self.type == "direct" and self.server is not None:
            raise ConfigError("a direct strategy has no server", key="server")
        if (self.username is None) != (self.password is None):
            raise ConfigError("give both username and password, or neither", key="username")
        self._validate_bridge()

    def _validate_bridge(self) -> None:
        if self.type != "front":
            for key, unset in (("fronts", not self.fronts),
                               ("carriers", self.carriers == FRONT_CARRIERS)):  # fmt: skip
                if not unset:
                    raise ConfigError(f"only front strategies take {key}", key=key)
        if self.type not in ("bridge", "front"):
            if self.rotate_after != "auto":
                raise ConfigError(
                    "only bridge and front strategies take rotate_after", key="rotate_after"
                )
            for key in ("uri", "cafile"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"only bridge and front strategies take {key}", key=key)
            return
        if self.uri is None:
            raise ConfigError(f'a {self.type} strategy needs uri = "sidestep://..."', key="uri")
        from proxy.bridge.identity import parse_bridge_uri

        uri = parse_bridge_uri(self.uri)
        if self.type == "front":
            if uri.carrier == "raw":
                raise ConfigError(
                    "a front strategy needs a bridge URI with a web carrier (ws, split or poll)",
                    key="uri",
                )
            if not self.fronts and uri.front is None:
                raise ConfigError(
                    'a front strategy needs fronts = ["cdn-name", ...] or front= in its URI',
                    key="fronts",
                )
            if not self.carriers:
                raise ConfigError('name at least one carrier, like ["ws", "split", "poll"]',
                                  key="carriers")  # fmt: skip
            if len(set(self.carriers)) != len(self.carriers):
                raise ConfigError("a carrier is listed twice", key="carriers")
        elif uri.carrier not in ("raw", "ws") or uri.front is not None:
            raise ConfigError(
                'this URI goes through a CDN (front=, split or poll): use type = "front"',
                key="uri",
            )
        for key, unset in (
            ("server", self.server is None),
            ("username", self.username is None),
        ):
            if not unset:
                raise ConfigError(f"a bridge strategy takes no {key}", key=key)

    def _validate_fragment(self) -> None:
        if self.type not in FRAGMENT_TYPES:
            for key, unset in (
                ("split", not self.split),
                ("records", not self.records),
                ("delay", self.delay == 0),
                ("ttl", self.ttl == 1),
                ("host_header", self.host_header is None),
                ("host_space", self.host_space is None),
            ):
                if not unset:
                    raise ConfigError(
                        f"only fragment, disorder and oob strategies take {key}", key=key
                    )
            return
        if not self.split:
            raise ConfigError(
                f'a {self.type} strategy needs split = [...], like ["sni-middle"]', key="split"
            )
        if self.server is not None:
            raise ConfigError(f"a {self.type} strategy connects directly: no server", key="server")
        if self.username is not None:
            raise ConfigError(f"a {self.type} strategy has no login", key="username")
        if self.type != "fragment" and not self.segments:
            raise ConfigError(f"a {self.type} strategy always sends segments", key="segments")
        if self.type != "disorder" and self.ttl != 1:
            raise ConfigError("only disorder strategies take ttl", key="ttl")
        if not (self.records or self.segments):
            raise ConfigError("with records = false, segments must be true", key="segments")
        if self.type != "fragment" and not sys.platform.startswith("linux"):
            raise ConfigError(f"{self.type} strategies need Linux", key="type")


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
    #: who looks up names for matching connections: "default" (the [dns] resolver), "secure"
    #: (only the [dns] endpoints, never plain DNS) or "system" (the operating system's)
    resolver: Literal["default", "secure", "system"] = "default"

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

    #: "fragment": a plain connection first, the built-in tricks only after it failed
    default_policy: str = "fragment"
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
    #: the freeze window: a TLS connection whose server data stops, mid-record, after this
    #: many bytes and no more than freeze_max_bytes is judged frozen
    freeze_min_bytes: int = option(14 * 1024, check=positive)
    freeze_max_bytes: int = option(22 * 1024, check=positive)
    #: seconds the server's data must have stopped inside the window; 0 turns it off
    freeze_stall: float = option(3.0, check=non_negative)
    #: a transfer this many times slower than what this network achieved for other sites is
    #: judged throttled; 0 turns it off
    throttle_factor: float = option(8.0, check=_factor)

    def validate(self) -> None:
        if self.freeze_min_bytes > self.freeze_max_bytes:
            raise ConfigError(
                f"must not be above freeze_max_bytes ({self.freeze_max_bytes})",
                key="freeze_min_bytes",
            )


def _builtin_strategies() -> tuple[StrategyConfig, ...]:
    tricks = (
        # one write, legal TLS (RFC 8446 5.1): the server name is no longer inside the first
        # record, which is all that first-record inspection (TSPU) looks at
        StrategyConfig("tls-record-split", "fragment", split=("sni-middle",), records=True,
                       segments=False),
        # two TCP segments cut inside the name (or the Host value): per-segment inspection
        # never sees a whole name. No cut in the first bytes: a first segment too short to show
        # a TLS record header fails protocol allow-lists (Iran's, with a 60 s penalty for the
        # client/server pair that would also sink every trick after this one)
        StrategyConfig("tcp-segment-split", "fragment", split=("sni-middle", "host-middle")),
        # also cut in the record header, which first-record inspection (TSPU) cannot
        # reassemble, but protocol allow-lists punish: after the gentler splits
        StrategyConfig("tls-record-and-segment", "fragment", split=("start+2", "sni-middle"),
                       records=True),
        # plain HTTP only: the request line, then the Host line cut in its value, the field
        # name in mixed case and a tab after the colon (all legal HTTP)
        StrategyConfig("http-host-mix", "fragment", split=("host-line", "host-middle"),
                       host_header="hOsT", host_space="\t"),
    )  # fmt: skip
    if not sys.platform.startswith("linux"):
        return tricks
    linux = (
        StrategyConfig("oob", "oob", split=("sni-middle", "host-middle")),
        # costs a retransmission (a few hundred ms): last
        StrategyConfig("disorder", "disorder", split=("start+1",)),
    )
    return tricks + linux


#: strategies every config has without writing them, in the order the built-in policy tries them
BUILTIN_STRATEGIES: tuple[StrategyConfig, ...] = _builtin_strategies()
#: policies every config has: "fragment" tries a plain connection, then the tricks, cheapest and
#: least likely to upset a server first. It is the default policy, so its attempt timeout is
#: what a first visit to a site whose name is silently dropped costs before the first trick:
#: 4 s still leaves a slow server (or a satellite link) several round trips for its answer
BUILTIN_POLICIES: tuple[PolicyConfig, ...] = (
    PolicyConfig(
        "fragment", ("direct", *(s.name for s in BUILTIN_STRATEGIES)), attempt_timeout=4.0
    ),
)


def check_routing(
    strategies: tuple[StrategyConfig, ...],
    policies: tuple[PolicyConfig, ...],
    rules: tuple[RuleConfig, ...],
    router: RouterConfig,
) -> None:
    """Cross-references: names unique, policies name known strategies, rules known policies."""
    builtin = {s.name for s in BUILTIN_STRATEGIES}
    strategy_names = {"direct", *builtin}
    for i, s in enumerate(strategies):
        if s.name in builtin:
            raise ConfigError(
                f"{s.name!r} is a built-in strategy; give yours another name",
                key=f"strategy[{i}].name",
            )
        if s.name in strategy_names and s.name != "direct":
            raise ConfigError(f"strategy {s.name!r} is defined twice", key=f"strategy[{i}].name")
        if s.name == "direct" and s.type != "direct":
            raise ConfigError("the name 'direct' is reserved", key=f"strategy[{i}].name")
        strategy_names.add(s.name)
    builtin_policies = {p.name for p in BUILTIN_POLICIES}
    policy_names = {"direct", *builtin_policies}
    for i, p in enumerate(policies):
        if p.name in builtin_policies:
            raise ConfigError(
                f"{p.name!r} is a built-in policy; give yours another name",
                key=f"policy[{i}].name",
            )
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
