"""The evidence log: JSON lines, rotation, tolerant reading."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.detect.evidence import (
    FIELDS,
    RECOVERED,
    EvidenceEvent,
    EvidenceLog,
    format_time,
    log_files,
    parse_time,
    read_events,
)

T0 = 1_740_830_400.0  # 2025-03-01T12:00:00Z


def event(i: float = 0, *, outcome: str = "sni-reset", worked: str | None = None) -> EvidenceEvent:
    return EvidenceEvent(
        time=T0 + i,
        network="gw-abc123",
        site="example.com",
        host="www.example.com",
        outcome=outcome,
        address="203.0.113.7:443",
        sni="www.example.com",
        strategy="direct",
        duration_ms=312,
        worked=worked,
    )


def test_evidence_line_format(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    EvidenceLog(path).write(event(0.25))
    (line,) = path.read_text().splitlines()
    doc = json.loads(line)
    assert list(doc) == list(FIELDS)
    assert doc["time"] == "2025-03-01T12:00:00.250Z"
    assert doc["outcome"] == "sni-reset"
    assert doc["worked"] is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_evidence_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    log = EvidenceLog(path)
    events = [event(1), event(2), event(3, outcome=RECOVERED, worked="fragment")]
    for e in events:
        assert log.write(e) is True
    assert list(read_events(path)) == events
    assert list(read_events(path, since=T0 + 2)) == events[1:]


@given(
    st.floats(0, 4_000_000_000).map(lambda t: round(t, 3)),
    st.text(min_size=1),
    st.one_of(st.none(), st.text()),
    st.one_of(st.none(), st.integers(0, 10**9)),
)
def test_evidence_json_round_trip(t: float, site: str, sni: str | None, ms: int | None) -> None:
    e = EvidenceEvent(
        time=t, network="n", site=site, host=site, outcome="x", sni=sni, duration_ms=ms
    )
    back = EvidenceEvent.from_json(e.to_json())
    assert back.time == pytest.approx(t, abs=0.001)
    assert (back.site, back.sni, back.duration_ms) == (site, sni, ms)


def test_evidence_time_helpers() -> None:
    assert format_time(T0) == "2025-03-01T12:00:00.000Z"
    assert parse_time("2025-03-01T12:00:00Z") == T0
    assert parse_time("2025-03-01T12:00:00") == T0
    assert parse_time("2025-03-01T14:00:00+02:00") == T0


def test_evidence_rotates_at_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    line_len = len(event(0).to_json()) + 1
    log = EvidenceLog(path, max_bytes=line_len * 2, backups=2)
    for i in range(7):
        log.write(event(i))
    assert sorted(os.listdir(tmp_path)) == [
        "evidence.jsonl",
        "evidence.jsonl.1",
        "evidence.jsonl.2",
    ]
    for p in log_files(path):
        assert p.stat().st_size <= line_len * 2
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert log_files(path) == [tmp_path / "evidence.jsonl.2", tmp_path / "evidence.jsonl.1", path]
    # The oldest file fell off: events 0 and 1 are gone, the rest read back in order.
    assert [e.time - T0 for e in read_events(path)] == [2, 3, 4, 5, 6]


def test_evidence_rotation_without_backups(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    line_len = len(event(0).to_json()) + 1
    log = EvidenceLog(path, max_bytes=line_len, backups=0)
    for i in range(3):
        log.write(event(i))
    assert os.listdir(tmp_path) == ["evidence.jsonl"]
    assert [e.time - T0 for e in read_events(path)] == [2]


def test_evidence_oversized_event_is_still_written(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    log = EvidenceLog(path, max_bytes=10, backups=1)
    log.write(event(0))
    log.write(event(1))
    assert [e.time - T0 for e in read_events(path)] == [0, 1]


def test_evidence_skips_corrupt_lines(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    good = [event(1), event(2)]
    path.write_text(
        "\n".join(
            [
                "not json",
                good[0].to_json(),
                "[1, 2]",
                '{"time": "yesterday", "network": "n", "site": "s", "host": "h", "outcome": "x"}',
                '{"time": "2025-03-01T12:00:00Z", "network": "n", "site": "s", "outcome": "x"}',
                '{"time": "2025-03-01T12:00:00Z", "network": "n", "site": "s", "host": "h",'
                ' "outcome": "x", "duration_ms": "slow"}',
                '{"time": "2025-03-01T12:00:00Z", "network": "n", "site": "s", "host": "h",'
                ' "outcome": "x", "sni": 7}',
                "",
                good[1].to_json(),
                '{"time": "2025-03-01T12:00:0',
            ]
        )
    )
    assert list(read_events(path)) == good


def test_evidence_after_cut_off_line_starts_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "evidence.jsonl"
    path.write_text(event(0).to_json() + "\n" + '{"time": "2025-')
    EvidenceLog(path).write(event(1))
    assert [e.time - T0 for e in read_events(path)] == [0, 1]


def test_evidence_write_error_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = EvidenceLog(blocker / "evidence.jsonl")
    with caplog.at_level(logging.WARNING, logger="sidestep.evidence"):
        assert log.write(event(0)) is False
        assert log.write(event(1)) is False
    assert caplog.text.count("cannot write the evidence log") == 1


def test_evidence_missing_log_reads_nothing(tmp_path: Path) -> None:
    assert list(read_events(tmp_path / "none.jsonl")) == []
    assert log_files(tmp_path / "none.jsonl") == []


def test_evidence_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EvidenceLog(tmp_path / "e", max_bytes=0)
    with pytest.raises(ValueError):
        EvidenceLog(tmp_path / "e", backups=-1)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {"time": st.text(max_size=30) | st.just("0001-01-01T00:00:00+01:00")},
        optional={
            "network": _json | st.text(),
            "site": _json | st.text(),
            "host": _json | st.text(),
            "outcome": _json | st.text(),
            "sni": _json,
            "duration_ms": _json,
        },
    )
)
def test_evidence_from_json_only_raises_value_error(doc: dict[str, object]) -> None:
    try:
        e = EvidenceEvent.from_json(json.dumps(doc))
    except ValueError:
        return
    # Whatever is accepted can be written back out.
    assert EvidenceEvent.from_json(e.to_json()) == e


@given(st.binary(max_size=200))
def test_evidence_from_json_garbage(data: bytes) -> None:
    try:
        EvidenceEvent.from_json(data.decode("utf-8", "replace"))
    except ValueError:
        pass
