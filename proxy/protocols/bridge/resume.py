"""Sessions that outlive their carrier: the resume hello and byte-offset bookkeeping. No I/O.

A carrier (a TCP or WebSocket connection) can die under a session: a reset, a FIN forged by a
middlebox, a flow that a censor freezes after some kilobytes. The session does not have to die
with it. Each end numbers the bytes of sealed records it sends, as one endless byte stream per
direction, and keeps the bytes its peer has not acknowledged in a bounded replay buffer
(:class:`SessionLedger`). The peer acknowledges with encrypted ACK frames (cumulative offsets,
see :mod:`~proxy.protocols.bridge.frames`). When the carrier breaks, the client dials a new one
and opens it with a *resume hello* instead of a hello; both ends tell each other how many bytes
they received, and each resends the rest from its buffer. The records, their keys, nonces and
the mux carry on unchanged, exactly once and in order, because the byte stream underneath them
is continued at the exact byte where the peer stopped reading, even inside a record.

Resume hello (the same layout, lengths and random look as a fresh hello, see
:mod:`~proxy.protocols.bridge.handshake`)::

    nonce(16) | ChaCha20[mask1, nonce](id(12) | offset(8) | proof(12) | time(8) | padlen(2))
              | padding | tag(16)
    tag   = HMAC-SHA256(mac1, "client resume" | everything before the tag)[:16]
    proof = HMAC-SHA256(resume key, "resume proof" | nonce | id | offset | time)[:12]

``id`` and the resume key come from the session's own keys (:class:`ResumeTicket`), so only the
two ends of the session can name it or prove it, and they never travel in clear. The server
tells the two kinds of first message apart by which tag verifies (two HMACs, before any other
work), then checks the timestamp and the replay cache exactly as for a hello, then looks the
session up and checks the proof. Any failure is the same silence as a bad hello.

Resume answer (the same layout and lengths as the server's answer to a hello)::

    ChaCha20[mask2, tag](offset(8) | zeros(24) | padlen(2)) | padding | confirm(16)
    confirm = HMAC-SHA256(resume key, "resume answer" | tag | everything before confirm)[:16]

After it each end sends the sealed-record bytes the other has not received, then carries on.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections import deque
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols.bridge.connection import BridgeConnection, ConnectionState, Event
from proxy.protocols.bridge.handshake import (
    CLIENT_HEADER_LEN,
    KEY_LEN,
    LABEL,
    MAX_HELLO_PADDING,
    NONCE_LEN,
    TAG_LEN,
    BridgeLine,
    Pending,
    RandomSource,
    Rejected,
    ReplayCache,
    SessionKeys,
    _hello_tag,
    _keystream_xor,
    _line_keys,
    _random_below,
    split_answer,
)
from proxy.protocols.bridge.mux import AckReceived, Role

SESSION_ID_LEN = 12
PROOF_LEN = 12
#: the sealed bytes one end keeps for its peer; beyond it no new records are made (backpressure)
REPLAY_LIMIT = 8 * 1024 * 1024
#: an ACK goes out at the latest after this many received bytes (and when the line goes idle;
#: before that it rides along with any frame going the other way, such as a WINDOW)
ACK_EVERY = 1024 * 1024
_MAX_OFFSET = (1 << 64) - 1
_HEAD = NONCE_LEN + CLIENT_HEADER_LEN
_FIELDS = struct.Struct(">12sQ12sQH")  # id, offset, proof, time, padding length
_ANSWER = struct.Struct(">Q24sH")  # offset, zeros, padding length


@dataclass(frozen=True, slots=True)
class ResumeTicket:
    """What both ends of one session know to resume it: its id and a key to prove it."""

    session_id: bytes
    key: bytes = field(repr=False)

    @classmethod
    def from_keys(cls, keys: SessionKeys, role: Role) -> ResumeTicket:
        """Derive the ticket from a session's keys (the same at both ends)."""
        if role is Role.CLIENT:
            c2s, s2c = keys.send_key, keys.receive_key
        else:
            c2s, s2c = keys.receive_key, keys.send_key
        okm = HKDF(
            algorithm=hashes.SHA256(),
            length=SESSION_ID_LEN + KEY_LEN,
            salt=keys.transcript_hash,
            info=LABEL + b" resume",
        ).derive(c2s + s2c)
        return cls(okm[:SESSION_ID_LEN], okm[SESSION_ID_LEN:])


