"""A DNS answer cache whose hits cost a few dictionary and byte-slicing operations.

The cache holds response *wire bytes*, keyed on the normalised question of the query
(:func:`proxy.protocols.dnswire.question_key`: lower-cased name, type, class, CD bit, EDNS
presence and DO bit). Everything that needs understanding of the response is done once, in
:meth:`DnsCache.store`: checking that it is cacheable, working out how long it lives (RFC 1035
TTLs, RFC 2308 negative caching) and recording where each TTL field sits. A hit in
:meth:`DnsCache.lookup` then only copies the bytes, puts in the query's ID, RD bit and question
(so the asker gets its own 0x20 letter case back) in front of the rest of the response, whose
TTL fields are rewritten with what is left of them at most once per second of age. dnspython
is not called on that path.

Rules:

- Lifetime of an entry: the smallest TTL in the answer section; for a negative answer
  (NXDOMAIN, or NOERROR without a record of the asked type: NODATA) the smaller of the SOA
  record's TTL and its MINIMUM field (RFC 2308 section 5), or ``negative_ttl_default`` when the
  authority section has no SOA (RFC 2308 section 5 says those SHOULD NOT be cached, and a
  forged NXDOMAIN usually has none: set it to 0 where answers can come over plain DNS). The
  result is clamped to ``[min_ttl, max_ttl]``, and a negative answer's lifetime to at most
  ``max_negative_ttl`` as well. A lifetime of 0 is not cached.
- Not cached: truncated responses, rcodes other than NOERROR and NXDOMAIN (a SERVFAIL is never
  stored, so it is never served stale), responses whose question differs from the query's,
  other opcodes, and messages carrying TSIG.
- Each TTL in a hit is the record's own TTL (clamped the same way) minus the whole seconds
  since it was stored, never below 0; the SOA of a negative answer shows the negative TTL left.
- Serve-stale (RFC 8767): an expired entry is kept for ``stale_ttl`` seconds more and is only
  given out by :meth:`DnsCache.lookup_stale`, which the resolver calls once every upstream has
  failed; stale answers carry TTL ``stale_answer_ttl`` (30 s, RFC 8767 section 4).
- Bounded: at most ``max_entries`` entries, the least recently used dropped first.
- Prefetch: hits are counted per entry since it was stored; :meth:`DnsCache.prefetch_candidates`
  names the popular entries about to expire, each once until it is stored again.

The cache does no I/O and takes its clock as an argument; it is not thread-safe (one trio task
or several in one thread is fine).
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable

import dns.message

from proxy.protocols.dnswire import TYPE_OPT, QuestionKey, question_key, walk_records

__all__ = ["DnsCache"]

#: RFC 8767 section 4: TTL of records served stale
STALE_ANSWER_TTL = 30
TYPE_SOA = 6
TYPE_ANY = 255
TYPE_TSIG = 250
RCODE_NOERROR = 0
RCODE_NXDOMAIN = 3

_TTL = struct.Struct(">I")
_pack_ttl = _TTL.pack_into


class _Entry:
    """A cached response cut where a hit changes it.

    ``heads`` holds header bytes 2 to 11 with the RD bit clear and set; ``template`` is
    everything after the question, with ``ttls`` giving (offset in ``template``, TTL at store
    time) for each TTL field to rewrite. ``body`` is ``template`` rendered for ``rendered_for``
    whole seconds of age: TTLs change once a second, so most hits reuse it.
    """

    __slots__ = (
        "body",
        "expires",
        "heads",
        "hits",
        "key",
        "prefetch_offered",
        "rendered_for",
        "stored_at",
        "template",
        "ttls",
    )

    def __init__(
        self,
        key: QuestionKey,
        wire: bytes,
        ttls: tuple[tuple[int, int], ...],
        stored_at: float,
        expires: float,
    ) -> None:
        self.key = key
        flags = wire[2] & 0xFE
        self.heads = (bytes((flags,)) + wire[3:12], bytes((flags | 1,)) + wire[3:12])
        self.template = wire[key.end :]
        self.ttls = tuple((offset - key.end, ttl) for offset, ttl in ttls)
        self.stored_at = stored_at
        self.expires = expires
        self.hits = 0
        self.prefetch_offered = False
        self.rendered_for = -1
        self.body = b""

    def render(self, elapsed: int | None, stale_ttl: int = 0) -> bytes:
        """``template`` with each TTL less ``elapsed`` seconds (or all ``stale_ttl``)."""
        buf = bytearray(self.template)
        for offset, ttl in self.ttls:
            if elapsed is None:
                ttl = stale_ttl
            elif ttl > elapsed:
                ttl -= elapsed
            else:
                ttl = 0
            _pack_ttl(buf, offset, ttl)
        return bytes(buf)


class DnsCache:
    """LRU-bounded DNS response cache with negative caching, serve-stale and prefetch hints."""

    def __init__(
        self,
        max_entries: int = 10_000,
        min_ttl: int = 0,
        max_ttl: int = 86400,
        negative_ttl_default: int = 300,
        stale_ttl: int = 86400,
        clock: Callable[[], float] = time.monotonic,
        *,
        stale_answer_ttl: int = STALE_ANSWER_TTL,
        max_negative_ttl: int | None = None,
    ) -> None:
        """
        :param max_entries: entries kept at most; the least recently used go first.
        :param min_ttl: lower clamp of every TTL (0: honour the authority).
        :param max_ttl: upper clamp of every TTL.
        :param negative_ttl_default: lifetime of a negative answer without SOA, before
            clamping; 0 does not cache them (RFC 2308 section 5 says they SHOULD NOT be).
        :param stale_ttl: how long after expiry an entry may still be served stale (RFC 8767's
            max-stale; it suggests 1 to 3 days); 0 turns serve-stale off.
        :param clock: seconds, monotonic.
        :param stale_answer_ttl: TTL written into stale answers.
        :param max_negative_ttl: upper clamp of negative answers' lifetime (``None``: max_ttl).
        """
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        if negative_ttl_default < 0 or stale_ttl < 0 or stale_answer_ttl < 0:
            raise ValueError("TTLs cannot be negative")
        if max_negative_ttl is not None and max_negative_ttl < 0:
            raise ValueError("TTLs cannot be negative")
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.negative_ttl_default = negative_ttl_default
        self.stale_ttl = stale_ttl
        self.stale_answer_ttl = stale_answer_ttl
        self.max_negative_ttl = max_ttl if max_negative_ttl is None else max_negative_ttl
        self._clock = clock
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.stale_hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _clamp(self, ttl: int) -> int:
        return min(max(ttl, self.min_ttl), self.max_ttl)

    # -- the hot path ------------------------------------------------------------------------

    def lookup(self, wire_query: bytes) -> bytes | None:
        """The cached answer to ``wire_query`` with its ID and TTLs brought up to date, or None.

        ``None`` for a miss, an expired entry, or a query that is not a cacheable standard
        query (see :func:`~proxy.protocols.dnswire.question_key`).
        """
        qk = question_key(wire_query)
        if qk is None:
            return None
        entry = self._entries.get(qk.key)
        if entry is None:
            self.misses += 1
            return None
        now = self._clock()
        if now >= entry.expires:
            self.misses += 1
            return None
        self._entries.move_to_end(qk.key)
        entry.hits += 1
        self.hits += 1
        elapsed = int(now - entry.stored_at)
        if elapsed != entry.rendered_for:
            entry.body = entry.render(elapsed)
            entry.rendered_for = elapsed
        end = qk.end
        # the asker's ID, RD bit and question (its own letter case), then the cached rest
        return b"".join(
            (wire_query[:2], entry.heads[wire_query[2] & 1], wire_query[12:end], entry.body)
        )

    def lookup_stale(self, wire_query: bytes) -> bytes | None:
        """An answer for when every upstream has failed (RFC 8767), or None.

        A fresh entry is answered as by :meth:`lookup`; one expired less than ``stale_ttl``
        seconds ago is answered with every TTL set to ``stale_answer_ttl``. Entries older than
        that are dropped.
        """
        qk = question_key(wire_query)
        if qk is None:
            return None
        entry = self._entries.get(qk.key)
        if entry is None:
            return None
        now = self._clock()
        if now < entry.expires:
            return self.lookup(wire_query)
        if now >= entry.expires + self.stale_ttl:
            del self._entries[qk.key]
            return None
        self._entries.move_to_end(qk.key)
        self.stale_hits += 1
        body = entry.render(None, self.stale_answer_ttl)
        return b"".join(
            (wire_query[:2], entry.heads[wire_query[2] & 1], wire_query[12 : qk.end], body)
        )

    # -- filling -----------------------------------------------------------------------------

    def store(self, query: bytes | QuestionKey, response: dns.message.Message | bytes) -> bool:
        """Cache ``response`` as the answer to ``query``; False when it is not cacheable.

        ``query`` is the query's wire form or its key (as :meth:`prefetch_candidates` gives).
        A :class:`dns.message.Message` is rendered once with dnspython; bytes are taken as
        they are, after a bounds-checked walk over their records. Storing again replaces the
        entry and resets its hit count.
        """
        qk = question_key(query) if isinstance(query, bytes) else query
        if qk is None:
            return False
        wire = response.to_wire() if isinstance(response, dns.message.Message) else response
        plan = self._plan(qk, wire)
        if plan is None:
            return False
        lifetime, ttls = plan
        now = self._clock()
        entries = self._entries
        entries[qk.key] = _Entry(qk, wire, ttls, now, now + lifetime)
        entries.move_to_end(qk.key)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        return True

    def _plan(self, qk: QuestionKey, wire: bytes) -> tuple[int, tuple[tuple[int, int], ...]] | None:
        """(lifetime, TTL fields) of a cacheable response to ``qk``, else None."""
        rqk = question_key(wire)
        if rqk is None or rqk.question != qk.question:
            return None
        flags = wire[2] << 8 | wire[3]
        rcode = flags & 0x000F
        if not flags & 0x8000 or flags & 0x0200 or rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
            return None  # not a response, truncated, or a failure
        records = walk_records(wire, rqk.end)
        if records is None or any(r.rtype == TYPE_TSIG for r in records):
            return None
        answers = [r for r in records if r.section == 0]
        qtype = qk.qtype
        negative = rcode == RCODE_NXDOMAIN or not any(
            r.rtype == qtype or qtype == TYPE_ANY for r in answers
        )
        lifetimes = [r.ttl for r in answers]
        soa = None
        if negative:
            soa = next((r for r in records if r.section == 1 and r.rtype == TYPE_SOA), None)
            if soa is not None and soa.rdata_end - soa.rdata_start >= 22:
                minimum = _TTL.unpack_from(wire, soa.rdata_end - 4)[0]
                lifetimes.append(min(soa.ttl, minimum))
            else:
                soa = None
                lifetimes.append(self.negative_ttl_default)
        lifetime = self._clamp(min(lifetimes))
        if negative:
            lifetime = min(lifetime, self.max_negative_ttl)
        if lifetime <= 0:
            return None
        ttls = tuple(
            (r.ttl_offset, lifetime if r is soa else self._clamp(r.ttl))
            for r in records
            if r.rtype != TYPE_OPT
        )
        return lifetime, ttls

    # -- maintenance -------------------------------------------------------------------------

    def prefetch_candidates(
        self, now: float | None = None, *, window: float = 10.0, min_hits: int = 3
    ) -> list[QuestionKey]:
        """Keys hit at least ``min_hits`` times that expire within ``window`` seconds.

        Each entry is named once; after the resolver refreshes it with :meth:`store` it can be
        named again. Build the refresh query with :func:`proxy.protocols.dnswire.build_query`.
        Linear in the number of entries: call it every few seconds, not per query.
        """
        if now is None:
            now = self._clock()
        due: list[QuestionKey] = []
        for entry in self._entries.values():
            if (
                not entry.prefetch_offered
                and entry.hits >= min_hits
                and now < entry.expires <= now + window
            ):
                entry.prefetch_offered = True
                due.append(entry.key)
        return due

    def purge(self, now: float | None = None) -> int:
        """Drop entries past their stale window; returns how many went."""
        if now is None:
            now = self._clock()
        dead = [k for k, e in self._entries.items() if now >= e.expires + self.stale_ttl]
        for k in dead:
            del self._entries[k]
        return len(dead)
