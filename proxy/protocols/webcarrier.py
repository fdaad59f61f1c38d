"""What the bridge's HTTP carriers (split HTTP and polling) put in their request targets.

Both carriers tie many HTTP requests to one carrier with a *carrier id* in the path, below the
bridge's secret path::

    GET  /SECRET/ID          split HTTP, downstream: one long streaming response
    POST /SECRET/ID/SEQ      split HTTP, upstream: the body is bytes number SEQ in order
    POST /SECRET/ID/SEQ      polling: the body carries upstream bytes, the answer downstream

The id is not merely random: it is ``version | kind | issued (unix seconds) | nonce | tag``
in unpadded base64url, the tag an HMAC-SHA256 under the bridge's secret. A server that gets a
request for an id it does not hold opens a new carrier only when the tag checks and the id was
issued within the clock window, so a probe that learned the secret path (or replays an old id)
still gets the ordinary 404, and the bridge keeps no state for it.

Upstream split-HTTP bodies may arrive out of order (several POSTs in flight, each over its own
connection through a CDN); :class:`ReorderBuffer` puts them back in order within a bounded
window and drops retransmitted pieces.

No I/O, no clock and no randomness here: time and nonces come in as arguments.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
from dataclasses import dataclass

from proxy.errors import RemoteProtocolError

VERSION = 1
NONCE_LEN = 8
TAG_LEN = 8
#: version, kind, issued time (4 bytes), nonce, tag
ID_LEN = 1 + 1 + 4 + NONCE_LEN + TAG_LEN
#: the id's length in unpadded base64url
ID_TEXT_LEN = (ID_LEN * 4 + 2) // 3
#: largest sequence number a target may carry (JavaScript's safe integers, as a sane bound)
MAX_SEQ = (1 << 53) - 1
_LABEL = b"sidestep web carrier id"
_SEQ = re.compile(rb"0|[1-9][0-9]{0,15}")


class CarrierKind(enum.IntEnum):
    SPLIT = 1
    POLL = 2


@dataclass(frozen=True, slots=True)
class CarrierId:
    """A checked carrier id."""

    kind: CarrierKind
    #: unix seconds when the client made it
    issued: int
    #: the id as it appears in the path
    text: str

    def fresh(self, now: float, window: float) -> bool:
        """Issued within ``window`` seconds of ``now`` (either way: clocks differ)."""
        return abs(now - self.issued) <= window


def _tag(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, _LABEL + body, hashlib.sha256).digest()[:TAG_LEN]


def make_carrier_id(secret: bytes, kind: CarrierKind, now: float, nonce: bytes) -> str:
    """A new carrier id for ``kind`` issued at ``now`` with ``nonce`` (8 random bytes)."""
    if len(nonce) != NONCE_LEN:
        raise ValueError(f"the nonce is {NONCE_LEN} bytes")
    issued = int(now) & 0xFFFFFFFF
    body = bytes([VERSION, int(kind)]) + issued.to_bytes(4, "big") + nonce
    raw = body + _tag(secret, body)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def check_carrier_id(secret: bytes, text: str) -> CarrierId | None:
    """The id ``text`` stands for if it is well formed and its tag is right, else ``None``."""
    if len(text) != ID_TEXT_LEN or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != ID_LEN or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != text:
        return None
    body, tag = raw[:-TAG_LEN], raw[-TAG_LEN:]
    if body[0] != VERSION or body[1] not in (k.value for k in CarrierKind):
        return None
    if not hmac.compare_digest(tag, _tag(secret, body)):
        return None
    return CarrierId(CarrierKind(body[1]), int.from_bytes(body[2:6], "big"), text)


# ----------------------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class CarrierTarget:
    """A request target under the secret path: the id text and, for POSTs, the sequence."""

    carrier: str
    seq: int | None = None


def build_target(path: str, carrier: str, seq: int | None = None) -> str:
    """``/SECRET/ID`` or ``/SECRET/ID/SEQ``."""
    if seq is not None and not 0 <= seq <= MAX_SEQ:
        raise ValueError("sequence number out of range")
    target = f"{path.rstrip('/')}/{carrier}"
    return target if seq is None else f"{target}/{seq}"


def parse_target(path: str, target: bytes) -> CarrierTarget | None:
    """Split ``target`` (as received) under ``path``; ``None`` when it is not that shape.

    The id is only checked for its alphabet and length here: :func:`check_carrier_id` says
    whether it is genuine. A query string or anything else makes it not ours.
    """
    prefix = path.rstrip("/").encode("ascii") + b"/"
    if not target.startswith(prefix):
        return None
    parts = target[len(prefix) :].split(b"/")
    if len(parts) > 2 or len(parts[0]) != ID_TEXT_LEN:
        return None
    if not re.fullmatch(rb"[A-Za-z0-9_-]+", parts[0]):
        return None
    seq = None
    if len(parts) == 2:
        if not _SEQ.fullmatch(parts[1]) or int(parts[1]) > MAX_SEQ:
            return None
        seq = int(parts[1])
    return CarrierTarget(parts[0].decode("ascii"), seq)


# ------------------------------------------------------------------------------------ reorder


class ReorderBuffer:
    """Upstream pieces numbered 0, 1, 2, ... back into one ordered byte stream.

    At most ``window`` sequence numbers ahead of the next expected one are held; a piece further
    ahead is the peer breaking the protocol (``RemoteProtocolError``). A piece already delivered
    or already held is a retransmission and is dropped. :attr:`held` counts the bytes waiting
    for a gap to fill, so the caller can bound them (and refuse to take more).
    """

    def __init__(self, window: int = 64) -> None:
        if window < 1:
            raise ValueError("the window is at least 1")
        self.window = window
        self.next_seq = 0
        self.held = 0
        self._pieces: dict[int, bytes] = {}
        self._ready = bytearray()

    def add(self, seq: int, data: bytes) -> bool:
        """Take piece ``seq``; False when it was a duplicate (nothing changed)."""
        if seq < self.next_seq or seq in self._pieces:
            return False
        if seq >= self.next_seq + self.window:
            raise RemoteProtocolError(f"piece {seq} is too far ahead of {self.next_seq}")
        if seq != self.next_seq:
            self._pieces[seq] = data
            self.held += len(data)
            return True
        self._ready += data
        self.next_seq += 1
        while self.next_seq in self._pieces:
            piece = self._pieces.pop(self.next_seq)
            self.held -= len(piece)
            self._ready += piece
            self.next_seq += 1
        return True

    @property
    def ready(self) -> int:
        """Bytes that can be read in order now."""
        return len(self._ready)

    def read(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` of the in-order bytes (all of them when ``None``)."""
        size = len(self._ready) if max_bytes is None else min(max_bytes, len(self._ready))
        data = bytes(self._ready[:size])
        del self._ready[:size]
        return data