def _mac(key: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, label + b"".join(parts), hashlib.sha256).digest()


def _resume_tag(mac_key: bytes, body: bytes) -> bytes:
    return _mac(mac_key, b"client resume", body)[:TAG_LEN]


def _proof(ticket_key: bytes, nonce: bytes, session_id: bytes, offset: int, stamp: int) -> bytes:
    fields = struct.pack(">QQ", offset, stamp)
    return _mac(ticket_key, b"resume proof", nonce, session_id, fields)[:PROOF_LEN]


# ---------------------------------------------------------------------------- server side


@dataclass(frozen=True, slots=True)
class FreshHello:
    """The first message is a hello: hand every byte read so far to a server connection."""


@dataclass(frozen=True, slots=True)
class ResumeRequest:
    """A genuine-looking resume hello (its tag verified); :func:`check_resume` decides the rest."""

    session_id: bytes
    #: sealed-record bytes the client has received from us
    offset: int
    stamp: int
    tag: bytes
    nonce: bytes = field(repr=False)
    proof: bytes = field(repr=False)
    #: bytes after the hello (the client sends none before our answer, but may)
    trailing: bytes = field(repr=False)


FirstMessage = Pending | Rejected | FreshHello | ResumeRequest


def read_first_message(line: BridgeLine, data: bytes) -> FirstMessage:
    """Sort the first message of a carrier: ``data`` is every byte read so far.

    A message is complete after at most ``MAX_HELLO_LEN`` bytes; until then this is
    :class:`Pending`. Neither tag verifying is :class:`Rejected` (silence).
    """
    if len(data) < _HEAD:
        return Pending()
    keys = _line_keys(line)
    nonce = data[:NONCE_LEN]
    header = _keystream_xor(keys.mask1, nonce, data[NONCE_LEN:_HEAD])
    sid, offset, proof, stamp, padlen = _FIELDS.unpack(header)
    total = _HEAD + padlen % (MAX_HELLO_PADDING + 1) + TAG_LEN
    if len(data) < total:
        return Pending()
    body, tag = data[: total - TAG_LEN], data[total - TAG_LEN : total]
    if hmac.compare_digest(tag, _hello_tag(keys.mac1, body)):
        return FreshHello()
    if hmac.compare_digest(tag, _resume_tag(keys.mac1, body)):
        return ResumeRequest(sid, offset, stamp, tag, nonce, proof, data[total:])
    return Rejected("bad hello tag")


def check_resume(
    request: ResumeRequest, ticket: ResumeTicket | None, replay: ReplayCache, now: float
) -> str | None:
    """Why the resume must be refused (silently), or ``None`` to accept it.

    Same order as a hello: timestamp, replay cache, then the session (``ticket`` is the one the
    request's id names, ``None`` when no such session is kept) and its proof.
    """
    if abs(request.stamp - now) > replay.window:
        return f"resume timestamp {request.stamp - now:+.0f} s off"
    refused = replay.check_and_add(request.tag, now)
    if refused is not None:
        return refused.replace("hello", "resume hello")
    if ticket is None:
        return "resume for an unknown or expired session"
    expected = _proof(ticket.key, request.nonce, request.session_id, request.offset, request.stamp)
    if not hmac.compare_digest(request.proof, expected):
        return "resume proof does not match the session"
    return None


