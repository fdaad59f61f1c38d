"""The lab's scenarios and the runner that fetches them through a proxy.

A scenario is one URL in the lab world whose right content is known in advance (``hello from
<name> ...`` or ``/bytes/N`` of the origin's pattern). :func:`fetch` gets it the way an
application would through sidestep: SOCKS5 CONNECT by name (:class:`Socks5ClientConnection` over a
trio TCP stream), TLS with the lab CA for https, one HTTP/1.1 GET with h11. It records what came
back (status, bytes, SHA-256, time) and how it failed: ``reset``, ``timeout``, ``eof``, ``tls``
(certificate or handshake), ``socks`` (the proxy could not connect), ``http`` (another status,
a block page), ``wrong-body``, ``truncated``, ``proxy`` (the proxy itself failed or is not
there). A scenario passes only when the expected body
arrived intact, which is the user's question: does this config get through this censor?

:func:`run_scenarios` runs a table against a lab concurrently (scenarios sharing a server
address run in table order, so residual blocking on one cannot race another) and joins each
fetch with sidestep's own log line for that connection (verdict and strategy, captured from the
``sidestep.conn`` logger by :func:`capture_connections`) and with the lab's record of what the
censor did to that name. :func:`run_check` is ``sidestep lab --check``: a lab, an in-process
sidestep with the user's config pointed into it, and the whole table.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from proxy.app import App
from proxy.bridge.identity import parse_bridge_uri
from proxy.config import (
    Config,
    DnsEndpointConfig,
    InboundConfig,
    default_config,
    parse_dns_server,
)
from proxy.errors import ProxyError, ResolveError
from proxy.inbound.base import IPAddress
from proxy.lab import world
from proxy.lab.ca import LabCA
from proxy.lab.origin import pattern_bytes
from proxy.lab.profiles import Profile
from proxy.lab.world import Lab, LabPorts, open_lab, reraise_single
from proxy.net.stream import TcpStream
from proxy.protocols import socks5
from proxy.resolve.base import Resolver
from proxy.routerconfig import StrategyConfig, split_server
from proxy.strategies.fragment import FragmentStrategy

__all__ = [
    "SCENARIOS", "CheckReport", "ConnectionLog", "Fetch", "LabOnlyResolver", "RunningSidestep",
    "Scenario", "ScenarioResult", "capture_connections", "fetch", "lab_config", "open_sidestep",
    "pace_fragments", "pace_strategies", "run_check", "run_scenarios",
]  # fmt: skip

Address = tuple[str, int]

#: the inbound ``lab --check`` gives sidestep
CHECK_INBOUND = "lab-check"
_LINGER_ABORT = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One URL of the lab world and what it shows."""

    id: str
    name: str
    scheme: str = "https"
    path: str = "/"
    note: str = ""

    def url(self, lab: Lab) -> str:
        return lab.url(self.name, self.path, self.scheme)

    def expected(self, lab: Lab) -> bytes:
        """The body the origin sends for this URL."""
        if self.path.startswith("/bytes/"):
            return pattern_bytes(int(self.path[7:]))
        host = lab.host_header(self.name, self.scheme)
        return f"hello from {self.name} (host {host})\n".encode()


KIB64 = "/bytes/65536"

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("open", world.OPEN, note="never censored: the control"),
    Scenario("open-http", world.OPEN, "http", note="plain-HTTP control"),
    Scenario("open-large", world.OPEN, path="/bytes/262144", note="throughput control"),
    Scenario("blocked", world.BLOCKED, note="listed by name everywhere"),
    Scenario("twitter", world.TWITTER, path=KIB64, note="listed, throttled in 2021"),
    Scenario("microsoft", world.MICROSOFT, path=KIB64, note="collateral of the *t.co* glob"),
    Scenario("throttled", world.THROTTLED, path=KIB64, note="throttled by name"),
    Scenario("frozen", world.FROZEN, path=KIB64, note="foreign hosting: frozen after 16 KiB"),
    Scenario("ip-blocked", world.IP_BLOCKED, note="blocked by address"),
    Scenario("poisoned", world.POISONED, note="censored only in DNS"),
    Scenario("http-blocked", world.HTTP_BLOCKED, "http", note="plain HTTP, block page"),
    Scenario("front", world.CDN_FRONT, note="the CDN's innocuous front"),
    Scenario("backend", world.CDN_BACKEND, note="listed, reachable by fronting"),
)


