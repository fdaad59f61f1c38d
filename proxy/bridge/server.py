"""``sidestep bridge``: the bridge server and its raw carrier.

A client dials the bridge and sends an optional first-byte prefix (see
:mod:`proxy.protocols.bridge.prefix`) and its hello. The server checks both with the sans-IO
:class:`~proxy.protocols.bridge.BridgeConnection`; a genuine client gets a
:class:`~proxy.bridge.session.BridgeSession`, whose every stream becomes an outbound TCP
connection (names resolved here, Happy Eyeballs by :func:`~proxy.net.dial.open_tcp`), relayed
with the mux's flow control.

Anything else - random bytes, a replayed or stale hello, a cut-off hello, a wrong prefix,
silence, a client over its session rate - gets nothing at all: the server keeps reading for a
random while and then closes with a plain FIN, so a probe learns no length, no answer and no
timing that tells the bridge apart from a server waiting for its own protocol.

Destinations pass :class:`DestinationPolicy`: loopback, private, link-local and other special
addresses are refused unless their network is in ``allow_networks`` (the bridge must not become a
door into its own network), then the optional allow and deny lists of networks and domains.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import ssl
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from proxy.bridge.carriers import accept_websocket
from proxy.bridge.config import BridgeConfig, DestinationsSection, load_bridge_config
from proxy.bridge.identity import BridgeIdentity, load_identity
from proxy.bridge.session import CARRIER_ERRORS, BridgeSession, MuxStream
from proxy.config import parse_listen
from proxy.errors import (
    ConfigError,
    ConnectRefused,
    ConnectTimeout,
    NotAllowed,
    ResolveError,
    UpstreamError,
)
from proxy.inbound.base import IPAddress
from proxy.net.dial import open_tcp
from proxy.net.relay import relay
from proxy.protocols.bridge import (
    BridgeConnection,
    ConnectionState,
    Event,
    ReplayCache,
    ResetCode,
)
from proxy.protocols.bridge.prefix import check_prefix, prefix_length
from proxy.resolve.base import Resolver
from proxy.resolve.system import SystemResolver

log = logging.getLogger("sidestep.bridge")

#: longest a client may take to send its whole hello
HANDSHAKE_TIMEOUT = 30.0
#: a relayed stream with no traffic either way for this long is closed
IDLE_TIMEOUT = 600.0
#: client addresses the rate limiter remembers
RATE_TABLE_SIZE = 65536


# ------------------------------------------------------------------------------ destinations


def _special(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
    )


def _name_matches(host: str, domain: str) -> bool:
    host = host.lower().rstrip(".")
    return host == domain or host.endswith("." + domain)


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """Which destinations the bridge connects to (built from ``[destinations]``)."""

    allow_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    allow_names: tuple[str, ...] = ()
    deny_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny_names: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, section: DestinationsSection) -> DestinationPolicy:
        def split(
            items: Sequence[str],
        ) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], tuple[str, ...]]:
            nets, names = [], []
            for item in items:
                try:
                    nets.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    names.append(item)
            return tuple(nets), tuple(names)

        allow_nets, allow_names = split(section.allow)
        deny_nets, deny_names = split(section.deny)
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in section.allow_networks)
        return cls(networks, allow_nets, allow_names, deny_nets, deny_names)

    @property
    def restricted(self) -> bool:
        return bool(self.allow_nets or self.allow_names)

    def check_name(self, host: str) -> None:
        """Refuse a destination name before it is looked up."""
        if any(_name_matches(host, d) for d in self.deny_names):
            raise NotAllowed(f"{host}: denied by the bridge's deny list")

    def permits(self, address: IPAddress, host: str) -> bool:
        """Whether ``address`` (the destination ``host`` resolved to) may be dialled."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.deny_nets):
            return False
        if _special(address) and not any(address in net for net in self.allow_networks):
            return False
        if self.restricted:
            by_name = any(_name_matches(host, d) for d in self.allow_names)
            return by_name or any(address in net for net in self.allow_nets)
        return True


# ------------------------------------------------------------------------------- rate limit


