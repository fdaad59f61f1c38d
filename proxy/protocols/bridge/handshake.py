"""The bridge handshake: one round trip, forward secret, silent to anyone without the bridge line.

What both ends know beforehand (the bridge line): the server's static X25519 public key ``S``,
a 32-byte ``secret`` and an 8-byte ``short_id``. From them both derive, with HKDF-SHA256
(RFC 5869), three "line keys": ``mask1`` and ``mac1`` for the client's first message and
``mask2`` for the server's answer. A censor who has not seen the bridge line knows none of them.

Client hello (one write, every byte indistinguishable from random)::

    nonce(16) | ChaCha20[mask1, nonce](E_c(32) | time(8) | padlen(2)) | padding | tag(16)
    tag = HMAC-SHA256(mac1, "client hello" | nonce | encrypted header | padding)[:16]

``E_c`` is the client's ephemeral X25519 key. X25519 public keys are not uniform (the top bit is
always clear, and not every value is a point), so it travels encrypted under a keystream that
only holders of the line can compute; that gives the same wire look as Elligator2 without a
home-made encoding (``cryptography`` has none). The padding length is random, so the hello has
no fixed size. The server checks, in this order and before any Diffie-Hellman work: the tag
(constant time), the timestamp (within ``window`` seconds of its own clock) and the replay cache
(an exact set of seen tags, kept until their timestamp can no longer be accepted). Any failure
is a :class:`Rejected` decision, never bytes on the wire: the I/O layer decides how to look
innocent (drain and close after a random delay, or hand over to the web server in front).

Server answer::

    ChaCha20[mask2, tag](E_s(32) | padlen(2)) | padding | confirm(16)

The client's tag (unique per accepted hello) is the keystream nonce, so no nonce is sent.
Session keys come from HKDF over ``es = DH(E_c, S)``, ``ee = DH(E_c, E_s)`` and the secret
(a pre-shared key mixed in, as in Noise's ``psk`` modifier), salted with the hash of the whole
transcript. ``confirm`` is an HMAC under a key from that schedule: a client that verifies it
knows it talks to the holder of ``S`` (es) and that the session is forward secret (ee).

The client waits for the answer before sending records (one round trip; no 0-RTT data, so every
byte it sends has forward secrecy).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from proxy.errors import LocalProtocolError, RemoteProtocolError

#: a source of random bytes, ``os.urandom`` in production (the protocol has no randomness of its
#: own, so tests can replay a run exactly)
RandomSource = Callable[[int], bytes]

LABEL = b"sidestep-bridge-v1"
KEY_LEN = 32
SECRET_LEN = 32
SHORT_ID_LEN = 8
NONCE_LEN = 16
TAG_LEN = 16
#: E_c, timestamp, padding length
CLIENT_HEADER_LEN = KEY_LEN + 8 + 2
#: E_s, padding length
SERVER_HEADER_LEN = KEY_LEN + 2
#: padding bounds of the two handshake messages; a hello is 74..1354 bytes, an answer 50..1330
MIN_HELLO_PADDING = 0
MAX_HELLO_PADDING = 1280
#: how far a client's clock may be from ours, in seconds
DEFAULT_WINDOW = 120.0
MAX_HELLO_LEN = NONCE_LEN + CLIENT_HEADER_LEN + MAX_HELLO_PADDING + TAG_LEN


@dataclass(frozen=True, slots=True)
class BridgeLine:
    """What a client knows about a bridge (and the server knows about itself)."""

    server_public: bytes
    secret: bytes = field(repr=False)
    short_id: bytes

    def __post_init__(self) -> None:
        if len(self.server_public) != KEY_LEN:
            raise ValueError(f"server public key must be {KEY_LEN} bytes")
        if len(self.secret) != SECRET_LEN:
            raise ValueError(f"secret must be {SECRET_LEN} bytes")
        if len(self.short_id) != SHORT_ID_LEN:
            raise ValueError(f"short id must be {SHORT_ID_LEN} bytes")


@dataclass(frozen=True, slots=True)
class SessionKeys:
    """Per-direction keys of one session, from the point of view of one end."""

    send_key: bytes = field(repr=False)
    send_length_key: bytes = field(repr=False)
    receive_key: bytes = field(repr=False)
    receive_length_key: bytes = field(repr=False)
    #: SHA-256 of the handshake; a later session layer can bind resumption to it
    transcript_hash: bytes


@dataclass(frozen=True, slots=True)
class Pending:
    """The server needs more bytes of the client hello."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """Unauthenticated, stale or replayed hello: answer nothing. ``reason`` is for local logs."""

    reason: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """A valid hello: write ``reply`` (one write), then records under ``keys``."""

    reply: bytes
    keys: SessionKeys


Decision = Pending | Rejected | Accepted


class ReplayCache:
    """Exact memory of accepted hello tags, shared by every connection of one bridge.

    A hello carries a timestamp accepted within ``window`` seconds of the server's clock, so a
    tag seen at time ``t`` can only be replayed successfully until ``t + 2 * window``; entries
    expire then. Entries are kept in insertion order, which is expiry order. When ``max_entries``
    live entries exist, new hellos are refused rather than older tags forgotten (only holders of
    the secret can fill the cache, and forgetting would let replays through).
    """

    def __init__(self, window: float = DEFAULT_WINDOW, max_entries: int = 1 << 18) -> None:
        self.window = window
        self.max_entries = max_entries
        self._expiry: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_add(self, tag: bytes, now: float) -> str | None:
        """Remember ``tag``; return ``None`` if it is new, else why it must be refused."""
        while self._expiry:
            oldest, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            del self._expiry[oldest]
        if tag in self._expiry:
            return "replayed hello"
        if len(self._expiry) >= self.max_entries:
            return "replay cache full"
        self._expiry[tag] = now + 2 * self.window
        return None


# ----------------------------------------------------------------------------- key schedule


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=LABEL + info).derive(ikm)


@dataclass(frozen=True, slots=True)
class _LineKeys:
    mask1: bytes
    mac1: bytes
    mask2: bytes


def _line_keys(line: BridgeLine) -> _LineKeys:
    okm = _hkdf(line.secret, line.server_public + line.short_id, b" line", 3 * KEY_LEN)
    return _LineKeys(okm[:32], okm[32:64], okm[64:96])


def padding_seed(line: BridgeLine) -> bytes:
    """32 bytes that shape this bridge's padding, the same at both ends and for every session."""
    return _hkdf(line.secret, line.server_public + line.short_id, b" padding shape", 32)


