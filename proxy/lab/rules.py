"""The censor core: an ordered rule list over flows, pure Python, no I/O.

Middleboxes (:mod:`proxy.lab.middlebox` for TCP) report what they see and carry out what the
:class:`CensorEngine` decides. Time comes from the :class:`~proxy.lab.clock.LabClock` given to the
engine, randomness from an injected :class:`random.Random`. Per :class:`Flow` (client ip/port,
server ip/port, proto) the middlebox calls:

* ``on_connect(flow) -> Verdict``: the SYN; the penalty box, then address-only triggers.
* ``on_client_segment(flow, data) -> Verdict``: one client read is one segment. ``forward`` says
  whether it goes on to the server, ``reply`` what to answer the client with before closing.
* ``on_server_bytes(flow, n) -> ServerVerdict``: how many S->C bytes pass, after what delay
  (``throttle_delay``: a token bucket), and whether S->C is now stopped (freeze, blackhole).
* ``on_datagram(flow, data)`` for UDP; ``on_close(flow)`` forgets the flow.

Rules are tried in order; the first match wins and is memoised on the flow for its whole life
(netem's model). A rule may carry a :class:`Penalty` (residual blocking: new flows with the same
key get the penalty action at connect for N seconds) and a match probability (drawn once per
flow). Every decision is logged as a :class:`Hit` in ``engine.log``; ``engine.hits(name=,
action=)`` filters it: the lab's own record of what it did.

Reassembly, the knob on every rule that reads payload:

* ``NONE``: each segment alone. TLS triggers need a complete ClientHello in that segment (records
  inside it are joined), so any TCP split of the hello evades them; HTTP triggers need the whole
  request head in it.
* ``FIRST_RECORD``: the 5-byte TLS record header must be whole in the first segment, else the rule
  gives up on the flow (a split in bytes 1-4 evades it); segments are gathered up to the first
  record's declared length and the SNI is looked for in that record only (a record split that
  pushes the name out of it evades it too). HTTP triggers see the reassembled stream.
* ``FULL``: the stream is reassembled across segments and records; fragmentation never helps.

On loopback the kernel completes the TCP handshake before anyone sees the SYN, so a per-flow
REFUSE is an immediate RST after accept and a per-flow DROP_SYN a connection that never answers.
:meth:`CensorEngine.listener_action` tells a middlebox when such a rule covers *every* flow to its
address, so it can refuse (bind, never listen) or drop SYNs (full accept queue) for real.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import http
import ipaddress
import random
import re
from dataclasses import dataclass, field

import h11

from proxy.errors import RemoteProtocolError
from proxy.lab.clock import LabClock
from proxy.protocols.tls_hello import MAX_RAW_SIZE, looks_like_tls, parse_client_hello

__all__ = [
    "Action", "ActionKind", "AllOf", "AnyOf", "CensorEngine", "ClientData", "Destination",
    "Flow", "FragmentedHello", "Hit", "HttpHost", "Keyword", "NameMatch", "Penalty",
    "PenaltyKey", "ProtocolAllowList", "Reassembly", "Rule", "ServerVerdict", "Sni", "Trigger",
    "Verdict",
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


class ActionKind(enum.Enum):
    FORWARD = "forward"
    RESET = "reset"
    BLACKHOLE = "blackhole"
    THROTTLE = "throttle"
    FREEZE_AFTER = "freeze_after"
    REFUSE = "refuse"
    DROP_SYN = "drop_syn"
    BLOCKPAGE = "blockpage"
    REDIRECT = "redirect"
    DROP_CLIENT = "drop_client"


#: actions under which client bytes still reach the server
_PASSING = frozenset({ActionKind.FORWARD, ActionKind.THROTTLE, ActionKind.FREEZE_AFTER})
#: actions under which nothing more goes server -> client
_SILENCING = frozenset(
    {ActionKind.RESET, ActionKind.BLACKHOLE, ActionKind.REFUSE, ActionKind.DROP_SYN,
     ActionKind.BLOCKPAGE, ActionKind.REDIRECT}
)  # fmt: skip
DEFAULT_IFRAME = "http://10.10.34.36/?type=Invalid%20Site&policy=MainPolicy"


@dataclass(frozen=True, slots=True)
class Action:
    """What the censor does to a flow. Build with the class methods (``Action.reset()``...)."""

    kind: ActionKind
    #: THROTTLE: sustained rate in bytes per second, and bucket size in bytes
    rate: float = 0.0
    burst: int = 0
    #: FREEZE_AFTER: S->C bytes that pass before the flow goes silent
    limit: int = 0
    #: BLOCKPAGE: HTTP status, and the body (None: an iframe page pointing at ``location``)
    status: int = 451
    body: bytes | None = None
    #: REDIRECT target, or the iframe source of the default block page
    location: str = DEFAULT_IFRAME

    def __post_init__(self) -> None:
        if self.kind is ActionKind.THROTTLE and (self.rate <= 0 or self.burst <= 0):
            raise ValueError("THROTTLE needs rate > 0 and burst > 0")
        if self.kind is ActionKind.FREEZE_AFTER and self.limit < 0:
            raise ValueError("FREEZE_AFTER needs a limit >= 0")
        if not 100 <= self.status <= 599:
            raise ValueError(f"HTTP status {self.status} out of range")

    @classmethod
    def forward(cls) -> Action:
        return cls(ActionKind.FORWARD)

    @classmethod
    def reset(cls) -> Action:
        return cls(ActionKind.RESET)

    @classmethod
    def blackhole(cls) -> Action:
        return cls(ActionKind.BLACKHOLE)

    @classmethod
    def throttle(cls, rate: float, burst: int = 4096) -> Action:
        return cls(ActionKind.THROTTLE, rate=rate, burst=burst)

    @classmethod
    def freeze_after(cls, limit: int) -> Action:
        return cls(ActionKind.FREEZE_AFTER, limit=limit)

    @classmethod
    def refuse(cls) -> Action:
        return cls(ActionKind.REFUSE)

    @classmethod
    def drop_syn(cls) -> Action:
        return cls(ActionKind.DROP_SYN)

    @classmethod
    def blockpage(
        cls, status: int = 451, body: bytes | None = None, iframe: str = DEFAULT_IFRAME
    ) -> Action:
        return cls(ActionKind.BLOCKPAGE, status=status, body=body, location=iframe)

    @classmethod
    def redirect(cls, location: str) -> Action:
        return cls(ActionKind.REDIRECT, status=302, location=location)

    @classmethod
    def drop_client(cls) -> Action:
        return cls(ActionKind.DROP_CLIENT)

    def response(self) -> bytes:
        """The HTTP response a BLOCKPAGE or REDIRECT answers with (empty for other actions)."""
        if self.kind is ActionKind.REDIRECT:
            head = f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\n"
            return (head + "Content-Length: 0\r\nConnection: close\r\n\r\n").encode("latin-1")
        if self.kind is not ActionKind.BLOCKPAGE:
            return b""
        body = self.body
        if body is None:
            body = (
                '<html><head><meta http-equiv="Content-Type" content="text/html; charset=utf-8">'
                f'</head><body><iframe src="{self.location}" style="width:100%;height:100%" '
                'scrolling="no" marginwidth="0" marginheight="0" frameborder="0" vspace="0" '
                'hspace="0"></iframe></body></html>\r\n'
            ).encode()
        try:
            phrase = http.HTTPStatus(self.status).phrase
        except ValueError:
            phrase = "Blocked"
        head = (
            f"HTTP/1.1 {self.status} {phrase}\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode("latin-1") + body


class PenaltyKey(enum.Enum):
    CLIENT = "client"
    CLIENT_SERVER = "client_server"
    THREE_TUPLE = "three_tuple"
    FIVE_TUPLE = "five_tuple"

    def of(self, flow: Flow) -> tuple[object, ...]:
        if self is PenaltyKey.CLIENT:
            return (flow.client_ip,)
        if self is PenaltyKey.CLIENT_SERVER:
            return (flow.client_ip, flow.server_ip)
        if self is PenaltyKey.THREE_TUPLE:
            return (flow.client_ip, flow.server_ip, flow.server_port)
        return (flow.client_ip, flow.client_port, flow.server_ip, flow.server_port, flow.proto)


@dataclass(frozen=True, slots=True)
class Penalty:
    """Residual blocking: for ``seconds`` after a hit, new flows with the same key get ``action``.

    The duration is fixed from the hit (flows decided by the box do not re-arm it).
    """

    seconds: float
    key: PenaltyKey = PenaltyKey.THREE_TUPLE
    action: Action = field(default_factory=Action.blackhole)


# --- what rules look at ------------------------------------------------------------------------


@dataclass(slots=True)
class _FlowState:
    flow: Flow
    decided: bool = False
    action: Action = field(default_factory=Action.forward)
    rule: str | None = None
    replied: bool = False
    segments: int = 0
    first: bytes = b""
    stream: bytearray = field(default_factory=bytearray)
    inspecting: bool = True
    spared: set[str] = field(default_factory=set)
    s2c_seen: int = 0
    s2c_passed: int = 0
    tokens: float = 0.0
    refilled: float = 0.0


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

    def __init__(self, state: _FlowState, segment: bytes, reassembly: Reassembly) -> None:
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
    """The server address is in one of ``networks`` and its port in ``ports`` (empty: any)."""

    networks: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()

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
        return self._match(flow.server_ip, flow.server_port)

    def at_segment(self, flow: Flow, data: ClientData) -> str | None:
        return self._match(flow.server_ip, flow.server_port)

    def for_every_client(self, server_ip: str, server_port: int) -> bool | None:
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


# --- rules and the engine ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """When ``match`` fires on a flow, apply ``action`` (and ``penalty``, if any)."""

    name: str
    match: Trigger
    action: Action
    reassembly: Reassembly = Reassembly.NONE
    penalty: Penalty | None = None
    #: chance that a match is acted on (drawn once per flow from the engine's rng)
    probability: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"rule {self.name}: probability must be in [0, 1]")


@dataclass(frozen=True, slots=True)
class Hit:
    """One decision of the censor, as logged."""

    time: float
    #: None for a decision about a whole listening address (:meth:`CensorEngine.listener_action`)
    flow: Flow | None
    rule: str
    trigger: str
    action: ActionKind
    #: decided by the penalty box rather than by inspecting this flow
    residual: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with the flow now (``on_connect``) or with one client segment."""

    action: Action
    rule: str | None = None
    #: bytes to send to the client before closing (block page, redirect); given once
    reply: bytes = b""

    @property
    def kind(self) -> ActionKind:
        return self.action.kind

    @property
    def forward(self) -> bool:
        """Whether the client's bytes go on to the server."""
        return self.action.kind in _PASSING


