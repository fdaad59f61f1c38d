"""The router end to end: real curl, two real sidestep processes, lab DNS servers.

The censored network is modelled with two resolvers: the one the client's sidestep uses (the
ISP's) answers an address nothing listens on for the blocked site, as if its IP were blocked;
the upstream sidestep (outside the censored network) resolves it honestly. So a direct attempt
is refused and the SOCKS5 upstream gets through.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from proxy.lab.dnsserver import DnsServer, Zone

from .conftest import Origins, curl, free_port, requires_curl, run_proxy

pytestmark = requires_curl


def evidence(state: Path) -> list[dict[str, object]]:
    path = state / "evidence.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_ip_blocked_site_falls_back_to_upstream_then_goes_straight_there(
    tmp_path: Path, origins: Origins, nursery: trio.Nursery
) -> None:
    isp = Zone("test").add("blocked.test", "127.66.0.1").add("open.test", "127.0.0.1")
    honest = Zone("test").add("blocked.test", "127.0.0.1").add("open.test", "127.0.0.1")
    isp_addr = await nursery.start(DnsServer(isp, ("127.53.1.1", 0)).serve)
    honest_addr = await nursery.start(DnsServer(honest, ("127.53.1.2", 0)).serve)
    up_port = free_port()
    upstream_cfg = f"""
[[inbound]]
name = "up"
protocol = "socks5"
listen = "127.0.0.1:{{port}}"
[dns]
resolver = "udp"
servers = ["{honest_addr[0]}:{honest_addr[1]}"]
"""
    client_cfg = f"""
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{{port}}"
[dns]
resolver = "udp"
servers = ["{isp_addr[0]}:{isp_addr[1]}"]
[[strategy]]
name = "vps"
type = "socks5"
server = "127.0.0.1:{up_port}"
[[policy]]
name = "censored"
strategies = ["direct", "vps"]
attempt_timeout = 3
[[rule]]
policy = "censored"
domain_suffix = ["test"]
"""
    port = origins.http[1]
    async with trio.open_nursery():
        with run_proxy(tmp_path, upstream_cfg, port=up_port), run_proxy(tmp_path, client_cfg) as p:
            # the open site works straight away, with no failed attempt
            r = await curl("--socks5-hostname", f"127.0.0.1:{p.port}", f"http://open.test:{port}/")
            assert r.stdout.startswith(b"hello from plain")
            # first visit to the blocked site: direct is refused, the upstream gets through
            r = await curl(
                "--socks5-hostname", f"127.0.0.1:{p.port}", f"http://blocked.test:{port}/"
            )
            assert r.stdout.startswith(b"hello from plain")
            await p.await_log("strategy=vps (after direct: ip-blocked)")
            events = evidence(p.state)
            assert [(e["strategy"], e["outcome"]) for e in events] == [
                ("direct", "ip-blocked"),
                ("vps", "recovered"),
            ]
            assert all(e["site"] == "blocked.test" for e in events)
            # second visit: the learned strategy goes first, no new direct attempt
            r = await curl(
                "--socks5-hostname", f"127.0.0.1:{p.port}", f"http://blocked.test:{port}/"
            )
            assert r.stdout.startswith(b"hello from plain")
            await p.await_log(f"blocked.test:{port} via mixed/socks5 sni=- strategy=vps up=")
            assert len(evidence(p.state)) == 2


async def test_on_all_failed_fail_closes_and_direct_falls_back(
    tmp_path: Path, origins: Origins
) -> None:
    dead = free_port()
    base = f"""
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{{port}}"
[[strategy]]
name = "dead"
type = "socks5"
server = "127.0.0.1:{dead}"
[[policy]]
name = "only-dead"
strategies = ["dead"]
on_all_failed = "ON_ALL_FAILED"
[router]
default_policy = "only-dead"
"""
    url = f"http://127.0.0.1:{origins.http[1]}/"
    with run_proxy(tmp_path, base.replace("ON_ALL_FAILED", "fail")) as p:
        r = await curl("--socks5-hostname", f"127.0.0.1:{p.port}", url, check=False)
        assert r.returncode != 0 and not r.stdout
        await p.await_log("all-failed")
    with run_proxy(tmp_path, base.replace("ON_ALL_FAILED", "direct")) as p:
        r = await curl("--socks5-hostname", f"127.0.0.1:{p.port}", url)
        assert r.stdout.startswith(b"hello from plain")
        await p.await_log("strategy=direct (after dead: ")


async def test_reload_under_load_drops_no_established_connection(
    tmp_path: Path, origins: Origins, ca_file: Path
) -> None:
    import hashlib
    import signal

    from proxy.lab.origin import pattern_bytes

    size = 24 * 1024 * 1024
    config = """
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{port}"
[[policy]]
name = "p"
strategies = ["direct"]
[[rule]]
policy = "p"
domain_suffix = ["RULE"]
"""
    url = f"https://localhost:{origins.https[1]}/bytes/{size}"
    with run_proxy(tmp_path, config.replace("RULE", "first.test")) as p:
        results: list[bytes] = []

        async def download(i: int) -> None:
            out = tmp_path / f"dl{i}"
            await curl(
                "--socks5-hostname",
                f"127.0.0.1:{p.port}",
                "--cacert",
                str(ca_file),
                "--limit-rate",
                "8M",
                "-o",
                str(out),
                url,
                timeout=60,
            )
            results.append(hashlib.sha256(out.read_bytes()).digest())

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(download, i)
            for n in range(3):
                await trio.sleep(0.5)
                p.config.write_text(
                    config.replace("RULE", f"reload{n}.test").replace("{port}", str(p.port))
                )
                p.proc.send_signal(signal.SIGHUP)
                with trio.fail_after(10):
                    while p.log_text().count("config reloaded") < n + 1:
                        await trio.sleep(0.02)
                assert len(results) < 6, "the downloads must still be running during reloads"
        expected = hashlib.sha256(pattern_bytes(size)).digest()
        assert results == [expected] * 6
        assert p.log_text().count("config reloaded") == 3


async def test_dead_upstream_failing_the_control_site_is_not_learned_as_a_block(
    tmp_path: Path, origins: Origins, nursery: trio.Nursery
) -> None:
    import signal
    import sys
    from typing import Any

    from proxy.learncli import LEARNED_FILE

    zone = Zone("test").add("open.test", "127.0.0.1")
    dns = await nursery.start(DnsServer(zone, ("127.53.1.3", 0)).serve)
    port = origins.http[1]
    config = f"""
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{{port}}"
[dns]
resolver = "udp"
servers = ["{dns[0]}:{dns[1]}"]
[[strategy]]
name = "dead"
type = "socks5"
server = "127.0.0.1:{free_port()}"
[[policy]]
name = "p"
strategies = ["dead", "direct"]
[router]
default_policy = "p"
CONTROL
"""
    learned: dict[str, list[Any]] = {}
    for name, control in (("control", f'control = ["127.0.0.1:{port}"]'), ("twin", "")):
        run_dir = tmp_path / name
        run_dir.mkdir()
        with run_proxy(run_dir, config.replace("CONTROL", control)) as p:
            url = f"http://open.test:{port}/"
            r = await curl("--socks5-hostname", f"127.0.0.1:{p.port}", url)
            assert r.stdout.startswith(b"hello from plain")
            await p.await_log("strategy=direct (after dead: ")
            if control:
                await p.await_log("strategy dead reaches no control site")
            p.proc.send_signal(signal.SIGTERM)  # the memory is saved at shutdown
            with trio.fail_after(10):
                while p.proc.poll() is None:
                    await trio.sleep(0.05)
            state = p.state / LEARNED_FILE
            shown = await trio.run_process(
                [sys.executable, "-m", "proxy", "learned", "--state", str(state), "--json"],
                capture_stdout=True,
            )
            learned[name] = json.loads(shown.stdout)
            if control:
                doc = json.loads(state.read_text())
                assert [u["strategy"] for u in doc["unhealthy"]] == ["dead"]
                assert evidence(p.state) == []  # a dead upstream is no evidence of a block
    # with a control: the site is known to work directly, and nothing failed for it
    (entry,) = learned["control"]
    assert (entry["site"], entry["works"], entry["failures"]) == ("open.test", "direct", [])
    # the no-control twin learns the dead upstream's failure as before
    (entry,) = learned["twin"]
    assert [f["strategy"] for f in entry["failures"]] == ["dead"]


async def test_list_file_next_to_config_and_missing_list_refused(
    tmp_path: Path, origins: Origins
) -> None:
    import signal

    dead = free_port()
    (tmp_path / "blocked.txt").write_text("# sites that must not go direct\nlocalhost\n")
    config = f"""
