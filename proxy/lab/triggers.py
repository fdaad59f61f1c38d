"""What the censor matches on: flows, the client bytes a rule may see, and the triggers.

A :class:`Trigger` is asked twice per flow at most: ``at_connect`` with addresses only, and
``at_segment`` with a :class:`ClientData`, the client bytes as the rule's :class:`Reassembly`
mode lets it see them (one segment, the first TLS record, or the whole stream so far). A match
returns a short description for the censor's log; ``None`` means no match. ``for_every_client``
lets a middlebox refuse or drop SYNs in the kernel when a rule covers every flow to an address.
UDP flows (:mod:`proxy.lab.udpbox`) give one datagram per ``at_segment``; :class:`QuicInitial`
reads those.

The engine that runs rules over flows is :mod:`proxy.lab.rules`, which re-exports all of this.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import ipaddress
import re
from dataclasses import dataclass
from typing import Protocol

import h11

from proxy.errors import RemoteProtocolError
from proxy.protocols.tls_hello import looks_like_tls, parse_client_hello

__all__ = [
    "AllOf", "AnyData", "AnyOf", "ClientData", "Destination", "Flow", "FragmentedHello",
    "HttpHost", "Keyword", "NameMatch", "ProtocolAllowList", "QuicInitial", "Reassembly", "Sni",
    "Trigger", "build_quic_initial",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Flow:
    """One connection (TCP) or association (UDP), oriented client -> server."""

    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    proto: str = "tcp"


class Reassembly(enum.Enum):
    NONE = "none"
    FIRST_RECORD = "first_record"
    FULL = "full"


class SeenBytes(Protocol):
    """What a flow has shown the censor so far (the engine's per-flow state)."""

    segments: int
    first: bytes
    stream: bytearray


def _first_record_sni(payload: bytes) -> str | None:
    """The server name if it lies wholly inside ``payload``, a (possibly cut) handshake record."""
    try:
        if payload[0] != 1:
            return None
        end = min(len(payload), 4 + int.from_bytes(payload[1:4], "big"))
        pos = 4 + 2 + 32
        pos += 1 + payload[pos]  # session id
        pos += 2 + int.from_bytes(payload[pos : pos + 2], "big")  # cipher suites
        pos += 1 + payload[pos]  # compression methods
        ext_end = min(end, pos + 2 + int.from_bytes(payload[pos : pos + 2], "big"))
        pos += 2
        while pos + 4 <= ext_end:
            ext_type = int.from_bytes(payload[pos : pos + 2], "big")
            length = int.from_bytes(payload[pos + 2 : pos + 4], "big")
            pos += 4
            if pos + length > ext_end:
                return None
            if ext_type == 0 and length >= 5 and payload[pos + 2] == 0:
                name_len = int.from_bytes(payload[pos + 3 : pos + 5], "big")
                name = payload[pos + 5 : pos + 5 + name_len]
                return name.decode("ascii") if len(name) == name_len and name else None
            pos += length
    except (IndexError, UnicodeDecodeError):
        return None
    return None


class ClientData:
    """The client bytes one rule may look at for the current segment, under its reassembly."""

    def __init__(self, state: SeenBytes, segment: bytes, reassembly: Reassembly) -> None:
        self._state = state
        self.segment = segment
        self.reassembly = reassembly
        #: 0-based number of this segment in the flow
        self.index = state.segments - 1

    def payload(self) -> bytes:
        """This segment alone (NONE) or everything the client sent so far (other modes)."""
        if self.reassembly is Reassembly.NONE:
            return self.segment
        return bytes(self._state.stream)

    @functools.cached_property
    def sni(self) -> str | None:
        """The ClientHello's server name as this reassembly mode sees it now, if visible."""
        data = self.payload()
        if self.reassembly is Reassembly.FIRST_RECORD:
            first = self._state.first
            if len(first) < 5 or not looks_like_tls(first[:3]):
                return None  # the record header was cut: this box gives up on the flow
            end = 5 + int.from_bytes(first[3:5], "big")
            return _first_record_sni(data[5:end]) if len(data) >= end else None
        try:
            hello = parse_client_hello(data)
        except RemoteProtocolError:
            return None
        return hello.sni if hello else None

    @functools.cached_property
    def http_host(self) -> str | None:
        """The Host header of an HTTP/1.x request head, lower-cased, without a port."""
        conn = h11.Connection(h11.SERVER)
        try:
            conn.receive_data(self.payload())
            event = conn.next_event()
        except h11.ProtocolError:
            return None
        if not isinstance(event, h11.Request):
            return None
        host = dict(event.headers).get(b"host", b"").decode("latin-1").lower()
        if host.startswith("["):
            return host[1 : host.find("]")]
        return host.split(":", 1)[0] if host.count(":") == 1 else host


# --- triggers ----------------------------------------------------------------------------------


class Trigger:
    """Base of the matchers. A match returns a short description (it goes into the log)."""

    def at_connect(self, flow: Flow) -> str | None:
        """Match on addresses only, when the flow starts."""
        return None

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        """Match when a client segment arrives."""
        return None

    def for_every_client(self, server_ip: str, server_port: int) -> bool | None:
        """True: matches every flow to this server at connect; False: none; None: it depends."""
        return False


class NameMatch(enum.Enum):
    EXACT = "exact"
    #: the name itself or any name below it (``twimg.com`` covers ``pbs.twimg.com``)
    SUFFIX = "suffix"
    #: shell-style pattern over the whole name, with the bug real lists had: ``*t.co*`` also
    #: matches ``microsoft.com`` and ``reddit.com``
    GLOB = "glob"
    REGEX = "regex"


def _name_matches(name: str, patterns: tuple[str, ...], mode: NameMatch) -> str | None:
    name = name.lower().rstrip(".")
    for p in patterns:
        if mode is NameMatch.EXACT:
            ok = name == p
        elif mode is NameMatch.SUFFIX:
            ok = name == p or name.endswith("." + p)
        elif mode is NameMatch.GLOB:
            ok = fnmatch.fnmatchcase(name, p)
        else:
            ok = re.search(p, name) is not None
        if ok:
            return p
    return None


def _patterns(value: str | tuple[str, ...], mode: NameMatch) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items:
        raise ValueError("a name trigger needs at least one pattern")
    if mode is NameMatch.REGEX:
        for p in items:
            re.compile(p)
        return items
    return tuple(p.lower().rstrip(".").removeprefix("*.") if mode is NameMatch.SUFFIX
                 else p.lower().rstrip(".") for p in items)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _NameTrigger(Trigger):
    names: str | tuple[str, ...]
    mode: NameMatch = NameMatch.EXACT

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _patterns(self.names, self.mode))

    def _check(self, label: str, name: str | None) -> str | None:
        hit = _name_matches(name, self.names, self.mode) if name else None  # type: ignore[arg-type]
        return None if hit is None else f"{label} {name} ~ {self.mode.value} {hit}"


