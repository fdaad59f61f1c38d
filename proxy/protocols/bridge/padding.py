"""Per-bridge padding shape: how much padding each record gets.

Each bridge has its own distribution (obfs4's "protocol polymorphism"), derived from a seed that
both ends compute from the bridge line, so no constant record-size signature is shared by every
bridge. The shape has two regimes:

* **heavy**, for the first ``heavy_records`` records that carry a stream's data: the record is
  padded up to a target size drawn from a per-bridge table of 8-24 sizes between 256 and 1400
  bytes with per-bridge weights. The first records of a stream usually carry the nested TLS
  handshake (ClientHello, ServerHello, certificates), whose sizes are the classic fingerprint
  of a tunnel; padding them to bridge-chosen sizes hides that shape (as Xray's Vision does).
  A record already larger than the drawn size still gets 0-63 extra bytes.
* **light**, afterwards: with a per-bridge probability (1/16 to 1/4) a record gets a small pad
  (up to a per-bridge maximum of 16-128 bytes); bulk transfer pays almost nothing.

All choices take the random number as an argument, so the shape itself is pure.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass

MIN_TARGET = 256
MAX_TARGET = 1400


@dataclass(frozen=True, slots=True)
class PaddingShape:
    #: record sizes the heavy regime pads up to, and their cumulative weights
    targets: tuple[int, ...]
    cumulative: tuple[int, ...]
    #: how many data-carrying records of each stream get heavy padding
    heavy_records: int
    #: light regime: pad a record when ``rand % 256 < light_chance``; pad up to ``light_max``
    light_chance: int
    light_max: int

    @classmethod
    def from_seed(cls, seed: bytes) -> PaddingShape:
        """The shape of the bridge whose padding seed is ``seed``."""
        stream = hashlib.shake_256(b"sidestep-bridge-v1 padding" + seed).digest(256)
        count = 8 + stream[0] % 17
        span = MAX_TARGET - MIN_TARGET
        targets = []
        total = 0
        cumulative = []
        for i in range(count):
            raw = int.from_bytes(stream[8 + 3 * i : 11 + 3 * i], "big")
            targets.append(MIN_TARGET + raw % (span + 1))
            total += 1 + stream[100 + i] % 16
            cumulative.append(total)
        return cls(
            targets=tuple(targets),
            cumulative=tuple(cumulative),
            heavy_records=8 + stream[1] % 9,
            light_chance=16 + stream[2] % 49,
            light_max=16 + stream[3] % 113,
        )

    def padding_for(self, size: int, *, heavy: bool, rand: int) -> int:
        """Padding bytes to add to a record of ``size`` bytes; ``rand`` is a random u32."""
        if heavy:
            pick = (rand & 0xFFFF) % self.cumulative[-1]
            target = self.targets[bisect.bisect_right(self.cumulative, pick)]
            if size < target:
                return target - size
            return (rand >> 16) % 64
        if rand % 256 < self.light_chance:
            return (rand >> 8) % (self.light_max + 1)
        return 0
