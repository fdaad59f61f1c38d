"""The learned memory: ordering, expiry, the unhealthy rule, persistence."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.route.learn import LearnedMemory, write_atomic

NET = "gw-abc123"
POLICY = ["direct", "fragment", "front", "bridge"]


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def memory(clock: FakeClock, path: Path | None = None, **kw: float) -> LearnedMemory:
    return LearnedMemory(path, clock=clock, **kw)  # type: ignore[arg-type]


def test_learn_order_unknown_site_keeps_configured_order(clock: FakeClock) -> None:
    assert memory(clock).order(NET, "example.com", POLICY) == POLICY


def test_learn_order_known_good_first_failed_last(clock: FakeClock) -> None:
    m = memory(clock)
    m.record_failure(NET, "example.com", "direct", "sni-reset")
    m.record_success(NET, "example.com", "front")
    assert m.order(NET, "example.com", POLICY) == ["front", "fragment", "bridge", "direct"]
    assert m.known_good(NET, "example.com") == "front"


def test_learn_order_most_recent_success_wins(clock: FakeClock) -> None:
    m = memory(clock)
    m.record_success(NET, "example.com", "bridge")
    clock.now += 10
    m.record_success(NET, "example.com", "fragment")
    assert m.order(NET, "example.com", POLICY)[:2] == ["fragment", "bridge"]


def test_learn_failure_after_success_demotes(clock: FakeClock) -> None:
    m = memory(clock)
    m.record_success(NET, "example.com", "fragment")
    clock.now += 5
    m.record_failure(NET, "example.com", "fragment", "sni-timeout")
    assert m.order(NET, "example.com", POLICY) == ["direct", "front", "bridge", "fragment"]
    assert m.known_good(NET, "example.com") is None


def test_learn_is_per_network_and_per_site(clock: FakeClock) -> None:
    m = memory(clock)
    m.record_success(NET, "example.com", "bridge")
    assert m.order("other-net", "example.com", POLICY) == POLICY
    assert m.order(NET, "example.org", POLICY) == POLICY


def test_learn_entries_expire_after_ttl(clock: FakeClock) -> None:
    m = memory(clock, ttl=3600)
    m.record_failure(NET, "example.com", "direct", "sni-reset")
    m.record_success(NET, "example.com", "bridge")
    clock.now += 3599
    assert m.order(NET, "example.com", POLICY)[0] == "bridge"
    clock.now += 1
    assert m.order(NET, "example.com", POLICY) == POLICY
    assert m.entries() == []


def test_learn_failure_count_restarts_after_expiry(clock: FakeClock) -> None:
    m = memory(clock, ttl=100)
    for _ in range(3):
        m.record_failure(NET, "example.com", "direct", "sni-reset")
    assert m.entries()[0].failures[0].count == 3
    clock.now += 200
    m.record_failure(NET, "example.com", "direct", "connect-refused")
    (failure,) = m.entries()[0].failures
    assert (failure.outcome, failure.count) == ("connect-refused", 1)


@pytest.mark.parametrize("verdict", ["frozen", "throttled", "sni-timeout", "blockpage"])
def test_learn_in_line_verdicts_demote_then_expire(clock: FakeClock, verdict: str) -> None:
    """A verdict found while data flowed demotes the strategy that had worked, until the
    ttl passes: then the configured order is back, so a censor that changed is noticed."""
    m = memory(clock, ttl=600)
    m.record_success(NET, "example.com", "direct")
    clock.now += 1
    assert m.record_failure(NET, "example.com", "direct", verdict)
    assert m.order(NET, "example.com", POLICY)[-1] == "direct"
    assert m.known_good(NET, "example.com") is None
    clock.now += 600
    assert m.order(NET, "example.com", POLICY) == POLICY


def test_learn_site_down_is_not_learned(clock: FakeClock) -> None:
    m = memory(clock)
    assert m.record_failure(NET, "example.com", "direct", "site-down") is False
    assert m.order(NET, "example.com", POLICY) == POLICY
    assert len(m) == 0


def test_learn_unhealthy_strategy_is_never_promoted(clock: FakeClock) -> None:
    m = memory(clock)
    m.record_success(NET, "example.com", "fragment")
    m.mark_unhealthy(NET, "fragment")
    assert m.is_unhealthy(NET, "fragment")
    assert not m.is_unhealthy("other-net", "fragment")
    # the earlier success is dropped, a new one refused, and it goes last
    assert m.record_success(NET, "example.org", "fragment") is False
    assert m.order(NET, "example.com", POLICY) == ["direct", "front", "bridge", "fragment"]
    assert m.order(NET, "example.org", POLICY)[-1] == "fragment"
    assert m.known_good(NET, "example.com") is None
    m.mark_healthy(NET, "fragment")
    # The dropped success stays dropped; new successes are stored again.
    assert m.order(NET, "example.com", POLICY) == POLICY
    assert m.record_success(NET, "example.com", "fragment") is True
    assert m.order(NET, "example.com", POLICY)[0] == "fragment"


def test_learn_unhealthy_mark_expires(clock: FakeClock) -> None:
    m = memory(clock, ttl=60)
    m.mark_unhealthy(NET, "fragment")
    clock.now += 61
    assert not m.is_unhealthy(NET, "fragment")
    assert m.record_success(NET, "example.com", "fragment") is True


def test_learn_forget_site_on_all_or_one_network(clock: FakeClock) -> None:
    m = memory(clock)
    m.record_success(NET, "example.com", "bridge")
    m.record_success("other", "example.com", "front")
    m.record_success(NET, "example.org", "front")
    assert m.forget("example.com", network="other") == 1
    assert m.forget("www.Example.com") == 1  # normalized to the registrable domain
    assert m.forget("example.com") == 0
    assert [(e.network, e.site) for e in m.entries()] == [(NET, "example.org")]


def test_learn_bounded_drops_least_recently_touched(clock: FakeClock) -> None:
    m = memory(clock, max_sites=3)
    for site in ["a.com", "b.com", "c.com"]:
        m.record_success(NET, site, "bridge")
    m.record_failure(NET, "a.com", "direct", "sni-reset")  # touches a.com
    m.record_success(NET, "d.com", "bridge")
    assert sorted(e.site for e in m.entries()) == ["a.com", "c.com", "d.com"]


@given(
    st.lists(
        st.tuples(st.sampled_from([*POLICY, "gone"]), st.booleans(), st.integers(0, 200_000)),
        max_size=20,
    ),
    st.permutations(POLICY),
)
def test_learn_order_is_a_permutation(
    history: list[tuple[str, bool, int]], policy: list[str]
) -> None:
    clock = FakeClock()
    m = memory(clock)
    for strategy, ok, dt in history:
        clock.now += dt
        if ok:
            m.record_success(NET, "s.com", strategy)
        else:
            m.record_failure(NET, "s.com", strategy, "sni-reset")
    result = m.order(NET, "s.com", policy)
    assert sorted(result) == sorted(policy)
    good = m.known_good(NET, "s.com")
    if good in policy:
        assert result[0] == good


def test_learn_persistence_round_trip(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "state" / "learned.json"
    m = memory(clock, path)
    m.record_failure(NET, "example.com", "direct", "sni-reset")
    m.record_failure(NET, "example.com", "direct", "sni-reset")
    m.record_success(NET, "example.com", "front")
    m.mark_unhealthy(NET, "fragment")
    m.save()
    assert not m.dirty
    again = memory(clock, path)
    assert again.entries() == m.entries()
    assert again.order(NET, "example.com", POLICY) == ["front", "bridge", "direct", "fragment"]
    assert again.is_unhealthy(NET, "fragment")


def test_learn_load_drops_expired_entries(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "learned.json"
    m = memory(clock, path, ttl=100)
    m.record_success(NET, "old.com", "front")
    clock.now += 50
    m.record_success(NET, "new.com", "front")
    m.save()
    clock.now += 60
    again = memory(clock, path, ttl=100)
    assert [e.site for e in again.entries()] == ["new.com"]
    assert len(again) == 1


def test_learn_save_is_atomic_and_private(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "learned.json"
    m = memory(clock, path)
    m.record_success(NET, "example.com", "front")
    m.save()
    m.record_success(NET, "example.org", "front")
    m.save()
    assert os.listdir(tmp_path) == ["learned.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["version"] == 1


def test_learn_write_atomic_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "learned.json"
    write_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["learned.json"]


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe\x00",
        b"[]",
        b'{"version": 99, "sites": []}',
        b'{"version": 1, "sites": [{"network": "n", "site": "s", "strategies": {"x": {}}}]}',
        b'{"version": 1, "sites": [{"network": "n", "site": "s", "strategies": '
        b'{"x": {"ok": "yesterday", "fail": null, "outcome": null, "fails": 0}}}]}',
        b'{"version": 1, "sites": [{"network": "n", "site": "s", "strategies": '
        b'{"x": {"ok": 1.0, "fail": null, "outcome": null, "fails": true}}}]}',
        b'{"version": 1, "sites": [], "unhealthy": [{"network": "n", "strategy": "x"}]}',
    ],
)
def test_learn_corrupt_file_is_moved_aside(
    tmp_path: Path, clock: FakeClock, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "learned.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="sidestep.learn"):
        m = memory(clock, path)
    assert len(m) == 0
    assert not path.exists()
    aside = tmp_path / f"learned.json.corrupt-{int(clock.now)}"
    assert aside.read_bytes() == content
    assert "moved it to" in caplog.text
    m.record_success(NET, "example.com", "front")
    m.save()
    assert memory(clock, path).known_good(NET, "example.com") == "front"


def test_learn_missing_file_starts_empty(tmp_path: Path, clock: FakeClock) -> None:
    m = memory(clock, tmp_path / "nope" / "learned.json")
    assert len(m) == 0
    assert not (tmp_path / "nope").exists()


def test_learn_maybe_save_is_debounced(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "learned.json"
    m = memory(clock, path, save_interval=30)
    assert m.maybe_save() is False  # nothing to save
    m.record_success(NET, "example.com", "front")
    assert m.maybe_save() is True
    m.record_success(NET, "example.org", "front")
    clock.now += 10
    assert m.maybe_save() is False
    clock.now += 20
    assert m.maybe_save() is True
    assert m.maybe_save() is False
    assert memory(clock, path).known_good(NET, "example.org") == "front"


def test_learn_maybe_save_failure_warns_once(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    m = memory(clock, blocker / "learned.json", save_interval=1)  # parent is a file
    with caplog.at_level(logging.WARNING, logger="sidestep.learn"):
        for _ in range(3):
            m.record_success(NET, "example.com", "front")
            clock.now += 2
            assert m.maybe_save() is False
    assert caplog.text.count("cannot save") == 1
    assert m.dirty


def test_learn_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        LearnedMemory(None, ttl=0)
    with pytest.raises(ValueError):
        LearnedMemory(None, max_sites=0)


# -- `sidestep learned` (proxy/learncli.py; kept here because the CLI module is a thin shell) ---


def run_learned(argv: list[str]) -> int:
    import argparse

    from proxy.learncli import add_learned_parser, learned_main

    parser = argparse.ArgumentParser(prog="sidestep")
    add_learned_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["learned", *argv])
    assert args.handler is learned_main
    return learned_main(args)


def saved_state(path: Path) -> None:
    import time

    m = LearnedMemory(path)
    now = time.time()
    m.record_failure(NET, "example.com", "direct", "sni-reset", at=now - 7200)
    m.record_failure(NET, "example.com", "direct", "sni-reset", at=now - 7100)
    m.record_success(NET, "example.com", "fragment", at=now - 7000)
    m.record_success("home", "example.org", "front", at=now - 30)
    m.save()


def test_learned_cli_lists_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "learned.json"
    saved_state(state)
    assert run_learned(["--state", str(state)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SITE", "NETWORK", "WORKS", "FAILED", "AGE"]
    assert lines[1].split() == ["example.org", "home", "front", "-", "30s"]
    assert lines[2].split() == [
        "example.com", NET, "fragment", "direct:", "sni-reset", "x2", "1h"
    ]  # fmt: skip


def test_learned_cli_json_and_network_filter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "learned.json"
    saved_state(state)
    assert run_learned(["--state", str(state), "--json", "--network", NET]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["site"] == "example.com"
    assert entry["works"] == "fragment"
    assert entry["failures"][0]["outcome"] == "sni-reset"


def test_learned_cli_forget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "learned.json"
    saved_state(state)
    assert run_learned(["--state", str(state), "--forget", "www.example.com"]) == 0
    assert "forgot www.example.com (1 entry)" in capsys.readouterr().out
    assert [e.site for e in LearnedMemory(state).entries()] == ["example.org"]
    assert run_learned(["--state", str(state), "--forget", "example.com"]) == 1
    err = capsys.readouterr().err
    assert err == "sidestep learned: nothing learned about example.com\n"


def test_learned_cli_empty_and_default_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.learncli import default_state_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "sidestep"
    assert run_learned([]) == 0
    assert "nothing learned yet" in capsys.readouterr().out
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "sidestep"


def test_learned_cli_state_is_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_learned(["--state", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_learned_cli_corrupt_state_is_set_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "learned.json"
    state.write_text("{garbage")
    assert run_learned(["--state", str(state)]) == 0
    assert "nothing learned yet" in capsys.readouterr().out
    assert [p.name.startswith("learned.json.corrupt-") for p in tmp_path.iterdir()] == [True]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
_record = st.fixed_dictionaries(
    {"ok": _json, "fail": _json, "outcome": _json, "fails": _json}
) | st.fixed_dictionaries(
    {
        "ok": st.none() | st.floats(1.6e9, 1.8e9),
        "fail": st.none() | st.floats(1.6e9, 1.8e9),
        "outcome": st.none() | st.text(max_size=6),
        "fails": st.integers(0, 5),
    }
)
_state_doc = st.fixed_dictionaries(
    {
        "version": st.just(1) | _json,
        "sites": st.lists(
            st.fixed_dictionaries(
                {
                    "network": st.text(max_size=4) | _json,
                    "site": st.text(max_size=4),
                    "strategies": st.dictionaries(st.text(max_size=4), _record, max_size=3),
                }
            ),
            max_size=3,
        )
        | _json,
    }
)


@given(_state_doc)
def test_learn_load_never_raises_and_keeps_or_sets_aside(doc: dict[str, object]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "learned.json"
        path.write_text(json.dumps(doc))
        clock = FakeClock()
        logging.getLogger("sidestep.learn").disabled = True
        try:
            m = memory(clock, path)
        finally:
            logging.getLogger("sidestep.learn").disabled = False
        if path.exists():  # accepted: it can be saved and loaded again unchanged
            before = m.entries()
            m.save()
            assert memory(clock, path).entries() == before
        else:
            assert len(m) == 0
        m.order(NET, "s", POLICY)


def test_learn_a_site_forgotten_by_another_process_stays_forgotten(tmp_path: Path) -> None:
    """`sidestep learned --forget` while the proxy runs: the proxy's next save keeps it gone."""
    path = tmp_path / "learned.json"
    running = LearnedMemory(path, clock=lambda: 1000.0)
    running.record_success("net", "blocked.example", "tor")
    running.record_success("net", "other.example", "tor")
    running.save()
    # another process (the CLI) forgets one site and saves
    cli = LearnedMemory(path, clock=lambda: 1000.0)
    assert cli.forget("blocked.example") == 1
    cli.save()
    # the proxy keeps learning about another site and saves again
    running.record_success("net", "third.example", "direct")
    running.save()
    sites = {e.site for e in LearnedMemory(path, clock=lambda: 1000.0).entries()}
    assert sites == {"other.example", "third.example"}


