"""``sidestep probe SITE...`` and ``sidestep check`` end to end, inside the censor lab.

The commands run as a user runs them (the real CLI in a subprocess, through ``sidestep lab
--probe``), and in-process through :func:`proxy.checkcli.run_command` with the lab's
:func:`~proxy.lab.cli.probe_env` for the cases a subprocess would make slow. Nothing here leaves
127.0.0.0/8.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from proxy.checkcli import Progress, run_command
from proxy.cli import main
from proxy.config import default_config
from proxy.detect.siteprobe import Site, SiteReport, StrategyResult
from proxy.lab import world
from proxy.lab.ca import LabCA
from proxy.lab.cli import probe_env
from proxy.lab.world import open_lab

ROOT = Path(__file__).resolve().parents[2]
DOWN = "127.60.9.9"  # in the lab plan, but nothing listens there


def sidestep(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def test_probe_cli_in_the_tspu_lab_subprocess() -> None:
    done = sidestep(
        "lab", "--profile", "ru-tspu", "--timeout", "3", "--probe",
        world.BLOCKED, world.OPEN, "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["exit"] == 1 and doc["summary"] == {"direct": 1, "circumvented": 1, "unreachable": 0}
    blocked, opened = doc["sites"]
    assert blocked["site"].startswith(f"{world.BLOCKED}:")  # at the lab's https port
    assert (blocked["status"], blocked["verdict"]) == ("circumvented", "sni-reset")
    by = {s["strategy"]: s for s in blocked["strategies"]}
    assert by["direct"]["verdict"] == "sni-reset"
    assert by["tls-record-split"]["outcome"] == "ok" and by["tls-record-split"]["verdict"] == "ok"
    assert "tls-record-split" in blocked["working"]
    assert opened["status"] == "direct"
    # no TTY: one progress line per finished site on stderr
    assert done.stderr.count("[") == 2 and "reachable" in done.stderr


async def _run(
    lab_ca: LabCA, profile: str, sites: list[str] | str, **kw: object
) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    async with open_lab(profile, ca=lab_ca) as lab:
        env = probe_env(lab)
        code = await run_command(
            default_config(),
            sites,
            env=env,
            out=out,
            err=err,
            timeout=3.0,
            **kw,  # type: ignore[arg-type]
        )
    return code, out.getvalue(), err.getvalue()


async def test_probe_uncensored_site_alone_exits_0(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    code, out, err = await _run(lab_ca, "ru-tspu", [world.OPEN, f"http://{world.OPEN}"])
    assert code == 0, out + err
    # the lab's ports vary with what other labs on the machine hold
    assert re.search(r"^open\.lab:\d+ \(https\): reachable directly$", out, re.M)
    assert re.search(r"^open\.lab:\d+ \(http\): reachable directly$", out, re.M)
    assert out.rstrip().endswith(
        "2 reachable directly, 0 only through circumvention, 0 unreachable"
    )


async def test_probe_site_down_everywhere_exits_2(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    code, out, _ = await _run(lab_ca, "ru-tspu", [world.OPEN, DOWN], as_json=True)
    assert code == 2
    doc = json.loads(out)
    down = doc["sites"][1]
    assert (down["status"], down["verdict"]) == ("unreachable", "site-down")
    assert {s["verdict"] for s in down["strategies"]} <= {"site-down", "-"}


async def test_probe_strategies_option_limits_and_orders(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    code, out, _ = await _run(
        lab_ca, "ru-tspu", [world.BLOCKED], as_json=True, only=["tls-record-split", "direct"]
    )
    assert code == 1
    doc = json.loads(out)
    assert doc["strategies"] == ["tls-record-split", "direct"]
    assert [s["verdict"] for s in doc["sites"][0]["strategies"]] == ["ok", "sni-reset"]


async def test_check_in_the_lab_table_and_json(
    lab_ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    sites = f"# what to try\n{world.OPEN}\n{world.BLOCKED}  # listed\n"
    code, out, err = await _run(lab_ca, "ru-tspu", sites, dns=True, path="lab.toml")
    assert code == 1, out + err
    assert out.startswith("config: lab.toml is valid; strategies: direct, tls-record-split")
    assert "\nDNS\n" in out and "\nsites\n" in out
    rows = {
        line.split()[0].split(":")[0]: line.split()
        for line in out.splitlines()
        if line.startswith("  ") and ".lab:" in line
    }
    assert rows["open.lab"][1:3] == ["direct", "ok"]
    assert rows["blocked.lab"][1:3] == ["circumvented", "sni-reset"]
    assert "tls-record-split" in rows["blocked.lab"][3]
    assert err.count("\n") == 2  # one progress line per site

    code, out, _ = await _run(lab_ca, "ru-tspu", sites, dns=True, as_json=True)
    doc = json.loads(out)
    assert code == doc["exit"] == 1 and doc["valid"] is True
    assert "verdicts" in doc["dns"]
    assert [s["status"] for s in doc["sites"]] == ["direct", "circumvented"]


def test_bad_config_is_one_line_and_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[router]\nno_such_key = 1\n")
    for argv in (["check", str(bad)], ["probe", "open.lab", "-c", str(bad)]):
        assert main(argv) == 3
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no_such_key" in err and "Traceback" not in err
    sites = tmp_path / "sites.txt"
    sites.write_text("open.lab\nftp://nope\n")
    assert main(["check", "--sites", str(sites)]) == 3
    assert "line 2" in capsys.readouterr().err
    assert main(["check", "--sites", str(tmp_path / "missing.txt")]) == 3
    assert main(["probe", "ftp://x.lab"]) == 3
    assert main(["probe", "x.lab", "--strategies", "nope"]) == 3
    assert "unknown strategy 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", "x.lab", "--no-such-flag"])
    assert exit_info.value.code == 3


def test_probe_dns_and_bare_probe_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe"]) == 2  # the group's help, as before
    assert "probe" in capsys.readouterr().err


def test_progress_redraws_one_line_on_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(2, stream, tty=True)
    report = SiteReport(Site("a.lab", 443), (StrategyResult("direct", "ok", "ok", 0.1),),
                        plain=frozenset({"direct"}))  # fmt: skip
    progress.done(report)
    progress.close()
    text = stream.getvalue()
    assert "\n" not in text and "[1/2] a.lab:443: reachable directly" in text
    assert text.endswith("\r\033[K")


def test_lab_probe_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lab", "--probe", "x.lab", "--check", "some.toml"]) == 2
    assert "choose one" in capsys.readouterr().err
    assert main(["lab", "--probe", "ftp://x.lab"]) == 3
    assert "only http:// and https://" in capsys.readouterr().err
