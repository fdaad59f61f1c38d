"""sidestep's configuration: one TOML file, typed, checked once at load, then immutable.

Each section is a frozen dataclass below; :mod:`proxy.configschema` builds them from the TOML
by reading their type hints, rejects unknown keys and wrong types, and reports every mistake as
a :class:`~proxy.errors.ConfigError` naming the key path and its line. Everything has a default,
so an empty file is a valid config; with no file at all the embedded ``proxy/default.toml`` is
used, which spells those defaults out with an explanation for each key.

Adding a section is declaring a dataclass and adding a field of that type to :class:`Config`.
There is no global config object: the app passes the parts each service needs.
"""

from __future__ import annotations

import functools
import importlib.resources
import ipaddress
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from proxy.configschema import (
    between,
    from_toml,
    non_negative,
    not_empty,
    option,
    positive,
    to_toml,
)
from proxy.errors import ConfigError
from proxy.routerconfig import (
    PolicyConfig,
    RouterConfig,
    RuleConfig,
    StrategyConfig,
    check_routing,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: the proxy languages an inbound can speak
InboundProtocol = Literal["mixed", "socks5", "socks4", "http", "transparent"]
LogLevel = Literal["debug", "info", "warning", "error"]

#: the ``source`` of errors in the configuration compiled into sidestep
DEFAULT_SOURCE = "<embedded default>"

#: who may use a listener on a loopback address when it has no ``allow`` list
LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)

#: inbound protocols able to relay UDP (SOCKS5 UDP ASSOCIATE)
UDP_PROTOCOLS = frozenset({"socks5", "mixed"})

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# --- value rules -------------------------------------------------------------------------------


def parse_dns_server(text: str) -> tuple[str, int]:
    """``"192.0.2.53"``, ``"192.0.2.53:5353"``, ``"[2001:db8::53]:53"`` -> (ip, port).

    A DNS server is always an IP literal: looking up the resolver's own name would need a
    resolver. Raises ``ValueError`` saying why not.
    """
    host, port = text, "53"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            host, port = text.strip("[]"), "53"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address; a DNS server must be one") from None
    if not (port.isascii() and port.isdigit()) or not 0 < int(port) <= 65535:
        raise ValueError(f"{port!r} is not a port; use a number from 1 to 65535")
    return str(ip), int(port)


