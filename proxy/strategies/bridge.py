"""The ``bridge`` strategy: connections carried by a sidestep bridge (``sidestep bridge``).

One session per bridge, shared by every connection: it is opened on first use (TCP to the
bridge, the optional first-byte prefix and the hello, one round trip), each connection becomes a
stream of it, and when the session is lost (the carrier broke or the bridge went away) the next
connection opens a new one. Streams already on a lost session break; a connection that cannot
get a session fails with an :class:`~proxy.errors.UpstreamError`, so the router moves on to the
policy's next strategy.

The bridge resolves target names itself (``remote_dns``): no DNS query for the target leaves
this machine. The bridge's own host should be an IP address in the URI; a name is looked up
with the system resolver.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Sequence
from typing import cast

import trio

from proxy.bridge.carriers import open_websocket
from proxy.bridge.identity import BridgeURI
from proxy.bridge.session import CARRIER_ERRORS, BridgeSession
from proxy.errors import RemoteProtocolError, UpstreamError
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp
from proxy.protocols.bridge import BridgeConnection, ConnectionState, Event
from proxy.protocols.bridge.prefix import PrefixKind, build_prefix
from proxy.resolve.system import SystemResolver

log = logging.getLogger("sidestep.bridge")


class BridgeStrategy:
    """Reach targets through the bridge at ``uri``: the raw carrier, or WebSocket over TLS
    (``cafile`` replaces the system's CAs for a bridge with its own certificate)."""

    remote_dns = True

    def __init__(
        self,
        name: str,
        uri: BridgeURI,
        *,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        cafile: str | None = None,
    ) -> None:
        if uri.carrier not in ("raw", "ws") or uri.front is not None:
            raise ValueError(f"bridge {name}: only the raw and ws carriers, unfronted, so far")
        self.cafile = cafile
        self.name = name
        self.uri = uri
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.sessions_opened = 0
        self._session: BridgeSession | None = None
        self._lock = trio.Lock()

    def __repr__(self) -> str:  # the URI holds the secret: never show it
        return f"BridgeStrategy({self.name!r}, {self.uri.host}:{self.uri.port})"

    def uri_address(self) -> tuple[str, int]:
        return self.uri.host, self.uri.port

    @property
    def via(self) -> str:
        host = f"[{self.uri.host}]" if ":" in self.uri.host else self.uri.host
        return f"via bridge {self.name} ({host}:{self.uri.port})"

    async def connect(
        self, target: Target, addresses: Sequence[IPAddress], first_flight: bytes
    ) -> trio.abc.HalfCloseableStream:
        session = await self.session()
        try:
            stream = session.open_stream(target.host, target.port)
            if first_flight:
                await stream.send_all(first_flight)
            else:
                await session.flush()
        except trio.BrokenResourceError as exc:
            raise UpstreamError(f"{self.via}: the session broke ({session.error})") from exc
        return stream

    async def session(self) -> BridgeSession:
        """The live session, opening one when there is none."""
        async with self._lock:
            if self._session is None or self._session.dead:
                self._session = await self._open_session()
                self.sessions_opened += 1
                trio.lowlevel.spawn_system_task(self._run, self._session)
            return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.aclose()

    async def _run(self, session: BridgeSession) -> None:
        try:
            await session.run()
        except Exception as exc:  # a system task must never crash the process
            log.warning("%s: session failed: %s: %s", self.via, type(exc).__name__, exc)
        finally:
            await trio.aclose_forcefully(session.carrier)
        log.info("%s: session ended (%s)", self.via, session.error)

    async def _open_session(self) -> BridgeSession:
        carrier = await self.dial_carrier()
        try:
            conn = BridgeConnection.client(self.uri.line(), rng=os.urandom, now=time.time())
            hello = conn.data_to_send()
            prefix = build_prefix(cast(PrefixKind, self.uri.prefix), os.urandom, len(hello))
            events: list[Event] = []
            with trio.move_on_after(self.handshake_timeout):
                await carrier.send_all(prefix + hello)
                while conn.state is ConnectionState.HANDSHAKE:
                    data = await carrier.receive_some(65536)
                    events += conn.receive_data(data) if data else conn.receive_eof()
            if conn.state is not ConnectionState.OPEN:
                raise UpstreamError(f"{self.via}: no answer to the hello")
        except (RemoteProtocolError, ssl.SSLError, *CARRIER_ERRORS) as exc:
            await trio.aclose_forcefully(carrier)
            raise UpstreamError(f"{self.via}: handshake failed: {exc}") from exc
        except BaseException:
            await trio.aclose_forcefully(carrier)
            raise
        session = BridgeSession(conn, carrier)
        session._handle(events)
        return session

    async def dial_carrier(self) -> trio.abc.Stream:
        """A fresh carrier connection to the bridge, ready for a hello: TCP, and for the web
        carriers TLS and the upgrade of the secret path. Raises ``UpstreamError``."""
        try:
            address: IPAddress = ipaddress.ip_address(self.uri.host)
            addresses = [address]
        except ValueError:
            addresses = await SystemResolver().resolve(self.uri.host)
        try:
            tcp = await open_tcp(addresses, self.uri.port, timeout=self.connect_timeout)
        except UpstreamError as exc:
            raise type(exc)(f"{self.via}: cannot reach the bridge: {exc}") from exc
        if self.uri.carrier == "raw":
            return tcp
        try:
            with trio.fail_after(self.handshake_timeout):
                return await self._open_web(tcp)
        except (RemoteProtocolError, ssl.SSLError, trio.TooSlowError, *CARRIER_ERRORS) as exc:
            await trio.aclose_forcefully(tcp)
            why = str(exc) or "timed out"
            raise UpstreamError(f"{self.via}: cannot open the carrier: {why}") from exc
        except BaseException:
            await trio.aclose_forcefully(tcp)
            raise

    async def _open_web(self, tcp: trio.abc.Stream) -> trio.abc.Stream:
        """TLS to the bridge's web server, then the WebSocket upgrade of the secret path."""
        context = ssl.create_default_context(cafile=self.cafile)
        context.set_alpn_protocols(["http/1.1"])
        tls = trio.SSLStream(tcp, context, server_hostname=self.uri.sni or self.uri.host)
        await tls.do_handshake()
        authority = self.uri.host if self.uri.port == 443 else self.uri_authority()
        return await open_websocket(tls, authority, self.uri.path)

    def uri_authority(self) -> str:
        host = f"[{self.uri.host}]" if ":" in self.uri.host else self.uri.host
        return f"{host}:{self.uri.port}"
