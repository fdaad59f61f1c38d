"""Router mode for real: two network namespaces, nftables from `sidestep router-rules`, curl.

The test builds its own little network: a "client" namespace whose default route is a
"router" namespace over a veth pair. In the router namespace run sidestep (a transparent
inbound on 0.0.0.0:1081, allowed only for the LAN 10.200.0.0/24), an honest resolver on its
loopback, and site.example on 198.51.100.1 ("the Internet", an address on the router's
loopback). `sidestep router-rules --apply` loads the redirect. The client has no proxy setting:
its connections are redirected, and sidestep names them by SNI / Host. The client is even given
a wrong address for site.example, as a poisoned resolver would, and still gets the real site.

Needs root, `ip` and `nft`; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CAN_NETNS = os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("nft") is not None
pytestmark = [
    pytest.mark.skipif(not CAN_NETNS, reason="needs root, ip and nft"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed"),
]

CONFIG = """
[[inbound]]
name = "transparent"
protocol = "transparent"
listen = "0.0.0.0:1081"
allow = ["10.200.0.0/24"]

[dns]
resolver = "udp"
servers = ["127.0.0.1:5353"]

[shutdown]
drain_timeout = 1
"""


def sh(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}: {proc.stderr or proc.stdout}")
    return proc


class Net:
    def __init__(self, tag: str) -> None:
        self.router = f"ssr{tag}"
        self.client = f"ssc{tag}"


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net(str(os.getpid() % 100000))
    vc, vr = f"{n.client}c", f"{n.router}r"
    try:
        sh("ip", "netns", "add", n.router)
        sh("ip", "netns", "add", n.client)
        sh("ip", "link", "add", vc, "type", "veth", "peer", "name", vr)
        sh("ip", "link", "set", vc, "netns", n.client)
        sh("ip", "link", "set", vr, "netns", n.router)
        for ns, dev, addr in ((n.client, vc, "10.200.0.2/24"), (n.router, vr, "10.200.0.1/24")):
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("ip", "addr", "add", addr, "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", "10.200.0.1", ns=n.client)
        sh("ip", "addr", "add", "198.51.100.1/32", "dev", "lo", ns=n.router)
        n.lan = vr  # type: ignore[attr-defined]
        yield n
    finally:
        sh("ip", "netns", "del", n.client, check=False)
        sh("ip", "netns", "del", n.router, check=False)


def start(ns: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_STATE_HOME": str(log.parent / "state")}
    with log.open("wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )


def wait_for(check: object, what: str, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not come up:\n{log.read_text()}")


def curl(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return sh("curl", "--silent", "--show-error", "--max-time", "10", *args, ns=ns, check=False)


def test_lan_client_without_proxy_settings_goes_through_sidestep(net: Net, tmp_path: Path) -> None:
    world_log, proxy_log = tmp_path / "world.log", tmp_path / "sidestep.log"
    world = start(net.router, ["-m", "tests.e2e.netns_world", str(tmp_path)], world_log)
    cfg = tmp_path / "router.toml"
    cfg.write_text(CONFIG)
    proxy = start(net.router, ["-m", "proxy", "run", "--config", str(cfg)], proxy_log)
    try:
        wait_for(lambda: "ready" in world_log.read_text(), "the far side", world_log)
        wait_for(lambda: "listening" in proxy_log.read_text(), "sidestep", proxy_log)
        ca = str(tmp_path / "ca.pem")
        poisoned = "site.example:443:198.51.100.99"

        # before the rules: the poisoned address leads nowhere
        assert (
            curl(
                net.client, "--cacert", ca, "--resolve", poisoned, "https://site.example/"
            ).returncode
            != 0
        )

        rules = [sys.executable, "-m", "proxy", "router-rules", "--config", str(cfg)]
        printed = sh(*rules, "--lan", net.lan, ns=net.router)  # type: ignore[attr-defined]
        assert "redirect to :1081" in printed.stdout
        sh(*rules, "--lan", net.lan, "--apply", ns=net.router)  # type: ignore[attr-defined]
        listed = sh("nft", "list", "table", "inet", "sidestep", ns=net.router)
        assert "redirect to :1081" in listed.stdout

        # TLS, named by SNI: the poisoned address is ignored, sidestep resolves the name itself
        got = curl(net.client, "--cacert", ca, "--resolve", poisoned, "https://site.example/")
        assert got.returncode == 0, got.stderr + proxy_log.read_text()
        assert got.stdout == "hello from site.example (host site.example)\n"
        # plain HTTP, named by the Host header
        got = curl(net.client, "-H", "Host: site.example", "http://198.51.100.77/")
        assert got.stdout == "hello from site.example (host site.example)\n"
        # no name at all (an IP literal Host): the original destination is used
        got = curl(net.client, "http://198.51.100.1/")
        assert got.stdout.startswith("hello from site.example")
        log = proxy_log.read_text()
        assert "-> site.example:443 via transparent/transparent" in log

        # connecting to the transparent port directly is not a way to use sidestep
        direct = curl(net.client, "-H", "Host: site.example", "http://10.200.0.1:1081/")
        assert direct.returncode != 0
        assert "connected directly, not through a firewall redirect" in proxy_log.read_text()

        # removing the rules restores the network as it was
        removed = sh(*rules, "--remove", ns=net.router)
        assert "removed" in removed.stdout
        assert sh("nft", "list", "tables", ns=net.router).stdout.strip() == ""
        after = curl(net.client, "--cacert", ca, "--resolve", poisoned, "https://site.example/")
        assert after.returncode != 0
    finally:
        for proc in (proxy, world):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