def resume_answer(
    line: BridgeLine, ticket: ResumeTicket, request: ResumeRequest, received: int, rng: RandomSource
) -> bytes:
    """The server's answer to an accepted resume: ``received`` is our offset of their bytes."""
    padlen = _random_below(rng, MAX_HELLO_PADDING + 1)
    clear = _ANSWER.pack(received, bytes(24), padlen)
    body = _keystream_xor(_line_keys(line).mask2, request.tag, clear) + rng(padlen)
    return body + _mac(ticket.key, b"resume answer", request.tag, body)[:TAG_LEN]


# ---------------------------------------------------------------------------- client side


class ResumeState(enum.Enum):
    WAIT_ANSWER = "wait-answer"
    DONE = "done"
    FAILED = "failed"


class ClientResume:
    """The client end of one resume attempt: :meth:`hello` once, then :meth:`receive_data`."""

    def __init__(self, line: BridgeLine, ticket: ResumeTicket, rng: RandomSource) -> None:
        self._line_keys = _line_keys(line)
        self._ticket = ticket
        self._rng = rng
        self._tag: bytes | None = None
        self._buffer = bytearray()
        self.state = ResumeState.WAIT_ANSWER
        self.trailing_data = b""

    def hello(self, received: int, now: float) -> bytes:
        """The resume hello: we have ``received`` bytes of the server's records; call once."""
        if self._tag is not None:
            raise LocalProtocolError("the resume hello was already built")
        if not 0 <= received <= _MAX_OFFSET:
            raise LocalProtocolError("resume offset out of range")
        nonce = self._rng(NONCE_LEN)
        stamp = int(now)
        sid = self._ticket.session_id
        padlen = _random_below(self._rng, MAX_HELLO_PADDING + 1)
        proof = _proof(self._ticket.key, nonce, sid, received, stamp)
        header = _FIELDS.pack(sid, received, proof, stamp, padlen)
        body = nonce + _keystream_xor(self._line_keys.mask1, nonce, header) + self._rng(padlen)
        self._tag = _resume_tag(self._line_keys.mac1, body)
        return body + self._tag

    def receive_data(self, data: bytes) -> int | None:
        """Feed server bytes; the server's offset of our bytes once the answer is complete.

        Bytes after the answer are in :attr:`trailing_data`. An answer that does not prove the
        session raises ``RemoteProtocolError``.
        """
        if self.state is not ResumeState.WAIT_ANSWER or self._tag is None:
            raise LocalProtocolError(f"resume cannot receive data in {self.state.name}")
        self._buffer += data
        answer = split_answer(self._buffer, self._line_keys.mask2, self._tag)
        if answer is None:
            return None
        clear, body, confirm, self.trailing_data = answer
        offset = _ANSWER.unpack(clear)[0]
        expected = _mac(self._ticket.key, b"resume answer", self._tag, body)[:TAG_LEN]
        if not hmac.compare_digest(confirm, expected):
            self.state = ResumeState.FAILED
            raise RemoteProtocolError("bridge answered the resume without proving the session")
        self.state = ResumeState.DONE
        return offset


# ------------------------------------------------------------------------------ the ledger