[[inbound]]
name = "mixed"
listen = "127.0.0.1:{{port}}"
[[strategy]]
name = "dead"
type = "socks5"
server = "127.0.0.1:{dead}"
[[policy]]
name = "via-dead"
strategies = ["dead"]
[[rule]]
policy = "via-dead"
domain_list = ["LIST"]
"""
    url_listed = f"http://localhost:{origins.http[1]}/"
    url_other = f"http://127.0.0.1:{origins.http[1]}/"
    with run_proxy(tmp_path, config.replace("LIST", "blocked.txt")) as p:
        # the relative list path is read next to the config: localhost goes to the dead upstream
        r = await curl("--socks5-hostname", f"127.0.0.1:{p.port}", url_listed, check=False)
        assert r.returncode != 0
        r = await curl("--socks5-hostname", f"127.0.0.1:{p.port}", url_other)
        assert r.stdout.startswith(b"hello from plain")
        # a reload naming a missing list is refused; the running rules stay
        p.config.write_text(config.replace("LIST", "missing.txt").replace("{port}", str(p.port)))
        p.proc.send_signal(signal.SIGHUP)
        text = await p.await_log("reload refused")
        assert "missing.txt" in text
        r = await curl("--socks5-hostname", f"127.0.0.1:{p.port}", url_other)
        assert r.stdout.startswith(b"hello from plain")
