"""Seal+open throughput of the bridge record layer vs a raw ChaCha20-Poly1305 loop.

In one thread, no sockets, ``--mib`` MiB each way:

- ``raw aead``: ``ChaCha20Poly1305.encrypt`` then ``decrypt`` of full-size (64 KiB) records
  with a counter nonce: the floor set by the C library plus the least Python possible.
- ``records``: :class:`RecordSealer` then :class:`RecordOpener` (masked lengths, counters, one
  ``receive_data`` per 64 KiB read as a carrier would deliver it).
- ``session``: a whole client/server :class:`BridgeConnection` pair after the handshake: one
  stream, ``send_data`` of the writes a bridge's relay makes (:data:`STREAM_READ`), framing,
  padding, sealing, opening, events and flow control acknowledgements.

Prints MB/s (best of ``--repeat``) of plaintext through seal+open and each one's ratio to raw.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from proxy.bridge.session import STREAM_READ
from proxy.protocols.bridge import BridgeConnection, BridgeLine, DataReceived, ReplayCache
from proxy.protocols.bridge.records import MAX_PLAINTEXT, RecordOpener, RecordSealer

CHUNK = MAX_PLAINTEXT
READ = 64 * 1024


def _raw(total: int) -> None:
    aead = ChaCha20Poly1305(os.urandom(32))
    data = os.urandom(CHUNK)
    for counter in range(total // CHUNK):
        nonce = bytes(4) + counter.to_bytes(8, "big")
        aead.decrypt(nonce, aead.encrypt(nonce, data, None), None)


def _records(total: int) -> None:
    key, length_key = os.urandom(32), os.urandom(32)
    sealer, opener = RecordSealer(key, length_key), RecordOpener(key, length_key)
    data = os.urandom(CHUNK)
    per_read = READ // CHUNK
    for _ in range(total // READ):
        wire = bytearray()
        for _ in range(per_read):
            sealer.seal_into(data, wire)
        opener.receive_data(bytes(wire))


def _session(total: int) -> None:
    private = X25519PrivateKey.generate()
    line = BridgeLine(private.public_key().public_bytes_raw(), os.urandom(32), os.urandom(8))
    now = time.time()
    client = BridgeConnection.client(line, rng=os.urandom, now=now)
    server = BridgeConnection.server(line, private, ReplayCache(), rng=os.urandom)
    server.receive_data(client.data_to_send(), now)
    client.receive_data(server.data_to_send())
    sid = client.open_stream("example.com", 443)
    data = os.urandom(STREAM_READ)
    for _ in range(total // STREAM_READ):
        client.send_data(sid, data)
        for event in server.receive_data(client.data_to_send(), now):
            if isinstance(event, DataReceived):
                server.acknowledge_data(sid, len(event.data))
        client.receive_data(server.data_to_send())


def _best(run: Callable[[int], None], total: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(total)
        best = min(best, time.perf_counter() - start)
    return total / best / 1e6


def run_bridgecodec_bench(mib: int, repeat: int) -> None:
    total = mib << 20
    print(f"bridge codec: {mib} MiB sealed and opened in one thread, best of {repeat}")
    raw = _best(_raw, total, repeat)
    print(f"  {'raw aead':<10} {raw:8.0f} MB/s  1.00x")
    for name, run in (("records", _records), ("session", _session)):
        rate = _best(run, total, repeat)
        print(f"  {name:<10} {rate:8.0f} MB/s  {rate / raw:.2f}x")
