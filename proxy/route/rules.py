"""Routing rules: ``[[rule]]`` entries compiled into indexes; the first matching rule wins.

A :class:`RuleSpec` is plain data (the config module maps its ``[[rule]]`` tables onto it).
:meth:`RuleSet.compile` checks every spec, loads the list files they name and builds the
indexes; :meth:`RuleSet.match` answers one routing decision with a :class:`Match`.

What one rule means
-------------------
A rule's match fields fall into three kinds:

* **destination**: ``domain`` (exact name), ``domain_suffix``, ``domain_keyword``,
  ``domain_regex``, ``ip_cidr`` and the entries of its ``domain_list`` / ``ip_list`` files;
* **port**: ``port``, each item an ``int`` or a string ``"443"`` / ``"8000-8080"`` (inclusive);
* **inbound**: ``inbound``, names of inbounds (``[[listen]]`` names), compared exactly.

Items of one kind are OR-ed (any suffix, keyword or CIDR of the rule is a destination match);
the kinds present in the rule are AND-ed; a kind the rule leaves empty does not constrain it.
A rule with no match field is refused (the catch-all is ``default_policy``). A rule naming list
files has a destination condition even while they are empty (it then matches nothing). The
lowest-numbered matching rule wins; :attr:`Match.reason` names one criterion of it that matched.

Names and addresses
-------------------
Names are normalised the same way in rules and queries: lower case, no trailing dot,
internationalised names in punycode (IDNA 2008 with UTS 46 mapping). ``domain_suffix`` matches
on a label boundary: ``example.com`` matches ``example.com`` and ``a.example.com``, never
``badexample.com``; a leading dot in a suffix is ignored. ``domain_keyword`` is a substring of
the normalised name (ASCII only, so write punycode keywords). ``domain_regex`` is searched
(unanchored, :func:`re.search`) in the normalised name. ``ip_cidr`` accepts ``10.0.0.0/8``,
``2001:db8::/32`` or a bare address; host bits are masked off (``10.1.2.3/8`` = ``10.0.0.0/8``).

The query gives ``host`` (a name, or None), ``ip`` (an address, or None), ``port`` and
``inbound``. A host that is an IP literal counts as the address. Domain criteria see only the
name and CIDR criteria only the address, so a name not resolved yet matches no CIDR, and a
target that is only an address matches no domain criterion. When both are known (the name was
resolved first), both kinds can match and rule order decides. IPv4-mapped IPv6 addresses
(``::ffff:a.b.c.d``) are matched as IPv4.

List files
----------
UTF-8 text, one entry a line; blank lines are skipped and ``#`` starts a comment anywhere on a
line (so a list regex cannot contain ``#``). A ``domain_list`` line is ``example.org``
(suffix match), ``domain:example.org`` (the same), ``full:example.org`` (exact),
``keyword:tube`` or ``regexp:^ads?\\.``; an ``ip_list`` line is a CIDR or an address. Paths
are opened as given (relative ones from the working directory). A missing file or a bad line
makes :meth:`RuleSet.compile` raise ``ValueError`` naming ``file:line``. :meth:`RuleSet.refresh`
stats the files and re-reads those whose size, mtime or inode changed, then swaps in a new
index with one assignment (a decision in progress keeps using the old one); a file that
became unreadable or bad keeps its previous contents and the problem is logged and returned.

Indexes (no scan over the rules)
--------------------------------
Exact names and suffixes: dicts from name to the sorted numbers of the rules naming it (a
name is looked up once per suffix of it, label by label). Keywords: one Aho-Corasick automaton
(a dict step per character of the name, however many keywords; measured 5x faster than a
regex alternation of 500 keywords). CIDRs: per prefix length in use, a dict keyed by the masked
address. Regexes: one combined alternation says whether any can match, then they are tried in
rule order below the best rule found so far. Port and inbound conditions are checked only on
those candidates; rules without a destination condition become, per inbound name, port
segments looked up by bisection. ``bench/rules.py`` measures it.
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
import logging
import os
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import idna

log = logging.getLogger("sidestep.route")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DOMAIN, SUFFIX, KEYWORD, REGEX, CIDR = "domain", "domain_suffix", "domain_keyword", "domain_regex", "ip_cidr"  # fmt: skip
_LIST_PREFIXES = {"full": DOMAIN, "domain": SUFFIX, "keyword": KEYWORD, "regexp": REGEX}
_NAME_RE = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
_MAX_PORT = 65535
K = TypeVar("K")


@dataclass(frozen=True)
class RuleSpec:
    """One ``[[rule]]``: match fields (see the module docstring) and the policy to use."""

    #: the policy (a name the caller resolves) used when this rule matches
    policy: str
    domain: tuple[str, ...] = ()
    domain_suffix: tuple[str, ...] = ()
    domain_keyword: tuple[str, ...] = ()
    domain_regex: tuple[str, ...] = ()
    ip_cidr: tuple[str, ...] = ()
    #: ints or strings ``"443"`` / ``"8000-8080"`` (inclusive)
    port: tuple[int | str, ...] = ()
    inbound: tuple[str, ...] = ()
    #: files of domain entries (see "List files")
    domain_list: tuple[str, ...] = ()
    #: files of CIDRs or addresses
    ip_list: tuple[str, ...] = ()
    #: shown in logs and in :class:`Match`; optional
    name: str = ""


@dataclass(frozen=True, slots=True)
class Match:
    """The outcome of one routing decision."""

    policy: str
    #: position of the matching rule in the list given to compile; None for the default
    rule_index: int | None
    rule_name: str
    #: what matched, e.g. ``"domain_suffix twitter.com"``, or ``"default"``
    reason: str


Entry = tuple[str, "str | IPNetwork"]  # (kind, normalised value)


@dataclass(frozen=True, slots=True)
class RuleView:
    """One compiled rule as plain data (:meth:`RuleSet.views`)."""

    policy: str
    name: str
    #: (kind, value): kind is one of "domain", "domain_suffix", "domain_keyword",
    #: "domain_regex" (value a str) or "ip_cidr" (value a network)
    entries: tuple[Entry, ...]
    #: inclusive port ranges; None: any port
    ports: tuple[tuple[int, int], ...] | None
    #: inbound names; None: any inbound
    inbounds: frozenset[str] | None


# --- parsing values ---------------------------------------------------------------------------


def normalize_host(host: str) -> str:
    """The form names are compared in: lower case, no trailing dot, punycode. Never raises."""
    if host.endswith("."):
        host = host[:-1]
    if host.isascii():
        return host.lower()
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return host.lower()


def _parse_name(text: str) -> str:
    name = normalize_host(text.strip())
    if len(name) > 253 or not _NAME_RE.fullmatch(name):
        raise ValueError(f"{text!r} is not a domain name")
    if _as_ip(name) is not None:
        raise ValueError(f"{text!r} is an IP address: use ip_cidr / ip_list")
    return name


def _parse_entry(kind: str, text: str) -> Entry:
    """Check and normalise one destination item; ValueError says what is wrong."""
    if kind == DOMAIN:
        return kind, _parse_name(text)
    if kind == SUFFIX:
        return kind, _parse_name(text.strip().removeprefix("."))
    if kind == KEYWORD:
        word = text.strip().lower()
        if not word or not word.isascii():
            raise ValueError(f"keyword {text!r} must be non-empty ASCII (names are punycode)")
        return kind, word
    if kind == REGEX:
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"bad regex {text!r}: {exc}") from None
        return kind, text
    try:
        return kind, ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP network or address") from None


def _parse_port(item: int | str) -> tuple[int, int]:
    if isinstance(item, bool) or not isinstance(item, int | str):
        raise ValueError(f"port {item!r} must be an int or a string 'a-b'")
    try:
        if isinstance(item, int):
            lo = hi = item
        else:
            first, sep, last = item.strip().partition("-")
            lo = int(first)
            hi = int(last) if sep else lo
    except ValueError:
        raise ValueError(f"port {item!r} is not a port or a range 'a-b'") from None
    if not 0 <= lo <= hi <= _MAX_PORT:
        raise ValueError(f"port {item!r} is out of 0-{_MAX_PORT} or reversed")
    return lo, hi


def _as_ip(text: str) -> IPAddress | None:
    """The address if ``text`` is an IP literal (cheap test first: TLDs are never numeric)."""
    if not text or (":" not in text and not text[-1].isdigit()):
        return None
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _parse_list(path: str, kind: str, text: str) -> tuple[Entry, ...]:
    entries = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.partition("#")[0].strip()
        if not line:
            continue
        try:
            if kind == CIDR:
                entries.append(_parse_entry(CIDR, line))
                continue
            prefix, sep, rest = line.partition(":")
            if sep and prefix in _LIST_PREFIXES:
                entries.append(_parse_entry(_LIST_PREFIXES[prefix], rest))
            elif sep and _as_ip(line) is None:
                raise ValueError(f"unknown prefix {prefix!r} (full:, domain:, keyword:, regexp:)")
            else:
                entries.append(_parse_entry(SUFFIX, line))
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: {exc}") from None
    return tuple(entries)


@dataclass(frozen=True, slots=True)
class _ListFile:
    stamp: tuple[int, int, int]  # mtime_ns, size, inode
    entries: tuple[Entry, ...]


def _load_list(path: str, kind: str) -> _ListFile:
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"{path}: cannot read list file: {exc}") from None
    return _ListFile((st.st_mtime_ns, st.st_size, st.st_ino), _parse_list(path, kind, text))


# --- one checked rule -------------------------------------------------------------------------


class _Filter:
    """Port and inbound conditions of one rule (None = that kind is not constrained)."""

    __slots__ = ("inbounds", "ports")

    def __init__(self, ports: tuple[tuple[int, int], ...] | None, inbounds: frozenset[str] | None):
        self.ports = ports
        self.inbounds = inbounds

    def allows(self, port: int, inbound: str) -> bool:
        if self.inbounds is not None and inbound not in self.inbounds:
            return False
        if self.ports is not None:
            return any(lo <= port <= hi for lo, hi in self.ports)
        return True

    def describe(self) -> str:
        parts = []
        if self.ports is not None:
            ranges = (str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
            parts.append("port " + ",".join(ranges))
        if self.inbounds is not None:
            parts.append("inbound " + ",".join(sorted(self.inbounds)))
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class _Rule:
    policy: str
    name: str
    entries: tuple[Entry, ...]
    lists: tuple[tuple[str, str], ...]  # (path, kind)
    filter: _Filter | None

    @property
    def has_destination(self) -> bool:
        return bool(self.entries or self.lists)


_ENTRY_FIELDS = (DOMAIN, SUFFIX, KEYWORD, REGEX, CIDR)


def _check_spec(index: int, spec: RuleSpec) -> _Rule:
    label = f"rule {index}" + (f" ({spec.name})" if spec.name else "")
    fields = (*_ENTRY_FIELDS, "port", "inbound", "domain_list", "ip_list")
    for fname in fields:
        value = getattr(spec, fname)
        if isinstance(value, str) or not isinstance(value, tuple):
            raise ValueError(f"{label}: {fname} must be a tuple, got {value!r}")
    if not isinstance(spec.policy, str) or not spec.policy:
        raise ValueError(f"{label}: policy must be a non-empty string")
    if not any(getattr(spec, fname) for fname in fields):
        raise ValueError(f"{label}: no match field (use the default policy for a catch-all)")
    try:
        entries = tuple(
            _parse_entry(kind, item) for kind in _ENTRY_FIELDS for item in getattr(spec, kind)
        )
        ports = tuple(_parse_port(p) for p in spec.port) or None
    except ValueError as exc:
        raise ValueError(f"{label}: {exc}") from None
    if not all(isinstance(n, str) and n for n in spec.inbound):
        raise ValueError(f"{label}: inbound names must be non-empty strings")
    inbounds = frozenset(spec.inbound) or None
    lists = tuple((p, SUFFIX) for p in spec.domain_list) + tuple((p, CIDR) for p in spec.ip_list)
    filt = _Filter(ports, inbounds) if (ports or inbounds) else None
    return _Rule(spec.policy, spec.name, entries, lists, filt)


# --- the indexes ------------------------------------------------------------------------------


class _Keywords:
    """Aho-Corasick automaton: every keyword occurring in a text, in one pass over it."""

    def __init__(self, words: Iterable[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.fail: list[int] = [0]
        self.out: list[tuple[str, ...]] = [()]
        for word in words:
            state = 0
            for ch in word:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto.append({})
                    self.fail.append(0)
                    self.out.append(())
                    self.goto[state][ch] = nxt
                state = nxt
            self.out[state] += (word,)
        queue = deque(self.goto[0].values())  # breadth first: a fail link points up the trie
        while queue:
            state = queue.popleft()
            for ch, child in self.goto[state].items():
                queue.append(child)
                back = self.fail[state]
                while back and ch not in self.goto[back]:
                    back = self.fail[back]
                self.fail[child] = self.goto[back].get(ch, 0) if state else 0
                self.out[child] += self.out[self.fail[child]]

    def found(self, text: str) -> list[str]:
        goto, fail, out = self.goto, self.fail, self.out
        state = 0
        hits: list[str] = []
        for ch in text:
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            if out[state]:
                hits.extend(out[state])
        return hits


def _sorted_map(pairs: dict[K, list[int]]) -> dict[K, tuple[int, ...]]:
    return {key: tuple(sorted(set(idx))) for key, idx in pairs.items()}


def _port_segments(items: list[tuple[int, int, int]], none: int) -> tuple[list[int], list[int]]:
    """From (lo, hi, rule) port ranges: segment starts and, per segment, the lowest rule
    covering it (``none`` if no rule does); bisect the starts to look a port up."""
    bounds = sorted({0} | {lo for lo, _, _ in items} | {hi + 1 for _, hi, _ in items} - {65536})
    pending = sorted(items)
    active: list[tuple[int, int]] = []  # heap of (rule, hi); expired entries dropped lazily
    starts, lowest = [], []
    k = 0
    for start in bounds:
        while k < len(pending) and pending[k][0] <= start:
            heapq.heappush(active, (pending[k][2], pending[k][1]))
            k += 1
        while active and active[0][1] < start:
            heapq.heappop(active)
        starts.append(start)
        lowest.append(active[0][0] if active else none)
    return starts, lowest


class _Index:
    """Immutable lookup structures for one version of the rules and list contents."""

    def __init__(self, rules: Sequence[_Rule], lists: dict[str, _ListFile], default: str):
        self.rules = rules
        self.default_match = Match(default, None, "", "default")
        self.filters = [r.filter for r in rules]
        # entries that came only from a list file: (rule, kind, value as text) -> path
        self.origin: dict[tuple[int, str, str], str] = {}
        exact: dict[str, list[int]] = {}
        suffix: dict[str, list[int]] = {}
        keywords: dict[str, list[int]] = {}
        regexes: dict[str, list[int]] = {}
        tables = {DOMAIN: exact, SUFFIX: suffix, KEYWORD: keywords, REGEX: regexes}
        nets: dict[tuple[int, int], dict[int, list[int]]] = {}  # (version, prefix) -> map
        for i, rule in enumerate(rules):
            entries = list(rule.entries)
            inline = set(rule.entries)
            for path, _kind in rule.lists:
                for entry in lists[path].entries:
                    entries.append(entry)
                    if entry not in inline:
                        self.origin.setdefault((i, entry[0], str(entry[1])), path)
            for kind, value in entries:
                if isinstance(value, str):
                    tables[kind].setdefault(value, []).append(i)
                else:
                    table = nets.setdefault((value.version, value.prefixlen), {})
                    table.setdefault(int(value.network_address), []).append(i)
        self.exact = _sorted_map(exact)
        self.suffix = _sorted_map(suffix)
        self.keywords = _sorted_map(keywords)
        self.automaton = _Keywords(self.keywords) if self.keywords else None
        self._build_regexes(regexes)
        self._build_wildcards()
        self.cidr: dict[int, list[tuple[int, int, dict[int, tuple[int, ...]]]]] = {4: [], 6: []}
        for (version, plen), table in sorted(nets.items()):
            bits = 32 if version == 4 else 128
            mask = ((1 << plen) - 1) << (bits - plen)
            self.cidr[version].append((plen, mask, _sorted_map(table)))

    def _build_regexes(self, regexes: dict[str, list[int]]) -> None:
        """(rule, compiled, pattern) in rule order, in two lists: the ``covered`` ones can be
        joined into one alternation (the prefilter) that says whether any of them can match."""
        covered: list[tuple[int, re.Pattern[str], str]] = []
        other: list[tuple[int, re.Pattern[str], str]] = []
        for pattern, idx in regexes.items():
            compiled = re.compile(pattern)
            wrap = compiled.groups == 0  # no groups: no backreference can be renumbered
            if wrap:
                try:
                    re.compile(f"(?:{pattern})")  # fails with a leading global flag like (?i)
                except re.error:
                    wrap = False
            (covered if wrap else other).extend((i, compiled, pattern) for i in set(idx))
        self.regex_covered = sorted(covered, key=lambda item: item[0])
        self.regex_other = sorted(other, key=lambda item: item[0])
        joined = "|".join(f"(?:{pattern})" for pattern in dict.fromkeys(p for _, _, p in covered))
        self.prefilter = re.compile(joined) if covered else None

    def _build_wildcards(self) -> None:
        """Rules without a destination condition: per inbound name, port segments (bisect)."""
        wild = [(i, r.filter) for i, r in enumerate(self.rules) if not r.has_destination]
        names = {n for _, f in wild if f is not None and f.inbounds for n in f.inbounds}
        none = len(self.rules)

        def segments(inbound: str | None) -> tuple[list[int], list[int]] | None:
            items = []
            for i, f in wild:
                if f is not None and f.inbounds is not None and inbound not in f.inbounds:
                    continue
                for lo, hi in f.ports if f is not None and f.ports else ((0, _MAX_PORT),):
                    items.append((lo, hi, i))
            return _port_segments(items, none) if items else None

        self.wild_by_inbound = {name: segments(name) for name in names}
        self.wild_other = segments(None)

    def first_regex(self, name: str, best: int, port: int, inbound: str) -> tuple[int, str]:
        """The lowest regex rule below ``best`` that allows port and inbound and matches."""
        found = ""
        groups = (self.regex_covered, self.regex_other)
        if self.prefilter is not None and not self.prefilter.search(name):
            groups = ([], self.regex_other)
        for items in groups:
            for i, compiled, pattern in items:
                if i >= best:
                    break
                f = self.filters[i]
                if (f is None or f.allows(port, inbound)) and compiled.search(name):
                    best, found = i, pattern
                    break
        return best, found

    def first_allowed(self, hits: tuple[int, ...], best: int, port: int, inbound: str) -> int:
        """The lowest rule number in ``hits`` below ``best`` whose filter passes, else best."""
        filters = self.filters
        for i in hits:
            if i >= best:
                return best
            f = filters[i]
            if f is None or f.allows(port, inbound):
                return i
        return best

    def match(self, host: str | None, ip: IPAddress | None, port: int, inbound: str) -> Match:
        name = normalize_host(host) if host else None
        if name is not None:
            literal = _as_ip(name)
            if literal is not None:
                name = None
                ip = literal if ip is None else ip
        if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        best = len(self.rules)
        why: tuple[str, object] = ("", None)
        first = self.first_allowed
        if name is not None:
            hits = self.exact.get(name)
            if hits and (i := first(hits, best, port, inbound)) < best:
                best, why = i, (DOMAIN, name)
            if self.suffix:
                key = name
                while True:
                    hits = self.suffix.get(key)
                    if hits and (i := first(hits, best, port, inbound)) < best:
                        best, why = i, (SUFFIX, key)
                    dot = key.find(".")
                    if dot < 0:
                        break
                    key = key[dot + 1 :]
            if self.automaton is not None:
                for word in self.automaton.found(name):
                    if (i := first(self.keywords[word], best, port, inbound)) < best:
                        best, why = i, (KEYWORD, word)
            if self.regex_covered or self.regex_other:
                i, pattern = self.first_regex(name, best, port, inbound)
                if i < best:
                    best, why = i, (REGEX, pattern)
        if ip is not None:
            address = int(ip)
            for plen, mask, table in self.cidr[ip.version]:
                hits = table.get(address & mask)
                if hits and (i := first(hits, best, port, inbound)) < best:
                    best, why = i, (CIDR, (address & mask, plen, ip.version))
        segs = self.wild_by_inbound.get(inbound, self.wild_other)
        if segs is not None:
            starts, lowest = segs
            if (i := lowest[bisect.bisect_right(starts, port) - 1]) < best:
                best, why = i, ("", None)
        if best == len(self.rules):
            return self.default_match
        return Match(self.rules[best].policy, best, self.rules[best].name, self._reason(best, why))

    def _reason(self, index: int, why: tuple[str, object]) -> str:
        kind, value = why
        if kind == CIDR:
            address, plen, version = value  # type: ignore[misc]
            ip_class = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
            value = f"{ip_class(address)}/{plen}"
        parts = []
        if kind:
            text = f"{kind} {value}"
            path = self.origin.get((index, kind, str(value))) if self.origin else None
            parts.append(text if path is None else f"{text} (from {path})")
        filt = self.rules[index].filter
        if filt is not None:
            parts.append(filt.describe())
        return "; ".join(parts)


# --- the public object ------------------------------------------------------------------------


class RuleSet:
    """Compiled rules plus the list files they read; see the module docstring."""

    def __init__(self, rules: Sequence[_Rule], default_policy: str, lists: dict[str, _ListFile],
                 refresh_interval: float) -> None:  # fmt: skip
        """Use :meth:`compile`."""
        self._rules = tuple(rules)
        self._default = default_policy
        self._lists = lists
        self._kinds = {path: kind for rule in rules for path, kind in rule.lists}
        self.refresh_interval = refresh_interval
        self._last_refresh: float | None = None
        self._failed: dict[str, tuple[int, int, int] | None] = {}  # path -> stamp reported
        self._index = _Index(self._rules, lists, default_policy)

    @classmethod
    def compile(
        cls, specs: Iterable[RuleSpec], default_policy: str, *, refresh_interval: float = 5.0
    ) -> RuleSet:
        """Check the specs, load their list files and build the indexes (ValueError if bad)."""
        if not isinstance(default_policy, str) or not default_policy:
            raise ValueError("default policy must be a non-empty string")
        rules = [_check_spec(i, spec) for i, spec in enumerate(specs)]
        lists: dict[str, _ListFile] = {}
        kinds: dict[str, str] = {}
        for i, rule in enumerate(rules):
            for path, kind in rule.lists:
                if kinds.setdefault(path, kind) != kind:
                    raise ValueError(f"rule {i}: {path} is used as both domain_list and ip_list")
                if path not in lists:
                    lists[path] = _load_list(path, kind)
        return cls(rules, default_policy, lists, refresh_interval)

    def __len__(self) -> int:
        return len(self._rules)

    @property
    def default_policy(self) -> str:
        return self._default

    @property
    def list_files(self) -> tuple[str, ...]:
        return tuple(self._lists)

    def match(self, host: str | None, ip: IPAddress | None, port: int, inbound: str = "") -> Match:
        """The first rule matching this destination, or the default policy."""
        return self._index.match(host, ip, port, inbound)

    def views(self) -> tuple[RuleView, ...]:
        """The rules in order, normalised, with their list files' current entries folded in
        (for exporting them, e.g. as a PAC file)."""
        out = []
        for rule in self._rules:
            entries = list(rule.entries)
            for path, _kind in rule.lists:
                listed = self._lists.get(path)
                if listed is not None:
                    entries.extend(listed.entries)
            filt = rule.filter
            out.append(
                RuleView(
                    policy=rule.policy,
                    name=rule.name,
                    entries=tuple(entries),
                    ports=filt.ports if filt is not None else None,
                    inbounds=filt.inbounds if filt is not None else None,
                )
            )
        return tuple(out)

    def refresh(self) -> list[str]:
        """Re-read changed list files and swap in a new index.

        Stats are cheap; a rebuild costs about as much as the compile (run it in a worker
        thread for large rule sets: the swap is one assignment).

        Returns the problems newly met (a file gone, unreadable or with a bad line; it keeps
        its previous contents), each also logged once: a file that stays broken is not
        reported again until it changes.
        """
        problems: list[str] = []
        fresh = dict(self._lists)
        changed = False
        for path, old in self._lists.items():
            try:
                st = os.stat(path)
                stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError as exc:
                stamp, error = None, f"{path}: {exc.strerror or exc}"
            if stamp == old.stamp:
                self._failed.pop(path, None)
                continue
            if path in self._failed and self._failed[path] == stamp:
                continue
            try:
                if stamp is None:
                    raise ValueError(error)
                fresh[path] = _load_list(path, self._kinds[path])
                changed = True
                self._failed.pop(path, None)
            except ValueError as exc:
                self._failed[path] = stamp
                problems.append(f"{exc}; keeping the previous contents")
                log.warning("rule list %s", problems[-1])
        if changed:
            index = _Index(self._rules, fresh, self._default)
            self._lists = fresh
            self._index = index  # one assignment: a reader sees the old or the new index
            log.info("rule lists reloaded (%d files)", len(fresh))
        return problems

    def maybe_refresh(self, now: float) -> list[str]:
        """:meth:`refresh` if ``refresh_interval`` seconds passed since the last one (``now``
        from any monotonic clock)."""
        if not self._lists:
            return []
        if self._last_refresh is not None and now - self._last_refresh < self.refresh_interval:
            return []
        self._last_refresh = now
        return self.refresh()