# --- one fetch ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetch:
    """What one fetch through the proxy got."""

    #: the expected body arrived whole (always False when nothing was expected)
    ok: bool
    #: a short human summary ("200, 64.0 KiB intact", "reset during tls", ...)
    got: str
    #: None, or one of reset, timeout, eof, tls, socks, proxy, http, wrong-body, truncated
    error: str | None
    status: int | None
    received: int
    sha256: str
    elapsed: float
    #: our address as the proxy saw it (how its log line is found)
    client: Address | None


class _SocksFailed(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class _Prefixed(trio.abc.Stream):
    """A stream that first returns bytes already read (what followed the SOCKS reply)."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self.inner = inner
        self.prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass(slots=True)
class _Progress:
    stage: str = "proxy"
    status: int | None = None
    reason: str = ""
    received: int = 0
    client: Address | None = None
    complete: bool = False
    digest: Any = field(default_factory=hashlib.sha256)


async def _socks_connect(tcp: trio.SocketStream, host: str, port: int) -> bytes:
    """SOCKS5 CONNECT by name; returns bytes that came after the reply."""
    client = socks5.Socks5ClientConnection()
    await tcp.send_all(client.data_to_send())
    while client.state is not socks5.ClientState.ESTABLISHED:
        data = await tcp.receive_some(4096)
        events = client.receive_data(data) if data else client.receive_eof()
        for event in events:
            if (
                isinstance(event, socks5.MethodSelected)
                and client.state is socks5.ClientState.READY
            ):
                request = socks5.CommandRequested(
                    socks5.Command.CONNECT, host, port, socks5.AddressType.DOMAIN
                )
                client.send(request)
            elif isinstance(event, socks5.Reply) and event.code != socks5.ReplyCode.SUCCEEDED:
                raise _SocksFailed(event.code.name.lower().replace("_", " "))
        if client.state is socks5.ClientState.CLOSED:
            raise _SocksFailed("the proxy refused us")
        out = client.data_to_send()
        if out:
            await tcp.send_all(out)
    return client.trailing_data


async def _get(proxy: Address, url: str, tls: ssl.SSLContext | None, progress: _Progress) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    tcp = await trio.open_tcp_stream(*proxy)
    sockname = tcp.socket.getsockname()
    progress.client = (sockname[0], sockname[1])
    stream: trio.abc.Stream = tcp
    try:
        rest = await _socks_connect(tcp, host, port)
        stream = _Prefixed(tcp, rest)
        if parts.scheme == "https":
            assert tls is not None  # fetch() checked it
            progress.stage = "tls"
            stream = trio.SSLStream(stream, tls, server_hostname=host, https_compatible=True)
            await stream.do_handshake()
        progress.stage = "http"
        conn = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", parts.netloc),
            ("User-Agent", "sidestep-lab-check"),
            ("Accept", "*/*"),
            ("Connection", "close"),
        ]
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        await stream.send_all(conn.send(h11.Request(method="GET", target=target, headers=headers)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                progress.status, progress.reason = event.status_code, event.reason.decode()
            elif isinstance(event, h11.Data):
                progress.received += len(event.data)
                progress.digest.update(event.data)
            elif isinstance(event, h11.EndOfMessage):
                progress.complete = True
                return
    finally:
        if not progress.complete:
            # abort (RST) rather than close, so the proxy's tunnel ends now and logs its line
            tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ABORT)
        await trio.aclose_forcefully(stream)


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _classify(exc: BaseException, progress: _Progress) -> tuple[str, str]:
    """``(error, got)`` for a fetch that raised ``exc``."""
    if progress.stage != "http":
        where = f"during {progress.stage}"
    elif progress.status is None:
        where = "before any response"
    else:
        where = f"after {_size(progress.received)} of the body"
    if isinstance(exc, _SocksFailed):
        return "socks", f"proxy could not connect: {exc.why}"
    for cause in _causes(exc):
        if isinstance(cause, ConnectionResetError):
            return "reset", f"reset {where}"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return "tls", f"certificate refused: {cause.verify_message}"
        if isinstance(cause, ssl.SSLEOFError):
            return "eof", f"closed {where}"
        if isinstance(cause, ssl.SSLError):
            return "tls", f"tls error: {cause.reason or cause}"
    if isinstance(exc, h11.RemoteProtocolError):
        return ("eof" if progress.status is None else "truncated"), f"closed {where}"
    if isinstance(exc, OSError):
        return "proxy", f"cannot reach the proxy: {exc.strerror or exc}"
    if isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError):
        return "eof", f"closed {where}"
    if isinstance(exc, ProxyError):
        return "proxy", f"proxy error {where}: {exc}"
    raise exc


async def fetch(
    proxy: Address,
    url: str,
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5.0,
    expected: bytes | None = None,
) -> Fetch:
    """GET ``url`` through the SOCKS5 proxy at ``proxy`` and say what arrived.

    ``tls`` is the client context for https URLs (the lab CA's :meth:`LabCA.client_context`).
    """
    if url.startswith("https:") and tls is None:
        raise ValueError("an https URL needs a TLS context")
    progress = _Progress()
    start = trio.current_time()
    error: str | None = None
    got = ""
    try:
        with trio.fail_after(timeout):
            await _get(proxy, url, tls, progress)
    except trio.TooSlowError:
        error = "timeout"
        if progress.status is None:
            got = f"timeout during {progress.stage}"
        else:
            got = f"timeout after {_size(progress.received)}"
            if expected is not None:
                got += f" of {_size(len(expected))} (too slow or frozen)"
    except Exception as exc:
        error, got = _classify(exc, progress)
    elapsed = trio.current_time() - start
    digest = progress.digest.hexdigest()
    if error is None:
        size = _size(progress.received)
        if progress.status != 200:
            error, got = "http", f"HTTP {progress.status} {progress.reason}, {size}"
        elif expected is not None and digest != hashlib.sha256(expected).hexdigest():
            error, got = "wrong-body", f"HTTP 200 but not the expected content ({size})"
        else:
            got = f"200, {size} intact"
    ok = error is None and expected is not None
    return Fetch(ok, got, error, progress.status, progress.received, digest, elapsed,
                 progress.client)  # fmt: skip


# --- sidestep's side of the story --------------------------------------------------------------


class ConnectionLog(logging.Handler):
    """Keeps the structured fields of sidestep's per-connection log lines, by client address."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: dict[str, dict[str, Any]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and "client" in fields:
            self.lines[str(fields["client"])] = dict(fields)

    def get(self, client: Address | None) -> dict[str, Any] | None:
        return None if client is None else self.lines.get(f"{client[0]}:{client[1]}")

    async def wait_for(self, clients: Sequence[Address], timeout: float) -> None:
        """Wait until every client has its line (a tunnel logs when it ends), or ``timeout``."""
        with trio.move_on_after(timeout):
            while any(self.get(c) is None for c in clients):
                await trio.sleep(0.01)


@contextmanager
def capture_connections(*, quiet: bool = True) -> Iterator[ConnectionLog]:
    """Collect ``sidestep.conn`` lines while the block runs (``quiet``: only here)."""
    logger = logging.getLogger("sidestep.conn")
    handler = ConnectionLog()
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    if quiet:
        logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


# --- running a table ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """A scenario's fetch, joined with sidestep's log line and the lab's record."""

    scenario: Scenario
    url: str
    #: what the profile does to this name, predicted from its rules
    censor: str
    fetch: Fetch
    #: sidestep's verdict for the connection ("-" if it logged none)
    verdict: str
    #: the strategy sidestep says it used ("-" if it logged none)
    strategy: str
    #: what the lab recorded doing to this name: action values ("reset", "inject_race", ...)
    lab_actions: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return self.fetch.ok

    def to_json(self) -> dict[str, Any]:
        f = self.fetch
        return {
            "scenario": self.scenario.id,
            "url": self.url,
            "censor": self.censor,
            "passed": self.passed,
            "got": f.got,
            "error": f.error,
            "status": f.status,
            "bytes": f.received,
            "sha256": f.sha256,
            "time": round(f.elapsed, 3),
            "verdict": self.verdict,
            "strategy": self.strategy,
            "lab": list(self.lab_actions),
        }


async def run_scenarios(
    lab: Lab,
    proxy: Address,
    scenarios: Sequence[Scenario] = SCENARIOS,
    *,
    timeout: float = 5.0,
    connections: ConnectionLog | None = None,
) -> list[ScenarioResult]:
    """Fetch every scenario through ``proxy``; results in table order."""
    tls = lab.ca.client_context()
    fetched: dict[int, Fetch] = {}
    groups: dict[str, list[int]] = {}
    for i, sc in enumerate(scenarios):
        groups.setdefault(lab.address(sc.name, sc.scheme)[0], []).append(i)

    async def run_group(indexes: list[int]) -> None:
        for i in indexes:
            sc = scenarios[i]
            fetched[i] = await fetch(
                proxy, sc.url(lab), tls=tls, timeout=timeout, expected=sc.expected(lab)
            )

    async with trio.open_nursery() as nursery:
        for indexes in groups.values():
            nursery.start_soon(run_group, indexes)
    if connections is not None:
        clients = [f.client for f in fetched.values() if f.client is not None]
        await connections.wait_for(clients, timeout=2.0)
    results = []
    for i, sc in enumerate(scenarios):
        f = fetched[i]
        line = connections.get(f.client) if connections is not None else None
        verdict = str(line.get("verdict") or line.get("outcome") or "-") if line else "-"
        strategy = str(line.get("strategy") or "-") if line else "-"
        events = lab.events(sc.name)
        actions = tuple(dict.fromkeys(e.action for e in events if e.action != "forward"))
        describe = lab.describe(sc.name, sc.scheme)
        results.append(ScenarioResult(sc, sc.url(lab), describe, f, verdict, strategy, actions))
    return results


# --- lab --check -------------------------------------------------------------------------------


def lab_config(config: Config, lab: Lab) -> Config:
    """``config`` pointed into ``lab``: one SOCKS5 inbound on a free port, the ISP resolver as
    the system resolver, plain-DNS servers outside the lab replaced by its public resolver (a
    check never sends a query out of the lab), and no drain time."""
    inbound = InboundConfig(name=CHECK_INBOUND, protocol="socks5", listen="127.0.0.1:0", udp=False)
    dns = config.dns
    isp = f"{lab.isp_resolver[0]}:{lab.isp_resolver[1]}"
    if dns.resolver == "system":
        dns = replace(dns, resolver="udp", servers=(isp,))
    elif dns.resolver == "auto" and not dns.servers:
        # auto's plain side is the system resolver: inside the lab, the ISP's
        dns = replace(dns, servers=(isp,))
    if dns.resolver in ("udp", "auto"):
        # a lab resolver keeps its role at the lab's actual port; anything else is "a public
        # resolver out there", which inside the lab is the public resolver address
        ours = {a[0]: a for a in (lab.isp_resolver, lab.public_resolver, lab.silent_resolver,
                                  lab.authoritative)}  # fmt: skip
        servers = [ours.get(parse_dns_server(s)[0], lab.public_resolver) for s in dns.servers]
        dns = replace(dns, servers=tuple(dict.fromkeys(f"{ip}:{port}" for ip, port in servers)))
    if dns.resolver in ("secure", "auto"):
        # DoH/DoT providers out there are, inside the lab, the lab's own DoH servers (the
        # famous one first, as the real famous ones usually come first in configs)
        endpoints = tuple(
            DnsEndpointConfig(url=ep.url, bootstrap=ep.bootstrap, cafile=str(lab.ca_file))
            for ep in sorted(lab.doh_endpoints, key=lambda ep: not ep.famous)
        )
        dns = replace(dns, endpoints=endpoints)
    if dns.resolver == "auto":
        # the injection probe's silent address and the certificate checks stay in the lab too
        silent = f"{lab.silent_resolver[0]}:{lab.silent_resolver[1]}"
        dns = replace(
            dns,
            silent_server=silent,
            check_cafile=str(lab.ca_file),
            check_port=lab.ports.of("https"),
        )
    shutdown = replace(config.shutdown, drain_timeout=0.0)
    checked = replace(
        config,
        inbound=(inbound,),
        dns=dns,
        shutdown=shutdown,
        strategy=tuple(_inside_lab(s) for s in config.strategy),
        # the status page on any free port, so it never competes with the user's own for 9099
        web=replace(config.web, listen="127.0.0.1:0"),
    )
    return _private_state(checked, lab)


#: where an upstream proxy outside the lab is sent during a check: nothing listens there, so
#: the attempt fails at once (a check must never dial out of the machine)
OUTSIDE_LAB = "127.255.255.254:9"


def _inside_lab(strategy: StrategyConfig) -> StrategyConfig:
    """Upstream proxies on loopback keep their address; others cannot be reached from the lab."""
    if strategy.type == "direct":
        return strategy
    if strategy.type == "bridge" and strategy.uri:
        # a bridge out there cannot be reached from the lab either: dial nowhere instead
        uri = parse_bridge_uri(strategy.uri)
        try:
            if ipaddress.ip_address(uri.host).is_loopback:
                return strategy
        except ValueError:
            pass  # a name: not in the lab
        host, port = split_server(OUTSIDE_LAB)
        return replace(strategy, uri=str(replace(uri, host=host, port=port)))
    if strategy.type == "front" and strategy.uri:
        return replace(strategy, fronts=_fronts_inside_lab(strategy))
    server = strategy.server or ("127.0.0.1:9050" if strategy.type == "tor" else None)
    if server is None or ipaddress.ip_address(split_server(server)[0]).is_loopback:
        return strategy
    return replace(strategy, server=OUTSIDE_LAB)


def _fronts_inside_lab(strategy: StrategyConfig) -> tuple[str, ...]:
    """A front strategy's candidates, those outside the lab sent nowhere (TLS name kept)."""
    from proxy.strategies.front import fronts_of

    assert strategy.uri is not None
    fronts = []
    for front in fronts_of(parse_bridge_uri(strategy.uri), strategy.fronts):
        try:
            inside = ipaddress.ip_address(front.address).is_loopback
        except ValueError:
            inside = False  # a name: not in the lab
        address = f"[{front.address}]" if ":" in front.address else front.address
        fronts.append(f"{front.name}@{address}:{front.port}" if inside else
                      f"{front.name}@{OUTSIDE_LAB}")  # fmt: skip
    return tuple(fronts)


def _private_state(config: Config, lab: Lab) -> Config:
    """Keep what sidestep learns and its evidence in the lab's own directory: a check must
    neither start from, nor write into, the user's memory of the real network."""
    router = getattr(config, "router", None)
    if router is None:
        return config
    known = {f.name for f in fields(router)}
    wanted = {
        "state_file": str(lab.workdir / "learned.json"),
        "evidence_file": str(lab.workdir / "evidence.jsonl"),
        "network": f"lab-{lab.profile.name}",
    }
    return replace(
        config, router=replace(router, **{k: v for k, v in wanted.items() if k in known})
    )


class LabOnlyResolver:
    """Keeps sidestep inside the lab: answers outside 127.0.0.0/8 and ::1 are not dialled.

    The Iranian profile answers 10.10.34.35 on purpose; a client in the lab must fail on it
    without sending a packet into the real network.
    """

    def __init__(self, inner: Resolver) -> None:
        self.inner = inner

    async def resolve(self, host: str) -> list[IPAddress]:
        answer = await self.inner.resolve(host)
        inside = [a for a in answer if a.is_loopback]
        if not inside:
            shown = ", ".join(str(a) for a in answer)
            raise ResolveError(f"{host}: the answer {shown} lies outside the lab; not dialled")
        return inside


@dataclass(frozen=True, slots=True)
class CheckReport:
    """The outcome of one ``lab --check`` run against one profile."""

    profile: Profile
    results: tuple[ScenarioResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "summary": self.profile.summary,
            "passed": self.passed,
            "scenarios": [r.to_json() for r in self.results],
        }


@dataclass(frozen=True, slots=True)
class RunningSidestep:
    """An in-process sidestep inside a lab."""

    app: App
    #: its SOCKS5 port
    address: Address
    #: its per-connection log lines
    connections: ConnectionLog


#: longest wait for the lab's censor to read one piece of a fragmented first flight
LAB_PIECE_WAIT = 1.0


def pace_fragments(app: App, lab: Lab) -> None:
    """Let the lab's censor read each piece of a fragmented first flight on its own.

    A real censor sees packets, so pieces sent as separate TCP segments stay separate for it.
    The lab's middlebox reads a socket in this same process: if the next piece were written
    before it had its turn, one read would return both and the split would be invisible to it.
    Each fragment strategy therefore waits, after each piece, until the middlebox in front of
    the address it dialled has read that piece (at most :data:`LAB_PIECE_WAIT` seconds; a
    connection to an address with no middlebox does not wait).
    """
    router = app.dispatcher.router
    if router is not None:
        pace_strategies(router.strategies, lab)


def pace_strategies(strategies: dict[str, Any], lab: Lab) -> None:
    """:func:`pace_fragments` for a table of strategies by name (``sidestep lab --probe``)."""

    async def piece_read(stream: TcpStream, piece: int) -> None:
        peer = stream.socket.getpeername()
        box = lab.middleboxes.get((peer[0], peer[1]))
        if box is None:
            return
        with trio.move_on_after(LAB_PIECE_WAIT):
            flow = await box.flow_from(stream.socket.getsockname()[1])
            await flow.wait_segments(piece + 1)

    for name, strategy in strategies.items():
        if isinstance(strategy, FragmentStrategy) and strategy.after_piece is None:
            strategies[name] = replace(strategy, after_piece=piece_read)


@asynccontextmanager
async def open_sidestep(lab: Lab, config: Config | None = None) -> AsyncIterator[RunningSidestep]:
    """Run sidestep with ``config`` (default: the embedded one) pointed into ``lab``
    (:func:`lab_config`, and :class:`LabOnlyResolver` so it never dials out of the lab)."""
    app = App(lab_config(config or default_config(), lab))
    app.dispatcher.resolver = LabOnlyResolver(app.dispatcher.resolver)
    pace_fragments(app, lab)
    with capture_connections() as connections:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(app.run)
                await app.ready.wait()
                try:
                    yield RunningSidestep(app, app.addresses()[CHECK_INBOUND], connections)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            reraise_single(group)


async def run_check(
    config: Config,
    profile: str | Profile = "none",
    *,
    scenarios: Sequence[Scenario] = SCENARIOS,
    timeout: float = 5.0,
    ca: LabCA | None = None,
    ports: LabPorts | None = None,
) -> CheckReport:
    """Start a lab and sidestep (with ``config`` pointed into it) and run ``scenarios``."""
    async with open_lab(profile, ca=ca, ports=ports) as lab, open_sidestep(lab, config) as side:
        results = await run_scenarios(
            lab, side.address, scenarios, timeout=timeout, connections=side.connections
        )
        return CheckReport(lab.profile, tuple(results))