class SessionLedger:
    """Byte offsets and the replay buffer of one end of an open session.

    Wraps the :class:`BridgeConnection` once its handshake is over: use :meth:`data_to_send`
    and :meth:`receive_data` instead of the connection's. ``sent`` are the handshake-time
    records already written (server), ``received`` the record bytes that arrived with the
    handshake's last message.

    Offsets: ``sent`` bytes made so far, of which the peer ``acked``; ``received`` bytes of the
    peer's, of which we last acknowledged ``acked_to_peer``. ACKs are due every ``ack_every``
    bytes, and sooner when the line goes idle (:meth:`data_to_send` with ``flush_ack``) after
    anything but ACKs arrived (an ACK is never acknowledged, so two idle ends stay quiet).
    """

    def __init__(
        self,
        conn: BridgeConnection,
        *,
        sent: bytes = b"",
        received: int = 0,
        limit: int = REPLAY_LIMIT,
        ack_every: int = ACK_EVERY,
    ) -> None:
        self.conn = conn
        self.limit = limit
        self.ack_every = ack_every
        # What the peer has not acknowledged, from ``acked`` on: the written chunks as they
        # were (no copy per write), the first one's ``_head_skip`` bytes already acknowledged.
        self._chunks: deque[bytes | bytearray] = deque([sent] if sent else [])
        self._head_skip = 0
        self.sent = len(sent)
        self.acked = 0
        self.received = received
        self.acked_to_peer = 0
        self._elicited = received > 0
        #: the end of the last bytes that the peer must acknowledge (not ACK-only records)
        self.eliciting_end = len(sent)

    @property
    def unacked(self) -> int:
        return self.sent - self.acked

    @property
    def full(self) -> bool:
        """The replay buffer is at its limit: no new records until the peer acknowledges."""
        return self.unacked >= self.limit

    @property
    def owes_ack(self) -> bool:
        """We received something worth acknowledging and have not acknowledged it yet."""
        return self._elicited and self.received > self.acked_to_peer

    @property
    def ack_due(self) -> bool:
        """An ACK goes out with the next write even if nothing else does."""
        return self.received - self.acked_to_peer >= self.ack_every

    @property
    def expecting_ack(self) -> bool:
        """The peer owes us an acknowledgement (it does not acknowledge ACK-only records)."""
        return self.acked < self.eliciting_end

    def data_to_send(self, *, flush_ack: bool = False) -> bytes | bytearray:
        """Sealed-record bytes to write now, remembered until the peer acknowledges them.

        An ACK that is owed rides along whenever other frames leave (it shares their record,
        so it costs no write of its own); on its own it leaves every ``ack_every`` bytes, or
        with ``flush_ack``. Once the replay buffer is full only a due ACK makes a write (and
        takes whatever else is queued with it).
        """
        conn = self.conn
        others = conn.has_data_to_send
        owed = self.received - self.acked_to_peer
        ack = (
            conn.state is ConnectionState.OPEN
            and owed > 0
            and (self.ack_due or (self._elicited and (flush_ack or (others and not self.full))))
        )
        if ack:
            conn.mux.send_ack(self.received)
            self.acked_to_peer = self.received
            self._elicited = False
        elif self.full:
            return b""
        out = conn.data_to_send()
        if out and others:  # ACK-only records are not acknowledged: they elicit nothing
            self.eliciting_end = self.sent + len(out)
        return self._remember(out)

    def _remember(self, out: bytes | bytearray) -> bytes | bytearray:
        if out:
            self._chunks.append(out)
            self.sent += len(out)
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed the peer's sealed-record bytes; ACKs are consumed here, other events returned.

        Raises ``RemoteProtocolError`` like the connection, and for an ACK of bytes never sent.
        """
        events = self.conn.receive_data(data)
        self.received += len(data)
        if not events:
            return events
        kept: list[Event] = []
        for event in events:
            if isinstance(event, AckReceived):
                self._acknowledge(event.offset)
            else:
                kept.append(event)
        if kept:
            self._elicited = True
        return kept

    def resume_from(self, peer_received: int) -> bytes:
        """A new carrier: the peer has ``peer_received`` of our bytes. Returns what to resend.

        The peer also learned our ``received`` in the resume exchange: that counts as an ACK.
        """
        self._acknowledge(peer_received)
        self.acked_to_peer = self.received
        if not self._chunks:
            return b""
        first = memoryview(self._chunks[0])[self._head_skip :]
        return b"".join([first, *list(self._chunks)[1:]])

    def _acknowledge(self, offset: int) -> None:
        if offset > self.sent:
            raise RemoteProtocolError(
                f"bridge peer acknowledged {offset} bytes but only {self.sent} were sent"
            )
        if offset <= self.acked:  # an old ACK resent after a resume
            return
        drop = offset - self.acked
        self.acked = offset
        chunks = self._chunks
        while drop:
            left = len(chunks[0]) - self._head_skip
            if drop < left:
                self._head_skip += drop
                return
            drop -= left
            chunks.popleft()
            self._head_skip = 0
