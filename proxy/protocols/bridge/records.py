"""AEAD records of a bridge session: encrypted lengths, counter nonces, automatic rekeying.

One record on the wire::

    masked length (2) | ChaCha20-Poly1305(key, nonce, plaintext, aad = masked length)

The length is the ciphertext length (plaintext + 16-byte tag), XORed with the next two bytes of
a ChaCha20 keystream under a separate per-direction length key (obfs4 masks its lengths the same
way, with SipHash). The masked bytes are the AEAD's associated data, so a flipped length bit is
caught by the tag check of the record it announces, and the stream never carries a clear-text
size. Nonces are a 64-bit record counter (RFC 8439 section 2.8 allows any unique 96-bit nonce);
after ``rekey_interval`` records both keys are replaced by an HKDF-Expand of themselves and the
counter restarts, so a nonce never repeats under one key and old keys cannot be recovered from
new ones. Both ends count records, so rekeying needs no message.

Any tampered, truncated, reordered or replayed record fails the tag check and raises
:class:`~proxy.errors.RemoteProtocolError`; the opener then stays broken and yields no plaintext.
"""

from __future__ import annotations

import struct
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from proxy.errors import LocalProtocolError, RemoteProtocolError

AEAD_TAG_LEN = 16
LENGTH_LEN = 2
#: the largest plaintext of one record (a TLS-sized record keeps per-record cost low)
MAX_PLAINTEXT = 16384
MAX_CIPHERTEXT = MAX_PLAINTEXT + AEAD_TAG_LEN
#: records per key before both ends derive the next key (2**32 records of 16 KiB is 64 TiB)
REKEY_INTERVAL = 1 << 32
_KEYSTREAM_CHUNK = 4096
_NONCE_PREFIX = b"\x00\x00\x00\x00"


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
        out = bytearray()
        self.seal_into(plaintext, out)
        return bytes(out)

    def seal_into(self, plaintext: bytes, out: bytearray) -> None:
        """Append one record carrying ``plaintext`` to ``out`` (no intermediate copies)."""
        size = len(plaintext)
        if not 1 <= size <= MAX_PLAINTEXT:
            raise LocalProtocolError(f"record plaintext must be 1-{MAX_PLAINTEXT} bytes")
        d = self._dir
        masked = struct.pack(">H", (size + AEAD_TAG_LEN) ^ d.length_mask())
        start = len(out)
        out += masked
        out += bytes(size + AEAD_TAG_LEN)
        with memoryview(out) as view:
            d.aead.encrypt_into(d.next_nonce(), plaintext, masked, view[start + LENGTH_LEN :])


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

    def receive_data(self, data: bytes) -> list[bytes]:
        """Feed bytes; return the plaintexts of every record now complete, in order."""
        if self._broken is not None:
            raise RemoteProtocolError(self._broken)
        if self._buffer:
            self._buffer += data
            view = memoryview(bytes(self._buffer))
            self._buffer.clear()
        else:
            view = memoryview(data)  # the usual case: no copy before decryption
        out: list[bytes] = []
        pos = 0
        end = len(view)
        d = self._dir
        while True:
            if self._pending_length is None:
                if end - pos < LENGTH_LEN:
                    break
                self._masked = bytes(view[pos : pos + LENGTH_LEN])
                length = int.from_bytes(self._masked, "big") ^ d.length_mask()
                pos += LENGTH_LEN
                if not AEAD_TAG_LEN < length <= MAX_CIPHERTEXT:
                    self._fail("bridge record length is out of range (tampered stream)")
                self._pending_length = length
            length = self._pending_length
            if end - pos < length:
                break
            try:
                plaintext = d.aead.decrypt(d.next_nonce(), view[pos : pos + length], self._masked)
            except InvalidTag:
                self._fail("bridge record failed authentication (tampered, reordered or replayed)")
            pos += length
            self._pending_length = None
            out.append(plaintext)
        if pos < end:
            self._buffer += view[pos:]
        return out

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