@dataclass(frozen=True, slots=True)
class Sni(_NameTrigger):
    """The ClientHello's server name matches one of ``names`` (a name or a tuple of them)."""

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        return self._check("sni", data.sni)


@dataclass(frozen=True, slots=True)
class HttpHost(_NameTrigger):
    """A plain-HTTP request's Host header matches one of ``names`` (case-insensitive)."""

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        return self._check("host", data.http_host)


@dataclass(frozen=True, slots=True)
class Keyword(Trigger):
    """``keyword`` occurs in the client's bytes (or only in the first line: ``request_line``)."""

    keyword: bytes
    request_line: bool = False

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        payload = data.payload()
        if self.request_line:
            # the request line starts the stream: a later lone segment does not hold it
            starts = data.index == 0 or data.reassembly is not Reassembly.NONE
            payload = payload.split(b"\r\n", 1)[0] if starts else b""
        return f"keyword {self.keyword!r}" if self.keyword in payload else None


@dataclass(frozen=True, slots=True)
class Destination(Trigger):
    """The server address is in one of ``networks``, its port in ``ports`` and the flow's
    protocol in ``protos`` ("tcp", "udp"); an empty tuple means any."""

    networks: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    protos: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for n in self.networks:
            ipaddress.ip_network(n, strict=False)  # raises ValueError on a bad entry

    def _match(self, ip: str, port: int) -> str | None:
        if self.ports and port not in self.ports:
            return None
        if not self.networks:
            return f"port {port}"
        addr = ipaddress.ip_address(ip)
        for n in self.networks:
            net = ipaddress.ip_network(n, strict=False)
            if addr.version == net.version and addr in net:
                return f"destination {ip}:{port} in {n}"
        return None

    def at_connect(self, flow: Flow) -> str | None:
        if self.protos and flow.proto not in self.protos:
            return None
        return self._match(flow.server_ip, flow.server_port)

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        return self.at_connect(flow)

    def for_every_client(self, server_ip: str, server_port: int) -> bool | None:
        # asked by the TCP middlebox about its listening address
        if self.protos and "tcp" not in self.protos:
            return False
        return self._match(server_ip, server_port) is not None


