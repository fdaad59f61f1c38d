"""The ``bridge`` strategy: connections carried by a sidestep bridge (``sidestep bridge``).

One session per bridge, shared by every connection: it is opened on first use (TCP to the
bridge, the optional first-byte prefix and the hello, one round trip) and each connection
becomes a stream of it.

The session outlives its carrier (:mod:`proxy.protocols.bridge.resume`). A keeper task watches
it: when the carrier breaks (a reset, a FIN) or stalls (nothing arrives for ``stall_timeout``
seconds after data was flowing, and a PING probe goes unanswered too), it dials a new carrier
and resumes the session on it, a few attempts with back-off; streams carry on without losing a
byte. Against censors that freeze a connection after some kilobytes (Russia, 2025) it also
rotates carriers on purpose: before the current one has carried ``rotate_after`` bytes, it opens
the next, resumes on it and drops the old. With ``rotate_after = "auto"`` the amount comes from
experience: a carrier that stalled after N bytes teaches "N on this network" (kept in the
learned memory when the router has one) and from then on carriers are rotated at 3/4 of N. Idle
sessions send a PING every ``keepalive`` seconds, which keeps NAT mappings alive and notices a
dead carrier; the bridge, in turn, gives up a carrier it has heard nothing from for three
keepalives (``CLIENT_SILENCE`` in :mod:`proxy.bridge.server`).

When no resume works (the bridge forgot the session, or is gone), the session is lost: its
streams break and the next connection opens a new one; a connection that cannot get a session
fails with an :class:`~proxy.errors.UpstreamError`, so the router moves on to the policy's next
strategy. A session this end closes says BYE, so the bridge does not keep it for a resume.

The bridge resolves target names itself (``remote_dns``): no DNS query for the target leaves
this machine. The bridge's own host should be an IP address in the URI; a name is looked up
with the system resolver.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import ssl
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal, cast

import trio

from proxy.bridge.carriers import BACKEND_DOWN, CarrierAnswered, open_websocket
from proxy.bridge.identity import BridgeURI
from proxy.bridge.session import CARRIER_ERRORS, BridgeSession, Reattached
from proxy.errors import ConnectRefused, RemoteProtocolError, UpstreamError
from proxy.inbound.base import IPAddress, Target
from proxy.net.dial import open_tcp
from proxy.protocols.bridge import BridgeConnection, ConnectionState, Event, Role
from proxy.protocols.bridge.prefix import PrefixKind, build_prefix
from proxy.protocols.bridge.resume import ClientResume, ResumeTicket, SessionLedger
from proxy.resolve.system import SystemResolver

if TYPE_CHECKING:
    from proxy.route.learn import LearnedMemory

log = logging.getLogger("sidestep.bridge")

#: seconds to wait before each resume attempt after a carrier broke
RESUME_BACKOFF = (0.0, 0.25, 0.5, 1.0, 2.0)
#: seconds without a byte (half of it quiet, half waiting for a probe's answer) that make a
#: carrier count as stalled while data was flowing or the bridge owes us an acknowledgement;
#: each half is at least a few round trips. Shorter than the dispatcher's freeze verdict (3 s),
#: which would cut the connections the session carries.
STALL_TIMEOUT = 2.0
#: the probe's answer may take this many round trips (measured at each handshake)
STALL_RTTS = 4
#: seconds of silence after which an idle session sends a PING
KEEPALIVE = 30.0
#: rotate carriers at this share of the volume after which one froze
ROTATE_SHARE = 0.75
#: a stall after fewer bytes than this is not taken for a volume limit
MIN_LEARNED_LIMIT = 4096


class BridgeDown(UpstreamError):
    """The bridge itself is gone, though the way to it works (the web server in front of it
    answers its path with an error): resuming again would not help."""


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
        rotate_after: int | Literal["auto"] = "auto",
    ) -> None:
        if not self.takes(uri):
            raise ValueError(
                f"bridge {name}: a fronted, split or poll URI needs the front strategy"
            )
        self.cafile = cafile
        self.name = name
        self.uri = uri
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.sessions_opened = 0
        #: bytes after which a carrier is replaced: "auto" (learned), a number, 0 (never)
        self.rotate_after: int | Literal["auto"] = rotate_after
        self.stall_timeout = STALL_TIMEOUT
        self.keepalive = KEEPALIVE
        self.resume_backoff: tuple[float, ...] = RESUME_BACKOFF
        #: where freezes are remembered (the router hands its memory over: :meth:`use_memory`)
        self.memory: LearnedMemory | None = None
        self.network = "unknown"
        #: the freeze volume learned in this run (used without a memory, too)
        self.learned_limit: int | None = None
        #: carriers replaced: after a break or stall (resumes) and on purpose (rotations)
        self.resumes = 0
        self.rotations = 0
        #: seconds the last handshake or resume took (about one round trip)
        self.rtt = 0.0
        self._session: BridgeSession | None = None
        self._lock = trio.Lock()

    @classmethod
    def takes(cls, uri: BridgeURI) -> bool:
        """Whether this strategy can use ``uri`` (the front strategy takes the web carriers)."""
        return uri.carrier in ("raw", "ws") and uri.front is None

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
        """The live session, opening one when there is none (a session being resumed is
        waited for, a little)."""
        async with self._lock:
            current = self._session
            if current is not None and current.detached:
                with trio.move_on_after(self.handshake_timeout):
                    while current.detached:
                        await current.changed.wait()
            if self._session is None or self._session.dead:
                self._session = await self._open_session()
                self.sessions_opened += 1
                trio.lowlevel.spawn_system_task(self._run, self._session)
            return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.aclose()

    def use_memory(self, memory: LearnedMemory, network: str) -> None:
        """Remember carrier freezes per ``network`` in ``memory`` (the router calls this)."""
        self.memory = memory
        self.network = network

    @property
    def limit_key(self) -> str:
        """What a learned freeze volume is filed under: the bridge's address."""
        return f"bridge {self.uri.host}:{self.uri.port}"

    def rotate_limit(self) -> int:
        """Bytes after which the current carrier is replaced now (0: never)."""
        if self.rotate_after != "auto":
            return self.rotate_after
        learned = self.learned_limit
        if self.memory is not None:
            remembered = self.memory.carrier_limit(self.network, self.limit_key)
            if remembered is not None:
                learned = remembered if learned is None else min(learned, remembered)
        return 0 if learned is None else max(int(learned * ROTATE_SHARE), 1)

    def learn_stall(self, carried: int) -> None:
        """A carrier stalled after receiving ``carried`` bytes: remember the volume limit."""
        if carried < MIN_LEARNED_LIMIT:
            return
        if self.learned_limit is None or carried < self.learned_limit:
            self.learned_limit = carried
        if self.memory is not None:
            self.memory.record_carrier_limit(self.network, self.limit_key, carried)
        log.info("%s: carriers freeze after %d bytes on this network", self.via, carried)

    async def _run(self, session: BridgeSession) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep, session)
                await session.run(linger=math.inf)  # the keeper resumes or abandons it
                nursery.cancel_scope.cancel()
        except Exception as exc:  # a system task must never crash the process
            log.warning("%s: session failed: %s: %s", self.via, type(exc).__name__, exc)
            session.abandon(f"{type(exc).__name__}: {exc}")
        log.info(
            "%s: session ended after %d carrier(s) (%s)", self.via, session.carriers, session.error
        )

    async def _keep(self, session: BridgeSession) -> None:
        """Watch one session for broken, stalled and worn-out carriers, and idle time."""
        probe_at: float | None = None  # an unanswered PING probe went out then
        data_mark = session.last_data  # data arriving after this makes a quiet spell suspect
        while not session.dead:
            session.rotate_at = self.rotate_limit()
            if session.detached:
                await self._reattach(session, f"carrier lost ({session.carrier_error})")
                probe_at, data_mark = None, session.last_data
                continue
            if session.rotation_due:
                await self._rotate(session)
                probe_at, data_mark = None, session.last_data
                continue
            now = trio.current_time()
            if probe_at is not None and session.last_received > probe_at:
                probe_at = None  # answered: the carrier works
            half = max(self.stall_timeout / 2, STALL_RTTS * self.rtt)
            if probe_at is not None and now - probe_at >= half:
                self.learn_stall(session.carrier_received)
                await self._reattach(
                    session, f"carrier stalled after {session.carrier_received} bytes"
                )
                probe_at, data_mark = None, session.last_data
                continue
            quiet = now - session.last_received
            suspect = session.ledger.expecting_ack or session.last_data > data_mark
            if probe_at is None and ((quiet >= half and suspect) or quiet >= self.keepalive):
                session.ping(os.urandom(8))
                probe_at, data_mark = now, session.last_data
            with trio.move_on_after(min(half / 4, 1.0)):
                await session.changed.wait()

    async def _rotate(self, session: BridgeSession) -> None:
        """Replace a carrier that has carried enough: dial the next one while the current one
        still works, then move the session over."""
        try:
            carrier = await self.dial_carrier()
        except UpstreamError as exc:
            log.info("%s: cannot open the next carrier yet: %s", self.via, exc)
            session.rotate_at = 0  # keep the current one; the next round tries again
            with trio.move_on_after(self.resume_backoff[-1] or 1.0):
                await session.changed.wait()
            return
        try:
            await session.swap(carrier, partial(self._exchange, carrier, session))
        except (RemoteProtocolError, ssl.SSLError, trio.TooSlowError, *CARRIER_ERRORS) as exc:
            await trio.aclose_forcefully(carrier)
            if not session.dead:
                log.info("%s: rotating the carrier failed: %s", self.via, exc or "timed out")
            return
        except BaseException:
            await trio.aclose_forcefully(carrier)
            raise
        self.rotations += 1

    async def _reattach(self, session: BridgeSession, why: str) -> None:
        """Resume ``session`` over a new carrier, a few attempts with back-off; abandon it when
        none works. A bridge that closes without answering (it no longer knows the session)
        or a refused connection (it is down, :class:`BridgeDown` too) ends the attempts at
        once."""
        log.info("%s: %s; resuming the session", self.via, why)
        problem = why
        for delay in self.resume_backoff:
            await trio.sleep(delay)
            if session.dead:
                return
            try:
                carrier = await self.dial_carrier()
            except (ConnectRefused, BridgeDown) as exc:
                problem = str(exc)
                break
            except UpstreamError as exc:
                problem = str(exc)
                continue
            try:
                await session.swap(carrier, partial(self._exchange, carrier, session))
            except RemoteProtocolError as exc:
                await trio.aclose_forcefully(carrier)
                problem = str(exc)
                break
            except (ssl.SSLError, trio.TooSlowError, *CARRIER_ERRORS) as exc:
                await trio.aclose_forcefully(carrier)
                problem = str(exc) or "no answer to the resume"
                continue
            except BaseException:
                await trio.aclose_forcefully(carrier)
                raise
            self.resumes += 1
            log.info("%s: session resumed (carrier %d)", self.via, session.carriers)
            return
        session.abandon(f"cannot resume the session: {problem}")

    async def _exchange(
        self, carrier: trio.abc.Stream, session: BridgeSession, received: int
    ) -> Reattached:
        """The client side of a resume on ``carrier``; raises on any failure."""
        if session.ticket is None:
            raise RemoteProtocolError("this session cannot be resumed")
        resume = ClientResume(self.uri.line(), session.ticket, os.urandom)
        hello = resume.hello(received, time.time())
        prefix = build_prefix(cast(PrefixKind, self.uri.prefix), os.urandom, len(hello))
        read = 0
        started = trio.current_time()
        with trio.fail_after(self.handshake_timeout):
            await carrier.send_all(prefix + hello)
            while True:
                data = await carrier.receive_some(65536)
                if not data:
                    raise RemoteProtocolError("the bridge closed without answering the resume")
                read += len(data)
                peer = resume.receive_data(data)
                if peer is not None:
                    self.rtt = trio.current_time() - started
                    return Reattached(peer, resume.trailing_data, len(prefix + hello), read)

    async def _open_session(self) -> BridgeSession:
        carrier = await self.dial_carrier()
        try:
            conn = BridgeConnection.client(self.uri.line(), rng=os.urandom, now=time.time())
            hello = conn.data_to_send()
            prefix = build_prefix(cast(PrefixKind, self.uri.prefix), os.urandom, len(hello))
            events: list[Event] = []
            read = 0
            started = trio.current_time()
            with trio.move_on_after(self.handshake_timeout):
                await carrier.send_all(prefix + hello)
                while conn.state is ConnectionState.HANDSHAKE:
                    data = await carrier.receive_some(65536)
                    read += len(data)
                    events += conn.receive_data(data) if data else conn.receive_eof()
            if conn.state is not ConnectionState.OPEN or conn.keys is None:
                raise UpstreamError(f"{self.via}: no answer to the hello")
        except (RemoteProtocolError, ssl.SSLError, *CARRIER_ERRORS) as exc:
            await trio.aclose_forcefully(carrier)
            raise UpstreamError(f"{self.via}: handshake failed: {exc}") from exc
        except BaseException:
            await trio.aclose_forcefully(carrier)
            raise
        self.rtt = trio.current_time() - started
        ticket = ResumeTicket.from_keys(conn.keys, Role.CLIENT)
        ledger = SessionLedger(conn, received=conn.handshake_trailing)
        session = BridgeSession(conn, carrier, ledger=ledger, ticket=ticket)
        session.carrier_sent, session.carrier_received = len(prefix + hello), read
        session.last_received = trio.current_time()
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
        except CarrierAnswered as exc:
            await trio.aclose_forcefully(tcp)
            if exc.status in BACKEND_DOWN:  # the web server is up, the bridge behind it not
                raise BridgeDown(f"{self.via}: the bridge is down: {exc}") from exc
            raise UpstreamError(f"{self.via}: cannot open the carrier: {exc}") from exc
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
