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

The triggers and the flow view they read (:class:`Flow`, :class:`ClientData`,
:class:`Reassembly`) live in :mod:`proxy.lab.triggers` and are re-exported here.

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
import http
import random
from dataclasses import dataclass, field

from proxy.lab.clock import LabClock
from proxy.lab.triggers import (
    AllOf,
    AnyData,
    AnyOf,
    ClientData,
    Destination,
    Flow,
    FragmentedHello,
    HttpHost,
    Keyword,
    NameMatch,
    ProtocolAllowList,
    Reassembly,
    Sni,
    Trigger,
)
from proxy.protocols.tls_hello import MAX_RAW_SIZE

__all__ = [
    "Action", "ActionKind", "AllOf", "AnyData", "AnyOf", "CensorEngine", "ClientData",
    "Destination", "Flow", "FragmentedHello", "Hit", "HttpHost", "Keyword", "NameMatch",
    "Penalty", "PenaltyKey", "ProtocolAllowList", "Reassembly", "Rule", "ServerVerdict", "Sni",
    "Trigger", "Verdict",
]  # fmt: skip


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
