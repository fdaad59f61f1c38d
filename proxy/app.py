"""Wiring: config in, running listeners out; reload on SIGHUP; drain on SIGINT/SIGTERM.

:class:`App` owns one :class:`~proxy.route.dispatcher.Dispatcher` and one
:class:`~proxy.inbound.listener.InboundServer` per ``[[inbound]]``. A reload builds the new
pieces first and only swaps them in when the whole config is valid and every new address could
be bound; established connections keep running on the objects they started with.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from proxy.config import Config, DnsConfig, DnsServerConfig, InboundConfig, load_config
from proxy.detect.evidence import EvidenceLog
from proxy.errors import ConfigError, ProxyError
from proxy.inbound.base import InboundSettings
from proxy.inbound.dnsserver import DnsServerRunner, DnsSockets
from proxy.inbound.listener import InboundServer, RawListener, open_listeners
from proxy.learncli import EVIDENCE_FILE, LEARNED_FILE, default_state_dir
from proxy.pac import PacScript, proxy_directive
from proxy.resolve.base import Resolver
from proxy.resolve.plain import PlainResolver
from proxy.resolve.service import DnsService
from proxy.resolve.system import SystemResolver
from proxy.route.dispatcher import Dispatcher, DispatchSettings
from proxy.route.learn import LearnedMemory
from proxy.route.router import Router
from proxy.route.site import network_id
from proxy.status import ConnectionRegistry
from proxy.strategies.base import Strategy
from proxy.web.api import build_status
from proxy.web.server import WebRunner, WebSources

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


def make_resolver(
    config: Config,
    *,
    evidence: EvidenceLog | None = None,
    strategies: Mapping[str, Strategy] | None = None,
) -> tuple[Resolver, list[AbstractAsyncContextManager[Any]]]:
    """The resolver the ``[dns]`` section asks for, and the parts of it that must be entered
    (secure resolvers own a connection task, the auto resolver its checker) before it is used.
    ``evidence`` receives the auto resolver's findings; ``strategies`` are the router's, for
    ``[dns] via``."""
    # The secure and auto resolvers (DoH, DoT, the tampering checks) are imported only by the
    # configs that use them: they carry cryptography and h2, megabytes a plain setup never needs.
    dns = config.dns
    if dns.resolver == "udp":
        return PlainResolver(dns.server_addresses, timeout=dns.timeout), []
    if dns.resolver == "secure":
        from proxy.resolve.chain import secure_chain

        chain, managed = secure_chain(dns)
        return chain, list(managed)
    if dns.resolver == "auto":
        from proxy.resolve.auto import build_auto

        profile = config.router.network or None
        auto, parts = build_auto(
            dns, strategies=strategies, evidence=evidence, network=lambda: network_id(profile)
        )
        return auto, parts
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
        #: open tunnels and totals, shared by every dispatcher a reload builds (status page)
        self.status = ConnectionRegistry()
        self.started = time.time()
        #: the status page's web port (``[web]``)
        self.web = WebRunner()
        #: runs the listeners, state saving and the dispatchers' background control probes
        self._nursery: trio.Nursery | None = None
        self._resolver: Resolver | None = None
        self._dns: DnsConfig | None = None
        #: what ``[[rule]] resolver`` may choose, built with the resolver
        self._choices: dict[str, Resolver] = {}
        self._unopened: list[AbstractAsyncContextManager[Any]] = []
        #: the DNS service (cache in front of the resolver) the dispatcher and DNS server share
        self.dns_service: DnsService | None = None
        self.dns_server = DnsServerRunner()
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
        # a port in use fails here, before anything
        dns_sockets, fresh = await self._bind_all(self.config)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._open_resolvers()
                self._swap(self.config, fresh, self.dispatcher, initial=True)
                self._swap_dns(self.config, dns_sockets)
                await self.web.apply(self.config.web, self._web_sources(), nursery)
                self.ready.set()
                dns_at = self.dns_server.address
                log.info(
                    "sidestep listening: %s",
                    ", ".join(
                        [
                            f"{r.server.name}={r.listen} ({r.server.protocol})"
                            for r in self._running.values()
                        ]
                        + ([f"dns={dns_at[0]}:{dns_at[1]} (udp+tcp)"] if dns_at else [])
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
        # [dns.server] changes alone keep the resolver and its cache
        dns = dataclasses.replace(config.dns, server=DnsServerConfig())
        if self._resolver is None or dns != self._dns:
            upstream, managed = make_resolver(
                config, evidence=self.evidence, strategies=router.strategies
            )
            self.dns_service = DnsService.from_config(config.dns, upstream)  # type: ignore[arg-type]
            cache = self.dns_service.cache
            if dns.resolver == "auto" and cache is not None:
                from proxy.resolve.auto import AutoResolver

                assert isinstance(upstream, AutoResolver)
                # answers cached before plain DNS was caught lying must not outlive the switch
                upstream.on_switch.append(lambda: cache.purge(float("inf")))
            self._resolver = self.dns_service
            self._dns = dns
            self._unopened.extend(managed)
            self._unopened.append(self.dns_service)  # after its upstream: runs the prefetch
            self._choices = self._rule_resolvers(config, upstream)
        dispatcher = Dispatcher(
            dispatch_settings(config), self._resolver, router, probes=self._nursery
        )
        dispatcher.resolvers = dict(self._choices)
        dispatcher.status = self.status
        return dispatcher

    def _rule_resolvers(self, config: Config, upstream: Resolver) -> dict[str, Resolver]:
        """The resolvers ``[[rule]] resolver`` can name: "system", and "secure" when there are
        endpoints (the main secure chain when there is one, sharing its health)."""
        choices: dict[str, Resolver] = {"system": SystemResolver(timeout=config.dns.timeout)}
        if config.dns.resolver == "auto":
            from proxy.resolve.auto import AutoResolver

            assert isinstance(upstream, AutoResolver)
            choices["secure"] = upstream.chain
        elif config.dns.resolver == "secure":
            choices["secure"] = upstream
        elif config.dns.endpoints:
            from proxy.resolve.chain import secure_chain

            chain, managed = secure_chain(config.dns)
            self._unopened.extend(managed)
            choices["secure"] = chain
        return choices

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
        self.dns_server.stop_accepting()
        self.web.stop_accepting()
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
        return (
            sum(r.server.active for r in self._running.values())
            + sum(server.active for server in self._retired)
            + self.dns_server.active
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
        dns_sockets, fresh = await self._bind_all(config)
        self._swap(config, fresh, dispatcher, initial=initial)
        self._swap_dns(config, dns_sockets)
        assert self._nursery is not None
        await self.web.apply(config.web, self._web_sources(), self._nursery)

    async def _bind_all(
        self, config: Config
    ) -> tuple[DnsSockets | None, dict[str, list[RawListener]]]:
        """Bind the DNS server's and every inbound's new addresses; all or nothing."""
        listen = config.dns.server.listen
        try:
            dns_sockets = self.dns_server.bind(config.dns.server)
        except OSError as exc:
            raise StartupError(f"DNS server: cannot listen on {listen}: {_why(exc)}") from None
        try:
            return dns_sockets, await self._bind_new(config)
        except BaseException:
            if dns_sockets is not None:
                dns_sockets.close()
            raise

    def _swap_dns(self, config: Config, sockets: DnsSockets | None) -> None:
        assert self._nursery is not None and self.dns_service is not None
        self.dns_server.apply(config.dns.server, self.dns_service, sockets, self._nursery)

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

    # -- the status page ---------------------------------------------------------------------

    def _web_sources(self) -> WebSources:
        return WebSources(status=self.status_document, pac=self.pac_for)

    def status_document(self) -> dict[str, Any]:
        """What ``/``, ``/api/status`` and ``/metrics`` show (:mod:`proxy.web.api`)."""
        return build_status(
            connections=self.status,
            memory=self.memory,
            network=self.network,
            dns_config=self.config.dns,
            dns_service=self.dns_service,
            evidence_path=self.evidence.path if self.evidence is not None else None,
            started=self.started,
            now=time.time(),
            clock_now=trio.current_time(),
        )

    def pac_for(self, host: str) -> bytes | None:
        """The PAC script naming the first inbound a browser can use, for a client that
        reached the web port at ``host`` (used when the inbound listens on every address)."""
        for inb in self.config.inbound:
            running = self._running.get(inb.listen)
            if inb.protocol == "transparent" or running is None:
                continue
            pac = inbound_settings(inb, self.dispatcher.router).pac
            if pac is None:
                return None
            bound_host, port = running.server.bound
            if ipaddress.ip_address(bound_host.split("%", 1)[0]).is_unspecified:
                bound_host = host
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            return pac(f"{shown}:{port}")
        return None


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
        raise StartupError(
            f"inbound {inb.name!r}: cannot listen on {inb.listen}: {_why(exc)}"
        ) from None


def _why(exc: OSError) -> str:
    """Why a listening socket could not be bound, in words."""
    return {
        errno.EADDRINUSE: "the address is already in use (another sidestep or proxy?)",
        errno.EACCES: "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        errno.EADDRNOTAVAIL: "this machine has no such address",
    }.get(exc.errno or 0, os.strerror(exc.errno or 0) if exc.errno else str(exc))
