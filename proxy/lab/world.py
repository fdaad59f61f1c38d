"""The censor lab's world: a small fake Internet on loopback, censored by one profile.

:func:`open_lab` starts every host, each on its own 127.x.y.z address, and yields a :class:`Lab`
that knows where everything is and what the censor did. A client under test needs no hooks:
point its resolver at :attr:`Lab.isp_resolver` and trust :attr:`Lab.ca_file`.

The address plan (public addresses are what DNS gives out)::

    127.53.0.1   ISP resolver (UDP+TCP): answers from the lab zone, lies as the profile says
    127.53.0.2   authoritative server for the zone (ns.lab): always honest, a control
    127.53.8.8   a "public resolver": honest, unless the profile injects on the path
    127.53.9.9   no resolver at all; under injection the censor still answers from here
    127.54.1.1/2 dns.famous.lab, the well-known DoH service (two addresses, like real ones)
    127.54.2.2   doh.small.lab, a lesser-known DoH service
    127.60.0.x   origins at home: open.lab (never censored), blocked.lab, throttled.lab, ...
    127.61.0.1   http-blocked.lab, plain HTTP only
    127.62.0.0/16  "foreign hosting" (frozen.lab); 127.63.0.0/16 IP-blocked (ip-blocked.lab)
    127.70.0.1   the CDN edge: cdn.front.lab and backend.lab (routes by Host header)
    127.80.0.x   bridge slots (bridge1.lab, bridge2.lab): empty until something is attached
    127.5.3.17   the ISP's block page; 127.66.6.6 the ISP's NXDOMAIN "search" page

Every service the censor sits in front of (origins, DoH, CDN, bridge slots) really listens on a
private twin address, the public one plus 100 in the second octet (127.60.0.2 -> 127.160.0.2),
and a :class:`~proxy.lab.middlebox.Middlebox` on the public address forwards to it under the
profile's :class:`~proxy.lab.rules.CensorEngine`. Each TLS origin also answers UDP on its HTTPS
port number (an echo standing in for HTTP/3, see :meth:`Lab.udp_address`), behind a
:class:`~proxy.lab.udpbox.UdpMiddlebox` running the same engine. DNS is censored by the ISP
resolver's :class:`~proxy.lab.dnsserver.DnsPolicy` and, for profiles that inject, by a
:class:`~proxy.lab.dnsinject.DnsInjector` on UDP at every resolver address.

Ports are 443/80/53 when the process may bind them, else 10443/10080/10053 (see
:func:`choose_ports`); URLs from :meth:`Lab.url` always carry the right one. Everything binds to
127.0.0.0/8 only, and everything started (sockets, tasks, the temporary directory holding the CA
file) is gone when the context exits, on errors too.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from dns.rdatatype import A

from proxy.lab.ca import LabCA
from proxy.lab.cdn import CdnEdge
from proxy.lab.clock import LabClock, SystemClock
from proxy.lab.dnsinject import DnsInjector
from proxy.lab.dnsserver import DnsLogEntry, DnsServer, Zone
from proxy.lab.dohserver import DohServer
from proxy.lab.middlebox import Middlebox
from proxy.lab.origin import OriginServer
from proxy.lab.rules import CensorEngine, Hit
from proxy.lab.udpbox import UdpEchoServer, UdpMiddlebox
from proxy.resolve.plain import PlainResolver

if TYPE_CHECKING:
    from proxy.lab.profiles import Profile

__all__ = [
    "AbroadResolver", "BridgeSlot", "DohEndpoint", "Lab", "LabEvent", "LabPorts", "OriginSpec",
    "choose_ports", "open_lab", "private_ip", "reraise_single",
]  # fmt: skip

Address = tuple[str, int]

ZONE_APEX = "lab"

# --- the address plan --------------------------------------------------------------------------

ISP_RESOLVER_IP = "127.53.0.1"
AUTHORITATIVE_IP = "127.53.0.2"
PUBLIC_RESOLVER_IP = "127.53.8.8"
SILENT_RESOLVER_IP = "127.53.9.9"
FAMOUS_DOH = "dns.famous.lab"
FAMOUS_DOH_IPS = ("127.54.1.1", "127.54.1.2")
SMALL_DOH = "doh.small.lab"
SMALL_DOH_IPS = ("127.54.2.2",)
CDN_FRONT = "cdn.front.lab"
CDN_BACKEND = "backend.lab"
CDN_IP = "127.70.0.1"
BLOCKPAGE_NAME = "blockpage.lab"
BLOCKPAGE_IP = "127.5.3.17"
HIJACK_NAME = "search.isp.lab"
HIJACK_IP = "127.66.6.6"
#: Iran's block-page address: answered by the ``ir`` ISP resolver, never dialled by the lab
BOGON_IP = "10.10.34.35"
#: where injected answers point: nothing listens there
FORGED_IPS = ("127.98.0.1", "127.98.0.2", "127.98.0.3")
FOREIGN_NET = "127.62.0.0/16"
IP_BLOCKED_NET = "127.63.0.0/16"
BRIDGE_IPS = ("127.80.0.1", "127.80.0.2")

OPEN = "open.lab"
BLOCKED = "blocked.lab"
THROTTLED = "throttled.lab"
TWITTER = "twitter.com.lab"
MICROSOFT = "microsoft.com.lab"
POISONED = "poisoned.lab"
HTTP_BLOCKED = "http-blocked.lab"
FROZEN = "frozen.lab"
IP_BLOCKED = "ip-blocked.lab"


@dataclass(frozen=True, slots=True)
class OriginSpec:
    """An origin site: its name, public address, and which schemes it serves."""

    name: str
    ip: str
    https: bool = True
    http: bool = True


ORIGINS: tuple[OriginSpec, ...] = (
    OriginSpec(OPEN, "127.60.0.1"),
    OriginSpec(BLOCKED, "127.60.0.2"),
    OriginSpec(THROTTLED, "127.60.0.3"),
    OriginSpec(TWITTER, "127.60.0.4"),
    OriginSpec(MICROSOFT, "127.60.0.5"),
    OriginSpec(POISONED, "127.60.0.6"),
    OriginSpec(HTTP_BLOCKED, "127.61.0.1", https=False),
    OriginSpec(FROZEN, "127.62.0.1"),
    OriginSpec(IP_BLOCKED, "127.63.0.1"),
)


def private_ip(public: str) -> str:
    """The address a censored service really listens on: second octet + 100."""
    a, b, c, d = (int(x) for x in public.split("."))
    if a != 127 or b >= 156:
        raise ValueError(f"{public} has no private twin in the lab plan")
    return f"127.{b + 100}.{c}.{d}"


@dataclass(frozen=True, slots=True)
class LabPorts:
    """The ports every lab host uses."""

    https: int = 443
    http: int = 80
    dns: int = 53

    def of(self, scheme: str) -> int:
        return {"https": self.https, "http": self.http, "dns": self.dns}[scheme]


STANDARD_PORTS = LabPorts()
HIGH_PORTS = LabPorts(10443, 10080, 10053)


def choose_ports() -> LabPorts:
    """443/80/53 when this process may bind ports below 1024 (root, CAP_NET_BIND_SERVICE or a
    lowered ``ip_unprivileged_port_start``), otherwise 10443/10080/10053."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((AUTHORITATIVE_IP, 0))  # the address exists: loopback is all of 127/8
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.53.255.254", STANDARD_PORTS.dns))  # an address the lab never uses
    except PermissionError:
        return HIGH_PORTS
    except OSError:
        pass  # in use or odd: the real binds will say so
    return STANDARD_PORTS


