"""``/metrics``: the status in the Prometheus text exposition format (version 0.0.4).

:func:`render` writes metric families; :func:`status_metrics` turns the status document of
:mod:`proxy.web.api` into them, so ``/metrics``, ``/api/status`` and the page never disagree.

The format, as Prometheus reads it: for each family a ``# HELP name text`` line (backslash and
newline escaped) and a ``# TYPE name counter|gauge`` line, then one line per sample,
``name{label="value",...} number``. Label values escape backslash, double quote and newline;
names match ``[a-zA-Z_:][a-zA-Z0-9_:]*`` and label names ``[a-zA-Z_][a-zA-Z0-9_]*`` (``__`` is
reserved). Counters are named ``..._total``. The text ends with a newline.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MetricType = Literal["counter", "gauge"]

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of a family, with its labels (in the order given)."""

    value: float
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Metric:
    """A metric family: name, type, help text and its samples."""

    name: str
    type: MetricType
    help: str
    samples: tuple[Sample, ...] = field(default=())

    def __post_init__(self) -> None:
        # our own names: a bad one is a bug here, never input from the network
        if not _METRIC_NAME.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.type == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")
        for sample in self.samples:
            for label, _ in sample.labels:
                if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
                    raise ValueError(f"invalid label name {label!r}")


def escape_label_value(value: str) -> str:
    """A label value as written between double quotes."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: only backslash and newline are escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, ``+Inf``/``-Inf``/``NaN`` as spelled."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def render(metrics: Iterable[Metric]) -> str:
    """The exposition text of ``metrics``."""
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {escape_help(metric.help)}")
        lines.append(f"# TYPE {metric.name} {metric.type}")
        for sample in metric.samples:
            labels = ""
            if sample.labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sample.labels)
                labels = "{" + inner + "}"
            lines.append(f"{metric.name}{labels} {format_value(sample.value)}")
    return "\n".join(lines) + "\n"


def _one(name: str, kind: MetricType, help: str, value: float) -> Metric:
    return Metric(name, kind, help, (Sample(value),))


def _by(name: str, kind: MetricType, help: str, label: str, values: Mapping[str, float]) -> Metric:
    return Metric(name, kind, help, tuple(Sample(v, ((label, k),)) for k, v in values.items()))


def status_metrics(status: Mapping[str, Any]) -> list[Metric]:
    """The metric families of a status document (:func:`proxy.web.api.build_status`)."""
    totals = status["totals"]
    closed: Sequence[Mapping[str, Any]] = totals["closed"]
    metrics = [
        _one(
            "sidestep_up",
            "gauge",
            "1 while sidestep runs (scrapes that fail mean it does not).",
            1,
        ),
        _one(
            "sidestep_uptime_seconds",
            "gauge",
            "Seconds since sidestep started.",
            float(status["uptime"]),
        ),
        _one(
            "sidestep_connections_active",
            "gauge",
            "Tunnels open now.",
            totals["active"],
        ),
        _one(
            "sidestep_connections_opened_total",
            "counter",
            "Tunnels opened since start.",
            totals["opened"],
        ),
        Metric(
            "sidestep_connections_total",
            "counter",
            "Tunnels ended since start, by outcome and by the strategy that carried them.",
            tuple(
                Sample(row["count"], (("outcome", row["outcome"]), ("strategy", row["strategy"])))
                for row in closed
            ),
        ),
        _by(
            "sidestep_bytes_total",
            "counter",
            "Bytes relayed by ended tunnels, from the clients (up) and to them (down).",
            "direction",
            {"up": totals["bytes_up"], "down": totals["bytes_down"]},
        ),
        _by(
            "sidestep_verdicts_total",
            "counter",
            "Verdicts of ended tunnels by kind (ok, sni-reset, frozen, ...).",
            "verdict",
            totals["verdicts"],
        ),
    ]
    dns = status["dns"]
    if dns.get("cache") is not None:
        cache = dns["cache"]
        metrics.append(
            _by(
                "sidestep_dns_cache_lookups_total",
                "counter",
                "DNS cache lookups by result (hit, stale hit, miss).",
                "result",
                {"hit": cache["hits"], "stale": cache["stale_hits"], "miss": cache["misses"]},
            )
        )
        metrics.append(
            _one(
                "sidestep_dns_cache_entries",
                "gauge",
                "Answers in the DNS cache.",
                cache["size"],
            )
        )
    if "upstream_queries" in dns:
        metrics.append(
            _one(
                "sidestep_dns_upstream_queries_total",
                "counter",
                "DNS queries sent to the resolvers (cache misses, prefetches).",
                dns["upstream_queries"],
            )
        )
        metrics.append(
            _one(
                "sidestep_dns_upstream_failures_total",
                "counter",
                "DNS queries the resolvers did not answer in time or at all.",
                dns["failures"],
            )
        )
    endpoints = dns.get("endpoints") or []
    if endpoints:
        metrics.append(
            Metric(
                "sidestep_dns_endpoint_up",
                "gauge",
                "1 when a secure DNS endpoint is not backing off after failures.",
                tuple(
                    Sample(
                        0 if ep["state"] in ("backing-off", "retrying") else 1,
                        (
                            ("endpoint", ep["endpoint"]),
                            ("address", f"{ep['address']}:{ep['port']}"),
                            ("transport", ep["transport"]),
                        ),
                    )
                    for ep in endpoints
                ),
            )
        )
    metrics.append(
        _by(
            "sidestep_learned_sites",
            "gauge",
            "Sites with a remembered result on this network, by what is known.",
            "state",
            status["learned_counts"],
        )
    )
    return metrics
