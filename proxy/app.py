"""Wiring: config in, running listeners out; reload on SIGHUP; drain on SIGINT/SIGTERM.

:class:`App` owns one :class:`~proxy.route.dispatcher.Dispatcher` and one
:class:`~proxy.inbound.listener.InboundServer` per ``[[inbound]]``. A reload builds the new
pieces first and only swaps them in when the whole config is valid and every new address could
be bound; established connections keep running on the objects they started with.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import signal
import urllib.parse
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from proxy.config import Config, DnsConfig, InboundConfig, load_config
from proxy.detect.evidence import EvidenceLog
from proxy.errors import ConfigError, ProxyError
from proxy.inbound.base import InboundSettings
from proxy.inbound.listener import InboundServer, RawListener, open_listeners
from proxy.learncli import EVIDENCE_FILE, LEARNED_FILE, default_state_dir
from proxy.pac import PacScript, proxy_directive
from proxy.resolve.base import Resolver
from proxy.resolve.chain import FallbackResolver
from proxy.resolve.doh import DohResolver
from proxy.resolve.dot import DotResolver
from proxy.resolve.plain import PlainResolver
from proxy.resolve.system import SystemResolver
from proxy.route.dispatcher import Dispatcher, DispatchSettings
from proxy.route.learn import LearnedMemory
from proxy.route.router import Router
from proxy.route.site import network_id

log = logging.getLogger("sidestep")


class StartupError(ProxyError):
    """sidestep cannot start (port in use, permission denied): said in one line."""


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:1080"`` / ``"[::1]:1080"`` / ``"localhost:1080"`` -> (ip, port)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    return host, int(port)


def dispatch_settings(config: Config) -> DispatchSettings:
    return DispatchSettings(
        connect_timeout=config.outbound.connect_timeout,
        happy_eyeballs_delay=config.outbound.happy_eyeballs_delay,
        first_flight_max=config.pipeline.first_flight_max,
        first_flight_wait=config.pipeline.first_flight_wait,
        first_flight_timeout=config.pipeline.first_flight_timeout,
        idle_timeout=config.relay.idle_timeout,
        buffer_size=config.relay.buffer_size,
        splice=config.relay.splice,
        resolve_timeout=config.dns.timeout,
    )


def make_resolver(config: Config) -> tuple[Resolver, list[AbstractAsyncContextManager[Any]]]:
    """The resolver the ``[dns]`` section asks for, and the parts of it that must be entered
    (secure resolvers own a connection task) before it is used."""
    dns = config.dns
    if dns.resolver == "udp":
        return PlainResolver(dns.server_addresses, timeout=dns.timeout), []
    if dns.resolver == "secure":
        parts: list[Any] = []
        for ep in dns.endpoints:
            url = urllib.parse.urlsplit(ep.url)
            pins = ep.pin_sha256 or None
            if url.scheme == "https":
                parts.append(
                    DohResolver(
                        ep.url, ep.bootstrap, timeout=dns.timeout, cafile=ep.cafile, pin_sha256=pins
                    )
                )
            else:
                parts.append(
                    DotResolver(
                        url.hostname or "",
                        ep.bootstrap,
                        url.port or 853,
                        timeout=dns.timeout,
                        cafile=ep.cafile,
                        pin_sha256=pins,
                    )
                )
        return FallbackResolver(parts, [ep.url for ep in dns.endpoints]), parts
    return SystemResolver(timeout=dns.timeout), []


async def _hold_open(
    manager: AbstractAsyncContextManager[Any],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``manager`` entered in a task of its own until the app's nursery ends."""
    async with manager:
        task_status.started()
        await trio.sleep_forever()


def open_state(config: Config) -> tuple[LearnedMemory | None, EvidenceLog | None]:
    """The learned memory and evidence log, in the state directory unless configured.

    When the directory cannot be created (a read-only home, say) sidestep still runs: it learns
    in memory only and keeps no evidence, and says so once.
    """
    state = default_state_dir()
    learned = Path(config.router.state_file) if config.router.state_file else state / LEARNED_FILE
    evidence = (
        Path(config.router.evidence_file) if config.router.evidence_file else state / EVIDENCE_FILE
    )
    try:
        for folder in {learned.parent, evidence.parent}:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        log.warning("cannot create %s (%s): learning in memory only, no evidence log", state, exc)
        return LearnedMemory(None, ttl=config.router.learn_ttl), None
    memory = LearnedMemory(learned, ttl=config.router.learn_ttl)
    return memory, EvidenceLog(evidence, max_bytes=config.router.evidence_max_bytes)


