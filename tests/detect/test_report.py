"""Summaries of the evidence log: text, JSON, CSV, and --since parsing."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from proxy.detect.evidence import EXHAUSTED, RECOVERED, EvidenceEvent, EvidenceLog
from proxy.detect.report import parse_since, render, summarize

T0 = 1_740_830_400.0  # 2025-03-01T12:00:00Z
HOUR = 3600.0


def ev(
    dt: float,
    site: str,
    outcome: str,
    *,
    strategy: str = "direct",
    worked: str | None = None,
    network: str = "gw-abc123",
    host: str | None = None,
) -> EvidenceEvent:
    return EvidenceEvent(
        time=T0 + dt,
        network=network,
        site=site,
        host=host or f"www.{site}",
        outcome=outcome,
        strategy=strategy,
        worked=worked,
    )


SAMPLE = [
    ev(0, "news.example", "sni-reset"),
    ev(1, "news.example", RECOVERED, strategy="fragment", worked="fragment"),
    ev(HOUR, "chat.example", "connect-refused"),
    ev(HOUR + 1, "chat.example", "connect-refused", strategy="fragment"),
    ev(HOUR + 2, "chat.example", EXHAUSTED, strategy="bridge"),
    ev(2 * HOUR, "news.example", "sni-reset", network="profile-phone", host="cdn.news.example"),
    ev(2 * HOUR + 1, "news.example", "sni-timeout", strategy="fragment", network="profile-phone"),
    ev(2 * HOUR + 2, "news.example", RECOVERED, strategy="front", worked="front"),
    ev(3 * HOUR, "shop.example", "site-down"),
]


def test_report_summarize_per_site() -> None:
    news, chat, shop = summarize(SAMPLE)
    assert news.site == "news.example"
    assert news.status == "recovered"
    assert news.first_blocked == T0
    assert news.last_blocked == T0 + 2 * HOUR + 1
    assert news.failures == 3
    assert news.outcomes == (("sni-reset", 2), ("sni-timeout", 1))
    assert dict(news.worked) == {"fragment": 1, "front": 1}
    assert news.last_worked == "front"
    assert news.networks == ("gw-abc123", "profile-phone")
    assert news.hosts == ("cdn.news.example", "www.news.example")

    assert chat.status == "blocked"
    assert chat.outcomes == (("connect-refused", 2), (EXHAUSTED, 1))
    assert chat.worked == ()
    assert chat.last_worked is None

    assert shop.status == "down"
    assert shop.first_blocked is None


def test_report_an_outage_that_exhausted_every_strategy_is_down_not_blocked() -> None:
    events = [
        ev(0, "dead.example", "site-down"),
        ev(1, "dead.example", "site-down", strategy="outside"),
        ev(2, "dead.example", EXHAUSTED, strategy=None),  # type: ignore[arg-type]
        ev(10, "slow.example", "throttled"),
        ev(20, "odd.example", "path-failed"),
        ev(21, "odd.example", RECOVERED, strategy="direct", worked="direct"),
    ]
    dead, slow, odd = summarize(events)
    assert dead.status == "down" and dead.first_blocked is None
    assert slow.status == "blocked" and slow.first_blocked == T0 + 10
    # a strategy that broke by itself is no evidence of blocking
    assert odd.status == "recovered" and odd.first_blocked is None


def test_report_summarize_orders_by_first_event_even_if_unsorted() -> None:
    sites = [s.site for s in summarize(reversed(SAMPLE))]
    assert sites == ["news.example", "chat.example", "shop.example"]
    assert summarize([]) == []


def test_report_text_table() -> None:
    text = render(summarize(SAMPLE), "text")
    lines = text.splitlines()
    assert lines[0].split() == [
        "SITE", "STATUS", "BLOCKED", "SINCE", "LAST", "SEEN", "FAILS", "BLOCKED", "BY", "WORKED"
    ]  # fmt: skip
    news = next(line for line in lines if line.startswith("news.example"))
    assert "recovered" in news
    assert "2025-03-01 12:00" in news
    assert "sni-reset x2, sni-timeout x1" in news
    assert "front x1" in news or "fragment x1" in news
    assert "3 sites: 1 recovered, 1 still blocked" in text


def test_report_text_empty() -> None:
    assert render([], "text", since=T0) == "No blocking recorded since 2025-03-01 12:00 UTC.\n"


def test_report_json() -> None:
    doc = json.loads(render(summarize(SAMPLE), "json", since=T0))
    assert doc["since"] == "2025-03-01T12:00:00.000Z"
    news = doc["sites"][0]
    assert news["site"] == "news.example"
    assert news["first_blocked"] == "2025-03-01T12:00:00.000Z"
    assert news["outcomes"] == {"sni-reset": 2, "sni-timeout": 1}
    assert news["worked"] == {"fragment": 1, "front": 1}
    assert news["status"] == "recovered"
    assert doc["sites"][2]["first_blocked"] is None


def test_report_csv() -> None:
    rows = list(csv.DictReader(io.StringIO(render(summarize(SAMPLE), "csv"))))
    assert [r["site"] for r in rows] == ["news.example", "chat.example", "shop.example"]
    news = rows[0]
    assert news["outcomes"] == "sni-reset=2;sni-timeout=1"
    assert news["networks"] == "gw-abc123;profile-phone"
    assert news["last_worked"] == "front"
    assert news["failures"] == "3"
    assert rows[2]["first_blocked"] == ""


def test_report_render_unknown_format() -> None:
    with pytest.raises(ValueError):
        render([], "xml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", T0 - 24 * HOUR),
        ("7d", T0 - 7 * 24 * HOUR),
        ("90m", T0 - 90 * 60),
        ("30s", T0 - 30),
        ("2w", T0 - 14 * 24 * HOUR),
        ("1.5h", T0 - 1.5 * HOUR),
        ("2025-03-01", T0 - 12 * HOUR),
        ("2025-03-01T12:00:00Z", T0),
        ("2025-03-01T13:00:00+01:00", T0),
    ],
)
def test_report_parse_since(text: str, expected: float) -> None:
    assert parse_since(text, now=T0) == expected


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "24", "h", "-3d", "2025-13-01", "99999999999d", "0001-01-01T00:00+01:00"],
)
def test_report_parse_since_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since(text, now=T0)


# -- `sidestep report` (proxy/learncli.py) -------------------------------------------------------


def run_report(argv: list[str]) -> int:
    import argparse

    from proxy.learncli import add_report_parser, report_main

    parser = argparse.ArgumentParser(prog="sidestep")
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", *argv])
    assert args.handler is report_main
    return report_main(args)


def write_sample(path: Path) -> None:
    log = EvidenceLog(path)
    for e in SAMPLE:
        log.write(e)


def test_report_cli_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evidence.jsonl"
    write_sample(path)
    assert run_report(["--evidence", str(path)]) == 0
    assert "news.example" in capsys.readouterr().out
    assert run_report(["--evidence", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [s["site"] for s in doc["sites"]] == ["news.example", "chat.example", "shop.example"]
    assert run_report(["--evidence", str(path), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("site,status,first_blocked")


def test_report_cli_since(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evidence.jsonl"
    write_sample(path)
    assert run_report(["--evidence", str(path), "--since", "2025-03-01T14:30:00Z"]) == 0
    out = capsys.readouterr().out
    assert "shop.example" in out and "news.example" not in out
    # The sample is from 2025: nothing in the last day.
    assert run_report(["--evidence", str(path), "--since", "24h"]) == 0
    assert "No blocking recorded since" in capsys.readouterr().out


def test_report_cli_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evidence.jsonl"
    assert run_report(["--evidence", str(path)]) == 1
    assert capsys.readouterr().err == f"sidestep report: no evidence log at {path}\n"
    write_sample(path)
    assert run_report(["--evidence", str(path), "--since", "last tuesday"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sidestep report: --since:") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        run_report(["--format", "xml"])
    assert exc.value.code == 2


def test_report_cli_reads_rotated_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evidence.jsonl"
    log = EvidenceLog(path, max_bytes=1000, backups=5)
    for e in SAMPLE:
        log.write(e)
    assert len(list(tmp_path.iterdir())) > 1
    assert run_report(["--evidence", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sites"][0]["failures"] == 3
