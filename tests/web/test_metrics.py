"""The Prometheus text rendering, read back with a small parser of the exposition format."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.web.metrics import (
    Metric,
    Sample,
    escape_label_value,
    format_value,
    render,
    status_metrics,
)

NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class Exposition:
    """What a scraper reads: families with help, type and samples."""

    def __init__(self) -> None:
        self.help: dict[str, str] = {}
        self.type: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []

    def value(self, name: str, **labels: str) -> float:
        found = [v for n, ls, v in self.samples if n == name and ls == labels]
        assert len(found) == 1, (name, labels, found)
        return found[0]


def _unescape(text: str, allowed: str) -> str:
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            nxt = text[i + 1]
            assert nxt in allowed, f"bad escape \\{nxt}"
            out.append("\n" if nxt == "n" else nxt)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _labels(text: str) -> tuple[dict[str, str], str]:
    """Parse ``{a="x",b="y"}`` at the start of ``text``; the labels and the rest."""
    labels: dict[str, str] = {}
    i = 1
    while text[i] != "}":
        m = LABEL.match(text, i)
        assert m is not None and not m.group().startswith("__"), text
        i = m.end()
        assert text[i : i + 2] == '="', text
        i += 2
        start = i
        while text[i] != '"':
            i += 2 if text[i] == "\\" else 1
        assert m.group() not in labels, "label given twice"
        labels[m.group()] = _unescape(text[start:i], '\\"n')
        i += 1
        if text[i] == ",":
            i += 1
    return labels, text[i + 1 :]


def parse(text: str) -> Exposition:
    """A strict reader of the text format (version 0.0.4) as Prometheus scrapes it."""
    assert text.endswith("\n")
    out = Exposition()
    seen_series: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for line in text[:-1].split("\n"):
        assert line, "no blank lines"
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert NAME.fullmatch(name) and name not in out.help
            out.help[name] = _unescape(help_text, "\\n")
            continue
        if line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge") and name not in out.type
            assert name in out.help, "HELP comes first here"
            assert not any(n == name for n, _, _ in out.samples), "TYPE before samples"
            out.type[name] = kind
            continue
        m = NAME.match(line)
        assert m is not None, line
        name, rest = m.group(), line[m.end() :]
        labels: dict[str, str] = {}
        if rest.startswith("{"):
            labels, rest = _labels(rest)
        assert rest.startswith(" "), line
        value = float(rest[1:].replace("+Inf", "inf").replace("-Inf", "-inf"))
        assert name in out.type, f"sample of undeclared family {name}"
        if out.type[name] == "counter":
            assert name.endswith("_total") and (math.isnan(value) or value >= 0)
        series = (name, tuple(sorted(labels.items())))
        assert series not in seen_series, f"duplicate series {series}"
        seen_series.add(series)
        out.samples.append((name, labels, value))
    return out


def test_metrics_status_document_parses_back(status_doc: dict[str, Any]) -> None:
    text = render(status_metrics(status_doc))
    exp = parse(text)
    assert exp.type["sidestep_connections_total"] == "counter"
    assert exp.value("sidestep_connections_active") == 1
    assert exp.value("sidestep_connections_opened_total") == 3
    assert exp.value("sidestep_connections_total", outcome="ok", strategy="direct") == 1
    assert exp.value("sidestep_connections_total", outcome="all-failed", strategy="-") == 1
    assert exp.value("sidestep_bytes_total", direction="up") == 600 + 517
    assert exp.value("sidestep_bytes_total", direction="down") == 9000
    assert exp.value("sidestep_verdicts_total", verdict="sni-reset") == 1
    assert exp.value("sidestep_dns_cache_lookups_total", result="hit") == 3
    assert exp.value("sidestep_dns_cache_lookups_total", result="miss") == 1
    assert exp.value("sidestep_dns_upstream_queries_total") == 1
    assert exp.value("sidestep_learned_sites", state="working") == 1
    ups = {ls["transport"]: v for n, ls, v in exp.samples if n == "sidestep_dns_endpoint_up"}
    assert ups == {"doh": 1, "dot": 0}
    assert all(NAME.fullmatch(n) for n in exp.type)


@given(st.text())
def test_metrics_label_values_round_trip(value: str) -> None:
    metric = Metric("x_total", "counter", "help", (Sample(1, (("site", value), ("b", "2"))),))
    exp = parse(render([metric]))
    assert exp.samples == [("x_total", {"site": value, "b": "2"}, 1.0)]


@given(st.text())
def test_metrics_help_text_round_trips(help_text: str) -> None:
    exp = parse(render([Metric("g", "gauge", help_text, (Sample(0.5),))]))
    assert exp.help["g"] == help_text
    assert exp.value("g") == 0.5


def test_metrics_escaping_is_exact() -> None:
    assert escape_label_value('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    line = render([Metric("g", "gauge", "h", (Sample(1, (("l", 'say "hi"\n'),)),))])
    assert 'g{l="say \\"hi\\"\\n"} 1' in line.splitlines()


@pytest.mark.parametrize(
    ("value", "text"),
    [(3, "3"), (2.0, "2"), (0.25, "0.25"), (math.inf, "+Inf"), (-math.inf, "-Inf"),
     (math.nan, "NaN"), (True, "1")],
)  # fmt: skip
def test_metrics_values_are_formatted_as_prometheus_reads_them(value: float, text: str) -> None:
    assert format_value(value) == text


@pytest.mark.parametrize(
    ("name", "kind", "labels"),
    [("1bad", "gauge", ()), ("has-dash", "gauge", ()), ("count", "counter", ()),
     ("ok_total", "counter", (("__reserved", "x"),)), ("ok", "gauge", (("a-b", "x"),))],
)  # fmt: skip
def test_metrics_refuse_invalid_names(name: str, kind: Any, labels: Any) -> None:
    with pytest.raises(ValueError):
        Metric(name, kind, "h", (Sample(1, labels),))
