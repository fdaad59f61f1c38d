"""The status document: what it holds, and the evidence tail read from a rotated log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from proxy.config import DnsConfig
from proxy.detect.evidence import EvidenceEvent, EvidenceLog
from proxy.resolve.plain import PlainResolver
from proxy.resolve.service import DnsService
from proxy.status import ConnectionRegistry
from proxy.web.api import build_status, recent_events, resolver_status, status_json


def _event(i: int) -> EvidenceEvent:
    return EvidenceEvent(
        time=1_700_000_000 + i, network="n", site=f"s{i}.example", host="h", outcome="sni-reset"
    )


def test_api_document_holds_every_part(status_doc: dict[str, Any]) -> None:
    doc = json.loads(status_json(status_doc))
    assert doc == status_doc  # plain JSON data all the way down
    assert doc["uptime"] == 3600 and doc["network"] == "home"
    [live] = doc["connections"]
    assert live["strategy"] == "tls-record-split" and live["age"] == 30.0
    assert live["sni"].startswith("<script>")  # carried as is; the page escapes it
    sites = {(e["network"], e["site"]): e for e in doc["learned"]}
    blocked = sites["home", "blocked.example"]
    assert blocked["works"] == "tls-record-split"
    assert blocked["failures"][0]["verdict"] == "sni-reset"
    assert doc["learned_counts"] == {"working": 1, "failing": 0}  # the other is "office"'s
    dns = doc["dns"]
    assert dns["mode"] == "secure" and dns["chain_mode"] == "fallback"
    assert [e["state"] for e in dns["endpoints"]] == ["up", "backing-off"]
    assert dns["cache"]["hit_rate"] == 0.75 and dns["cache"]["capacity"] == 100
    events = doc["evidence"]["events"]
    assert [e["outcome"] for e in events][:3] == ["sni-reset", "sni-timeout", "recovered"]
    assert [e["ts"] for e in events] == sorted(e["ts"] for e in events)
    assert doc["evidence"]["by_verdict"]["sni-reset"] == 2


def test_api_recent_events_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    log = EvidenceLog(path, max_bytes=2000, backups=3)
    for i in range(60):
        assert log.write(_event(i))
    assert (tmp_path / "evidence.jsonl.1").exists()  # the log did rotate
    newest = recent_events(path, limit=25)
    assert [e.site for e in newest] == [f"s{i}.example" for i in range(35, 60)]
    # a short tail cuts a line in two: the partial line is skipped, never misread
    tail = recent_events(path, limit=1000, tail_bytes=300)
    assert tail and all(e.outcome == "sni-reset" for e in tail)
    sites = [e.site for e in tail]
    assert sites == sorted(sites, key=lambda s: int(s[1:].split(".")[0]))
    assert recent_events(tmp_path / "missing.jsonl") == []


def test_api_corrupt_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    path.write_text(_event(1).to_json() + "\nnot json\n{}\n" + _event(2).to_json() + "\n")
    assert [e.site for e in recent_events(path)] == ["s1.example", "s2.example"]


def test_api_unreadable_evidence_is_reported_not_raised(tmp_path: Path) -> None:
    folder = tmp_path / "evidence.jsonl"
    folder.mkdir()  # a directory where the log should be: reading fails
    parts: dict[str, Any] = {
        "connections": ConnectionRegistry(),
        "memory": None,
        "network": "n",
        "dns_config": DnsConfig(),
        "dns_service": None,
        "evidence_path": folder,
        "started": 0.0,
        "now": 1.0,
        "clock_now": 0.0,
    }
    doc = build_status(**parts)
    assert doc["evidence"]["events"] == [] and "cannot read" in doc["evidence"]["error"]
    assert doc["learned"] == [] and doc["dns"]["cache"] is None


def test_api_plain_resolver_lists_its_servers() -> None:
    service = DnsService(PlainResolver([("127.0.0.53", 53), ("::1", 5353)]), None)
    status = resolver_status(DnsConfig(resolver="udp"), service)
    assert status["servers"] == ["127.0.0.53:53", "[::1]:5353"]
    assert status["endpoints"] == [] and status["cache"] is None
