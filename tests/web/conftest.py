"""A status document built from real parts (registry, learned memory, evidence log, DNS
service with a chain), with names a hostile network could send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import DnsConfig
from proxy.detect.evidence import EvidenceEvent, EvidenceLog
from proxy.resolve.cache import DnsCache
from proxy.resolve.chain import ChainMember, EndpointKey, HealthBook, ResolverChain
from proxy.resolve.plain import PlainResolver
from proxy.resolve.service import DnsService
from proxy.route.learn import LearnedMemory
from proxy.status import ConnectionRegistry
from proxy.web.api import build_status

HOSTILE = '<script>alert("x")</script>&"\'\x01'
NETWORK = "home"
#: a fixed "now" for the documents (Unix time)
NOW = 1_780_000_000.0


def build_parts(tmp_path: Path) -> dict[str, Any]:
    """Every input of :func:`build_status`, filled with a little of everything."""
    registry = ConnectionRegistry()
    open_one = registry.open(
        client=("127.0.0.1", 40000),
        inbound="mixed",
        protocol="socks5",
        target="blocked.example:443",
        policy="fragment",
        now=100.0,
    )
    open_one.sni, open_one.strategy, open_one.up, open_one.down = (
        HOSTILE,
        "tls-record-split",
        517,
        4096,
    )
    done = registry.open(
        client=("127.0.0.1", 40001),
        inbound="mixed",
        protocol="socks5",
        target="open.example:443",
        policy="direct",
        now=101.0,
    )
    registry.close(done, strategy="direct", up=600, down=9000, outcome="ok", verdict="ok")
    failed = registry.open(
        client=("127.0.0.1", 40002),
        inbound="mixed",
        protocol="http-connect",
        target="x.example:443",
        policy="fragment",
        now=102.0,
    )
    registry.close(
        failed,
        strategy="-",
        up=517,
        down=0,
        outcome="all-failed: every strategy of policy 'fragment' failed",
        verdict="sni-reset",
    )

    memory = LearnedMemory(None, clock=lambda: NOW)
    memory.record_failure(NETWORK, "blocked.example", "direct", "sni-reset", at=NOW - 50)
    memory.record_success(NETWORK, "blocked.example", "tls-record-split", at=NOW - 40)
    memory.record_failure("office", HOSTILE, "direct", "ip-blocked", at=NOW - 30)

    evidence = EvidenceLog(tmp_path / "evidence.jsonl")
    for i, (site, outcome) in enumerate(
        [
            ("blocked.example", "sni-reset"),
            (HOSTILE, "sni-timeout"),
            ("blocked.example", "recovered"),
            ("slow.example", "throttled"),
            ("blocked.example", "sni-reset"),
        ]
    ):
        evidence.write(
            EvidenceEvent(
                time=NOW - 600 + i * 120,
                network=NETWORK,
                site=site,
                host=site,
                outcome=outcome,
                sni=site,
                strategy="direct",
                worked="tls-record-split" if outcome == "recovered" else None,
            )
        )

    plain = PlainResolver([("127.0.0.53", 53)])
    health = HealthBook(clock=lambda: 1000.0)
    keys = [
        EndpointKey("127.54.1.1", 443, "doh", "dns.famous.example"),
        EndpointKey("127.54.2.2", 853, "dot", ""),
    ]
    chain = ResolverChain([ChainMember(str(k), k, plain) for k in keys], health=health)
    health.success(keys[0], 0.012)
    health.failure(keys[1], "connect timeout <b>")
    service = DnsService(chain, DnsCache(max_entries=100), prefetch=False)
    assert service.cache is not None
    service.cache.hits, service.cache.misses = 3, 1
    service.upstream_queries = 1
    return {
        "connections": registry,
        "memory": memory,
        "network": NETWORK,
        "dns_config": DnsConfig(resolver="secure"),
        "dns_service": service,
        "evidence_path": tmp_path / "evidence.jsonl",
        "started": NOW - 3600,
        "now": NOW,
        "clock_now": 130.0,
    }


@pytest.fixture
def status_doc(tmp_path: Path) -> dict[str, Any]:
    return build_status(**build_parts(tmp_path))
