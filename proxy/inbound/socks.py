"""SOCKS5 and SOCKS4/4a inbounds: the trio side of :mod:`proxy.protocols.socks5` and ``socks4``.

A handler speaks the handshake with the client under ``settings.handshake_timeout`` (slowloris
guard), then:

* CONNECT becomes a :class:`~proxy.inbound.base.Request` handed to ``ctx.tunnel`` with a replier
  that answers the client once the pipeline knows the outcome;
* SOCKS5 UDP ASSOCIATE (when ``settings.udp``) runs a relay here, for as long as the client keeps
  its TCP control connection open and the association is not idle;
* BIND is refused (COMMAND_NOT_SUPPORTED / 0x5B).

Errors: a :class:`~proxy.errors.RemoteProtocolError` from the sans-IO connection means the
connection already queued whatever reply the protocol still allows, so the handler flushes it
once and returns. A handshake timeout returns without a reply (no request was complete, so no
reply is defined). The caller (the listener) closes the stream in every case, and also swallows
``trio.BrokenResourceError`` if the client vanishes mid-tunnel.

SOCKS4 carries no password: an inbound that requires authentication answers every SOCKS4
request with 0x5B.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import trio

from proxy.errors import LocalProtocolError, ProxyError, RemoteProtocolError
from proxy.inbound.base import InboundContext, InboundSettings, IPAddress, Replier, Request, Target
from proxy.net.stream import limited
from proxy.protocols import socks4, socks5

log = logging.getLogger("sidestep.inbound.socks")

_READ_SIZE = 65536
_UDP_READ_SIZE = 65535
#: how many remote addresses one UDP association remembers (replies from others are dropped)
_MAX_PEERS = 1024
_STREAM_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


async def _flush(
    stream: trio.abc.Stream, conn: socks5.Socks5ServerConnection | socks4.Socks4ServerConnection
) -> None:
    out = conn.data_to_send()
    if out:
        await stream.send_all(out)


async def _flush_quietly(
    stream: trio.abc.Stream,
    conn: socks5.Socks5ServerConnection | socks4.Socks4ServerConnection,
    grace: float,
) -> None:
    """Best effort: send a last error reply without letting a stuck client hold us."""
    with trio.move_on_after(grace):
        try:
            await _flush(stream, conn)
        except _STREAM_GONE:
            pass


def _who(client: tuple[str, int]) -> str:
    return str(Target.parse(client[0], client[1]))


class _Socks5Replier:
    """Answers a SOCKS5 CONNECT once; later calls are ignored."""

    def __init__(self, stream: trio.abc.Stream, conn: socks5.Socks5ServerConnection) -> None:
        self._stream = stream
        self._conn = conn
        self.answered = False

    async def succeed(self, bound: tuple[str, int] | None) -> None:
        if self.answered:
            return
        self.answered = True
        host, port = bound or ("0.0.0.0", 0)
        try:
            self._conn.send(socks5.Reply(socks5.ReplyCode.SUCCEEDED, host, port))
        except LocalProtocolError:  # an address SOCKS5 cannot express: say "unspecified"
            self._conn.send(socks5.Reply(socks5.ReplyCode.SUCCEEDED))
        await _flush(self._stream, self._conn)

    async def fail(self, error: BaseException) -> None:
        if self.answered:
            return
        self.answered = True
        self._conn.send(socks5.Reply(socks5.reply_code_for(error)))
        await _flush(self._stream, self._conn)


class _Socks4Replier:
    """Answers a SOCKS4 CONNECT once; later calls are ignored."""

    def __init__(self, stream: trio.abc.Stream, conn: socks4.Socks4ServerConnection) -> None:
        self._stream = stream
        self._conn = conn
        self.answered = False

    async def succeed(self, bound: tuple[str, int] | None) -> None:
        if self.answered:
            return
        self.answered = True
        host, port = bound or ("0.0.0.0", 0)
        self._conn.send(socks4.Reply(socks4.ReplyCode.GRANTED, host, port))
        await _flush(self._stream, self._conn)

    async def fail(self, error: BaseException) -> None:
        if self.answered:
            return
        self.answered = True
        self._conn.send(socks4.Reply(socks4.ReplyCode.REJECTED))
        await _flush(self._stream, self._conn)


async def _run_tunnel(
    ctx: InboundContext,
    request: Request,
    replier: _Socks5Replier | _Socks4Replier,
) -> None:
    """Hand the request to the pipeline; make sure the client gets an answer either way."""
    timeout = ctx.settings.handshake_timeout
    as_replier: Replier = replier
    try:
        await ctx.tunnel(request, as_replier)
    except Exception as exc:
        if not replier.answered:
            with trio.move_on_after(timeout):
                try:
                    await replier.fail(exc)
                except _STREAM_GONE:
                    pass
        raise
    if not replier.answered:
        with trio.move_on_after(timeout):
            await replier.fail(ProxyError("the pipeline ended without answering"))


# ------------------------------------------------------------------------------------ SOCKS5


async def _socks5_handshake(
    stream: trio.abc.Stream,
    prefix: bytes,
    conn: socks5.Socks5ServerConnection,
    settings: InboundSettings,
    client: tuple[str, int],
) -> socks5.CommandRequested | None:
    """Run the handshake up to the request; None when the client left or failed to log in."""
    pending = prefix
    while True:
        events = conn.receive_data(pending)
        for event in events:
            if isinstance(event, socks5.CredentialsReceived):
                ok = settings.check_password(event.username, event.password)
                conn.send(socks5.AuthResult(ok))
                if not ok:
                    log.info(
                        "%s: %s: wrong SOCKS5 username or password for %r",
                        settings.name,
                        _who(client),
                        event.username,
                    )
                    await _flush(stream, conn)
                    return None
            elif isinstance(event, socks5.CommandRequested):
                return event
        await _flush(stream, conn)
        if events:  # an answer may unblock input the client pipelined: parse it first
            pending = b""
            continue
        pending = await stream.receive_some(_READ_SIZE)
        if not pending:
            conn.receive_eof()  # raises if the client stopped mid-message
            return None


async def handle_socks5(
    stream: trio.abc.Stream, prefix: bytes, client: tuple[str, int], ctx: InboundContext
) -> None:
    """Serve one SOCKS5 client; ``prefix`` holds bytes the listener already read."""
    settings = ctx.settings
    conn = socks5.Socks5ServerConnection(require_auth=settings.auth_required)
    try:
        command = await limited(
            stream,
            settings.handshake_timeout,
            _socks5_handshake(stream, prefix, conn, settings, client),
        )
    except trio.TooSlowError:
        log.info("%s: %s: SOCKS5 handshake timed out", settings.name, _who(client))
        return
    except RemoteProtocolError as exc:
        log.info("%s: %s: SOCKS5 protocol error: %s", settings.name, _who(client), exc)
        await _flush_quietly(stream, conn, settings.handshake_timeout)
        return
    except _STREAM_GONE:
        return
    if command is None:
        return

    if command.command is socks5.Command.CONNECT:
        request = Request(
            inbound=settings.name,
            client=client,
            target=Target.parse(command.host, command.port),
            stream=stream,
            prefix=conn.trailing_data,
            protocol="socks5",
        )
        await _run_tunnel(ctx, request, _Socks5Replier(stream, conn))
    elif command.command is socks5.Command.UDP_ASSOCIATE and settings.udp:
        await _udp_associate(stream, conn, command, client, ctx)
    else:
        log.info("%s: %s: refused SOCKS5 %s", settings.name, _who(client), command.command.name)
        conn.send(socks5.Reply(socks5.ReplyCode.COMMAND_NOT_SUPPORTED))
        await _flush_quietly(stream, conn, settings.handshake_timeout)


# --------------------------------------------------------------------------- SOCKS5 UDP relay


def _canonical_ip(host: str) -> IPAddress | None:
    """The address in ``host`` without scope, IPv4-mapped IPv6 unwrapped; None if not an IP."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


