"""The sidestep bridge protocol, without any I/O.

Layers, top to bottom, and the module that holds each::

    application streams      SOCKS CONNECT targets, bytes both ways
    mux.py                   OPEN / DATA / CLOSE / RESET / WINDOW / PING / PONG / ACK / BYE
                             frames, per-stream credit windows, padding applied per record
    frames.py                the frame codec (a type byte first, so padding-only records exist)
    padding.py               the per-bridge padding shape (heavy for each stream's first records)
    records.py               AEAD records of up to 64 KiB: ChaCha20-Poly1305, masked lengths,
                             counter nonces, per-direction keys, rekeying by record count
    handshake.py             one-round-trip X25519 handshake, client proof checked before any DH,
                             timestamp window and exact replay cache
    resume.py                byte offsets, replay buffer and the resume hello: a session
                             continues over a new carrier
    ------------------------ carrier (I/O layer): TLS + WebSocket, split HTTP, polling, raw TCP
                             (proxy/bridge for the server; the client strategy)

:class:`~proxy.protocols.bridge.connection.BridgeConnection` ties them together for one end of a
session. The I/O layer supplies ``now`` and a random source (``os.urandom``), moves bytes between
it and the carrier, and decides how to stay silent when the server rejects a hello.

The session layer (resume.py) sits between the records and the carrier. Each end numbers the
sealed-record bytes it sends, one byte stream per direction, keeps what the peer has not yet
acknowledged (ACK frames, encrypted like everything else) in a bounded replay buffer, and when a
carrier breaks, stalls or is rotated, the client opens a new one with a *resume hello* that
looks like a hello on the wire, names the session with an id derived from its keys and proves
it; both ends then resend from the byte the peer stopped at. The records need no change: their
counter nonces already demand exactly-once, in-order delivery, which the byte offsets restore;
the mux and the record keys survive unchanged. A BYE frame ends a session for good.

Bulk transfer: a bulk DATA frame fills a whole record (65512 bytes of payload), windows are
2 MiB per stream and 16 MiB per session, the sealer encrypts a batch of records into one buffer
and the receiving mux hands a DATA-only record's plaintext to the stream in place, so a byte is
copied once on each side besides the cipher and the socket calls (``bench/bridgecodec.py`` and
``python -m bench bridge`` measure it).
"""

from proxy.protocols.bridge.connection import (
    BridgeConnection,
    ConnectionState,
    Event,
    HandshakeCompleted,
    HandshakeRejected,
    SessionEnded,
)
from proxy.protocols.bridge.frames import ResetCode
from proxy.protocols.bridge.handshake import BridgeLine, RandomSource, ReplayCache
from proxy.protocols.bridge.mux import (
    AckReceived,
    ByeReceived,
    DataReceived,
    PingReceived,
    PongReceived,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)

__all__ = [
    "AckReceived",
    "BridgeConnection",
    "BridgeLine",
    "ByeReceived",
    "ConnectionState",
    "DataReceived",
    "Event",
    "HandshakeCompleted",
    "HandshakeRejected",
    "PingReceived",
    "PongReceived",
    "RandomSource",
    "ReplayCache",
    "ResetCode",
    "Role",
    "SessionEnded",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
    "WindowUpdated",
]