@dataclass(frozen=True, slots=True)
class DohEndpoint:
    """A DoH service as a client configures it: URL and the addresses to reach it without DNS."""

    name: str
    url: str
    bootstrap: tuple[str, ...]
    #: the well-known one censors block first
    famous: bool


@dataclass(frozen=True, slots=True)
class BridgeSlot:
    """A place for a bridge server, already behind the censor and the CDN.

    Attach one with :meth:`Lab.start_service`, listening on ``direct`` (reached by clients at
    ``public``, through the censor) and/or ``behind_cdn`` (plain HTTP; the CDN edge routes
    requests with ``Host: <name>`` there).
    """

    index: int
    name: str
    public: Address
    direct: Address
    behind_cdn: Address


@dataclass(frozen=True, slots=True)
class LabEvent:
    """One thing the censor did, from the lab's own logs (DNS lies and DPI decisions)."""

    time: float
    #: "dns" (resolver lie or injection), "tcp" or "udp" (a middlebox decision)
    layer: str
    #: the host name it concerned, when the lab can tell
    name: str | None
    #: a :class:`~proxy.lab.rules.ActionKind` or :class:`~proxy.lab.dnsserver.DnsMode` value
    action: str
    detail: str
    #: the server address of a TCP or UDP decision
    address: str | None = None


