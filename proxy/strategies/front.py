"""The ``front`` strategy: a sidestep bridge reached through a CDN with domain fronting.

The censor sees TLS to an innocuous name the CDN serves (the *front*); inside, the HTTP
``Host`` names the bridge's site behind the same CDN, and the path is the bridge's secret
location. Three web carriers are tried in order - WebSocket, split HTTP, polling
(:mod:`proxy.bridge.carriers`, :mod:`proxy.bridge.httpcarriers`) - on each candidate front in
turn, and what worked is remembered per network in the learned memory (under the pseudo-site
``carriers:<strategy name>``), so the next session on this network starts with it.

A candidate front is ``NAME`` (dialled by that name, looked up with the system resolver) or
``NAME@ADDRESS[:PORT]`` (dialled at that address, with ``NAME`` as the TLS server name), like
curl's ``--connect-to``. A CDN that answers a fronted request with 421 or 403 refuses fronting:
that front is dropped from the candidates for as long as the strategy lives (logged as "CDN
refuses fronting"), and is never counted as censorship of the site being visited.

Everything above the carrier - the hello, the session, its streams - is the bridge strategy's
(:class:`~proxy.strategies.bridge.BridgeStrategy`); this class only opens carriers, which is
why it is a subclass: a session that outlives its carrier reattaches through
:meth:`dial_carrier` as well.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from proxy.bridge.carriers import FrontingRefused, open_websocket
from proxy.bridge.httpcarriers import open_poll, open_split
from proxy.bridge.identity import WEB_CARRIERS, BridgeURI, check_host, split_host_port
from proxy.bridge.session import CARRIER_ERRORS, BridgeSession
from proxy.errors import ConfigError, RemoteProtocolError, UpstreamError
from proxy.inbound.base import IPAddress
from proxy.net.dial import open_tcp
from proxy.resolve.system import SystemResolver
from proxy.strategies.bridge import BridgeDown, BridgeStrategy

log = logging.getLogger("sidestep.bridge")


@dataclass(frozen=True, slots=True)
class FrontCandidate:
    """One CDN front: the TLS server name, and where to dial it."""

    name: str
    address: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int) -> FrontCandidate:
        """``NAME``, ``NAME@ADDRESS`` or ``NAME@ADDRESS:PORT`` (``[v6]:PORT``); a
        ``ConfigError`` says what is wrong."""
        name, at, where = text.partition("@")
        name = check_host(name, "front")
        if not at:
            return cls(name, name, default_port)
        if where.startswith("[") and where.endswith("]"):
            return cls(name, check_host(where[1:-1], "front"), default_port)
        if where.startswith("[") or where.count(":") == 1:
            address, port = split_host_port(where, "front")
            return cls(name, address, port)
        return cls(name, check_host(where, "front"), default_port)

    def __str__(self) -> str:
        return self.name if self.address == self.name else f"{self.name}@{self.address}"


def check_front(text: str) -> None:
    """Config check for one ``fronts`` entry (``ValueError`` saying what is allowed)."""
    try:
        FrontCandidate.parse(text, 443)
    except ConfigError as exc:
        raise ValueError(
            f"{text[:80]!r} is not NAME or NAME@ADDRESS[:PORT] ({exc.message})"
        ) from None


def fronts_of(uri: BridgeURI, fronts: Sequence[str]) -> list[FrontCandidate]:
    """The candidates: ``fronts`` when given, else the URI's own ``front`` (its ``sni`` as the
    TLS name when set), else the bridge's own name (no fronting at all)."""
    if fronts:
        return [FrontCandidate.parse(text, uri.port) for text in fronts]
    if uri.front is not None:
        return [FrontCandidate(uri.sni or uri.front, uri.front, uri.port)]
    return [FrontCandidate(uri.sni or uri.host, uri.host, uri.port)]