@dataclass(frozen=True, slots=True)
class ServerVerdict:
    """How much of a server chunk may reach the client, and when."""

    allow: int
    delay: float = 0.0
    #: nothing more goes server -> client on this flow (frozen, blackholed, torn down)
    stop: bool = False


_FORWARD = Verdict(Action.forward())


class CensorEngine:
    """The ordered rule list, the flow table, the penalty box and the event log."""

    def __init__(
        self,
        rules: list[Rule] | tuple[Rule, ...],
        *,
        clock: LabClock,
        rng: random.Random | None = None,
        inspect_segments: int | None = None,
        inspect_bytes: int = MAX_RAW_SIZE,
    ) -> None:
        self.rules = tuple(rules)
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique: {names}")
        if rng is None and any(r.probability < 1.0 for r in self.rules):
            raise ValueError("rules with probability < 1 need an rng (random.Random(seed))")
        self.clock = clock
        self.rng = rng
        #: stop inspecting a flow after this many client segments (None: no limit) or bytes
        self.inspect_segments = inspect_segments
        self.inspect_bytes = inspect_bytes
        self.log: list[Hit] = []
        self._flows: dict[Flow, _FlowState] = {}
        #: penalty key -> (expiry time, action, rule name)
        self._box: dict[tuple[object, ...], tuple[float, Action, str]] = {}

    # -- queries --------------------------------------------------------------------------------

    def hits(self, name: str | None = None, action: ActionKind | Action | None = None) -> list[Hit]:
        """Logged decisions, optionally only those of rule ``name`` and/or of ``action``."""
        kind = action.kind if isinstance(action, Action) else action
        return [h for h in self.log if (name is None or h.rule == name)
                and (kind is None or h.action is kind)]  # fmt: skip

    def penalised(self, flow: Flow) -> bool:
        """Whether a new flow like ``flow`` would start in the penalty box now."""
        return self._boxed(flow) is not None

    def listener_action(self, server_ip: str, server_port: int) -> Action | None:
        """REFUSE or DROP_SYN if the first rule that can decide at connect covers every client.

        Returns None when some flows may be treated differently (client-dependent triggers,
        probability, or an earlier rule that takes everything). A non-None answer is logged.
        """
        for rule in self.rules:
            every = rule.match.for_every_client(server_ip, server_port)
            if every is False:
                continue
            if every is None or rule.probability < 1.0 or rule.penalty is not None:
                return None
            if rule.action.kind not in (ActionKind.REFUSE, ActionKind.DROP_SYN):
                return None
            self._record(None, rule.name, f"every flow to {server_ip}:{server_port}", rule.action)
            return rule.action
        return None

    # -- events ---------------------------------------------------------------------------------

    def on_connect(self, flow: Flow) -> Verdict:
        """A client opens ``flow`` (SYN, or a first datagram). Decides on addresses only."""
        state = self._flows.get(flow)
        if state is None:
            state = self._flows[flow] = _FlowState(flow)
        else:
            return self._verdict(state)
        boxed = self._boxed(flow)
        if boxed is not None:
            until, action, rule = boxed
            self._decide(state, rule, f"penalty box until {until:.3f}", action, residual=True)
            return self._verdict(state)
        for rule in self.rules:
            found = rule.match.at_connect(flow)
            if found is not None and self._fires(state, rule):
                self._decide(state, rule.name, found, rule.action, rule.penalty)
                break
        return self._verdict(state)

    def on_client_segment(self, flow: Flow, data: bytes) -> Verdict:
        """One read of client bytes (one segment). Returns what to do with it."""
        state = self._flows.get(flow)
        if state is None:
            self.on_connect(flow)
            state = self._flows[flow]
        if not data:
            return self._verdict(state)
        state.segments += 1
        if state.segments == 1:
            state.first = bytes(data)
        if state.decided or not state.inspecting:
            return self._verdict(state)
        if len(state.stream) < self.inspect_bytes:
            state.stream += data[: self.inspect_bytes - len(state.stream)]
        views: dict[Reassembly, ClientData] = {}
        for rule in self.rules:
            view = views.get(rule.reassembly)
            if view is None:
                view = views[rule.reassembly] = ClientData(state, data, rule.reassembly)
            found = rule.match.at_segment(flow, view)
            if found is not None and self._fires(state, rule):
                self._decide(state, rule.name, found, rule.action, rule.penalty)
                return self._verdict(state)
        limit = self.inspect_segments
        if (limit is not None and state.segments >= limit) or len(
            state.stream
        ) >= self.inspect_bytes:
            state.inspecting = False
        return self._verdict(state)

    def on_datagram(self, flow: Flow, data: bytes) -> Verdict:
        """A UDP datagram client -> server: like a segment, the first one also opens the flow."""
        return self.on_client_segment(flow, data)

    def on_server_bytes(self, flow: Flow, n: int) -> ServerVerdict:
        """``n`` bytes arrived from the server. How many may pass, and after what delay."""
        state = self._flows.get(flow)
        if state is None:
            return ServerVerdict(n)
        state.s2c_seen += n
        kind = state.action.kind
        if kind in _SILENCING:
            return ServerVerdict(0, stop=True)
        allow, stop = n, False
        if kind is ActionKind.FREEZE_AFTER:
            allow = max(0, min(n, state.action.limit - state.s2c_passed))
            stop = allow < n
        state.s2c_passed += allow
        return ServerVerdict(allow, delay=self.throttle_delay(flow, allow), stop=stop)

    def throttle_delay(self, flow: Flow, n: int) -> float:
        """Seconds to hold ``n`` S->C bytes so the flow keeps to its token bucket (0: none).

        The bucket may go into debt: the bytes are booked now and the delay is the time the
        refill takes to pay the debt back, so successive calls queue up behind each other.
        """
        state = self._flows.get(flow)
        if state is None or state.action.kind is not ActionKind.THROTTLE or n <= 0:
            return 0.0
        rate, burst = state.action.rate, state.action.burst
        now = self.clock.now()
        state.tokens = min(float(burst), state.tokens + (now - state.refilled) * rate)
        state.refilled = now
        state.tokens -= n
        return 0.0 if state.tokens >= 0 else -state.tokens / rate

    def on_close(self, flow: Flow) -> None:
        """The flow is over on both sides: forget its state (the log and penalty box stay)."""
        self._flows.pop(flow, None)

    # -- internals ------------------------------------------------------------------------------

    def _fires(self, state: _FlowState, rule: Rule) -> bool:
        if rule.name in state.spared:
            return False
        if rule.probability >= 1.0:
            return True
        assert self.rng is not None  # checked in __init__
        if self.rng.random() < rule.probability:
            return True
        state.spared.add(rule.name)
        return False

    def _boxed(self, flow: Flow) -> tuple[float, Action, str] | None:
        now = self.clock.now()
        for key in PenaltyKey:
            entry = self._box.get((key.value, *key.of(flow)))
            if entry is not None:
                if now < entry[0]:
                    return entry
                del self._box[(key.value, *key.of(flow))]
        return None

    def _decide(
        self,
        state: _FlowState,
        rule: str,
        trigger: str,
        action: Action,
        penalty: Penalty | None = None,
        *,
        residual: bool = False,
    ) -> None:
        state.decided, state.action, state.rule = True, action, rule
        state.inspecting = False
        if action.kind is ActionKind.THROTTLE:
            state.tokens, state.refilled = float(action.burst), self.clock.now()
        self._record(state.flow, rule, trigger, action, residual=residual)
        if penalty is not None:
            until = self.clock.now() + penalty.seconds
            self._box[(penalty.key.value, *penalty.key.of(state.flow))] = (
                until,
                penalty.action,
                rule,
            )

    def _record(
        self, flow: Flow | None, rule: str, trigger: str, action: Action, *, residual: bool = False
    ) -> None:
        self.log.append(Hit(self.clock.now(), flow, rule, trigger, action.kind, residual))

    def _verdict(self, state: _FlowState) -> Verdict:
        if not state.decided:
            return _FORWARD
        reply = b""
        if state.segments and not state.replied:
            reply = state.action.response()
            state.replied = bool(reply)
        return Verdict(state.action, state.rule, reply)