@dataclass(slots=True)
class Lab:
    """A running lab; built by :func:`open_lab`, valid inside its ``async with``."""

    profile: Profile
    ports: LabPorts
    ca: LabCA
    ca_file: Path
    #: a private (0700) temporary directory, removed when the lab stops
    workdir: Path
    engine: CensorEngine
    zone: Zone
    #: the resolver a censored network hands out (the "system" resolver inside the lab)
    isp_resolver: Address
    public_resolver: Address
    #: an address where no resolver listens
    silent_resolver: Address
    authoritative: Address
    origins: tuple[OriginSpec, ...]
    doh_endpoints: tuple[DohEndpoint, ...] = ()
    bridge_slots: tuple[BridgeSlot, ...] = ()
    cdn: CdnEdge | None = None
    #: public (ip, port) -> the middlebox there
    middleboxes: dict[Address, Middlebox] = field(default_factory=dict)
    #: (name, scheme) -> the origin server answering for it
    servers: dict[tuple[str, str], OriginServer] = field(default_factory=dict)
    #: public (ip, port) -> the UDP middlebox there; origin name -> its UDP echo service
    udp_boxes: dict[Address, UdpMiddlebox] = field(default_factory=dict)
    udp_servers: dict[str, UdpEchoServer] = field(default_factory=dict)
    doh_servers: dict[str, DohServer] = field(default_factory=dict)
    dns_servers: list[DnsServer] = field(default_factory=list)
    injectors: list[DnsInjector] = field(default_factory=list)
    _names_at: dict[str, list[str]] = field(default_factory=dict)
    _static: list[tuple[Hit, str]] = field(default_factory=list)
    _nursery: trio.Nursery | None = None

    # -- where things are ---------------------------------------------------------------------

    def addresses(self, name: str) -> tuple[str, ...]:
        """The public addresses the lab zone gives for ``name`` (honest DNS)."""
        _, answer, _ = self.zone.lookup(name, "A")
        return tuple(r.address for rrset in answer if rrset.rdtype == A for r in rrset)

    def address(self, name: str, scheme: str = "https") -> Address:
        """The first public ``(ip, port)`` of ``name`` for ``scheme``."""
        found = self.addresses(name)
        if not found:
            raise KeyError(f"{name} is not in the lab zone")
        return found[0], self.ports.of(scheme)

    def udp_address(self, name: str) -> Address:
        """The public UDP ``(ip, port)`` of TLS origin ``name``: its HTTP/3 stand-in, which
        echoes ``b"h3:" + payload`` (through the censor, on the HTTPS port number)."""
        if name not in self.udp_servers:
            raise KeyError(f"{name} has no UDP service in the lab")
        return self.address(name)

    def url(self, name: str, path: str = "/", scheme: str = "https") -> str:
        """``scheme://name[:port]/path``, the port written only when it is not the default."""
        port = self.ports.of(scheme)
        default = {"https": 443, "http": 80}[scheme]
        netloc = name if port == default else f"{name}:{port}"
        return f"{scheme}://{netloc}{path}"

    def host_header(self, name: str, scheme: str = "https") -> str:
        """What a client puts in ``Host`` for ``url(name, scheme=scheme)``."""
        return self.url(name, "/", scheme).split("://", 1)[1].rstrip("/")

    # -- what the censor does and did ---------------------------------------------------------

    def dns_log(self) -> list[DnsLogEntry]:
        """Every DNS lie and injection, by time."""
        entries = [e for s in self.dns_servers for e in s.log]
        entries += [e for i in self.injectors for e in i.log]
        return sorted(entries, key=lambda e: e.time)

    def events(self, name: str | None = None) -> list[LabEvent]:
        """The censor's record, by time; with ``name``, only what concerned that host."""
        out = [
            LabEvent(e.time, "dns", e.qname, e.mode.value, f"{e.transport} {e.qtype} from "
                     f"{e.client[0]}:{e.client[1]}")
            for e in self.dns_log()
        ]  # fmt: skip
        static = {id(hit): address for hit, address in self._static}
        for hit in self.engine.log:
            ip = hit.flow.server_ip if hit.flow is not None else static.get(id(hit))
            here = self._names_at.get(ip or "", [])
            named = [n for n in here if f" {n} ~" in hit.trigger]
            who = named[0] if named else (here[0] if len(here) == 1 else None)
            detail = f"{hit.rule}: {hit.trigger}" + (" (residual)" if hit.residual else "")
            layer = hit.flow.proto if hit.flow is not None else "tcp"
            out.append(LabEvent(hit.time, layer, who, hit.action.value, detail, ip))
        out.sort(key=lambda e: e.time)
        if name is None:
            return out
        mine = set(self.addresses(name))
        return [e for e in out if e.name == name or (e.name is None and e.address in mine)]

    def describe(self, name: str, scheme: str | None = None) -> str:
        """What the profile does to ``name`` (DNS, then each scheme), predicted from its rules;
        ``"quic"`` is a QUIC Initial to the UDP service of a TLS origin."""
        from proxy.lab.profiles import predict_dns, predict_tcp, predict_udp

        parts = []
        dns_part = predict_dns(self.profile, name)
        if dns_part:
            parts.append(dns_part)
        spec = next((o for o in self.origins if o.name == name), None)
        if scheme is not None:
            schemes: tuple[str, ...] = (scheme,)
        elif spec is not None:
            schemes = ("https",) * spec.https + ("http",) * spec.http + ("quic",) * spec.https
        else:
            schemes = ("https",)  # the DoH services, the CDN and the bridge slots
        for s in schemes:
            for ip in self.addresses(name):
                if s == "quic":
                    verdict = predict_udp(self.profile, (ip, self.ports.https))
                else:
                    verdict = predict_tcp(self.profile, name, (ip, self.ports.of(s)), s)
                parts.append(verdict if scheme else f"{s}: {verdict}")
        return "; ".join(dict.fromkeys(parts)) or "-"

    # -- extending the world ------------------------------------------------------------------

    async def start_service(self, serve: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """Start ``serve(*args, task_status=...)`` inside the lab (e.g. a bridge in a slot);
        it is cancelled with the lab. Returns what it reports to ``task_status.started``."""
        if self._nursery is None:
            raise RuntimeError("the lab is not running")
        return await self._nursery.start(serve, *args)


@asynccontextmanager
async def open_lab(
    profile: str | Profile = "none",
    *,
    clock: LabClock | None = None,
    ca: LabCA | None = None,
    ports: LabPorts | None = None,
    extra_names: Sequence[str] = (),
) -> AsyncIterator[Lab]:
    """Start the whole lab under ``profile`` (a name from :data:`proxy.lab.profiles.PROFILES`
    or a :class:`~proxy.lab.profiles.Profile`) and stop everything on exit.

    ``clock`` drives the censor's decisions (default: trio's clock, so a MockClock works);
    ``ca`` reuses a CA across labs; ``extra_names`` adds more TLS+HTTP origins (127.60.1.x).
    ``ports`` fixes the ports; by default they are :func:`choose_ports`, and when another lab
    already holds those, other high ports are tried (the lab's URLs always carry the right one).
    """
    # profiles.py builds its rules from this module's address plan, hence the late import
    from proxy.lab.profiles import Profile, get_profile

    chosen = profile if isinstance(profile, Profile) else get_profile(profile)
    extras = tuple(OriginSpec(n, f"127.60.1.{i + 1}") for i, n in enumerate(extra_names))
    if len(extras) > 250:
        raise ValueError("at most 250 extra names")
    candidates = [ports] if ports is not None else _port_candidates()
    workdir = Path(tempfile.mkdtemp(prefix="sidestep-lab-"))  # mode 0700
    try:
        lab_ca = ca or LabCA.create()
        for i, attempt in enumerate(candidates):
            lab = _new_lab(chosen, attempt, lab_ca, workdir, clock, extras)
            try:
                async with trio.open_nursery() as nursery:
                    lab._nursery = nursery
                    try:
                        await _Builder(lab, nursery).build()
                    except OSError as exc:
                        if exc.errno != errno.EADDRINUSE or i == len(candidates) - 1:
                            raise
                        nursery.cancel_scope.cancel()  # taken: try the next ports
                        continue
                    try:
                        yield lab
                    finally:
                        lab._nursery = None
                        nursery.cancel_scope.cancel()
                    return
            except BaseExceptionGroup as group:
                reraise_single(group)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _port_candidates() -> list[LabPorts]:
    first = choose_ports()
    spare = [LabPorts(p, p + 1, p + 2) for p in random.sample(range(20000, 60000, 3), 6)]
    return [first, *([HIGH_PORTS] if first != HIGH_PORTS else []), *spare]


def reraise_single(group: BaseExceptionGroup[BaseException]) -> None:
    """Re-raise the one exception a nursery wrapped (a failing test's assertion, say)."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if exc is group:
        raise group
    raise exc from exc.__cause__


def _new_lab(
    profile: Profile,
    ports: LabPorts,
    ca: LabCA,
    workdir: Path,
    clock: LabClock | None,
    extras: tuple[OriginSpec, ...],
) -> Lab:
    origins = ORIGINS + extras
    zone = Zone(ZONE_APEX)
    for spec in origins:
        zone.add(spec.name, spec.ip)
    zone.add(CDN_FRONT, CDN_IP).add(CDN_BACKEND, CDN_IP)
    zone.add(FAMOUS_DOH, *FAMOUS_DOH_IPS).add(SMALL_DOH, *SMALL_DOH_IPS)
    zone.add("ns.lab", AUTHORITATIVE_IP).add("resolver.isp.lab", ISP_RESOLVER_IP)
    zone.add(BLOCKPAGE_NAME, BLOCKPAGE_IP).add(HIJACK_NAME, HIJACK_IP)
    slots = []
    for i, ip in enumerate(BRIDGE_IPS, start=1):
        name = f"bridge{i}.lab"
        zone.add(name, ip)
        hidden = private_ip(ip)
        slots.append(BridgeSlot(i, name, (ip, ports.https), (hidden, ports.https),
                                (hidden, ports.http)))  # fmt: skip
    https = "" if ports.https == 443 else f":{ports.https}"
    doh = (
        DohEndpoint(FAMOUS_DOH, f"https://{FAMOUS_DOH}{https}/dns-query", FAMOUS_DOH_IPS, True),
        DohEndpoint(SMALL_DOH, f"https://{SMALL_DOH}{https}/dns-query", SMALL_DOH_IPS, False),
    )
    return Lab(
        profile=profile,
        ports=ports,
        ca=ca,
        ca_file=ca.write_cert(workdir / "lab-ca.pem"),
        workdir=workdir,
        engine=profile.engine(clock or SystemClock()),
        zone=zone,
        isp_resolver=(ISP_RESOLVER_IP, ports.dns),
        public_resolver=(PUBLIC_RESOLVER_IP, ports.dns),
        silent_resolver=(SILENT_RESOLVER_IP, ports.dns),
        authoritative=(AUTHORITATIVE_IP, ports.dns),
        origins=origins,
        doh_endpoints=doh,
        bridge_slots=tuple(slots),
    )


class _Builder:
    """Starts the lab's hosts in the lab's nursery."""

    def __init__(self, lab: Lab, nursery: trio.Nursery) -> None:
        self.lab = lab
        self.nursery = nursery
        self.ports = lab.ports

    async def build(self) -> None:
        await self._dns()
        await self._doh()
        await self._origins()
        await self._cdn()
        for slot in self.lab.bridge_slots:
            await self._censor(slot.public, slot.direct, slot.name)
        for name, ip in ((BLOCKPAGE_NAME, BLOCKPAGE_IP), (HIJACK_NAME, HIJACK_IP)):
            # the ISP's own pages: not behind the censor
            await self._origin(name, (ip, self.ports.https), tls=True)
            await self._origin(name, (ip, self.ports.http), tls=False)

    async def _censor(self, public: Address, private: Address, name: str) -> None:
        lab = self.lab
        lab._names_at.setdefault(public[0], []).append(name)
        box = Middlebox(lab.engine, listen=public, upstream=private)
        before = len(lab.engine.log)
        await self.nursery.start(box.serve)
        # a rule refusing or dropping every flow was decided (and logged) at start-up
        lab._static += [(hit, public[0]) for hit in lab.engine.log[before:]]
        lab.middleboxes[public] = box

    async def _origin(self, name: str, address: Address, *, tls: bool) -> OriginServer:
        context = self.lab.ca.issue(name).server_context(alpn=("http/1.1",)) if tls else None
        server = OriginServer(name, tls=context)
        await self.nursery.start(server.serve, *address)
        self.lab.servers[(name, "https" if tls else "http")] = server
        return server

    async def _dns(self) -> None:
        lab, port = self.lab, self.ports.dns
        zone, profile = lab.zone, lab.profile
        inject = profile.injection
        start = self.nursery.start

        async def server(address: Address, **kw: Any) -> None:
            dns_server = DnsServer(zone, address, **kw)
            await start(dns_server.serve)
            lab.dns_servers.append(dns_server)

        async def injector(address: Address, upstream: Address | None) -> None:
            assert inject is not None
            tap = DnsInjector(inject, address, upstream=upstream)
            await start(tap.serve)
            lab.injectors.append(tap)

        await server(lab.authoritative)
        if inject is None:
            await server(lab.isp_resolver, policy=profile.isp)
            await server(lab.public_resolver)
            return
        # the censor taps UDP on the way to every resolver address; TCP reaches the resolver
        behind = (private_ip(ISP_RESOLVER_IP), port)
        await server(behind, policy=profile.isp)
        await injector(lab.isp_resolver, behind)
        await server(lab.isp_resolver, policy=profile.isp, udp=False)
        await injector(lab.public_resolver, lab.authoritative)
        await server(lab.public_resolver, udp=False)
        await injector(lab.silent_resolver, None)

    async def _doh(self) -> None:
        lab = self.lab
        for endpoint in lab.doh_endpoints:
            hidden = (private_ip(endpoint.bootstrap[0]), self.ports.https)
            server = DohServer(lab.zone, lab.ca.issue(endpoint.name), hidden)
            await self.nursery.start(server.serve)
            lab.doh_servers[endpoint.name] = server
            for ip in endpoint.bootstrap:
                await self._censor((ip, self.ports.https), hidden, endpoint.name)

    async def _origins(self) -> None:
        for spec in self.lab.origins:
            hidden = private_ip(spec.ip)
            for scheme in ("https", "http"):
                if getattr(spec, scheme):
                    port = self.ports.of(scheme)
                    await self._origin(spec.name, (hidden, port), tls=scheme == "https")
                    await self._censor((spec.ip, port), (hidden, port), spec.name)
            if spec.https:
                await self._udp(spec.name, (spec.ip, self.ports.https), (hidden, self.ports.https))

    async def _udp(self, name: str, public: Address, private: Address) -> None:
        echo = UdpEchoServer(name)
        await self.nursery.start(echo.serve, *private)
        box = UdpMiddlebox(self.lab.engine, listen=public, upstream=private)
        await self.nursery.start(box.serve)
        self.lab.udp_servers[name] = echo
        self.lab.udp_boxes[public] = box

    async def _cdn(self) -> None:
        lab, http = self.lab, self.ports.http
        hidden = private_ip(CDN_IP)
        front_site = ("127.170.0.2", http)
        backend_site = ("127.170.0.3", http)
        await self._origin(CDN_FRONT, front_site, tls=False)
        await self._origin(CDN_BACKEND, backend_site, tls=False)
        routes = {CDN_FRONT: front_site, CDN_BACKEND: backend_site}
        routes.update({slot.name: slot.behind_cdn for slot in lab.bridge_slots})
        issued = lab.ca.issue(CDN_FRONT, CDN_BACKEND, *(s.name for s in lab.bridge_slots))
        edge = CdnEdge(issued, routes, (hidden, self.ports.https))
        await self.nursery.start(edge.serve)
        lab.cdn = edge
        await self._censor((CDN_IP, self.ports.https), (hidden, self.ports.https), CDN_FRONT)
        lab._names_at[CDN_IP].append(CDN_BACKEND)


class AbroadResolver:
    """DNS for a machine outside the censored network (a bridge, a CDN's origin): honest
    answers from the lab's authoritative server, each lab host reached at its private twin
    address, where no censor sits in between."""

    def __init__(self, lab: Lab) -> None:
        self.inner = PlainResolver([lab.authoritative])

    async def resolve(self, host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        return [ipaddress.ip_address(private_ip(str(a))) for a in await self.inner.resolve(host)]
