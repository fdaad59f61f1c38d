"""`sidestep system-proxy` against the real desktop tools (gsettings, kwriteconfig5).

gsettings writes to a keyfile under a temporary XDG_CONFIG_HOME (GSETTINGS_BACKEND=keyfile), and
kwriteconfig5 to a temporary kioslaverc, so the tests change nothing on the machine. macOS and
Windows cannot run here: their output parsing and registry values are checked as functions.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.sysproxy import (
    Target,
    parse_network_services,
    parse_networksetup_proxy,
    windows_values,
)
from tests.e2e.conftest import free_port, wait_port

HAS_GNOME_SCHEMA = shutil.which("gsettings") is not None and "org.gnome.system.proxy" in (
    subprocess.run(["gsettings", "list-schemas"], capture_output=True, text=True).stdout
    if shutil.which("gsettings")
    else ""
)
requires_gsettings = pytest.mark.skipif(
    not HAS_GNOME_SCHEMA, reason="gsettings with the GNOME proxy schema not installed"
)
requires_kde = pytest.mark.skipif(
    shutil.which("kwriteconfig5") is None, reason="kwriteconfig5 not installed"
)


@pytest.fixture
def desktop(tmp_path: Path) -> dict[str, str]:
    """An environment whose desktop settings live in tmp_path."""
    env = {
        **os.environ,
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "GSETTINGS_BACKEND": "keyfile",
    }
    env.pop("DBUS_SESSION_BUS_ADDRESS", None)
    (tmp_path / "config").mkdir()
    return env


def sidestep(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def gsettings(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(["gsettings", *args], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def write_config(tmp_path: Path, port: int, protocol: str = "mixed") -> Path:
    cfg = tmp_path / "sidestep.toml"
    cfg.write_text(
        f'[[inbound]]\nname = "main"\nprotocol = "{protocol}"\nlisten = "127.0.0.1:{port}"\n'
        "[shutdown]\ndrain_timeout = 1\n"
    )
    return cfg


@requires_gsettings
def test_gnome_on_off_restores_the_users_own_proxy(tmp_path: Path, desktop: dict[str, str]) -> None:
    # the user had their own proxy configured before
    gsettings(desktop, "set", "org.gnome.system.proxy", "mode", "manual")
    gsettings(desktop, "set", "org.gnome.system.proxy.http", "host", "10.9.9.9")
    gsettings(desktop, "set", "org.gnome.system.proxy.http", "port", "3128")
    gsettings(desktop, "set", "org.gnome.system.proxy", "ignore-hosts", "['intranet.example']")
    before = {
        (s, k): gsettings(desktop, "get", s, k)
        for s, k in [
            ("org.gnome.system.proxy", "mode"),
            ("org.gnome.system.proxy", "ignore-hosts"),
            ("org.gnome.system.proxy.http", "host"),
            ("org.gnome.system.proxy.http", "port"),
            ("org.gnome.system.proxy.socks", "host"),
        ]
    }
    cfg = write_config(tmp_path, 18999)

    on = sidestep(desktop, "system-proxy", "on", "--config", str(cfg), "--backend", "gnome")
    assert on.returncode == 0, on.stderr
    assert gsettings(desktop, "get", "org.gnome.system.proxy", "mode") == "'manual'"
    assert gsettings(desktop, "get", "org.gnome.system.proxy.http", "host") == "'127.0.0.1'"
    assert gsettings(desktop, "get", "org.gnome.system.proxy.https", "port") == "18999"
    assert "127.0.0.0/8" in gsettings(desktop, "get", "org.gnome.system.proxy", "ignore-hosts")
    state = Path(desktop["XDG_STATE_HOME"]) / "sidestep" / "system-proxy.json"
    assert state.stat().st_mode & 0o777 == 0o600

    # on again (e.g. after a crash) must not save sidestep's own settings as "the original"
    again = sidestep(desktop, "system-proxy", "on", "--config", str(cfg), "--backend", "gnome")
    assert "already on" in again.stdout
    status = sidestep(desktop, "system-proxy", "status", "--backend", "gnome")
    assert "set by sidestep: yes, pointing at 127.0.0.1:18999" in status.stdout

    off = sidestep(desktop, "system-proxy", "off", "--backend", "gnome")
    assert off.returncode == 0 and "restored" in off.stdout
    assert {(s, k): gsettings(desktop, "get", s, k) for s, k in before} == before
    assert not state.exists()
    nothing = sidestep(desktop, "system-proxy", "off", "--backend", "gnome")
    assert "nothing to restore" in nothing.stdout


@requires_gsettings
def test_gnome_pac_mode(tmp_path: Path, desktop: dict[str, str]) -> None:
    cfg = write_config(tmp_path, 18998)
    on = sidestep(
        desktop, "system-proxy", "on", "--pac", "--config", str(cfg), "--backend", "gnome"
    )
    assert on.returncode == 0, on.stderr
    assert gsettings(desktop, "get", "org.gnome.system.proxy", "mode") == "'auto'"
    url = gsettings(desktop, "get", "org.gnome.system.proxy", "autoconfig-url")
    assert url == "'http://127.0.0.1:18998/proxy.pac'"
    assert sidestep(desktop, "system-proxy", "off", "--backend", "gnome").returncode == 0
    assert gsettings(desktop, "get", "org.gnome.system.proxy", "mode") == "'none'"


@requires_gsettings
def test_run_with_system_proxy_restores_on_exit(tmp_path: Path, desktop: dict[str, str]) -> None:
    port = free_port()
    cfg = write_config(tmp_path, port)
    env = {**desktop, "XDG_CURRENT_DESKTOP": "GNOME"}
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(cfg), "--system-proxy", "proxy"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_port(port, proc, log)
        assert gsettings(env, "get", "org.gnome.system.proxy", "mode") == "'manual'"
        assert gsettings(env, "get", "org.gnome.system.proxy.http", "port") == str(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert gsettings(env, "get", "org.gnome.system.proxy", "mode") == "'none'"
    assert gsettings(env, "get", "org.gnome.system.proxy.http", "port") == "8080"  # the default


@requires_kde
def test_kde_on_off(tmp_path: Path, desktop: dict[str, str]) -> None:
    rc = Path(desktop["XDG_CONFIG_HOME"]) / "kioslaverc"
    rc.write_text("[Proxy Settings]\nProxyType=0\nNoProxyFor=intranet.example\n")
    cfg = write_config(tmp_path, 18997, protocol="socks5")

    on = sidestep(desktop, "system-proxy", "on", "--config", str(cfg), "--backend", "kde")
    assert on.returncode == 0, on.stderr
    text = rc.read_text()
    assert "ProxyType=1" in text
    assert "socksProxy=socks://127.0.0.1 18997" in text
    assert "httpProxy" not in text  # a socks5-only inbound is not an HTTP proxy

    off = sidestep(desktop, "system-proxy", "off", "--backend", "kde")
    assert off.returncode == 0, off.stderr
    text = rc.read_text()
    assert "ProxyType=0" in text
    assert "NoProxyFor=intranet.example" in text
    assert "socksProxy" not in text  # it was not there before, so it is removed


def test_config_without_a_usable_inbound_is_one_clear_line(
    tmp_path: Path, desktop: dict[str, str]
) -> None:
    cfg = write_config(tmp_path, 18996, protocol="socks4")
    out = sidestep(desktop, "system-proxy", "on", "--config", str(cfg), "--backend", "gnome")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "sidestep: the config has no mixed, http or socks5 inbound to point the system at"
    )
    assert "Traceback" not in out.stderr


def test_networksetup_parsing() -> None:
    services = "An asterisk (*) denotes that a network service is disabled.\nWi-Fi\n*Bluetooth PAN\nUSB 10/100/1000 LAN\n"
    assert parse_network_services(services) == ["Wi-Fi", "USB 10/100/1000 LAN"]
    web = "Enabled: Yes\nServer: 10.0.0.1\nPort: 3128\nAuthenticated Proxy Enabled: 0\n"
    assert parse_networksetup_proxy(web) == {
        "Enabled": "Yes",
        "Server": "10.0.0.1",
        "Port": "3128",
        "Authenticated Proxy Enabled": "0",
    }
    assert parse_networksetup_proxy("URL: (null)\nEnabled: No\n") == {
        "URL": "(null)",
        "Enabled": "No",
    }


def test_windows_registry_values() -> None:
    mixed = Target("127.0.0.1", 1080, http=True, socks=True)
    assert windows_values(mixed) == {
        "ProxyEnable": 1,
        "ProxyServer": "127.0.0.1:1080",
        "ProxyOverride": "<local>;localhost;127.0.0.0/8;::1",
        "AutoConfigURL": None,
    }
    socks = Target("::1", 1080, http=False, socks=True)
    assert windows_values(socks)["ProxyServer"] == "socks=[::1]:1080"
    pac = Target("127.0.0.1", 1080, True, True, "http://127.0.0.1:1080/proxy.pac")
    assert windows_values(pac) == {
        "ProxyEnable": 0,
        "AutoConfigURL": "http://127.0.0.1:1080/proxy.pac",
    }
