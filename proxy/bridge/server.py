"""``sidestep bridge``: the bridge server and its raw carrier.

A client dials the bridge and sends an optional first-byte prefix (see
:mod:`proxy.protocols.bridge.prefix`) and its hello. The server checks both with the sans-IO
:class:`~proxy.protocols.bridge.BridgeConnection`; a genuine client gets a
:class:`~proxy.bridge.session.BridgeSession`, whose every stream becomes an outbound TCP
connection (names resolved here, Happy Eyeballs by :func:`~proxy.net.dial.open_tcp`), relayed
with the mux's flow control.

A carrier may also open with a resume hello (:mod:`proxy.protocols.bridge.resume`): the session
it names, kept with its streams and their outbound connections for ``resume_window`` seconds
after its carrier broke, moves onto the new carrier and carries on. Resumes do not count
against ``sessions_per_minute`` (a client rotating carriers makes many).

Anything else - random bytes, a replayed or stale hello or resume hello, a resume for a session
this bridge does not keep, a cut-off hello, a wrong prefix,
silence, a client over its session rate - gets nothing at all: the server keeps reading for a
random while and then closes with a plain FIN, so a probe learns no length, no answer and no
timing that tells the bridge apart from a server waiting for its own protocol.

Destinations pass :class:`DestinationPolicy`: loopback, private, link-local and other special
addresses are refused unless their network is in ``allow_networks`` (the bridge must not become a
door into its own network), then the optional allow and deny lists of networks and domains. With
``[destinations] tor`` every stream goes on through a local Tor client's SOCKS port instead (Tor
resolves the names; the lists still apply to what clients ask for).
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
from proxy.bridge.httpcarriers import ServerCarrier, WebCarrierHub
from proxy.bridge.identity import BridgeIdentity, load_identity
from proxy.bridge.session import (
    CARRIER_ERRORS,
    STREAM_READ,
    BridgeSession,
    MuxStream,
    Reattached,
)
from proxy.config import parse_listen
from proxy.errors import (
    ConfigError,
    ConnectRefused,
    ConnectTimeout,
    NotAllowed,
    ResolveError,
    UpstreamError,
)
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp
from proxy.net.relay import relay
from proxy.protocols.bridge import (
    BridgeConnection,
    ConnectionState,
    ReplayCache,
    ResetCode,
    Role,
)
from proxy.protocols.bridge.handshake import Pending, Rejected
from proxy.protocols.bridge.prefix import check_prefix, prefix_length
from proxy.protocols.bridge.resume import (
    FirstMessage,
    FreshHello,
    ResumeRequest,
    ResumeTicket,
    SessionLedger,
    check_resume,
    read_first_message,
    resume_answer,
)
from proxy.resolve.base import Resolver
from proxy.resolve.system import SystemResolver
from proxy.strategies.upstream import Socks5Strategy, tor_strategy

log = logging.getLogger("sidestep.bridge")

#: longest a client may take to send its whole hello
HANDSHAKE_TIMEOUT = 30.0
#: a relayed stream with no traffic either way for this long is closed
IDLE_TIMEOUT = 600.0
#: a carrier that brought nothing for this long is given up (clients ping every 30 s)
CLIENT_SILENCE = 90.0
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
        self.tor: Socks5Strategy | None = None
        if config.destinations.tor is not None:
            tor_host, _, tor_port = config.destinations.tor.rpartition(":")
            self.tor = tor_strategy("tor", (tor_host.strip("[]"), int(tor_port)))
        self.sessions_opened = 0
        #: seconds of silence after which a client's carrier is given up (see CLIENT_SILENCE)
        self.client_silence = CLIENT_SILENCE
        self.sessions_resumed = 0
        #: open sessions by their resume id (kept through carrier breaks for resume_window)
        self.sessions: dict[bytes, BridgeSession] = {}
        self.probes_silenced = 0
        self.tls: ssl.SSLContext | None = None
        self._nursery: trio.Nursery | None = None
        section = config.bridge
        #: the split-HTTP and polling carriers, on the web carrier's secret path
        self.web: WebCarrierHub | None = None
        if section.carrier == "ws":
            self.web = WebCarrierHub(
                identity.secret, section.path or "/", self._start_web_carrier,
                window=float(section.clock_window),
            )  # fmt: skip
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
            self._nursery = nursery
            await nursery.start(trio.serve_listeners, self.handle_carrier, listeners)
            task_status.started(BridgeListening(bound))

    def _start_web_carrier(self, carrier: ServerCarrier, client: str) -> None:
        """A new split-HTTP or polling carrier: its session runs beside the requests."""
        assert self._nursery is not None  # requests only arrive while serve() runs
        self._nursery.start_soon(self.handle_carrier, carrier, client)

    async def handle_carrier(self, carrier: trio.abc.Stream, client: str | None = None) -> None:
        """One carrier connection: handshake, then the session, or silence. ``client`` comes
        with a carrier that the web server loop already opened (split HTTP, polling)."""
        handed_over = False  # a resumed session owns its new carrier
        try:
            if client is None:
                client = _peer_ip(carrier)
                if self.config.bridge.carrier == "ws":
                    web = await self._web_carrier(carrier)
                    if web is None:
                        return
                    carrier, client = web
            first: FirstMessage = Rejected("no hello in time")
            data = b""
            with trio.move_on_after(HANDSHAKE_TIMEOUT):
                first, data = await self._first_message(carrier)
            if isinstance(first, ResumeRequest):
                handed_over = await self._resume(carrier, client, first, len(data))
                return
            if isinstance(first, FreshHello):
                await self._fresh_session(carrier, client, data)
                return
            reason = first.reason if isinstance(first, Rejected) else "no valid hello"
            log.info("bridge: carrier from %s refused (%s); silenced", client, reason)
            await self._silence(carrier)
        except Exception as exc:  # the per-connection top level: one line, keep serving
            log.warning("bridge: carrier failed: %s: %s", type(exc).__name__, exc)
        finally:
            if not handed_over:
                await trio.aclose_forcefully(carrier)

    async def _fresh_session(self, carrier: trio.abc.Stream, client: str, hello: bytes) -> None:
        """A hello: the handshake, then the session until it ends (kept through carrier
        breaks for ``resume_window`` seconds), or silence."""
        if not self.rate.allow(client, time.monotonic()):
            log.info("bridge: %s is over its session rate; silenced", client)
            await self._silence(carrier)
            return
        conn = BridgeConnection.server(
            self.line,
            self._private,
            self.replay,
            rng=os.urandom,
            max_streams=self.config.bridge.max_streams,
        )
        events = conn.receive_data(hello, time.time())
        if conn.state is not ConnectionState.OPEN or conn.keys is None:
            reason = next((getattr(e, "reason", "") for e in events), "") or "no valid hello"
            log.info("bridge: carrier from %s refused (%s); silenced", client, reason)
            await self._silence(carrier)
            return
        records = b"".join(conn.records_to_send())  # numbered by the ledger, unlike the reply
        reply = conn.data_to_send()
        try:
            await carrier.send_all(reply + records)
        except CARRIER_ERRORS:
            return
        self.sessions_opened += 1
        ticket = ResumeTicket.from_keys(conn.keys, Role.SERVER)
        ledger = SessionLedger(conn, sent=records, received=conn.handshake_trailing)
        session = BridgeSession(conn, carrier, ledger=ledger, ticket=ticket)
        session.silence_limit = self.client_silence
        self.sessions[ticket.session_id] = session
        log.info("bridge: session from %s opened", client)
        try:
            await session.run(
                self._serve_stream, initial=events, linger=self.config.bridge.resume_window
            )
        finally:
            if self.sessions.get(ticket.session_id) is session:
                del self.sessions[ticket.session_id]
        log.info(
            "bridge: session from %s ended after %d carrier(s) (%s)",
            client, session.carriers, session.error,
        )  # fmt: skip

    async def _resume(
        self, carrier: trio.abc.Stream, client: str, request: ResumeRequest, read: int
    ) -> bool:
        """A resume hello: move its session onto ``carrier`` (True), or silence (False)."""
        session = self.sessions.get(request.session_id)
        ticket = session.ticket if session is not None else None
        refused = check_resume(request, ticket, self.replay, time.time())
        if refused is not None or session is None or ticket is None:
            log.info("bridge: resume from %s refused (%s); silenced", client, refused)
            await self._silence(carrier)
            return False

        async def exchange(received: int) -> Reattached:
            answer = resume_answer(self.line, ticket, request, received, os.urandom)
            await carrier.send_all(answer)
            return Reattached(request.offset, request.trailing, len(answer), read)

        try:
            await session.swap(carrier, exchange)
        except CARRIER_ERRORS as exc:
            log.info("bridge: resume from %s failed: %s", client, exc)
            return False
        self.sessions_resumed += 1
        log.info("bridge: session resumed by %s (carrier %d)", client, session.carriers)
        while session.carrier is carrier and not session.dead:  # the listener closes it after
            await session.changed.wait()
        return True

    async def _web_carrier(self, tcp: trio.abc.Stream) -> tuple[trio.abc.Stream, str] | None:
        """TLS (standalone) and HTTP until a WebSocket upgrade of the secret path; ``None``
        when the connection ended without one (it got the cover page or 404s, or carried
        split-HTTP or polling requests: no time limit on those, each read has its own)."""
        stream: trio.abc.Stream = tcp
        client = _peer_ip(tcp)
        if self.tls is not None:
            stream = trio.SSLStream(tcp, self.tls, server_side=True)
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
                try:
                    await stream.do_handshake()
                except CARRIER_ERRORS:
                    return None
            if handshake.cancelled_caught:
                return None
        try:
            ws = await accept_websocket(
                stream, self.config.bridge.path or "/", cover_page=self.tls is not None,
                web=self.web, peer=client,
            )  # fmt: skip
        except CARRIER_ERRORS:
            return None
        if ws is None:
            return None
        forwarded = ws.forwarded_for
        if _is_loopback(client) and forwarded is not None and _is_ip(forwarded):
            client = forwarded  # behind nginx on loopback: the real client
        return ws, client

    async def _first_message(self, carrier: trio.abc.Stream) -> tuple[FirstMessage, bytes]:
        """Read the prefix and the first message (a hello or a resume hello): what it is, and
        every byte of it and after it read so far."""
        kind = self.config.bridge.prefix
        pending = b""
        need = prefix_length(kind)
        received = b""
        while True:
            try:
                data = await carrier.receive_some(65536)
            except CARRIER_ERRORS:
                return Rejected("carrier broke during the hello"), b""
            if not data:
                return Rejected("hello truncated"), b""
            if need:
                pending += data
                verdict = check_prefix(kind, pending)
                if verdict is None:
                    continue
                if not verdict:
                    return Rejected("wrong prefix"), b""
                data, pending, need = pending[need:], b"", 0
            received += data
            first = read_first_message(self.line, received)
            if not isinstance(first, Pending):
                return first, received

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
            await relay(
                stream, target, idle_timeout=IDLE_TIMEOUT, closing=True, buffer_size=STREAM_READ
            )
        finally:
            await trio.aclose_forcefully(target)
            await stream.aclose()

    async def _dial(self, host: str, port: int) -> trio.abc.HalfCloseableStream:
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            self.policy.check_name(host)
            if self.tor is not None:  # Tor resolves the name at its exit: no lookup here
                return await self.tor.connect(Target(host, port), [], b"")
            addresses = await self.resolver.resolve(host)
        if self.tor is not None:
            if not self.policy.permits(addresses[0], host):
                raise NotAllowed(f"{host}: not a destination this bridge serves")
            return await self.tor.connect(Target(host, port), addresses, b"")
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