class FrontStrategy(BridgeStrategy):
    """Reach targets through the bridge at ``uri`` via CDN fronts (see the module docstring)."""

    def __init__(
        self,
        name: str,
        uri: BridgeURI,
        *,
        fronts: Sequence[FrontCandidate] = (),
        carriers: Sequence[str] = WEB_CARRIERS,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        cafile: str | None = None,
    ) -> None:
        super().__init__(
            name, uri, connect_timeout=connect_timeout, handshake_timeout=handshake_timeout,
            cafile=cafile,
        )  # fmt: skip
        if not carriers or any(c not in WEB_CARRIERS for c in carriers):
            raise ValueError(f"front {name}: carriers are some of {', '.join(WEB_CARRIERS)}")
        self.candidates: list[FrontCandidate] = list(fronts) or fronts_of(uri, ())
        self.carriers = tuple(carriers)
        #: fronts dropped because their CDN answered 421/403 to a fronted request
        self.refused: list[FrontCandidate] = []
        #: the carrier and front of the live session, as "split via cdn.example"
        self.worked: str | None = None
        self._failed: set[str] = set()
        self._current: str | None = None

    @classmethod
    def takes(cls, uri: BridgeURI) -> bool:
        return uri.carrier in WEB_CARRIERS

    def __repr__(self) -> str:  # the URI holds the secret: never show it
        return f"FrontStrategy({self.name!r}, {self.uri.host})"

    @property
    def via(self) -> str:
        return f"via front {self.name} ({self.uri.host} behind a CDN)"

    @property
    def memory_key(self) -> str:
        return f"carriers:{self.name}"

    def options(self) -> list[tuple[str, FrontCandidate, str]]:
        """(key, front, carrier) in the order to try: fronts in order, on each the carriers in
        order; what the memory says worked on this network first."""
        table = {
            f"{carrier} via {front}": (front, carrier)
            for front in self.candidates
            for carrier in self.carriers
        }
        keys = list(table)
        if self.memory is not None:
            keys = self.memory.order(self.network, self.memory_key, keys)
        return [(key, *table[key]) for key in keys]

    def _record(self, key: str, outcome: str | None) -> None:
        if self.memory is None:
            return
        if outcome is None:
            self.memory.record_success(self.network, self.memory_key, key)
        else:
            self.memory.record_failure(self.network, self.memory_key, key, outcome)

    async def dial_carrier(self) -> trio.abc.Stream:
        """The first carrier that opens, over the candidates in :meth:`options` order, skipping
        those that already failed this round. Raises ``UpstreamError`` when none opens:
        :class:`~proxy.strategies.bridge.BridgeDown` when the CDN answered every attempt with
        an error for the bridge's path (a 502: the bridge behind it is gone) and nothing failed
        on the way to the CDN, so that a session being resumed is given up at once."""
        self._current = None
        problems: list[str] = []
        answered = 0  # attempts the CDN answered with an error for the bridge's path
        lost = 0  # attempts that failed on the way to the CDN (perhaps for a moment)
        for key, front, carrier in self.options():
            if key in self._failed or front not in self.candidates:
                continue
            try:
                stream = await self._open(front, carrier)
            except FrontingRefused as exc:
                log.warning("%s: CDN refuses fronting at %s (%d): dropped", self.via, front,
                            exc.status)  # fmt: skip
                self.candidates.remove(front)
                self.refused.append(front)
                problems.append(f"{front}: CDN refuses fronting")
                continue
            except UpstreamError as exc:
                # the front itself is out of reach: its other carriers would fail alike
                for other in (f"{c} via {front}" for c in self.carriers):
                    self._failed.add(other)
                    self._record(other, "unreachable")
                problems.append(f"{front}: {exc}")
                lost += 1
                continue
            except (RemoteProtocolError, ssl.SSLError, trio.TooSlowError, *CARRIER_ERRORS) as exc:
                self._failed.add(key)
                self._record(key, "carrier-failed")
                problems.append(f"{key}: {exc or 'timed out'}")
                if isinstance(exc, RemoteProtocolError):
                    answered += 1
                else:
                    lost += 1
                log.info("%s: %s failed: %s", self.via, key, exc or "timed out")
                continue
            self._current = key
            return stream
        self._failed.clear()
        why = "; ".join(problems) or "every CDN refuses fronting"
        if answered and not lost:
            raise BridgeDown(f"{self.via}: the bridge is down: {why}")
        raise UpstreamError(f"{self.via}: no carrier opens: {why}")

    async def _open_session(self) -> BridgeSession:
        # a carrier that opens but carries no answer to the hello (a CDN buffering the
        # download, say) counts as failed too: move on to the next one
        while True:
            try:
                session = await super()._open_session()
            except UpstreamError:
                key, self._current = self._current, None
                if key is None:
                    raise
                self._failed.add(key)
                self._record(key, "no-answer")
                log.info("%s: %s opened but the hello got no answer", self.via, key)
                continue
            self.worked = self._current
            if self._current is not None:
                self._record(self._current, None)
                log.info("%s: session over %s", self.via, self._current)
            self._failed.clear()
            return session

    async def _open(self, front: FrontCandidate, carrier: str) -> trio.abc.Stream:
        """One carrier through ``front``: TLS with its name, Host and path the bridge's."""
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(front.address)]
        except ValueError:
            addresses = await SystemResolver().resolve(front.address)
        context = ssl.create_default_context(cafile=self.cafile)
        context.set_alpn_protocols(["http/1.1"])

        async def dial() -> trio.abc.Stream:
            tcp = await open_tcp(addresses, front.port, timeout=self.connect_timeout)
            tls = trio.SSLStream(tcp, context, server_hostname=front.name)
            try:
                with trio.fail_after(self.handshake_timeout):
                    await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            return tls

        try:
            first = await dial()
        except UpstreamError as exc:
            raise type(exc)(f"cannot reach {front}: {exc}") from exc
        except (trio.TooSlowError, ssl.SSLError, *CARRIER_ERRORS) as exc:
            raise UpstreamError(f"no TLS with {front}: {exc or 'timed out'}") from exc
        host = self.uri.host if self.uri.port == 443 else self.uri_authority()
        path = self.uri.path
        reused = [first]

        async def dial_again() -> trio.abc.Stream:
            return reused.pop() if reused else await dial()

        with trio.fail_after(self.handshake_timeout):
            if carrier == "ws":
                try:
                    return await open_websocket(first, host, path)
                except BaseException:
                    await trio.aclose_forcefully(first)
                    raise
            if carrier == "split":
                return await open_split(dial_again, host, path, self.uri.secret)
            return await open_poll(dial_again, host, path, self.uri.secret)
