"""The sidestep bridge protocol, without any I/O.

Layers, top to bottom, and the module that holds each::

    application streams      SOCKS CONNECT targets, bytes both ways
    mux.py                   OPEN / DATA / CLOSE / RESET / WINDOW / PING / PONG frames,
                             per-stream credit windows, padding applied per record
    frames.py                the frame codec (a type byte first, so padding-only records exist)
    padding.py               the per-bridge padding shape (heavy for each stream's first records)
    records.py               AEAD records: ChaCha20-Poly1305, masked lengths, counter nonces,
                             per-direction keys, rekeying by record count
    handshake.py             one-round-trip X25519 handshake, client proof checked before any DH,
                             timestamp window and exact replay cache
    ------------------------ carrier (I/O layer): TLS + WebSocket, split HTTP, polling, raw TCP
                             (proxy/bridge for the server; the client strategy)

:class:`~proxy.protocols.bridge.connection.BridgeConnection` ties them together for one end of a
session. The I/O layer supplies ``now`` and a random source (``os.urandom``), moves bytes between
it and the carrier, and decides how to stay silent when the server rejects a hello.

Seam for a session layer (issue 7, item 3). A session that outlives its carrier needs a session
id and sequence/acknowledgement numbers *below* the AEAD records and *above* the carrier. The
unit it numbers is one sealed record: :meth:`BridgeConnection.records_to_send` hands them out one
by one, so a session layer can wrap each with ``(session id, seq, ack)``, keep the unacknowledged
ones in a bounded replay buffer, resend them on a new carrier connection, and on the other side
drop duplicates and feed the in-order record bytes to :meth:`BridgeConnection.receive_data`. The
records themselves need no change: their counter nonces already demand exactly-once, in-order
delivery, which is what the session layer restores. Reattaching a carrier will need its own
hello (proving the secret and naming the session, bound to ``HandshakeCompleted.transcript_hash``)
so that probes still learn nothing; the mux and the record keys survive unchanged.
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
    "BridgeConnection",
    "BridgeLine",
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