def _looks_like(proto: str, data: bytes) -> bool:
    if proto == "tls":
        return len(data) >= 5 and looks_like_tls(data[:3])
    if proto == "http":
        return re.match(rb"[A-Z]{3,10} [/*a-zA-Z0-9\[]", data) is not None
    if proto == "dns":  # DNS over TCP: length prefix, then a standard query with one question
        if len(data) < 14:
            return False
        counts = (int.from_bytes(data[i : i + 2], "big") for i in (6, 8, 10))
        return (
            int.from_bytes(data[:2], "big") >= 12
            and data[4] & 0xF8 == 0
            and (tuple(counts) == (1, 0, 0))
        )
    raise ValueError(f"unknown protocol {proto!r}")


@dataclass(frozen=True, slots=True)
class ProtocolAllowList(Trigger):
    """Violation when one of the first ``segments`` client segments is none of ``allowed``."""

    allowed: tuple[str, ...] = ("tls", "http", "dns")
    segments: int = 1

    def __post_init__(self) -> None:
        for proto in self.allowed:
            _looks_like(proto, b"")

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        if data.index >= self.segments:
            return None
        if any(_looks_like(p, data.segment) for p in self.allowed):
            return None
        return f"segment {data.index} is not {'/'.join(self.allowed)}"


@dataclass(frozen=True, slots=True)
class FragmentedHello(Trigger):
    """The first segment starts a ClientHello that it does not hold whole in one record."""

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        if data.index != 0 or not looks_like_tls(data.segment[:3]):
            return None
        try:
            hello = parse_client_hello(data.segment)
        except RemoteProtocolError:
            return None
        if hello is None:
            return "ClientHello cut across segments"
        return f"ClientHello in {hello.record_count} records" if hello.record_count > 1 else None


#: QUIC version 2 (RFC 9369) numbers its long-header packet types differently: Initial is 1
QUIC_V2 = 0x6B3343CF


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """A QUIC variable-length integer (RFC 9000 16) at ``pos``: value, position after it."""
    size = 1 << (data[pos] >> 6)
    if pos + size > len(data):
        raise IndexError("varint cut")
    return int.from_bytes(data[pos : pos + size], "big") & ((1 << (8 * size - 2)) - 1), pos + size


