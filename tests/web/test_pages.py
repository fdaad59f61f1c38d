"""The status page and its SVG timeline: well-formed, ordered, and escaped."""

from __future__ import annotations

import html
import html.parser
import xml.etree.ElementTree as ET
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.web.pages import human_age, human_bytes, render_status_page, render_timeline, text

SVG = "{http://www.w3.org/2000/svg}"


class Tags(html.parser.HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags_of(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(page)
    parser.close()
    return parser.tags


def svg_of(page: str) -> ET.Element:
    start = page.index("<svg")
    return ET.fromstring(page[start : page.index("</svg>", start) + len("</svg>")])


def _event(ts: float, outcome: str, site: str = "a.example") -> dict[str, Any]:
    return {"ts": ts, "time": str(ts), "outcome": outcome, "site": site, "strategy": "direct"}


def test_timeline_is_valid_xml_with_events_in_time_order() -> None:
    events = [
        _event(1000, "sni-reset"),
        _event(4000, "recovered"),
        _event(2000, "sni-reset"),
        _event(3000, "frozen"),
    ]
    root = ET.fromstring(render_timeline(events))
    assert root.tag == f"{SVG}svg"
    circles = root.findall(f"{SVG}circle")
    assert len(circles) == 4
    xs = [float(c.get("cx", "nan")) for c in circles]
    assert xs == sorted(xs) and len(set(xs)) == 4  # drawn in time order, apart
    assert [c.get("data-verdict") for c in circles] == [
        "sni-reset", "sni-reset", "frozen", "recovered"
    ]  # fmt: skip
    # one lane per verdict: events of a verdict share a row, different verdicts do not
    ys = {c.get("data-verdict"): c.get("cy") for c in circles}
    assert len(set(ys.values())) == 3
    assert float(xs[0]) < float(xs[-1]) <= float(root.get("width", "0"))
    lanes = [t.text for t in root.findall(f"{SVG}text") if t.get("class") == "lane"]
    assert lanes == ["frozen", "recovered", "sni-reset"]


def test_timeline_window_ends_now_and_spans_a_minute() -> None:
    root = ET.fromstring(render_timeline([_event(1000, "sni-reset")], now=1030))
    ticks = [
        float(line.get("x1", "nan"))
        for line in root.findall(f"{SVG}line")
        if line.get("class") == "axis" and line.get("x1") == line.get("x2")
    ]
    assert len(ticks) == 5 and ticks == sorted(ticks)
    [dot] = root.findall(f"{SVG}circle")
    # the window is [now - 60 s, now]: an event 30 s ago sits in the middle
    assert float(dot.get("cx", "nan")) == (ticks[0] + ticks[-1]) / 2


def test_timeline_of_one_event_and_of_none() -> None:
    one = ET.fromstring(render_timeline([_event(5, "sni-reset")]))
    assert len(one.findall(f"{SVG}circle")) == 1
    empty = ET.fromstring(render_timeline([]))
    assert empty.findall(f"{SVG}circle") == []
    assert "No blocking events" in "".join(empty.itertext())


@given(st.text(), st.text())
def test_timeline_stays_well_formed_whatever_the_names(site: str, verdict: str) -> None:
    root = ET.fromstring(render_timeline([_event(1, verdict, site), _event(2, "x", site)]))
    titles = [t.text or "" for t in root.iter(f"{SVG}title")]
    assert len(titles) == 2


def test_page_escapes_hostile_names(status_doc: dict[str, Any]) -> None:
    page = render_status_page(status_doc)
    assert "<script" not in page  # the hostile SNI and site name never become markup
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "\x01" not in page
    assert [t for t, _ in tags_of(page) if t == "script"] == []
    # the inline SVG (with the hostile site in a tooltip) is still well-formed XML
    assert len(svg_of(page).findall(f"{SVG}circle")) == 5


def test_page_loads_nothing_from_elsewhere(status_doc: dict[str, Any]) -> None:
    page = render_status_page(status_doc)
    for tag, attrs in tags_of(page):
        assert "src" not in attrs, tag
        href = attrs.get("href")
        assert href is None or href.startswith("/"), href
    assert "@import" not in page and "url(" not in page
    refresh = [a for t, a in tags_of(page) if t == "meta" and a.get("http-equiv") == "refresh"]
    assert refresh and refresh[0]["content"] == "5"


def test_page_shows_every_part_of_the_document(status_doc: dict[str, Any]) -> None:
    page = render_status_page(status_doc)
    ids = {a.get("id") for _, a in tags_of(page)}
    assert {"connections", "sites", "evidence", "dns", "outcomes"} <= ids
    assert "blocked.example:443" in page and "tls-record-split" in page  # live + learned
    assert "sni-reset" in page and "ip-blocked" in page  # verdicts, per network
    assert "backing-off" in page and "connect timeout &lt;b&gt;" in page  # resolver health
    assert "75%" in page  # DNS cache hit rate: 3 hits of 4 lookups
    assert "4.0 KiB" in page  # bytes of the open connection


def _xml_char(ch: str) -> bool:
    code = ord(ch)
    return ch in "\t\n\r" or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or code > 0xFFFF


@given(st.text())
def test_text_never_lets_markup_through(value: str) -> None:
    out = text(value)
    assert not set(out) & set("<>\"'")
    # nothing is lost but the characters XML cannot carry
    assert html.unescape(out) == "".join(ch if _xml_char(ch) else "\ufffd" for ch in value)


def test_human_units() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1536, 5 * 2**20, 3 * 2**30)] == [
        "0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 GiB"
    ]  # fmt: skip
    assert [human_age(s) for s in (5, 75, 7300, 90000)] == ["5 s", "1 m 15 s", "2 h 1 m", "1 d 1 h"]
