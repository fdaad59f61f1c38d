"""AEAD records of a bridge session: encrypted lengths, counter nonces, automatic rekeying.

One record on the wire::

    masked length (2) | ChaCha20-Poly1305(key, nonce, plaintext, aad = masked length)

The length is the ciphertext length (plaintext + 16-byte tag), so a record carries at most
65519 bytes of plaintext: bulk data travels in records that large, which keeps the cost per byte
of everything done per record low. The length is XORed with the next two bytes of a ChaCha20
keystream under a separate per-direction length key (obfs4 masks its lengths the same way, with
SipHash). The masked bytes are the AEAD's associated data, so a flipped length bit is caught by
the tag check of the record it announces, and the stream never carries a clear-text size.

Nonces are a 64-bit record counter (RFC 8439 section 2.8 allows any unique 96-bit nonce); after
``rekey_interval`` records both keys are replaced by an HKDF-Expand of themselves and the
counter restarts, so a nonce never repeats under one key and old keys cannot be recovered from
new ones. The record that crosses the boundary is the first one under the new key (counter 0);
its length is still masked by the old length keystream, where it left off. Both ends count
records, so rekeying needs no message.

Any tampered, truncated, reordered or replayed record fails the tag check and raises
:class:`~proxy.errors.RemoteProtocolError`; the opener then stays broken and yields no plaintext.
A record out of place usually announces a plausible length, so the error comes once that many
bytes have arrived (or at the end of the stream), never with any plaintext.

Costs: the sealer encrypts every record of a batch straight into one buffer
(:meth:`RecordSealer.seal_all`); the opener decrypts whole records straight from the bytes it is
given and copies aside only a record cut by the end of a read.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from proxy.errors import LocalProtocolError, RemoteProtocolError

AEAD_TAG_LEN = 16
LENGTH_LEN = 2
#: the largest ciphertext one record carries: what its 16-bit length field can say
MAX_CIPHERTEXT = 0xFFFF
#: the largest plaintext of one record (bulk data travels in records this size: few per MiB)
MAX_PLAINTEXT = MAX_CIPHERTEXT - AEAD_TAG_LEN
#: records per key before both ends derive the next key (2**32 records of 64 KiB is 256 TiB)
REKEY_INTERVAL = 1 << 32
_KEYSTREAM_CHUNK = 4096
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_LENGTH = struct.Struct(">H")


def _next_key(key: bytes, label: bytes) -> bytes:
    return HKDFExpand(hashes.SHA256(), 32, b"sidestep-bridge-v1 rekey " + label).derive(key)


class _Direction:
    """Key, length keystream and counter of one direction."""

    def __init__(self, key: bytes, length_key: bytes, rekey_interval: int) -> None:
        if rekey_interval < 1:
            raise ValueError("rekey_interval must be at least 1")
        self.rekey_interval = rekey_interval
        self.epoch = 0
        self._install(key, length_key)

    def _install(self, key: bytes, length_key: bytes) -> None:
        self._key = key
        self._length_key = length_key
        self.aead = ChaCha20Poly1305(key)
        self._keystream = Cipher(
            algorithms.ChaCha20(length_key, b"\x00" * 16), mode=None
        ).encryptor()
        self._mask = b""
        self._mask_pos = 0
        self.counter = 0

    def next_nonce(self) -> bytes:
        if self.counter >= self.rekey_interval:
            self.epoch += 1
            self._install(_next_key(self._key, b"data"), _next_key(self._length_key, b"length"))
        nonce = _NONCE_PREFIX + self.counter.to_bytes(8, "big")
        self.counter += 1
        return nonce

    def length_mask(self) -> int:
        if self._mask_pos + LENGTH_LEN > len(self._mask):
            self._mask = self._keystream.update(bytes(_KEYSTREAM_CHUNK))
            self._mask_pos = 0
        pos = self._mask_pos
        self._mask_pos = pos + LENGTH_LEN
        return (self._mask[pos] << 8) | self._mask[pos + 1]


class RecordSealer:
    """Turns plaintexts into records for one direction."""

    def __init__(
        self, key: bytes, length_key: bytes, *, rekey_interval: int = REKEY_INTERVAL
    ) -> None:
        self._dir = _Direction(key, length_key, rekey_interval)

    @property
    def records_sealed(self) -> int:
        return self._dir.epoch * self._dir.rekey_interval + self._dir.counter

    def seal(self, plaintext: bytes) -> bytes:
        """One record carrying ``plaintext`` (1..MAX_PLAINTEXT bytes)."""
        return bytes(self.seal_all([plaintext]))

    def seal_into(self, plaintext: bytes, out: bytearray) -> None:
        """Append one record carrying ``plaintext`` to ``out``."""
        out += self.seal_all([plaintext])

    def seal_all(self, plaintexts: Sequence[bytes | bytearray | memoryview]) -> bytearray:
        """The records carrying ``plaintexts``, in order, back to back in one new buffer.

        The buffer is allocated once and every record is encrypted straight into it, so bulk
        data is touched by the cipher and nothing else on its way to the carrier.
        """
        sizes = [len(memoryview(p)) for p in plaintexts]
        for size in sizes:
            if not 1 <= size <= MAX_PLAINTEXT:
                raise LocalProtocolError(f"record plaintext must be 1-{MAX_PLAINTEXT} bytes")
        out = bytearray(sum(sizes) + len(sizes) * (LENGTH_LEN + AEAD_TAG_LEN))
        d = self._dir
        pos = 0
        with memoryview(out) as view:
            for plaintext, size in zip(plaintexts, sizes, strict=True):
                masked = _LENGTH.pack((size + AEAD_TAG_LEN) ^ d.length_mask())
                view[pos : pos + LENGTH_LEN] = masked
                pos += LENGTH_LEN
                end = pos + size + AEAD_TAG_LEN
                nonce = d.next_nonce()  # first: it may rekey, replacing d.aead
                d.aead.encrypt_into(nonce, plaintext, masked, view[pos:end])
                pos = end
        return out


class RecordOpener:
    """Reads records of one direction from a byte stream, any chunking."""

    def __init__(
        self, key: bytes, length_key: bytes, *, rekey_interval: int = REKEY_INTERVAL
    ) -> None:
        self._dir = _Direction(key, length_key, rekey_interval)
        self._buffer = bytearray()
        self._pending_length: int | None = None
        self._masked = b""
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a record (at most one record)."""
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[bytearray]:
        """Feed bytes; return the plaintexts of every record now complete, in order (each a
        new ``bytearray``, the caller's to keep and change).

        Whole records are decrypted straight from ``data``; only the unfinished record at the
        end is copied aside, and it is completed from the front of the next call's bytes.
        """
        if self._broken is not None:
            raise RemoteProtocolError(self._broken)
        out: list[bytearray] = []
        buf = self._buffer
        with memoryview(data) as view:
            pos = 0
            end = len(view)
            while True:
                length = self._pending_length
                if length is None:
                    if buf:  # the first byte of a length arrived last time
                        take = min(LENGTH_LEN - len(buf), end - pos)
                        buf += view[pos : pos + take]
                        pos += take
                        if len(buf) < LENGTH_LEN:
                            break
                        length = self._begin(bytes(buf))
                        buf.clear()
                    elif end - pos >= LENGTH_LEN:
                        length = self._begin(bytes(view[pos : pos + LENGTH_LEN]))
                        pos += LENGTH_LEN
                    else:
                        buf += view[pos:end]
                        break
                if buf or end - pos < length:  # a record split across reads
                    take = min(length - len(buf), end - pos)
                    buf += view[pos : pos + take]
                    pos += take
                    if len(buf) < length:
                        break
                    out.append(self._open(buf))
                    buf.clear()
                else:
                    out.append(self._open(view[pos : pos + length]))
                    pos += length
        return out

    def _begin(self, masked: bytes) -> int:
        """Unmask the length of the next record; out of range means a tampered stream."""
        length = int.from_bytes(masked, "big") ^ self._dir.length_mask()
        if not AEAD_TAG_LEN < length <= MAX_CIPHERTEXT:
            self._fail("bridge record length is out of range (tampered stream)")
        self._masked = masked
        self._pending_length = length
        return length

    def _open(self, ciphertext: bytes | bytearray | memoryview) -> bytearray:
        d = self._dir
        nonce = d.next_nonce()  # first: it may rekey, replacing d.aead
        plaintext = bytearray(len(ciphertext) - AEAD_TAG_LEN)
        try:
            d.aead.decrypt_into(nonce, ciphertext, self._masked, plaintext)
        except InvalidTag:
            self._fail("bridge record failed authentication (tampered, reordered or replayed)")
        self._pending_length = None
        return plaintext

    def receive_eof(self) -> None:
        """The byte stream ended: an error if it ended inside a record."""
        if self._broken is not None:
            raise RemoteProtocolError(self._broken)
        if self._buffer or self._pending_length is not None:
            self._fail("bridge session ended in the middle of a record (truncated)")

    def _fail(self, message: str) -> NoReturn:
        self._broken = message
        self._buffer.clear()
        raise RemoteProtocolError(message)