def inbound_settings(inbound: InboundConfig, router: Router | None = None) -> InboundSettings:
    pac = None
    if router is not None:
        script = PacScript(router.rules, router.direct_policies(), inbound.name)

        def pac(address: str) -> bytes:
            return script.render(proxy_directive(inbound.protocol, address))

    return InboundSettings(
        name=inbound.name,
        users={u.username: u.password for u in inbound.users},
        handshake_timeout=inbound.handshake_timeout,
        udp=inbound.udp,
        idle_timeout=inbound.idle_timeout,
        pac=pac,
        listen=inbound.listen,
    )


def _allow(inbound: InboundConfig) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(inbound.effective_allow)


@dataclass(slots=True)
class _Running:
    server: InboundServer
    listen: str
    scope: trio.CancelScope


class App:
    """A running sidestep: start with :meth:`run`."""

    def __init__(self, config: Config, *, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.memory, self.evidence = open_state(config)
        self.network = network_id(config.router.network or None)
        #: runs the listeners, state saving and the dispatchers' background control probes
        self._nursery: trio.Nursery | None = None
        self._resolver: Resolver | None = None
        self._dns: DnsConfig | None = None
        self._unopened: list[AbstractAsyncContextManager[Any]] = []
        self.dispatcher = self._dispatcher(config)
        self._running: dict[str, _Running] = {}
        #: servers removed by a reload whose clients may still be connected
        self._retired: list[InboundServer] = []
        self._stopping = trio.Event()
        #: set once every inbound is listening (tests wait on it)
        self.ready = trio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Listen on every inbound until SIGINT/SIGTERM, then drain and return."""
        fresh = await self._bind_new(self.config)  # a port in use fails here, before anything
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._open_resolvers()
                self._swap(self.config, fresh, self.dispatcher, initial=True)
                self.ready.set()
                log.info(
                    "sidestep listening: %s",
                    ", ".join(
                        f"{r.server.name}={r.listen} ({r.server.protocol})"
                        for r in self._running.values()
                    ),
                )
                nursery.start_soon(self._watch_signals, signals)
                nursery.start_soon(self._save_state)
                await self._stopping.wait()
                await self._drain()
                nursery.cancel_scope.cancel()

    def _dispatcher(self, config: Config) -> Dispatcher:
        base_dir = Path(self.config_path).resolve().parent if self.config_path else None
        router = Router(
            config,
            memory=self.memory,
            evidence=self.evidence,
            network=self.network,
            base_dir=base_dir,
        )
        if self._resolver is None or config.dns != self._dns:
            self._resolver, managed = make_resolver(config)
            self._dns = config.dns
            self._unopened.extend(managed)
        return Dispatcher(dispatch_settings(config), self._resolver, router, probes=self._nursery)

    async def _open_resolvers(self) -> None:
        """Enter the secure resolvers built for the current config (each in its own task).

        Resolvers replaced by a reload stay open until shutdown: connections that started
        before the reload may still be using them.
        """
        assert self._nursery is not None
        while self._unopened:
            await self._nursery.start(_hold_open, self._unopened.pop(0))

    async def _save_state(self) -> None:
        """Persist the learned memory every so often (and once more at shutdown)."""
        if self.memory is None:
            return
        try:
            while True:
                await trio.sleep(10)
                self.memory.maybe_save()
        finally:
            self.memory.maybe_save(float("inf"))

    def stop(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does)."""
        self._stopping.set()

    async def _watch_signals(self, signals: trio.abc.AsyncIterator[int]) -> None:  # type: ignore[name-defined]
        async for signum in signals:
            if signum == signal.SIGHUP:
                await self.reload()
            else:
                if self._stopping.is_set():
                    log.warning("second stop signal: closing every connection now")
                    assert self._nursery is not None
                    self._nursery.cancel_scope.cancel()
                    return
                log.info("%s received: no new connections, draining", signal.Signals(signum).name)
                self.stop()

    async def _drain(self) -> None:
        for running in self._running.values():
            running.server.stop_accepting()
        timeout = self.config.shutdown.drain_timeout
        with trio.move_on_after(timeout):
            # control probes still running decide what the last connections taught: let them end
            while self.open_connections() or self.dispatcher.settling:
                await trio.sleep(0.05)
        left = self.open_connections()
        if left:
            log.info("drain time (%.1fs) over: closing %d connection(s)", timeout, left)

    def open_connections(self) -> int:
        self._retired = [server for server in self._retired if server.active]
        return sum(r.server.active for r in self._running.values()) + sum(
            server.active for server in self._retired
        )

    async def reload(self) -> bool:
        """Re-read the config file; swap it in only when it is valid and can be applied."""
        if self.config_path is None:
            log.info("reload: running on the embedded default, nothing to re-read")
            return False
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return False
        try:
            await self._apply(config, initial=False)
        except (StartupError, ConfigError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            return False
        from proxy.logsetup import setup_logging

        try:
            setup_logging(config.log.level, json_lines=config.log.json, file=config.log.file)
        except OSError as exc:
            log.error("reload: cannot open log file %s: %s", config.log.file, exc.strerror)
        log.info("config reloaded from %s", self.config_path)
        return True

    async def _apply(self, config: Config, *, initial: bool) -> None:
        # Build everything that can still refuse the config (rules with missing list files,
        # bad upstreams) before binding anything, so a refusal changes nothing.
        dispatcher = self.dispatcher if initial else self._dispatcher(config)
        if not initial:
            await self._open_resolvers()
        fresh = await self._bind_new(config)
        self._swap(config, fresh, dispatcher, initial=initial)

    async def _bind_new(self, config: Config) -> dict[str, list[RawListener]]:
        """Bind every address the config names that is not bound yet; all or nothing."""
        fresh: dict[str, list[RawListener]] = {}
        try:
            for inb in config.inbound:
                if inb.listen not in self._running and inb.listen not in fresh:
                    fresh[inb.listen] = await _bind(inb)
        except BaseException:
            for listeners in fresh.values():
                for listener in listeners:
                    await listener.aclose()
            raise
        return fresh

    def _swap(
        self,
        config: Config,
        fresh: dict[str, list[RawListener]],
        dispatcher: Dispatcher,
        *,
        initial: bool,
    ) -> None:
        # Running inbounds are keyed by their listen address: an inbound whose address is
        # unchanged keeps its socket (and its clients) and only gets the new settings.
        assert self._nursery is not None
        if initial:
            dispatcher.probes = self._nursery
        wanted = {inb.listen: inb for inb in config.inbound}
        for listen, running in list(self._running.items()):
            inb = wanted.get(listen)
            if inb is None:
                running.server.stop_accepting()
                self._retired.append(running.server)
                del self._running[listen]
                continue
            running.server.name = inb.name
            running.server.protocol = inb.protocol
            running.server.ctx = dispatcher.context(inbound_settings(inb, dispatcher.router))
            running.server.allow = _allow(inb)
        for listen, listeners in fresh.items():
            inb = wanted[listen]
            server = InboundServer(
                name=inb.name,
                protocol=inb.protocol,
                ctx=dispatcher.context(inbound_settings(inb, dispatcher.router)),
                allow=_allow(inb),
            )
            server.bind_info(listeners)
            scope = trio.CancelScope()
            self._running[listen] = _Running(server, listen, scope)
            self._nursery.start_soon(_serve_in_scope, server, listeners, scope)
        self.config = config
        self.dispatcher = dispatcher

    def addresses(self) -> dict[str, tuple[str, int]]:
        """The actual bound address of each inbound (port 0 in the config gets a real one)."""
        return {r.server.name: r.server.bound for r in self._running.values()}


async def _serve_in_scope(
    server: InboundServer,
    listeners: list[RawListener],
    scope: trio.CancelScope,
) -> None:
    with scope:
        await server.serve(listeners)


async def _bind(inb: InboundConfig) -> list[RawListener]:
    host, port = split_listen(inb.listen)
    try:
        return await open_listeners(host, port)
    except OSError as exc:
        why = {
            errno.EADDRINUSE: "the address is already in use (another sidestep or proxy?)",
            errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
            errno.EADDRNOTAVAIL: "this machine has no such address",
        }.get(exc.errno or 0, os.strerror(exc.errno or 0) if exc.errno else str(exc))
        raise StartupError(f"inbound {inb.name!r}: cannot listen on {inb.listen}: {why}") from None