def _keystream_xor(key: bytes, nonce: bytes, data: bytes) -> bytes:
    encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    return encryptor.update(data)


def diffie_hellman(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519 (RFC 7748); a low-order peer key (all-zero result) raises ``ValueError``."""
    return private.exchange(X25519PublicKey.from_public_bytes(public))


def _private_key(rng: RandomSource) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(rng(KEY_LEN))


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _session_keys(
    line: BridgeLine, es: bytes, ee: bytes, transcript: bytes, *, client: bool
) -> tuple[SessionKeys, bytes]:
    """The session keys for one end, and the server's confirmation tag."""
    th = hashlib.sha256(LABEL + transcript).digest()
    okm = _hkdf(es + ee + line.secret, th, b" session", 5 * KEY_LEN)
    confirm_key = okm[:32]
    c2s, c2s_len, s2c, s2c_len = okm[32:64], okm[64:96], okm[96:128], okm[128:160]
    confirm = hmac.new(confirm_key, b"server confirm" + th, hashlib.sha256).digest()[:TAG_LEN]
    if client:
        keys = SessionKeys(c2s, c2s_len, s2c, s2c_len, th)
    else:
        keys = SessionKeys(s2c, s2c_len, c2s, c2s_len, th)
    return keys, confirm


def _random_below(rng: RandomSource, bound: int) -> int:
    return int.from_bytes(rng(4), "big") % bound


def _hello_tag(mac_key: bytes, body: bytes) -> bytes:
    return hmac.new(mac_key, b"client hello" + body, hashlib.sha256).digest()[:TAG_LEN]


# ---------------------------------------------------------------------------------- client


class ClientState(enum.Enum):
    WAIT_ANSWER = "wait-answer"  # hello built, waiting for the server's answer
    DONE = "done"  # keys known; trailing_data holds the first record bytes
    FAILED = "failed"


class ClientHandshake:
    """The client end: :meth:`hello` once, then :meth:`receive_data` until it returns keys."""

    def __init__(self, line: BridgeLine, rng: RandomSource) -> None:
        self._line = line
        self._line_keys = _line_keys(line)
        self._rng = rng
        self._ephemeral = _private_key(rng)
        self._hello: bytes | None = None
        self._tag = b""
        self._buffer = bytearray()
        self.state = ClientState.WAIT_ANSWER
        self.trailing_data = b""

    def hello(self, now: float) -> bytes:
        """The client hello, stamped with ``now`` (seconds since the epoch); call once."""
        if self._hello is not None:
            raise LocalProtocolError("the client hello was already built")
        nonce = self._rng(NONCE_LEN)
        padlen = MIN_HELLO_PADDING + _random_below(
            self._rng, MAX_HELLO_PADDING - MIN_HELLO_PADDING + 1
        )
        header = _public_bytes(self._ephemeral) + struct.pack(">QH", int(now), padlen)
        body = nonce + _keystream_xor(self._line_keys.mask1, nonce, header) + self._rng(padlen)
        self._tag = _hello_tag(self._line_keys.mac1, body)
        self._hello = body + self._tag
        return self._hello

    def receive_data(self, data: bytes) -> SessionKeys | None:
        """Feed server bytes; return the session keys once the answer is complete and genuine.

        Raises ``RemoteProtocolError`` when the answer does not prove the server's key (a wrong
        public key or secret in the bridge line, or a man in the middle).
        """
        if self.state is not ClientState.WAIT_ANSWER or self._hello is None:
            raise LocalProtocolError(f"client handshake cannot receive data in {self.state.name}")
        self._buffer += data
        answer = split_answer(self._buffer, self._line_keys.mask2, self._tag)
        if answer is None:
            return None
        header, body, confirm, self.trailing_data = answer
        server_ephemeral = header[:KEY_LEN]
        self.state = ClientState.FAILED
        try:
            es = diffie_hellman(self._ephemeral, self._line.server_public)
            ee = diffie_hellman(self._ephemeral, server_ephemeral)
        except ValueError:
            raise RemoteProtocolError("bridge answered with an invalid key") from None
        keys, expected = _session_keys(self._line, es, ee, self._hello + body, client=True)
        if not hmac.compare_digest(confirm, expected):
            raise RemoteProtocolError(
                "bridge failed to prove its key (wrong bridge line, or someone in the middle)"
            )
        self.state = ClientState.DONE
        return keys


def split_answer(
    buffer: bytearray, mask: bytes, tag: bytes
) -> tuple[bytes, bytes, bytes, bytes] | None:
    """Cut one server answer (a fresh handshake's or a resume's) from the front of ``buffer``.

    Both answers share one framing: a ``SERVER_HEADER_LEN`` header under the ``mask`` keystream
    with the client's ``tag`` as nonce, whose last two bytes give the padding length, then the
    padding and a ``TAG_LEN`` confirm. Returns ``(clear header, header + padding as sent,
    confirm, bytes after the answer)`` and empties ``buffer``, or ``None`` (buffer untouched)
    until the whole answer is there. Checking the confirm is the caller's: its key differs.
    """
    if len(buffer) < SERVER_HEADER_LEN:
        return None
    header = _keystream_xor(mask, tag, bytes(buffer[:SERVER_HEADER_LEN]))
    padlen = int.from_bytes(header[-2:], "big") % (MAX_HELLO_PADDING + 1)
    total = SERVER_HEADER_LEN + padlen + TAG_LEN
    if len(buffer) < total:
        return None
    body = bytes(buffer[: total - TAG_LEN])
    confirm = bytes(buffer[total - TAG_LEN : total])
    trailing = bytes(buffer[total:])
    buffer.clear()
    return header, body, confirm, trailing


# ---------------------------------------------------------------------------------- server


class ServerState(enum.Enum):
    WAIT_HELLO = "wait-hello"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


class ServerHandshake:
    """The server end: feed bytes until the decision is :class:`Accepted` or :class:`Rejected`.

    ``static_private`` is the bridge's long-term X25519 key; ``replay`` is shared by all
    connections of the bridge. After ``Accepted``, ``trailing_data`` holds bytes that followed
    the hello (the client's first records, when it pipelines).
    """

    def __init__(
        self,
        line: BridgeLine,
        static_private: X25519PrivateKey,
        replay: ReplayCache,
        rng: RandomSource,
    ) -> None:
        if _public_bytes(static_private) != line.server_public:
            raise LocalProtocolError("the static private key does not match the bridge line")
        self._line = line
        self._line_keys = _line_keys(line)
        self._static = static_private
        self._replay = replay
        self._rng = rng
        self._buffer = bytearray()
        self.state = ServerState.WAIT_HELLO
        self.trailing_data = b""

    def receive_data(self, data: bytes, now: float) -> Decision:
        """Feed client bytes; ``now`` is the server clock in seconds since the epoch."""
        if self.state is ServerState.REJECTED:
            return Rejected("already rejected")
        if self.state is not ServerState.WAIT_HELLO:
            raise LocalProtocolError("the server handshake is already complete")
        self._buffer += data
        head = NONCE_LEN + CLIENT_HEADER_LEN
        if len(self._buffer) < head:
            return Pending()
        nonce = bytes(self._buffer[:NONCE_LEN])
        header = _keystream_xor(self._line_keys.mask1, nonce, bytes(self._buffer[NONCE_LEN:head]))
        padlen = int.from_bytes(header[KEY_LEN + 8 :], "big") % (MAX_HELLO_PADDING + 1)
        total = head + padlen + TAG_LEN
        if len(self._buffer) < total:
            return Pending()
        hello = bytes(self._buffer[:total])
        self.trailing_data = bytes(self._buffer[total:])
        self._buffer.clear()
        decision = self._decide(hello, header, now)
        if isinstance(decision, Rejected):
            self.state = ServerState.REJECTED
            self.trailing_data = b""
        else:
            self.state = ServerState.ACCEPTED
        return decision

    def _decide(self, hello: bytes, header: bytes, now: float) -> Decision:
        # Cheap checks first: one HMAC, then integers, then a dict lookup. No DH before this.
        tag = hello[-TAG_LEN:]
        if not hmac.compare_digest(tag, _hello_tag(self._line_keys.mac1, hello[:-TAG_LEN])):
            return Rejected("bad hello tag")
        (stamp,) = struct.unpack(">Q", header[KEY_LEN : KEY_LEN + 8])
        if abs(stamp - now) > self._replay.window:
            return Rejected(f"hello timestamp {stamp - now:+.0f} s off")
        refused = self._replay.check_and_add(tag, now)
        if refused is not None:
            return Rejected(refused)
        client_ephemeral = header[:KEY_LEN]
        ephemeral = _private_key(self._rng)
        try:
            es = diffie_hellman(self._static, client_ephemeral)
            ee = diffie_hellman(ephemeral, client_ephemeral)
        except ValueError:
            return Rejected("low-order client key")
        padlen = _random_below(self._rng, MAX_HELLO_PADDING + 1)
        clear = _public_bytes(ephemeral) + padlen.to_bytes(2, "big")
        body = _keystream_xor(self._line_keys.mask2, tag, clear) + self._rng(padlen)
        keys, confirm = _session_keys(self._line, es, ee, hello + body, client=False)
        return Accepted(body + confirm, keys)