@dataclass(slots=True)
class SessionRateLimit:
    """At most ``per_minute`` new sessions per client address in any 60 seconds (0: none)."""

    per_minute: int
    _seen: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)

    def allow(self, client: str, now: float) -> bool:
        if self.per_minute <= 0:
            return True
        times = self._seen.pop(client, None) or deque()
        while times and times[0] <= now - 60.0:
            times.popleft()
        allowed = len(times) < self.per_minute
        if allowed:
            times.append(now)
        self._seen[client] = times
        while len(self._seen) > RATE_TABLE_SIZE:
            self._seen.popitem(last=False)
        return allowed


# ----------------------------------------------------------------------------------- server


@dataclass(frozen=True, slots=True)
class BridgeListening:
    """What :meth:`BridgeServer.serve` reports once it accepts connections."""

    addresses: tuple[tuple[str, int], ...]


class BridgeServer:
    """One bridge: its identity, config, replay cache, rate limit and destination policy."""

    def __init__(
        self,
        config: BridgeConfig,
        identity: BridgeIdentity,
        *,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.line = identity.line()
        self._private = identity.static_private()
        self.replay = ReplayCache(window=float(config.bridge.clock_window))
        self.policy = DestinationPolicy.from_config(config.destinations)
        self.rate = SessionRateLimit(config.bridge.sessions_per_minute)
        self.resolver: Resolver = resolver or SystemResolver()
        self.sessions_opened = 0
        self.probes_silenced = 0
        self.tls: ssl.SSLContext | None = None
        section = config.bridge
        if section.tls_certificate is not None and section.tls_key is not None:
            self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls.set_alpn_protocols(["http/1.1"])
            try:
                self.tls.load_cert_chain(section.tls_certificate, section.tls_key)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load the TLS certificate or key: {exc}", key="bridge.tls_key"
                ) from None

    async def serve(
        self, listen: str | None = None, *, task_status: trio.TaskStatus[BridgeListening]
    ) -> None:
        """Accept raw-carrier connections on ``listen`` (default: the config's) forever."""
        host, port = parse_listen(listen or self.config.bridge.listen)
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = tuple(
            (str(lst.socket.getsockname()[0]), int(lst.socket.getsockname()[1]))
            for lst in listeners
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle_carrier, listeners)
            task_status.started(BridgeListening(bound))

    async def handle_carrier(self, carrier: trio.abc.Stream) -> None:
        """One carrier connection: handshake, then the session, or silence."""
        try:
            client = _peer_ip(carrier)
            if self.config.bridge.carrier == "ws":
                web = await self._web_carrier(carrier)
                if web is None:
                    return
                carrier, client = web
            conn = BridgeConnection.server(
                self.line,
                self._private,
                self.replay,
                rng=os.urandom,
                max_streams=self.config.bridge.max_streams,
            )
            if not self.rate.allow(client, time.monotonic()):
                log.info("bridge: %s is over its session rate; silenced", client)
                await self._silence(carrier)
                return
            events: list[Event] = []
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                events = await self._handshake(carrier, conn)
            if conn.state is not ConnectionState.OPEN:
                reason = next((getattr(e, "reason", "") for e in events), "") or "no valid hello"
                log.info("bridge: carrier from %s refused (%s); silenced", client, reason)
                await self._silence(carrier)
                return
            self.sessions_opened += 1
            log.info("bridge: session from %s opened", client)
            session = BridgeSession(conn, carrier)
            await session.run(self._serve_stream, initial=events)
            log.info("bridge: session from %s ended (%s)", client, session.error)
        except Exception as exc:  # the per-connection top level: one line, keep serving
            log.warning("bridge: carrier failed: %s: %s", type(exc).__name__, exc)
        finally:
            await trio.aclose_forcefully(carrier)

    async def _web_carrier(self, tcp: trio.abc.Stream) -> tuple[trio.abc.Stream, str] | None:
        """TLS (standalone) and HTTP until a WebSocket upgrade of the secret path; ``None``
        when the connection ended without one (it got the cover page or 404s)."""
        stream: trio.abc.Stream = tcp
        client = _peer_ip(tcp)
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            if self.tls is not None:
                stream = trio.SSLStream(tcp, self.tls, server_side=True)
                try:
                    await stream.do_handshake()
                except CARRIER_ERRORS:
                    return None
            try:
                ws = await accept_websocket(
                    stream, self.config.bridge.path or "/", cover_page=self.tls is not None
                )
            except CARRIER_ERRORS:
                return None
            if ws is None:
                return None
            forwarded = ws.forwarded_for
            if _is_loopback(client) and forwarded is not None and _is_ip(forwarded):
                client = forwarded  # behind nginx on loopback: the real client
            return ws, client
        return None

    async def _handshake(self, carrier: trio.abc.Stream, conn: BridgeConnection) -> list[Event]:
        """Read the prefix and the hello; returns the connection's events (state tells)."""
        kind = self.config.bridge.prefix
        pending = b""
        need = prefix_length(kind)
        while True:
            try:
                data = await carrier.receive_some(65536)
            except CARRIER_ERRORS:
                return []
            if not data:
                if need:
                    return []
                return conn.receive_eof()
            if need:
                pending += data
                verdict = check_prefix(kind, pending)
                if verdict is None:
                    continue
                if not verdict:
                    return []
                data, pending, need = pending[need:], b"", 0
                if not data:
                    continue
            events = conn.receive_data(data, time.time())
            if conn.state is not ConnectionState.HANDSHAKE:
                if conn.state is ConnectionState.OPEN:
                    out = conn.data_to_send()
                    try:
                        await carrier.send_all(out)
                    except CARRIER_ERRORS:
                        return []
                return events

    async def _silence(self, carrier: trio.abc.Stream) -> None:
        """Say nothing: read and discard for a random while, then close (a FIN, not a RST)."""
        self.probes_silenced += 1
        low, high = self.config.bridge.probe_close_delay
        delay = low + (high - low) * secrets.randbelow(1_000_001) / 1_000_000
        with trio.move_on_after(delay):
            try:
                while await carrier.receive_some(65536):
                    pass
            except CARRIER_ERRORS:
                return
            await trio.sleep_forever()  # the peer closed: still wait out the delay

    async def _serve_stream(self, stream: MuxStream) -> None:
        """Connect one stream to its destination and relay until both sides are done."""
        try:
            target = await self._dial(stream.host, stream.port)
        except UpstreamError as exc:
            log.info("bridge: stream to %s:%s failed: %s", stream.host, stream.port, exc)
            await stream.reset(_reset_code(exc))
            return
        except NotAllowed as exc:
            log.info("bridge: stream refused: %s", exc)
            await stream.reset(ResetCode.NOT_ALLOWED)
            return
        try:
            await relay(stream, target, idle_timeout=IDLE_TIMEOUT, closing=True)
        finally:
            await trio.aclose_forcefully(target)
            await stream.aclose()

    async def _dial(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            self.policy.check_name(host)
            addresses = await self.resolver.resolve(host)
        permitted = [a for a in addresses if self.policy.permits(a, host)]
        if not permitted:
            raise NotAllowed(f"{host}: not a destination this bridge serves")
        timeout = self.config.destinations.connect_timeout
        return await open_tcp(permitted, port, timeout=timeout)


def _reset_code(exc: UpstreamError) -> ResetCode:
    if isinstance(exc, ConnectRefused):
        return ResetCode.REFUSED
    if isinstance(exc, ConnectTimeout):
        return ResetCode.TIMEOUT
    if isinstance(exc, ResolveError):
        return ResetCode.RESOLVE_FAILED
    return ResetCode.UNREACHABLE


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def _peer_ip(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else "-"
    except OSError:
        return "-"


# -------------------------------------------------------------------------------------- cli


def add_bridge_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bridge",
        help="run a bridge server for sidestep clients (see configs/bridge.toml)",
        description=(
            "Run the bridge server: accept clients that hold this bridge's URI and connect "
            "them to the sites they ask for. Everyone else gets silence."
        ),
    )
    p.add_argument("--config", metavar="FILE", default="bridge.toml", help="default: bridge.toml")


def run_bridge(args: argparse.Namespace) -> int:
    from proxy.logsetup import setup_logging

    config = load_bridge_config(args.config)
    identity = load_identity(config.identity_path(args.config))
    setup_logging("info", json_lines=False)
    server = BridgeServer(config, identity)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            listening = await nursery.start(server.serve)
            shown = ", ".join(f"{h}:{p}" for h, p in listening.addresses)
            print(f"sidestep bridge: listening on {shown}", file=sys.stderr, flush=True)

    try:
        trio.run(run)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen: {exc.strerror or exc}", source=str(Path(args.config))
        ) from None
    return 0
