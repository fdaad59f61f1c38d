"""What sidestep is doing right now: the open tunnels and the running totals.

The dispatcher registers each tunnel when it starts (:meth:`ConnectionRegistry.open`), fills in
what it learns on the way (the SNI once the first flight is read, the strategy once one won),
and closes it with the final byte counts and outcome (:meth:`ConnectionRegistry.close`), which
also moves the totals the status page and ``/metrics`` show. That is a dictionary insert and a
few counter increments per connection; nothing is done per relayed chunk.

Bytes of a tunnel that is still relaying are read from the kernel when a snapshot is taken
(``TCP_INFO`` of the client's socket, Linux): they count the client connection's bytes, the
proxy handshake's few dozen included, and cost one system call per open tunnel per snapshot.
Where that is not available the figures are what the pipeline knew so far (the first flight
and first answer) until the tunnel ends.
"""

from __future__ import annotations

import functools
import itertools
import re
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

#: offset of ``tcpi_bytes_acked`` in Linux's ``struct tcp_info``; ``tcpi_bytes_received`` follows
_TCPI_BYTES_OFFSET = 120
_TCPI_BYTES = struct.Struct("=QQ")
_TCP_INFO = getattr(socket, "TCP_INFO", None)
#: a label value that is a short word ("sni-reset", "idle-timeout") and nothing else
_WORD = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
#: outcomes that are their own kind (the common case, answered without parsing)
_PLAIN_OUTCOMES = frozenset({"ok", "idle-timeout"})


def outcome_kind(outcome: str) -> str:
    """The class of a connection's outcome, for counting: the free text after it is dropped.

    ``"ok"``, ``"idle-timeout"``, ``"all-failed: every strategy..."`` -> ``"all-failed"``,
    ``"client gone: BrokenResourceError"`` -> ``"client-gone"``, ``"frozen after 20480 bytes:
    ..."`` -> ``"frozen"``. Anything unexpected counts as ``"other"``, so the set of values
    stays small whatever an error message says.
    """
    if outcome in _PLAIN_OUTCOMES:
        return outcome
    head = outcome.split(":", 1)[0].strip().lower()
    if head.startswith("frozen"):
        return "frozen"
    head = head.replace(" ", "-")
    return head if _WORD.fullmatch(head) else "other"


@functools.lru_cache(maxsize=64)
def verdict_kind(verdict: str | None) -> str | None:
    """A verdict as counted (``None``: the connection was not judged)."""
    if not verdict or verdict == "-":
        return None
    return verdict if _WORD.fullmatch(verdict) else "other"


def kernel_bytes(stream: object) -> tuple[int, int] | None:
    """(bytes received from, bytes acknowledged by) the peer of a TCP stream, from the kernel;
    ``None`` when the stream has no TCP socket or the system does not say."""
    sock = getattr(stream, "socket", None)
    if sock is None or _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
    except (OSError, TypeError, ValueError):
        return None
    if not isinstance(info, bytes) or len(info) < _TCPI_BYTES_OFFSET + _TCPI_BYTES.size:
        return None
    acked, received = _TCPI_BYTES.unpack_from(info, _TCPI_BYTES_OFFSET)
    return received, acked


@dataclass(slots=True, eq=False)
class LiveConnection:
    """One tunnel being served; the dispatcher updates the fields as it goes."""

    id: int
    client: tuple[str, int]
    inbound: str
    protocol: str
    target: str
    policy: str
    #: ``trio.current_time()`` when the tunnel started
    opened: float
    #: the client's stream (its socket gives live byte counts)
    stream: object = None
    sni: str | None = None
    #: the strategy carrying the tunnel, "-" while none has won yet
    strategy: str = "-"
    #: bytes from the client and to the client known to the pipeline so far
    up: int = 0
    down: int = 0

    def to_json(self, now: float) -> dict[str, Any]:
        up, down = self.up, self.down
        live = kernel_bytes(self.stream)
        if live is not None:
            up, down = max(up, live[0]), max(down, live[1])
        return {
            "id": self.id,
            "client": f"{self.client[0]}:{self.client[1]}",
            "inbound": self.inbound,
            "protocol": self.protocol,
            "target": self.target,
            "sni": self.sni,
            "policy": self.policy,
            "strategy": self.strategy,
            "up": up,
            "down": down,
            "age": round(max(0.0, now - self.opened), 3),
        }


class ConnectionRegistry:
    """The open tunnels and the totals of the closed ones (one per app, kept across reloads)."""

    def __init__(self) -> None:
        self._live: dict[int, LiveConnection] = {}
        self._ids = itertools.count(1)
        #: closed tunnels by (outcome kind, strategy)
        self.closed: Counter[tuple[str, str]] = Counter()
        #: verdicts of closed tunnels by kind
        self.verdicts: Counter[str] = Counter()
        #: bytes of closed tunnels, from and to the clients
        self.bytes_up = 0
        self.bytes_down = 0
        #: tunnels opened so far
        self.opened = 0

    def open(
        self,
        *,
        client: tuple[str, int],
        inbound: str,
        protocol: str,
        target: str,
        policy: str,
        now: float,
        stream: object = None,
    ) -> LiveConnection:
        """Register a tunnel that just started."""
        conn = LiveConnection(
            next(self._ids), client, inbound, protocol, target, policy, now, stream
        )
        self._live[conn.id] = conn
        self.opened += 1
        return conn

    def close(
        self,
        conn: LiveConnection,
        *,
        strategy: str,
        up: int,
        down: int,
        outcome: str,
        verdict: str | None,
    ) -> None:
        """The tunnel ended: drop it from the live set and count it. Closing twice counts once."""
        if self._live.pop(conn.id, None) is None:
            return
        conn.stream = None
        self.closed[outcome_kind(outcome), strategy or "-"] += 1
        kind = verdict_kind(verdict)
        if kind is not None:
            self.verdicts[kind] += 1
        self.bytes_up += max(0, up)
        self.bytes_down += max(0, down)

    def __len__(self) -> int:
        return len(self._live)

    def live(self) -> list[LiveConnection]:
        """The open tunnels, oldest first."""
        return list(self._live.values())

    def snapshot(self, now: float, *, limit: int = 1000) -> list[dict[str, Any]]:
        """The newest ``limit`` open tunnels as JSON-ready dicts, newest first."""
        newest = list(itertools.islice(reversed(self._live.values()), limit))
        return [conn.to_json(now) for conn in newest]

    def totals(self) -> dict[str, Any]:
        """The counters, JSON-ready."""
        return {
            "opened": self.opened,
            "active": len(self._live),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "closed": [
                {"outcome": outcome, "strategy": strategy, "count": count}
                for (outcome, strategy), count in sorted(self.closed.items())
            ],
            "verdicts": dict(sorted(self.verdicts.items())),
        }