def _check_dns_server_ip(value: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address") from None


def _check_dns_server(value: str) -> None:
    parse_dns_server(value)


def _check_optional_dns_server(value: str) -> None:
    if value:
        parse_dns_server(value)


def _check_dns_name(value: str) -> None:
    labels = value.rstrip(".").split(".")
    if not value or any(not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", label) for label in labels):
        raise ValueError(f'{value!r} is not a DNS name; write one like "example.com"')


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``"127.0.0.1:1080"``, ``"[::1]:1080"`` or ``"localhost:1080"`` into host and port.

    The host must be an IP literal or ``localhost`` (a listener never depends on DNS). Port 0
    asks the system for any free port, which tests use. Raises ``ValueError`` saying why not.
    """
    example = 'write "host:port", such as "127.0.0.1:1080" or "[::1]:1080"'
    if listen.startswith("["):
        host, sep, port = listen[1:].partition("]:")
        if not sep:
            raise ValueError(f"{listen!r} is not an address; {example}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} inside brackets is not an IPv6 address") from None
    else:
        host, sep, port = listen.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{listen!r} is not an address; {example}")
        if ":" in host:
            raise ValueError(f'an IPv6 address needs brackets around it, like "[{host}]:{port}"')
        if host != "localhost":
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(
                    f"{host!r} is not an IP address; listen on an IP address or localhost"
                ) from None
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"{port!r} is not a port; use a number from 1 to 65535")
    return host, int(port)


def _check_listen(listen: str) -> None:
    parse_listen(listen)


def _check_network(text: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f'{text!r} is not an IP address or network; write one like "192.168.0.0/16"'
        ) from None


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a usable name; use letters, digits, '-', '_' and '.'")


def _check_credential(text: str) -> None:
    # SOCKS5 password authentication (RFC 1929) carries each field in 1 to 255 bytes
    if not 1 <= len(text.encode()) <= 255:
        raise ValueError("must be 1 to 255 bytes long")


# --- sections ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UserConfig:
    """One username/password pair allowed to use an inbound."""

    username: str = option(check=_check_credential)
    password: str = option(check=_check_credential, secret=True)

    def validate(self) -> None:
        if ":" in self.username:
            raise ConfigError(
                "a username cannot contain ':' (HTTP proxy authentication could not send it)",
                key="username",
            )


class _Listener:
    """What config sections that open a port guarded by an ``allow`` list share: their
    ``listen`` and ``allow`` fields (declared by each dataclass) and the rule that a port other
    machines can reach must say which of them may use it."""

    __slots__ = ()

    if TYPE_CHECKING:
        listen: str
        allow: tuple[str, ...]

    @property
    def address(self) -> tuple[str, int]:
        """``listen`` split into host and port."""
        return parse_listen(self.listen)

    @property
    def is_loopback(self) -> bool:
        """True when only this machine can reach the listener."""
        host = self.address[0]
        return host == "localhost" or ipaddress.ip_address(host).is_loopback

    @property
    def effective_allow(self) -> tuple[IPNetwork, ...]:
        """The client networks actually admitted: ``allow``, or loopback when it is empty."""
        if self.allow:
            return tuple(ipaddress.ip_network(a, strict=False) for a in self.allow)
        return LOOPBACK_NETWORKS

    def require_allow(self, what: str, risk: str) -> None:
        """Refuse a listener other machines can reach when it has no allow list."""
        if not self.allow and not self.is_loopback:
            raise ConfigError(
                f"{what} on {self.address[0]} can be reached by other machines, so it needs an "
                'allow list of the client networks it serves, e.g. allow = ["192.168.0.0/16"]; '
                f"{risk}",
                key="listen",
            )


@dataclass(frozen=True, slots=True)
class InboundConfig(_Listener):
    """One listening socket and the proxy protocol its clients speak."""

    #: how log lines and rules refer to this inbound; unique
    name: str = option(check=_check_name)
    #: "mixed" answers SOCKS5, SOCKS4/4a and HTTP proxy requests on one port
    protocol: InboundProtocol = "mixed"
    #: "host:port" to listen on
    listen: str = option("127.0.0.1:1080", check=_check_listen)
    #: client networks allowed to connect; empty means loopback only (see effective_allow)
    allow: tuple[str, ...] = option((), each=_check_network)
    #: when non-empty, clients must log in with one of these
    users: tuple[UserConfig, ...] = ()
    #: seconds a client gets to finish its proxy handshake
    handshake_timeout: float = option(10.0, check=positive)
    #: allow SOCKS5 UDP ASSOCIATE (no effect on socks4 and http, which cannot carry UDP)
    udp: bool = True
    #: seconds an idle HTTP keep-alive client connection is kept open
    idle_timeout: float = option(300.0, check=positive)

    def validate(self) -> None:
        self.require_allow(
            "an inbound",
            "without one anybody who can reach the port could use your connection (an open proxy)",
        )
        seen: set[str] = set()
        for i, user in enumerate(self.users):
            if user.username in seen:
                raise ConfigError(
                    f"username {user.username!r} is listed twice", key=f"users[{i}].username"
                )
            seen.add(user.username)
        if self.users and self.protocol == "socks4":
            raise ConfigError(
                "SOCKS4 has no passwords; use protocol socks5, http or mixed to require a login",
                key="users",
            )


@dataclass(frozen=True, slots=True)
class OutboundConfig:
    """How sidestep connects to destinations."""

    #: seconds to wait for a TCP connection to be established
    connect_timeout: float = option(10.0, check=positive)
    #: seconds between starting attempts on successive addresses (RFC 8305 "Happy Eyeballs")
    happy_eyeballs_delay: float = option(0.25, check=non_negative)


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    """The first bytes of a tunnel, read before choosing how to reach the destination."""

    #: most bytes of the client's first flight held back for inspection
    first_flight_max: int = option(16384, check=between(1, 65536))
    #: seconds to wait for the client to speak first before assuming the server will
    first_flight_wait: float = option(0.25, check=non_negative)
    #: seconds allowed to gather a complete TLS ClientHello
    first_flight_timeout: float = option(5.0, check=positive)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Copying bytes between client and destination once a tunnel is up."""

    #: seconds a tunnel may carry nothing in either direction before it is closed
    idle_timeout: float = option(300.0, check=positive)
    #: bytes read at a time in each direction
    buffer_size: int = option(65536, check=between(4096, 1048576))
    #: let the kernel copy bytes directly (Linux splice) when nothing needs to look at them
    splice: bool = True


def _check_endpoint_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "tls") or not parts.hostname:
        raise ValueError(
            f"{url!r}: write https://host/path for DNS over HTTPS or tls://host[:port] for "
            "DNS over TLS"
        )


@dataclass(frozen=True, slots=True)
class DnsEndpointConfig:
    """One DNS-over-HTTPS or DNS-over-TLS server."""

    #: https://host[:port]/path (DoH, RFC 8484) or tls://host[:port] (DoT, RFC 7858)
    url: str = option(check=_check_endpoint_url)
    #: the server's IP addresses, so reaching it needs no plaintext lookup of its own name
    bootstrap: tuple[str, ...] = option(each=_check_dns_server_ip)
    #: a CA bundle to trust instead of the system's (private resolvers)
    cafile: str | None = option(None, check=not_empty)
    #: base64 SHA-256 pins of the server's public key (SPKI); any one must match
    pin_sha256: tuple[str, ...] = ()

    def validate(self) -> None:
        if not self.bootstrap:
            raise ConfigError("a secure endpoint needs its bootstrap IP addresses", key="bootstrap")


@dataclass(frozen=True, slots=True)
class DnsServerConfig(_Listener):
    """sidestep's own DNS server, for devices and programs that do not use the proxy for names."""

    #: answer DNS queries (UDP and TCP) on `listen`
    enabled: bool = False
    #: "host:port" to listen on, UDP and TCP alike
    listen: str = option("127.0.0.1:5353", check=_check_listen)
    #: client networks answered; empty means loopback only. Required off loopback
    allow: tuple[str, ...] = option((), each=_check_network)
    #: queries per second one client address may send (0: no limit); the rest are dropped
    rate_limit: int = option(100, check=between(0, 1_000_000))
    #: queries a client may send at once above the rate before the limit applies
    burst: int = option(200, check=between(1, 1_000_000))
    #: seconds an idle DNS-over-TCP connection is kept open
    tcp_idle_timeout: float = option(10.0, check=positive)

    def validate(self) -> None:
        if self.enabled:
            self.require_allow(
                "a DNS server",
                "without one anybody could use it (an open resolver, abused for floods)",
            )


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """Turning destination names into addresses."""

    #: "system" asks the operating system's resolver; "udp" asks `servers` directly over
    #: plain DNS (UDP, TCP when the answer is truncated); "secure" asks `endpoints` (DNS over
    #: HTTPS or TLS) in order, and no plaintext query leaves; "auto" starts like "system"
    #: (or "udp" when `servers` are given), checks for tampering, and switches to `endpoints`
    resolver: Literal["system", "udp", "secure", "auto"] = "system"
    #: "ip" or "ip:port" of plain DNS servers, tried in order (for resolver = "udp")
    servers: tuple[str, ...] = option((), each=_check_dns_server)
    #: secure endpoints for resolver = "secure", tried in order
    endpoints: tuple[DnsEndpointConfig, ...] = ()
    #: how secure endpoints are asked: "race" starts the next one every `stagger` seconds
    #: while earlier ones are pending; "fallback" asks one after another
    order: Literal["race", "fallback"] = "race"
    #: seconds between race starts
    stagger: float = option(0.3, check=non_negative)
    #: names whose plain and secure answers are compared by the tampering checks
    canaries: tuple[str, ...] = option((), each=_check_dns_name)
    #: random names under this suffix must not resolve (NXDOMAIN hijack check)
    nxdomain_suffix: str = option("com", check=_check_dns_name)
    #: "ip" or "ip:port" where no DNS server listens: an answer from there was injected on the
    #: path; "" turns the injection check off
    silent_server: str = option("192.0.2.53", check=_check_optional_dns_server)
    #: answers in these networks are not taken for lies (your LAN's own names)
    local_networks: tuple[str, ...] = option((), each=_check_network)
    #: addresses of block pages, on top of the known ones
    blockpage_ips: tuple[str, ...] = option((), each=_check_dns_server_ip)
    #: CA bundle used to check a site's certificate when two answers disagree; "": the system's
    check_cafile: str | None = option(None, check=not_empty)
    #: port the certificate check connects to
    check_port: int = option(443, check=between(1, 65535))
    #: seconds between tampering checks in "auto" mode (also re-run when the network changes)
    check_interval: float = option(3600.0, check=positive)
    #: in secure mode, also send each name to the plain resolver and ignore the answer, for
    #: networks that block connections to addresses never looked up in plaintext (Iran)
    decoy: bool = False
    #: strategies (socks5/http/tor) that carry DNS-over-HTTPS when every endpoint is blocked
    via: tuple[str, ...] = ()
    #: seconds to wait for an answer
    timeout: float = option(5.0, check=positive)
    #: answers kept in memory (0 turns the cache off)
    cache_size: int = option(10000, check=between(0, 10_000_000))
    #: seconds every answer is kept at least, whatever its TTL says (0: honour the TTL)
    min_ttl: int = option(0, check=between(0, 86400))
    #: seconds any answer is kept at most
    max_ttl: int = option(86400, check=between(0, 604800))
    #: seconds a negative answer (no such name, no such record) is kept at most
    negative_ttl: int = option(300, check=between(0, 86400))
    #: seconds an expired answer is still given out when every upstream fails (0: never)
    serve_stale: int = option(86400, check=between(0, 604800))
    #: ask again for popular names shortly before their answers expire
    prefetch: bool = True
    #: the local DNS server
    server: DnsServerConfig = field(default_factory=DnsServerConfig)

    def validate(self) -> None:
        if self.min_ttl > self.max_ttl:
            raise ConfigError(
                f"min_ttl ({self.min_ttl}) is larger than max_ttl ({self.max_ttl}); "
                "min_ttl must be at most max_ttl",
                key="min_ttl",
            )
        if self.resolver == "secure" and not self.endpoints:
            raise ConfigError(
                'resolver = "secure" needs at least one [[dns.endpoints]] with url and bootstrap',
                key="endpoints",
            )
        if self.resolver == "auto" and not self.endpoints:
            raise ConfigError(
                'resolver = "auto" needs at least one [[dns.endpoints]] to switch to',
                key="endpoints",
            )
        if self.resolver == "udp" and not self.servers:
            raise ConfigError(
                'resolver = "udp" needs at least one server, e.g. servers = ["192.0.2.53:53"]',
                key="servers",
            )

    @property
    def server_addresses(self) -> tuple[tuple[str, int], ...]:
        """``servers`` as (ip, port) pairs."""
        return tuple(parse_dns_server(s) for s in self.servers)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """What sidestep writes about its work."""

    level: LogLevel = "info"
    #: one JSON object per line instead of plain text
    json: bool = False
    #: write to this file instead of standard error
    file: str | None = option(None, check=not_empty)


@dataclass(frozen=True, slots=True)
class ShutdownConfig:
    """Stopping gracefully."""

    #: seconds open connections get to finish after a stop is requested
    drain_timeout: float = option(10.0, check=non_negative)


@dataclass(frozen=True, slots=True)
class WebConfig(_Listener):
    """The status page, ``/metrics``, ``/api/status`` and ``/proxy.pac`` on one web port."""

    #: serve them at all
    enabled: bool = True
    #: "host:port" of the web port
    listen: str = option("127.0.0.1:9099", check=_check_listen)
    #: client networks served; empty means loopback only. Required off loopback
    allow: tuple[str, ...] = option((), each=_check_network)
    #: seconds a client gets to send a request, and to take the answer
    timeout: float = option(10.0, check=positive)

    def validate(self) -> None:
        if self.enabled:
            self.require_allow("a status page", "the page lists the sites being visited")


def _default_inbounds() -> tuple[InboundConfig, ...]:
    return (InboundConfig(name="mixed"),)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration."""

    inbound: tuple[InboundConfig, ...] = field(default_factory=_default_inbounds)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown: ShutdownConfig = field(default_factory=ShutdownConfig)
    web: WebConfig = field(default_factory=WebConfig)
    strategy: tuple[StrategyConfig, ...] = ()
    policy: tuple[PolicyConfig, ...] = ()
    rule: tuple[RuleConfig, ...] = ()
    router: RouterConfig = field(default_factory=RouterConfig)

    def validate(self) -> None:
        check_routing(self.strategy, self.policy, self.rule, self.router)
        for i, rule in enumerate(self.rule):
            if rule.resolver == "secure" and not self.dns.endpoints:
                raise ConfigError(
                    'resolver = "secure" needs at least one [[dns.endpoints]] to ask',
                    key=f"rule[{i}].resolver",
                )
        carriers = {s.name for s in self.strategy if s.type != "direct"}
        for i, name in enumerate(self.dns.via):
            if name not in carriers:
                known = ", ".join(sorted(carriers)) or "none are configured"
                raise ConfigError(
                    f"dns.via names {name!r}, which is not a socks5, http or tor strategy "
                    f"(those can carry DNS over HTTPS; known: {known})",
                    key=f"dns.via[{i}]",
                )
        if not self.inbound:
            raise ConfigError(
                "at least one [[inbound]] is needed, or sidestep would listen nowhere",
                key="inbound",
            )
        names: dict[str, int] = {}
        listens: dict[tuple[str, int], str] = {}
        for i, inbound in enumerate(self.inbound):
            if inbound.name in names:
                raise ConfigError(
                    f"the name {inbound.name!r} is already used by inbound[{names[inbound.name]}]; "
                    "every inbound needs its own name",
                    key=f"inbound[{i}].name",
                )
            names[inbound.name] = i
            host, port = inbound.address
            if port and (host, port) in listens:
                raise ConfigError(
                    f"inbound {listens[host, port]!r} already listens on {inbound.listen}",
                    key=f"inbound[{i}].listen",
                )
            listens[host, port] = inbound.name


# --- loading and showing -----------------------------------------------------------------------


def parse_config(text: str, source: str) -> Config:
    """Build a :class:`Config` from TOML ``text``; ``source`` names it in error messages."""
    return from_toml(Config, text, source)


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read the config file at ``path``, or the embedded default when ``path`` is ``None``."""
    if path is None:
        return default_config()
    source = os.fspath(path)
    try:
        raw = Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", source=source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError("the file is not UTF-8 text", line=line, source=source) from None
    return parse_config(text, source)


def default_config_text() -> str:
    """The text of the embedded default configuration (``proxy/default.toml``)."""
    return importlib.resources.files("proxy").joinpath("default.toml").read_text(encoding="utf-8")


@functools.cache
def default_config() -> Config:
    """The configuration used when no file is given (immutable, so it is built once)."""
    return parse_config(default_config_text(), DEFAULT_SOURCE)


def render_config(config: Config, mask_secrets: bool = True) -> str:
    """The effective configuration as TOML, every key included.

    With ``mask_secrets`` passwords read ``"***"``; without it, parsing the text gives back a
    config equal to ``config``.
    """
    head = "# sidestep effective configuration"
    if mask_secrets:
        head += ' (passwords are shown as "***")'
    return f"{head}\n\n{to_toml(config, mask_secrets=mask_secrets)}"
