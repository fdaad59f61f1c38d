"""The status document: one JSON-ready dict behind ``/``, ``/api/status`` and ``/metrics``.

:func:`build_status` gathers it from the running parts (the connection registry, the learned
memory, the DNS service, the evidence log) each time it is asked; the page and the metrics are
rendered from the dict alone, so the three views show the same data. Its keys:

* ``connections``: the open tunnels, newest first (:meth:`ConnectionRegistry.snapshot`);
* ``totals``: counters of ended tunnels (outcomes by strategy, bytes, verdicts);
* ``learned``: per network and site, the strategy that works and the ones that failed, with
  their verdicts; ``learned_counts`` sums them up for the current network;
* ``dns``: the resolver mode, its servers or secure endpoints with their health, the cache;
* ``evidence``: the newest events of the evidence log (the timeline is drawn from them).

Everything in it is plain data (strings, numbers, lists, dicts); names that came from the
network (sites, SNI) are carried as they are and escaped by whoever renders them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proxy import __version__
from proxy.config import DnsConfig
from proxy.detect.evidence import EvidenceEvent, format_time, log_files
from proxy.resolve.plain import PlainResolver
from proxy.resolve.service import DnsService
from proxy.route.learn import LearnedMemory
from proxy.status import ConnectionRegistry

if TYPE_CHECKING:
    from proxy.resolve.chain import ResolverChain

#: evidence events the document carries at most
EVIDENCE_LIMIT = 200
#: bytes read from the end of each evidence file to find them (the file may be megabytes)
EVIDENCE_TAIL_BYTES = 256 * 1024
#: learned (network, site) entries the document carries at most
LEARNED_LIMIT = 500


def build_status(
    *,
    connections: ConnectionRegistry,
    memory: LearnedMemory | None,
    network: str,
    dns_config: DnsConfig,
    dns_service: DnsService | None,
    evidence_path: Path | None,
    started: float,
    now: float,
    clock_now: float,
) -> dict[str, Any]:
    """The status document. ``started``/``now`` are Unix times; ``clock_now`` is the clock the
    connection registry's times are on (trio's)."""
    learned = learned_status(memory)
    return {
        "version": __version__,
        "network": network,
        "time": format_time(now),
        "timestamp": round(now, 3),
        "started": format_time(started),
        "uptime": round(max(0.0, now - started), 3),
        "connections": connections.snapshot(clock_now),
        "totals": connections.totals(),
        "learned": learned[:LEARNED_LIMIT],
        "learned_counts": learned_counts(learned, network),
        "dns": resolver_status(dns_config, dns_service),
        "evidence": evidence_status(evidence_path),
    }


def learned_status(memory: LearnedMemory | None) -> list[dict[str, Any]]:
    """What the memory knows, most recently updated first."""
    if memory is None:
        return []
    return [
        {
            "network": entry.network,
            "site": entry.site,
            "works": entry.works,
            "works_at": None if entry.works_at is None else format_time(entry.works_at),
            "failures": [
                {
                    "strategy": f.strategy,
                    "verdict": f.outcome,
                    "at": format_time(f.at),
                    "count": f.count,
                }
                for f in entry.failures
            ],
            "updated": format_time(entry.updated_at),
        }
        for entry in memory.entries()
    ]


def learned_counts(learned: list[dict[str, Any]], network: str) -> dict[str, int]:
    """Sites of ``network`` by state: "working" (a strategy is known to get through) and
    "failing" (only failures are known)."""
    counts = {"working": 0, "failing": 0}
    for entry in learned:
        if entry["network"] == network:
            counts["working" if entry["works"] else "failing"] += 1
    return counts


def resolver_status(dns_config: DnsConfig, service: DnsService | None) -> dict[str, Any]:
    """How names are resolved now: mode, servers or endpoints with health, cache figures."""
    out: dict[str, Any] = {"mode": dns_config.resolver, "servers": [], "endpoints": []}
    if service is None:
        out["cache"] = None
        return out
    upstream = service.upstream
    # The auto and secure resolvers' modules are loaded only by configs that use them (they
    # weigh megabytes): a class whose module was never imported has no instance to look for.
    auto = sys.modules.get("proxy.resolve.auto")
    secure = sys.modules.get("proxy.resolve.chain")
    chain: ResolverChain | None = None
    if auto is not None and isinstance(upstream, auto.AutoResolver):
        out["secure_now"] = upstream.secure
        out["checks"] = upstream.checks
        out["reasons"] = [v.to_json() for v in upstream.reasons]
        chain = upstream.chain
        plain = upstream.plain
        if isinstance(plain, PlainResolver):
            out["servers"] = [_host_port(h, p) for h, p in plain.servers]
    elif secure is not None and isinstance(upstream, secure.ResolverChain):
        chain = upstream
    elif isinstance(upstream, PlainResolver):
        out["servers"] = [_host_port(h, p) for h, p in upstream.servers]
    if chain is not None:
        out["chain_mode"] = chain.mode
        out["endpoints"] = chain.status()
    out["upstream_queries"] = service.upstream_queries
    out["failures"] = service.failures
    out["coalesced"] = service.coalesced
    out["prefetched"] = service.prefetched
    cache = service.cache
    if cache is None:
        out["cache"] = None
    else:
        looked = cache.hits + cache.stale_hits + cache.misses
        out["cache"] = {
            "size": len(cache),
            "capacity": cache.max_entries,
            "hits": cache.hits,
            "stale_hits": cache.stale_hits,
            "misses": cache.misses,
            "hit_rate": round((cache.hits + cache.stale_hits) / looked, 4) if looked else None,
        }
    return out


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def evidence_status(path: Path | None) -> dict[str, Any]:
    """The newest evidence events (oldest of them first) and their count by verdict."""
    if path is None:
        return {"path": None, "events": [], "by_verdict": {}, "error": None}
    error = None
    try:
        events = recent_events(path)
    except OSError as exc:
        events, error = [], f"cannot read {path}: {exc.strerror or exc}"
    by_verdict: dict[str, int] = {}
    for event in events:
        by_verdict[event.outcome] = by_verdict.get(event.outcome, 0) + 1
    return {
        "path": str(path),
        "events": [{**json.loads(event.to_json()), "ts": event.time} for event in events],
        "by_verdict": dict(sorted(by_verdict.items())),
        "error": error,
    }


def recent_events(
    path: Path, *, limit: int = EVIDENCE_LIMIT, tail_bytes: int = EVIDENCE_TAIL_BYTES
) -> list[EvidenceEvent]:
    """The last ``limit`` valid events of the log at ``path`` (rotated files included), in the
    order written, reading at most ``tail_bytes`` from the end of each file."""
    found: list[EvidenceEvent] = []
    for file in reversed(log_files(path)):  # newest file first
        found = _tail_events(file, tail_bytes) + found
        if len(found) >= limit:
            break
    return found[-limit:]


def _tail_events(file: Path, tail_bytes: int) -> list[EvidenceEvent]:
    try:
        with open(file, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - tail_bytes)
            f.seek(start)
            data = f.read(tail_bytes)
    except FileNotFoundError:  # rotated away between listing and reading
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line was cut by the seek
    events: list[EvidenceEvent] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            events.append(EvidenceEvent.from_json(line.decode("utf-8", errors="replace")))
        except ValueError:
            continue
    return events


def status_json(status: dict[str, Any]) -> bytes:
    """The document as served at ``/api/status``."""
    return (json.dumps(status, ensure_ascii=False, indent=1) + "\n").encode()