async def _udp_associate(
    stream: trio.abc.Stream,
    conn: socks5.Socks5ServerConnection,
    command: socks5.CommandRequested,
    client: tuple[str, int],
    ctx: InboundContext,
) -> None:
    """Answer UDP ASSOCIATE with a relay socket on our side of the control connection."""
    tcp = getattr(stream, "socket", None)
    if tcp is None:  # not a plain socket stream: we do not know which address to offer
        conn.send(socks5.Reply(socks5.ReplyCode.COMMAND_NOT_SUPPORTED))
        await _flush(stream, conn)
        return
    local = tcp.getsockname()
    relay = trio.socket.socket(tcp.family, socket.SOCK_DGRAM)
    with relay:
        try:
            await relay.bind((local[0], 0, *local[2:]))
        except OSError as exc:
            log.warning("%s: cannot open a UDP relay on %s: %s", ctx.settings.name, local[0], exc)
            conn.send(socks5.Reply(socks5.ReplyCode.GENERAL_FAILURE))
            await _flush(stream, conn)
            return
        bound = relay.getsockname()
        bound_ip = _canonical_ip(bound[0])
        conn.send(socks5.Reply(socks5.ReplyCode.SUCCEEDED, str(bound_ip or bound[0]), bound[1]))
        await _flush(stream, conn)
        association = _UdpAssociation(relay, client, command.port, ctx)
        await association.run(stream)


