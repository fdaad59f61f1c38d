"""Per-site, per-network memory of which strategy worked and which failed (DESIGN.md, "route/").

The router asks :meth:`LearnedMemory.order` to reorder a policy's strategies before the first
attempt, so the second visit to a blocked site goes straight to the way that worked last time
instead of waiting for the plain attempt to time out again. Entries are keyed by network identity
and registrable domain (:mod:`proxy.route.site`) and expire after ``ttl`` (default 24 h): censors
change their rules, and a stale memory must not pin a strategy that stopped working, nor keep
avoiding a plain connection once a block is lifted.

How the dispatcher uses it, for one connection on network ``net`` to site ``site``:

1. ``order(net, site, policy.strategies)`` gives the order of attempts: the strategy that worked
   most recently first, then the ones we know nothing about (in configured order), then the ones
   that failed recently or are marked unhealthy.
2. Each failed attempt: ``record_failure(net, site, strategy, verdict)``, once the dispatcher has
   judged it against a control (:mod:`proxy.detect.verdict`). A ``site-down`` verdict (the
   control fails too, the server is simply down) is ignored: nothing is learned from an outage.
   A freeze or throttling found while a connection runs (``frozen``, ``throttled``) is recorded
   the same way at once, so the next connections to the site take the next strategy; like
   every entry it expires after ``ttl``, when the configured order (plain first) comes back.
3. The attempt that got a first response: ``record_success(net, site, strategy)``.
4. Safe rollout: before trusting a strategy that has just rescued a site, the dispatcher checks
   it against an uncensored control site (research/dpi-proxies.md, section 6.4: some tricks
   break ordinary sites). If the control fails through it, ``mark_unhealthy(net, strategy)``:
   that strategy's successes on this network are dropped, ``record_success`` refuses to store new
   ones and ``order`` puts it last, until the mark expires or ``mark_healthy`` clears it after a
   control probe succeeds again.
5. ``maybe_save()`` now and then (it writes at most every ``save_interval`` seconds, and only
   when something changed) and ``save()`` at shutdown.

Saving writes a temporary file in the same directory, fsyncs it and renames it over the state file,
so a crash leaves either the old or the new file. A file that cannot be parsed is moved aside to
``<name>.corrupt-<unix time>`` with a warning and the memory starts empty: losing what was learned
costs a few slow first connections, refusing to start would cost the user the proxy.

No trio and no sockets here; all time comes from the injected ``clock`` or the ``at`` arguments.
:meth:`LearnedMemory.dump` and :func:`write_atomic` are separate so an async caller can serialize
on the event loop and write from a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from proxy.route.site import site_of

log = logging.getLogger("sidestep.learn")

#: Version of the state file format.
STATE_VERSION = 1
#: Outcomes that say nothing about the path, so they are never remembered.
NOT_LEARNED_OUTCOMES: frozenset[str] = frozenset({"site-down"})
DEFAULT_TTL = 24 * 3600.0


@dataclass(slots=True)
class _Attempts:
    """What we know of one strategy for one (network, site)."""

    ok_at: float | None = None
    fail_at: float | None = None
    outcome: str | None = None
    fails: int = 0


@dataclass(frozen=True, slots=True)
class LearnedFailure:
    """A strategy that failed recently for a site."""

    strategy: str
    outcome: str
    at: float
    count: int


@dataclass(frozen=True, slots=True)
class LearnedEntry:
    """One (network, site) as shown by ``sidestep learned``."""

    network: str
    site: str
    works: str | None
    works_at: float | None
    failures: tuple[LearnedFailure, ...]
    updated_at: float


class LearnedMemory:
    """Which strategy worked and which failed, per (network, site), with expiry and persistence.

    ``path`` is the JSON state file (``None`` keeps the memory in RAM only); it is loaded at once.
    At most ``max_sites`` (network, site) pairs are kept: the least recently touched go first.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
        save_interval: float = 30.0,
        max_sites: int = 10_000,
    ) -> None:
        if ttl <= 0 or max_sites <= 0:
            raise ValueError("ttl and max_sites must be positive")
        self.path = path
        self.ttl = ttl
        self.save_interval = save_interval
        self.max_sites = max_sites
        self._clock = clock
        # Insertion order is recency order: touched entries move to the end.
        self._sites: dict[tuple[str, str], dict[str, _Attempts]] = {}
        self._unhealthy: dict[tuple[str, str], float] = {}
        # (network, carrier key) -> (bytes after which a bridge carrier froze, when)
        self._carrier_limits: dict[tuple[str, str], tuple[int, float]] = {}
        self._dirty = False
        self._saved_at = -math.inf
        self._save_failing = False
        # What the state file held when we last read or wrote it, so that a site forgotten
        # meanwhile by `sidestep learned --forget` stays forgotten when we save again.
        self._disk_stamp: tuple[int, int] | None = None
        self._disk_keys: set[tuple[str, str]] = set()
        self._touched: set[tuple[str, str]] = set()
        if path is not None:
            self._load(path)
            self._disk_stamp = _stamp(path)
            self._disk_keys = set(self._sites)

    # -- recording ---------------------------------------------------------------------------

    def record_success(
        self, network: str, site: str, strategy: str, *, at: float | None = None
    ) -> bool:
        """Remember that ``strategy`` reached ``site``. False when refused (strategy unhealthy)."""
        now = self._now(at)
        if self.is_unhealthy(network, strategy, now=now):
            return False
        records = self._touch(network, site)
        rec = records.setdefault(strategy, _Attempts())
        # The latest recorded success is the known-good one: keep success times strictly
        # increasing per site, so a tie (two successes in one clock tick) cannot make
        # order() and known_good() disagree.
        latest = max(
            (r.ok_at for n, r in records.items() if n != strategy and r.ok_at is not None),
            default=None,
        )
        if latest is not None and now <= latest:
            now = latest + 1e-6
        rec.ok_at = now
        rec.fails = 0
        self._dirty = True
        return True

    def record_failure(
        self, network: str, site: str, strategy: str, outcome: str, *, at: float | None = None
    ) -> bool:
        """Remember that ``strategy`` failed for ``site`` with ``outcome`` (a verdict).

        Returns False when the outcome is one that is not learned from (``site-down``).
        """
        if outcome in NOT_LEARNED_OUTCOMES:
            return False
        now = self._now(at)
        rec = self._touch(network, site).setdefault(strategy, _Attempts())
        rec.fails = rec.fails + 1 if self._fresh(rec.fail_at, now) else 1
        rec.fail_at = now
        rec.outcome = outcome
        self._dirty = True
        return True

    def mark_unhealthy(self, network: str, strategy: str, *, at: float | None = None) -> None:
        """A control probe through ``strategy`` failed on ``network``: stop trusting it there.

        Its remembered successes on that network are dropped; until the mark expires (``ttl``) or
        :meth:`mark_healthy` clears it, no new success is stored and :meth:`order` puts it last.
        """
        self._unhealthy[(network, strategy)] = self._now(at)
        for (net, _site), strategies in self._sites.items():
            rec = strategies.get(strategy)
            if net == network and rec is not None:
                rec.ok_at = None
        self._dirty = True

    def record_carrier_limit(
        self, network: str, key: str, limit: int, *, at: float | None = None
    ) -> None:
        """A bridge carrier to ``key`` (the bridge's address) stalled on ``network`` after
        carrying ``limit`` bytes (a volume freeze). The smallest such amount is kept."""
        now = self._now(at)
        known = self.carrier_limit(network, key, now=now)
        if known is None or limit < known:
            self._carrier_limits[(network, key)] = (limit, now)
        else:
            self._carrier_limits[(network, key)] = (known, now)
        self._dirty = True

    def carrier_limit(self, network: str, key: str, *, now: float | None = None) -> int | None:
        """Bytes after which carriers to ``key`` froze on ``network`` lately, if they did."""
        entry = self._carrier_limits.get((network, key))
        if entry is None or not self._fresh(entry[1], self._now(now)):
            return None
        return entry[0]

    def mark_healthy(self, network: str, strategy: str) -> None:
        """A control probe through ``strategy`` succeeded again: lift the mark."""
        if self._unhealthy.pop((network, strategy), None) is not None:
            self._dirty = True

    def is_unhealthy(self, network: str, strategy: str, *, now: float | None = None) -> bool:
        """Whether ``strategy`` is marked as failing the control site on ``network``."""
        return self._fresh(self._unhealthy.get((network, strategy)), self._now(now))

    def forget(self, site: str, network: str | None = None) -> int:
        """Drop what is known about ``site`` (on one network, or all). Returns entries dropped."""
        names = {site.strip().lower()}
        with contextlib.suppress(ValueError):
            names.add(site_of(site))
        doomed = [
            key for key in self._sites if key[1] in names and (network is None or key[0] == network)
        ]
        for key in doomed:
            del self._sites[key]
        if doomed:
            self._dirty = True
        return len(doomed)

    # -- reading -----------------------------------------------------------------------------

    def reorders(self, network: str, site: str) -> bool:
        """Whether :meth:`order` may change the configured order for ``site``: False when
        nothing is known about the site and no strategy is marked unhealthy (checked in a
        moment, where ordering would cost a look at every strategy)."""
        return bool(self._unhealthy) or bool(self._sites.get((network, site)))

    def order(self, network: str, site: str, strategies: Sequence[str]) -> list[str]:
        """``strategies`` reordered: known-good first, then unknown, then recently failed.

        Known-good strategies are sorted by most recent success; the other two groups keep the
        configured order. Unhealthy strategies count as failed. The result is always a
        permutation of ``strategies``.
        """
        now = self._clock()
        known = self._sites.get((network, site), {})
        good: list[tuple[float, int, str]] = []
        unknown: list[str] = []
        failed: list[str] = []
        for index, name in enumerate(strategies):
            if self.is_unhealthy(network, name, now=now):
                failed.append(name)
                continue
            rec = known.get(name)
            state = self._state(rec, now)
            if state == "good" and rec is not None and rec.ok_at is not None:
                good.append((-rec.ok_at, index, name))
            elif state == "failed":
                failed.append(name)
            else:
                unknown.append(name)
        return [name for _, _, name in sorted(good)] + unknown + failed

    def known_good(self, network: str, site: str) -> str | None:
        """The strategy that worked most recently for ``site`` and has not failed since."""
        now = self._clock()
        best: tuple[float, str] | None = None
        for name, rec in self._sites.get((network, site), {}).items():
            if self._state(rec, now) != "good" or self.is_unhealthy(network, name, now=now):
                continue
            if rec.ok_at is not None and (best is None or rec.ok_at > best[0]):
                best = (rec.ok_at, name)
        return None if best is None else best[1]

    def entries(self) -> list[LearnedEntry]:
        """Unexpired knowledge, most recently updated first."""
        now = self._clock()
        out: list[LearnedEntry] = []
        for (network, site), strategies in self._sites.items():
            works = self.known_good(network, site)
            failures = tuple(
                LearnedFailure(name, rec.outcome or "?", rec.fail_at, rec.fails)
                for name, rec in strategies.items()
                if rec.fail_at is not None and self._state(rec, now) == "failed"
            )
            stamps = [
                t
                for rec in strategies.values()
                for t in (rec.ok_at, rec.fail_at)
                if self._fresh(t, now)
            ]
            if works is None and not failures:
                continue
            works_at = strategies[works].ok_at if works is not None else None
            out.append(LearnedEntry(network, site, works, works_at, failures, max(stamps)))
        out.sort(key=lambda e: e.updated_at, reverse=True)
        return out

    def __len__(self) -> int:
        return len(self._sites)

    @property
    def dirty(self) -> bool:
        """Whether there are changes not yet saved."""
        return self._dirty

    # -- persistence -------------------------------------------------------------------------

    def dump(self) -> bytes:
        """The state file contents for the current memory (expired entries left out)."""
        self.prune()
        sites = [
            {
                "network": network,
                "site": site,
                "strategies": {
                    name: {"ok": r.ok_at, "fail": r.fail_at, "outcome": r.outcome, "fails": r.fails}
                    for name, r in strategies.items()
                },
            }
            for (network, site), strategies in self._sites.items()
        ]
        unhealthy = [
            {"network": network, "strategy": strategy, "at": at}
            for (network, strategy), at in self._unhealthy.items()
        ]
        limits = [
            {"network": network, "key": key, "bytes": limit, "at": at}
            for (network, key), (limit, at) in self._carrier_limits.items()
        ]
        doc = {"version": STATE_VERSION, "sites": sites, "unhealthy": unhealthy}
        if limits:
            doc["carrier_limits"] = limits
        return (json.dumps(doc, indent=1, ensure_ascii=False) + "\n").encode()

    def save(self) -> None:
        """Write the state file atomically now. Raises :class:`OSError` if that fails.

        When someone else rewrote the file since we last read or wrote it (``sidestep learned
        --forget`` while the proxy runs), the sites they removed and we have not touched since
        are dropped here too instead of being written back.
        """
        if self.path is not None:
            if _stamp(self.path) != self._disk_stamp:
                self._drop_forgotten(self.path)
            write_atomic(self.path, self.dump())
            self._disk_stamp = _stamp(self.path)
            self._disk_keys = set(self._sites)
            self._touched.clear()
        self._dirty = False
        self._saved_at = self._clock()

    def _drop_forgotten(self, path: Path) -> None:
        try:
            on_disk, _ = _parse_state(json.loads(path.read_bytes()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return  # unreadable now: ours is the better copy
        for key in self._disk_keys - set(on_disk) - self._touched:
            self._sites.pop(key, None)

    def maybe_save(self, now: float | None = None) -> bool:
        """Save if there are changes and the last save is ``save_interval`` old. Never raises.

        Returns whether the file was written. A failure is logged once until a save succeeds.
        """
        now = self._now(now)
        if not self._dirty or now - self._saved_at < self.save_interval:
            return False
        try:
            self.save()
        except OSError as exc:
            self._saved_at = now  # retry after another interval, not on every call
            if not self._save_failing:
                log.warning("cannot save learned strategies to %s: %s", self.path, exc)
                self._save_failing = True
            return False
        self._save_failing = False
        return True

    def prune(self, now: float | None = None) -> None:
        """Drop expired knowledge and marks."""
        now = self._now(now)
        for key in list(self._sites):
            strategies = self._sites[key]
            for name in list(strategies):
                rec = strategies[name]
                if not self._fresh(rec.ok_at, now):
                    rec.ok_at = None
                if not self._fresh(rec.fail_at, now):
                    rec.fail_at, rec.outcome, rec.fails = None, None, 0
                if rec.ok_at is None and rec.fail_at is None:
                    del strategies[name]
            if not strategies:
                del self._sites[key]
        for key, (_, at) in list(self._carrier_limits.items()):
            if not self._fresh(at, now):
                del self._carrier_limits[key]
        for key, at in list(self._unhealthy.items()):
            if not self._fresh(at, now):
                del self._unhealthy[key]

    # -- internals ---------------------------------------------------------------------------

    def _now(self, at: float | None) -> float:
        return self._clock() if at is None else at

    def _fresh(self, t: float | None, now: float) -> bool:
        return t is not None and now - t < self.ttl

    def _state(self, rec: _Attempts | None, now: float) -> str:
        """``good``, ``failed`` or ``unknown`` for one strategy's record at ``now``."""
        if rec is None:
            return "unknown"
        ok = rec.ok_at if self._fresh(rec.ok_at, now) else None
        fail = rec.fail_at if self._fresh(rec.fail_at, now) else None
        if ok is not None and (fail is None or ok > fail):
            return "good"
        if fail is not None:
            return "failed"
        return "unknown"

    def _touch(self, network: str, site: str) -> dict[str, _Attempts]:
        key = (network, site)
        self._touched.add(key)
        strategies = self._sites.pop(key, None)
        if strategies is None:
            strategies = {}
            while len(self._sites) >= self.max_sites:
                del self._sites[next(iter(self._sites))]
        self._sites[key] = strategies
        return strategies

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._set_aside(path, f"cannot read it ({exc.strerror or exc})")
            return
        try:
            doc = json.loads(raw)
            sites, unhealthy = _parse_state(doc)
            limits = _parse_carrier_limits(doc)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._set_aside(path, f"it is not a valid state file ({exc})")
            return
        for key, strategies in sites.items():
            if len(self._sites) >= self.max_sites:
                del self._sites[next(iter(self._sites))]
            self._sites[key] = strategies
        self._unhealthy = unhealthy
        self._carrier_limits = limits
        self.prune()

    def _set_aside(self, path: Path, why: str) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{int(self._clock())}")
        try:
            os.replace(path, aside)
        except OSError as exc:
            log.warning(
                "ignoring learned strategies in %s: %s; could not move it aside: %s",
                path,
                why,
                exc.strerror or exc,
            )
            return
        log.warning("ignoring learned strategies in %s: %s; moved it to %s", path, why, aside)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory, fsync, rename. Mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable; not every platform lets us open a directory.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _parse_state(
    doc: object,
) -> tuple[dict[tuple[str, str], dict[str, _Attempts]], dict[tuple[str, str], float]]:
    """Validate a decoded state file; raises ValueError/TypeError/KeyError when it is wrong."""
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise ValueError("unknown format or version")
    sites: dict[tuple[str, str], dict[str, _Attempts]] = {}
    for item in _list(doc["sites"]):
        strategies: dict[str, _Attempts] = {}
        for name, rec in _dict(item["strategies"]).items():
            rec = _dict(rec)
            fails = rec["fails"]
            if not isinstance(fails, int) or isinstance(fails, bool) or fails < 0:
                raise ValueError("bad failure count")
            outcome = rec["outcome"]
            if outcome is not None and not isinstance(outcome, str):
                raise TypeError("bad outcome")
            strategies[_str(name)] = _Attempts(
                _opt_time(rec["ok"]), _opt_time(rec["fail"]), outcome, fails
            )
        sites[(_str(item["network"]), _str(item["site"]))] = strategies
    unhealthy: dict[tuple[str, str], float] = {}
    for item in _list(doc.get("unhealthy", [])):
        unhealthy[(_str(item["network"]), _str(item["strategy"]))] = _time(item["at"])
    return sites, unhealthy


def _parse_carrier_limits(doc: dict[str, object]) -> dict[tuple[str, str], tuple[int, float]]:
    limits: dict[tuple[str, str], tuple[int, float]] = {}
    for item in _list(doc.get("carrier_limits", [])):
        size = item["bytes"]
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError("bad carrier limit")
        limits[(_str(item["network"]), _str(item["key"]))] = (size, _time(item["at"]))
    return limits


def _list(x: object) -> list[dict[str, object]]:
    if not isinstance(x, list) or not all(isinstance(i, dict) for i in x):
        raise TypeError("expected a list of objects")
    return x


def _dict(x: object) -> dict[str, object]:
    if not isinstance(x, dict):
        raise TypeError("expected an object")
    return x


def _str(x: object) -> str:
    if not isinstance(x, str) or not x:
        raise TypeError("expected a non-empty string")
    return x


def _opt_time(x: object) -> float | None:
    return None if x is None else _time(x)


def _time(x: object) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise TypeError("expected a timestamp")
    return float(x)
