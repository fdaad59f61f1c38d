"""The in-line monitor: TLS record framing, freezes, throttling, the baseline. No I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.net.monitor import Baseline, Degradation, LinkMonitor, MonitorSettings, RecordTracker

SETTINGS = MonitorSettings(freeze_min=14_000, freeze_max=22_000, freeze_stall=3.0)


def record(length: int, kind: int = 23) -> bytes:
    return bytes([kind, 3, 3]) + length.to_bytes(2, "big") + b"x" * length


def records_stream(lengths: list[int]) -> bytes:
    return b"".join(record(n) for n in lengths)


@given(st.lists(st.integers(0, 3000), min_size=1, max_size=8), st.data())
def test_record_tracker_knows_boundaries_however_the_bytes_are_cut(
    lengths: list[int], data: st.DataObject
) -> None:
    stream = records_stream(lengths)
    ends = set()
    pos = 0
    for n in lengths:
        pos += 5 + n
        ends.add(pos)
    cut = data.draw(st.integers(0, len(stream)))
    tracker = RecordTracker()
    # fed in random pieces, byte by byte at times
    fed = 0
    while fed < cut:
        step = data.draw(st.integers(1, max(1, cut - fed)))
        tracker.feed(memoryview(stream)[fed : fed + step])
        fed += step
    assert not tracker.broken
    assert tracker.at_boundary == (cut == 0 or cut in ends)


def test_record_tracker_notices_a_stream_that_is_not_tls() -> None:
    tracker = RecordTracker()
    tracker.feed(b"HTTP/1.1 200 OK\r\n")
    assert tracker.broken


def tls_monitor(down_before: int = 0, baseline: Baseline | None = None) -> LinkMonitor:
    return LinkMonitor(
        SETTINGS, 0.0, baseline=baseline, records=RecordTracker(), down_before=down_before
    )


def test_monitor_finds_a_freeze_mid_record_inside_the_window() -> None:
    monitor = tls_monitor()
    stream = record(40_000)[:16_384]  # cut in the middle of a record
    assert monitor.records is not None
    monitor.records.feed(stream)
    assert monitor.tick(16_384, 0.5) is None
    assert monitor.tick(16_384, 2.0) is None  # stalled 1.5 s: not yet
    assert monitor.tick(16_384, 3.6) is Degradation.FROZEN
    assert monitor.tick(16_384, 4.0) is None  # reported once


def test_monitor_does_not_call_an_idle_keepalive_frozen() -> None:
    """An answer that ended on a record boundary is a server that is done, not a freeze."""
    monitor = tls_monitor()
    stream = records_stream([8000, 8000])
    assert monitor.records is not None
    monitor.records.feed(stream)
    for t in range(1, 60):
        assert monitor.tick(len(stream), float(t)) is None


def test_monitor_freeze_needs_the_window_and_an_open_connection() -> None:
    below = tls_monitor()
    assert below.records is not None
    below.records.feed(record(9000)[:5000])
    assert [below.tick(5000, float(t)) for t in range(1, 10)] == [None] * 9
    closed = tls_monitor()
    assert closed.records is not None
    closed.records.feed(record(40_000)[:16_000])
    assert [closed.tick(16_000, float(t), open_both=False) for t in range(1, 10)] == [None] * 9
    # the first response counts towards the window
    early = tls_monitor(down_before=12_000)
    assert early.records is not None
    early.records.feed(record(40_000)[:16_000])
    assert early.tick(4000, 1.0) is None
    assert early.tick(4000, 5.0) is Degradation.FROZEN


def test_monitor_without_records_never_finds_a_freeze() -> None:
    monitor = LinkMonitor(SETTINGS, 0.0)
    assert [monitor.tick(16_000, float(t)) for t in range(1, 10)] == [None] * 9


def fast_baseline() -> Baseline:
    baseline = Baseline()
    baseline.learn(1_000_000.0)
    return baseline


def test_monitor_finds_throttling_far_below_the_baseline() -> None:
    monitor = tls_monitor(baseline=fast_baseline())
    down = 0
    found = None
    t = 0.0
    while found is None and t < 30:
        t += 0.5
        down += 1000  # 2 kB/s, steadily
        found = monitor.tick(down, t)
    assert found is Degradation.THROTTLED
    assert t >= SETTINGS.throttle_window


def test_monitor_throttle_ignores_bursty_gaps_shorter_than_the_pause() -> None:
    monitor = tls_monitor(baseline=fast_baseline())
    down = 0
    found = []
    for i in range(1, 40):
        if i % 4 == 0:  # 4 kB every 2 s, like a token bucket with a 4 kB burst
            down += 4096
        found.append(monitor.tick(down, i * 0.5))
    assert Degradation.THROTTLED in found


def test_monitor_throttle_needs_a_baseline_and_a_busy_server() -> None:
    no_baseline = tls_monitor()
    assert all(no_baseline.tick(i * 1000, i * 0.5) is None for i in range(1, 40))
    # a client that does not read sets the pace, not the path
    slow_client = tls_monitor(baseline=fast_baseline())
    ticks = [slow_client.tick(i * 1000, i * 0.5, client_blocked=True) for i in range(1, 40)]
    assert all(x is None for x in ticks)
    # a fast enough flow is not throttled
    fast = tls_monitor(baseline=fast_baseline())
    assert all(fast.tick(i * 400_000, i * 0.5) is None for i in range(1, 40))
    # a trickle (chat, server-sent events) carries too little to be judged
    trickle = tls_monitor(baseline=fast_baseline())
    assert all(trickle.tick(i * 100, i * 0.5) is None for i in range(1, 40))


def test_monitor_teaches_the_baseline_only_with_bulk_undegraded_transfers() -> None:
    bulk = LinkMonitor(SETTINGS, 0.0)
    bulk.tick(500_000, 0.5)
    rate = bulk.finish(1_000_000, 0.75)
    # credited with at least one interval for the last stretch: never above the true rate
    assert rate is not None and 1_000_000 / 1.0 <= rate <= 1_000_000 / 0.75
    small = LinkMonitor(SETTINGS, 0.0)
    assert small.finish(10_000, 0.1) is None
    degraded = tls_monitor(baseline=fast_baseline())
    for i in range(1, 40):
        degraded.tick(i * 1000, i * 0.5)
    assert degraded.found is Degradation.THROTTLED
    assert degraded.finish(100_000, 30.0) is None


def test_baseline_is_a_moving_average() -> None:
    baseline = Baseline()
    assert baseline.rate is None
    baseline.learn(100.0)
    baseline.learn(200.0)
    baseline.learn(0.0)  # ignored
    assert baseline.samples == 2 and baseline.rate == 125.0


def test_monitor_settings_can_be_turned_off() -> None:
    assert not MonitorSettings(freeze_stall=0, throttle_factor=0).enabled
    assert MonitorSettings().enabled