class _UdpAssociation:
    """One client's UDP relay: client <-> relay socket <-> per-family outbound sockets.

    Only datagrams from the client's IP are relayed, and only from one source port (the one the
    request named, else the first one seen). Replies are only accepted from addresses the client
    has sent to. Every relayed datagram pushes the idle deadline back.
    """

    def __init__(
        self,
        relay: trio.socket.SocketType,
        client: tuple[str, int],
        requested_port: int,
        ctx: InboundContext,
    ) -> None:
        self._relay = relay
        self._ctx = ctx
        self._client_ip = _canonical_ip(client[0])
        self._expected_port = requested_port or None
        #: the client's UDP address exactly as the relay socket reports it, once known
        self._client_addr: tuple[object, ...] | None = None
        self._outbound: dict[int, trio.socket.SocketType] = {}
        self._peers: dict[tuple[str, int], None] = {}
        self._nursery: trio.Nursery | None = None

    def _touch(self) -> None:
        if self._nursery is not None:
            idle = self._ctx.settings.udp_idle_timeout
            self._nursery.cancel_scope.deadline = trio.current_time() + idle

    async def run(self, control: trio.abc.Stream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._touch()
                nursery.start_soon(self._watch_control, control, nursery.cancel_scope)
                nursery.start_soon(self._from_client)
        finally:
            for sock in self._outbound.values():
                sock.close()

    async def _watch_control(self, control: trio.abc.Stream, scope: trio.CancelScope) -> None:
        """The association lives as long as the TCP connection: EOF or error ends it."""
        try:
            while await control.receive_some(_READ_SIZE):
                pass  # nothing more is expected on the control connection
        except _STREAM_GONE:
            pass
        scope.cancel()

    def _is_client(self, addr: tuple[object, ...]) -> bool:
        if self._client_addr is not None:
            return addr[:2] == self._client_addr[:2]
        if _canonical_ip(str(addr[0])) != self._client_ip:
            return False
        if self._expected_port is not None and addr[1] != self._expected_port:
            return False
        self._client_addr = addr
        return True

    async def _from_client(self) -> None:
        while True:
            try:
                data, addr = await self._relay.recvfrom(_UDP_READ_SIZE)
            except (ConnectionResetError, ConnectionRefusedError):
                continue  # an ICMP error for an earlier send, reported by some systems
            if not self._is_client(addr):
                log.debug("UDP relay: dropped a datagram from %s, not the client", addr[0])
                continue
            try:
                datagram = socks5.parse_udp_datagram(data)
            except RemoteProtocolError:
                continue
            if datagram.frag != 0:  # reassembly is optional in RFC 1928 and we do not do it
                continue
            ip = await self._destination(datagram.host)
            if ip is None:
                continue
            out = await self._outbound_for(ip)
            if out is None:
                continue
            self._touch()
            peer = (str(ip), datagram.port)
            self._peers.pop(peer, None)
            self._peers[peer] = None
            if len(self._peers) > _MAX_PEERS:
                del self._peers[next(iter(self._peers))]
            try:
                await out.sendto(datagram.payload, peer)
            except OSError as exc:
                log.debug("UDP relay: send to %s failed: %s", peer, exc)

    async def _destination(self, host: str) -> IPAddress | None:
        ip = _canonical_ip(host)
        if ip is not None:
            return ip
        try:
            addresses = await self._ctx.resolve(host)
        except ProxyError as exc:
            log.debug("UDP relay: cannot resolve %s: %s", host, exc)
            return None
        return addresses[0] if addresses else None

    async def _outbound_for(self, ip: IPAddress) -> trio.socket.SocketType | None:
        family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        sock = self._outbound.get(family)
        if sock is not None:
            return sock
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            await sock.bind(("0.0.0.0" if ip.version == 4 else "::", 0))
        except OSError as exc:
            sock.close()
            log.debug("UDP relay: no %s socket: %s", family.name, exc)
            return None
        self._outbound[family] = sock
        if self._nursery is not None:  # always set: run() opens it before reading datagrams
            self._nursery.start_soon(self._from_remote, sock)
        return sock

    async def _from_remote(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, addr = await sock.recvfrom(_UDP_READ_SIZE)
            except (ConnectionResetError, ConnectionRefusedError):
                continue
            ip = _canonical_ip(str(addr[0]))
            if ip is None or (str(ip), addr[1]) not in self._peers or self._client_addr is None:
                continue
            self._touch()
            try:
                await self._relay.sendto(
                    socks5.build_udp_datagram(str(ip), addr[1], data), self._client_addr
                )
            except (OSError, LocalProtocolError) as exc:
                log.debug("UDP relay: send to the client failed: %s", exc)


# ------------------------------------------------------------------------------------ SOCKS4


async def _socks4_handshake(
    stream: trio.abc.Stream, prefix: bytes, conn: socks4.Socks4ServerConnection
) -> socks4.CommandRequested | None:
    pending = prefix
    while True:
        for event in conn.receive_data(pending):
            if isinstance(event, socks4.CommandRequested):
                return event
        pending = await stream.receive_some(_READ_SIZE)
        if not pending:
            conn.receive_eof()
            return None


async def handle_socks4(
    stream: trio.abc.Stream, prefix: bytes, client: tuple[str, int], ctx: InboundContext
) -> None:
    """Serve one SOCKS4/4a client; ``prefix`` holds bytes the listener already read."""
    settings = ctx.settings
    conn = socks4.Socks4ServerConnection()
    try:
        command = await limited(
            stream, settings.handshake_timeout, _socks4_handshake(stream, prefix, conn)
        )
    except trio.TooSlowError:
        log.info("%s: %s: SOCKS4 handshake timed out", settings.name, _who(client))
        return
    except RemoteProtocolError as exc:
        log.info("%s: %s: SOCKS4 protocol error: %s", settings.name, _who(client), exc)
        await _flush_quietly(stream, conn, settings.handshake_timeout)
        return
    except _STREAM_GONE:
        return
    if command is None:
        return

    if settings.auth_required or command.command is not socks4.Command.CONNECT:
        why = "needs a password" if settings.auth_required else "does not support BIND"
        log.info("%s: %s: refused SOCKS4 request: inbound %s", settings.name, _who(client), why)
        conn.send(socks4.Reply(socks4.ReplyCode.REJECTED))
        await _flush_quietly(stream, conn, settings.handshake_timeout)
        return
    request = Request(
        inbound=settings.name,
        client=client,
        target=Target.parse(command.host, command.port),
        stream=stream,
        prefix=conn.trailing_data,
        protocol="socks4",
    )
    await _run_tunnel(ctx, request, _Socks4Replier(stream, conn))