def test_learn_a_forgotten_site_learned_again_meanwhile_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "learned.json"
    running = LearnedMemory(path, clock=lambda: 1000.0)
    running.record_success("net", "blocked.example", "tor")
    running.save()
    cli = LearnedMemory(path, clock=lambda: 1000.0)
    cli.forget("blocked.example")
    cli.save()
    running.record_failure("net", "blocked.example", "direct", "connect-refused")
    running.save()
    sites = {e.site for e in LearnedMemory(path, clock=lambda: 1000.0).entries()}
    assert sites == {"blocked.example"}


def test_learned_carrier_limit_keeps_the_smallest_per_network_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "learned.json"
    memory = LearnedMemory(path, ttl=100.0, clock=lambda: 1000.0)
    assert memory.carrier_limit("home", "bridge 192.0.2.1:443") is None
    memory.record_carrier_limit("home", "bridge 192.0.2.1:443", 20000)
    memory.record_carrier_limit("home", "bridge 192.0.2.1:443", 16384)
    memory.record_carrier_limit("home", "bridge 192.0.2.1:443", 30000)  # a later, larger stall
    assert memory.carrier_limit("home", "bridge 192.0.2.1:443") == 16384
    assert memory.carrier_limit("cafe", "bridge 192.0.2.1:443") is None
    memory.save()
    again = LearnedMemory(path, ttl=100.0, clock=lambda: 1050.0)
    assert again.carrier_limit("home", "bridge 192.0.2.1:443") == 16384
    assert again.carrier_limit("home", "bridge 192.0.2.1:443", now=1200.0) is None  # expired
    later = LearnedMemory(path, ttl=100.0, clock=lambda: 1200.0)
    assert later.carrier_limit("home", "bridge 192.0.2.1:443") is None


def test_learn_reorders_only_what_it_knows_something_about(clock: FakeClock) -> None:
    # the router skips order() when this says it would keep the configured order
    m = memory(clock)
    assert not m.reorders(NET, "example.com")
    m.record_success(NET, "example.com", "front")
    assert m.reorders(NET, "example.com") and not m.reorders(NET, "other.org")
    m.mark_unhealthy(NET, "front")
    assert m.reorders(NET, "other.org")  # an unhealthy strategy moves back everywhere