def _quic_initial(data: bytes) -> int | None:
    """The version of a long-header Initial starting ``data`` (header fields whole), or None."""
    if len(data) < 7 or data[0] & 0xC0 != 0xC0:
        return None  # short header, or the fixed bit is clear: not QUIC (or not parseable)
    version = int.from_bytes(data[1:5], "big")
    initial = 1 if version == QUIC_V2 else 0
    if version == 0 or (data[0] >> 4) & 0x03 != initial:
        return None  # version negotiation, or a Handshake/0-RTT/Retry packet
    try:
        pos = 5
        for _ in ("dcid", "scid"):
            if data[pos] > 20 and version in (1, QUIC_V2):
                return None
            pos += 1 + data[pos]
        token, pos = _varint(data, pos)
        length, pos = _varint(data, pos + token)
    except IndexError:
        return None
    return version if pos <= len(data) and length > 0 else None


@dataclass(frozen=True, slots=True)
class QuicInitial(Trigger):
    """A UDP datagram that starts with a QUIC long-header Initial packet (RFC 9000 17.2.2).

    ``min_size``: clients pad the datagrams carrying their Initials to 1200 bytes (RFC 9000
    14.1), smaller ones are not matched; ``versions``: the versions that count (empty: any
    but 0, which is version negotiation); ``ports``: server ports (empty: any). Only the header
    is read: the CRYPTO frame, and so the SNI, stays encrypted to this trigger.
    """

    min_size: int = 1200
    versions: tuple[int, ...] = ()
    ports: tuple[int, ...] = ()

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        if flow.proto != "udp" or (self.ports and flow.server_port not in self.ports):
            return None
        datagram = data.segment
        if len(datagram) < self.min_size:
            return None
        version = _quic_initial(datagram)
        if version is None or (self.versions and version not in self.versions):
            return None
        return f"quic initial version {version:#x}, {len(datagram)} bytes"


def build_quic_initial(size: int = 1200, version: int = 1, dcid: bytes = bytes(8)) -> bytes:
    """A datagram :class:`QuicInitial` matches: an Initial header, then zeros up to ``size``
    (the payload is not real ciphertext; the censor reads headers only)."""
    kind = 1 if version == QUIC_V2 else 0
    head = bytes([0xC0 | kind << 4 | 0x03]) + version.to_bytes(4, "big")
    head += bytes([len(dcid)]) + dcid + bytes([0]) + b"\x00"  # no SCID, no token
    rest = max(size - len(head) - 2, 20)
    return head + (0x4000 | rest).to_bytes(2, "big") + bytes(rest)


@dataclass(frozen=True, slots=True)
class AnyData(Trigger):
    """Any client bytes at all: the catch-all that ends an allow-list ("everything else").

    It never matches at connect, so rules before it still see the first segment.
    """

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        return f"segment {data.index} of an unlisted flow"


@dataclass(frozen=True, slots=True)
class AllOf(Trigger):
    """Every trigger matches on the same event."""

    triggers: tuple[Trigger, ...]

    def at_connect(self, flow: Flow) -> str | None:
        found = [t.at_connect(flow) for t in self.triggers]
        return None if None in found else " and ".join(found)  # type: ignore[arg-type]

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        found = [t.at_segment(flow, data) for t in self.triggers]
        return None if None in found else " and ".join(found)  # type: ignore[arg-type]

    def for_every_client(self, server_ip: str, server_port: int) -> bool | None:
        found = [t.for_every_client(server_ip, server_port) for t in self.triggers]
        return False if False in found else (True if all(found) else None)


@dataclass(frozen=True, slots=True)
class AnyOf(Trigger):
    """Any of the triggers matches (the first one that does is logged)."""

    triggers: tuple[Trigger, ...]

    def at_connect(self, flow: Flow) -> str | None:
        return next((d for t in self.triggers if (d := t.at_connect(flow))), None)

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        return next((d for t in self.triggers if (d := t.at_segment(flow, data))), None)

    def for_every_client(self, server_ip: str, server_port: int) -> bool | None:
        found = [t.for_every_client(server_ip, server_port) for t in self.triggers]
        return True if True in found else (False if not any(f is None for f in found) else None)
