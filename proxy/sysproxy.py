"""``sidestep system-proxy on|off|status``: point the operating system's proxy setting at sidestep.

Browsers and most desktop programs follow the system proxy setting, so turning it on is all a
laptop user has to do. Each platform keeps it somewhere else:

======== ======================================================================================
gnome    ``gsettings``, schema ``org.gnome.system.proxy`` (GNOME, Cinnamon, Budgie, MATE's GIO
         apps, Chromium and Firefox on those desktops)
kde      ``kioslaverc`` ``[Proxy Settings]`` through ``kwriteconfig5``/``kwriteconfig6``, then a
         D-Bus signal so running KDE programs re-read it
macos    ``networksetup`` for every enabled network service (Wi-Fi, Ethernet, ...)
windows  the WinINet keys under ``HKCU\\...\\Internet Settings``, then ``InternetSetOption`` so
         running programs notice
======== ======================================================================================

Turning it on first saves what was there (the whole previous state, as the platform's own
values) to ``system-proxy.json`` in the state directory, created 0600. ``off`` puts exactly that
back and deletes the file; ``on`` while already on re-applies without overwriting the saved
state, so the user's original settings are never lost. ``sidestep run --system-proxy`` turns it
on after start and off on exit; if sidestep is killed, ``sidestep system-proxy off`` restores.

The proxy given to the system is sidestep's first inbound that can serve it (mixed, http or
socks5), or with ``--pac`` the PAC URL on an HTTP-speaking inbound, so only the names the rules
send through sidestep use it. Loopback addresses are always excluded from proxying.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy.config import Config, InboundConfig, load_config, parse_listen
from proxy.errors import ConfigError
from proxy.learncli import default_state_dir

__all__ = [
    "BACKENDS",
    "SystemProxyError",
    "Target",
    "add_system_proxy_parser",
    "choose_backend",
    "target_from_config",
    "turn_off",
    "turn_on",
]

STATE_FILE = "system-proxy.json"
#: never proxied, whatever the platform calls them
BYPASS = ("localhost", "127.0.0.0/8", "::1")


class SystemProxyError(Exception):
    """A platform tool failed or is missing; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Target:
    """What the system should use: sidestep's address, and the kinds of proxy it speaks."""

    host: str
    port: int
    #: the inbound speaks HTTP proxy (CONNECT and plain requests)
    http: bool
    #: the inbound speaks SOCKS5
    socks: bool
    #: use this PAC URL instead of a fixed proxy
    pac_url: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def target_from_config(config: Config, *, pac: bool = False) -> Target:
    """The first inbound the system can use; a wildcard listen address is reached on loopback."""
    usable = [i for i in config.inbound if i.protocol in ("mixed", "http", "socks5")]
    if pac:
        usable = [i for i in usable if i.protocol in ("mixed", "http")]
    if not usable:
        kinds = "mixed or http" if pac else "mixed, http or socks5"
        raise SystemProxyError(f"the config has no {kinds} inbound to point the system at")
    inbound: InboundConfig = usable[0]
    host, port = parse_listen(inbound.listen)
    if host in ("0.0.0.0", "localhost"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    http = inbound.protocol in ("mixed", "http")
    socks = inbound.protocol in ("mixed", "socks5")
    target = Target(host, port, http, socks)
    if pac:
        target = Target(host, port, http, socks, f"http://{target.address}/proxy.pac")
    return target


Runner = Callable[[Sequence[str]], str]


def run_tool(args: Sequence[str]) -> str:
    """Run a platform tool; its stdout, or :class:`SystemProxyError` with its complaint."""
    try:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=20, check=False)
    except FileNotFoundError:
        raise SystemProxyError(f"{args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise SystemProxyError(f"{args[0]} did not finish in 20 s") from None
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()
        raise SystemProxyError(
            f"{' '.join(args[:3])} failed: {why[-1] if why else proc.returncode}"
        )
    return proc.stdout


class Backend(Protocol):
    name: str

    def snapshot(self) -> dict[str, Any]:
        """The current settings, JSON-serialisable, in a form :meth:`restore` puts back."""
        ...

    def apply(self, target: Target) -> None: ...

    def restore(self, saved: dict[str, Any]) -> None: ...

    def describe(self) -> list[str]:
        """The current settings as lines for ``status``."""
        ...


# --- GNOME -------------------------------------------------------------------------------------

_GNOME = "org.gnome.system.proxy"
_GNOME_KEYS = (
    (_GNOME, "mode"),
    (_GNOME, "autoconfig-url"),
    (_GNOME, "ignore-hosts"),
    (f"{_GNOME}.http", "host"),
    (f"{_GNOME}.http", "port"),
    (f"{_GNOME}.https", "host"),
    (f"{_GNOME}.https", "port"),
    (f"{_GNOME}.socks", "host"),
    (f"{_GNOME}.socks", "port"),
)


def gvariant_string(text: str) -> str:
    """``text`` as a GVariant string literal for ``gsettings set``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class GnomeBackend:
    name = "gnome"

    def __init__(self, run: Runner = run_tool) -> None:
        self.run = run

    def snapshot(self) -> dict[str, Any]:
        return {
            f"{schema} {key}": self.run(["gsettings", "get", schema, key]).strip()
            for schema, key in _GNOME_KEYS
        }

    def _set(self, schema: str, key: str, value: str) -> None:
        self.run(["gsettings", "set", schema, key, value])

    def apply(self, target: Target) -> None:
        bypass = "[" + ", ".join(gvariant_string(h) for h in BYPASS) + "]"
        self._set(_GNOME, "ignore-hosts", bypass)
        if target.pac_url:
            self._set(_GNOME, "autoconfig-url", gvariant_string(target.pac_url))
            self._set(_GNOME, "mode", "'auto'")
            return
        empty, none = gvariant_string(""), "0"
        for schema, wanted in (("http", target.http), ("https", target.http)):
            self._set(
                f"{_GNOME}.{schema}", "host", gvariant_string(target.host) if wanted else empty
            )
            self._set(f"{_GNOME}.{schema}", "port", str(target.port) if wanted else none)
        # with an HTTP proxy set, GIO sends everything through it; SOCKS only for socks-only
        socks = target.socks and not target.http
        self._set(f"{_GNOME}.socks", "host", gvariant_string(target.host) if socks else empty)
        self._set(f"{_GNOME}.socks", "port", str(target.port) if socks else none)
        self._set(_GNOME, "mode", "'manual'")

    def restore(self, saved: dict[str, Any]) -> None:
        # mode last, so no program sees a half-restored manual setting
        for name, value in sorted(saved.items(), key=lambda kv: kv[0] == f"{_GNOME} mode"):
            schema, _, key = name.partition(" ")
            self._set(schema, key, str(value))

    def describe(self) -> list[str]:
        return [f"{name}: {value}" for name, value in self.snapshot().items()]


# --- KDE ---------------------------------------------------------------------------------------

_KDE_KEYS = (
    "ProxyType",
    "Proxy Config Script",
    "httpProxy",
    "httpsProxy",
    "socksProxy",
    "NoProxyFor",
)


class KdeBackend:
    name = "kde"

    def __init__(self, run: Runner = run_tool) -> None:
        self.run = run
        six = shutil.which("kwriteconfig6") is not None
        self.write_tool = "kwriteconfig6" if six else "kwriteconfig5"
        self.read_tool = "kreadconfig6" if six else "kreadconfig5"

    def _args(self, key: str) -> list[str]:
        return ["--file", "kioslaverc", "--group", "Proxy Settings", "--key", key]

    def snapshot(self) -> dict[str, Any]:
        # kreadconfig prints an empty line for a missing key; "" is restored as "delete"
        return {key: self.run([self.read_tool, *self._args(key)]).rstrip("\n") for key in _KDE_KEYS}

    def _write(self, key: str, value: str) -> None:
        if value == "":
            self.run([self.write_tool, *self._args(key), "--delete"])
        else:
            self.run([self.write_tool, *self._args(key), value])

    def apply(self, target: Target) -> None:
        values = {key: "" for key in _KDE_KEYS}
        values["NoProxyFor"] = ",".join(BYPASS)
        if target.pac_url:
            values["ProxyType"] = "2"
            values["Proxy Config Script"] = target.pac_url
        else:
            values["ProxyType"] = "1"
            host = f"[{target.host}]" if ":" in target.host else target.host
            if target.http:
                values["httpProxy"] = values["httpsProxy"] = f"http://{host} {target.port}"
            if target.socks:
                values["socksProxy"] = f"socks://{host} {target.port}"
        self.restore(values)

    def restore(self, saved: dict[str, Any]) -> None:
        for key in _KDE_KEYS:
            if key != "ProxyType":
                self._write(key, str(saved.get(key, "")))
        self._write("ProxyType", str(saved.get("ProxyType", "")))
        _notify_kde()

    def describe(self) -> list[str]:
        return [f"{key}: {value or '(unset)'}" for key, value in self.snapshot().items()]


def _notify_kde() -> None:
    """Ask running KDE programs to re-read their proxy settings (best effort: no session bus
    means no running KDE program to tell)."""
    if shutil.which("dbus-send") is None or not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return
    subprocess.run(
        ["dbus-send", "--type=signal", "/KIO/Scheduler",
         "org.kde.KIO.Scheduler.reparseSlaveConfiguration", "string:"],
        capture_output=True, timeout=5, check=False,
    )  # fmt: skip


# --- macOS -------------------------------------------------------------------------------------

_MAC_KINDS = ("webproxy", "securewebproxy", "socksfirewallproxy")


def parse_networksetup_proxy(text: str) -> dict[str, str]:
    """``networksetup -getwebproxy`` style output -> {"Enabled": "Yes", "Server": ..., ...}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_network_services(text: str) -> list[str]:
    """``networksetup -listallnetworkservices`` -> enabled service names (disabled ones start
    with ``*``; the first line is an explanation)."""
    lines = text.splitlines()[1:]
    return [line for line in lines if line.strip() and not line.startswith("*")]


class MacBackend:
    name = "macos"

    def __init__(self, run: Runner = run_tool) -> None:
        self.run = run

    def _services(self) -> list[str]:
        return parse_network_services(self.run(["networksetup", "-listallnetworkservices"]))

    def snapshot(self) -> dict[str, Any]:
        saved: dict[str, Any] = {}
        for service in self._services():
            entry = {
                kind: parse_networksetup_proxy(self.run(["networksetup", f"-get{kind}", service]))
                for kind in _MAC_KINDS
            }
            entry["autoproxyurl"] = parse_networksetup_proxy(
                self.run(["networksetup", "-getautoproxyurl", service])
            )
            saved[service] = entry
        return saved

    def apply(self, target: Target) -> None:
        for service in self._services():
            if target.pac_url:
                self.run(["networksetup", "-setautoproxyurl", service, target.pac_url])
                self.run(["networksetup", "-setautoproxystate", service, "on"])
                for kind in _MAC_KINDS:
                    self.run(["networksetup", f"-set{kind}state", service, "off"])
                continue
            self.run(["networksetup", "-setautoproxystate", service, "off"])
            self.run(["networksetup", "-setproxybypassdomains", service, *BYPASS])
            wanted = {"webproxy": target.http, "securewebproxy": target.http}
            wanted["socksfirewallproxy"] = target.socks and not target.http
            for kind, on in wanted.items():
                if on:
                    self.run(
                        ["networksetup", f"-set{kind}", service, target.host, str(target.port)]
                    )
                self.run(["networksetup", f"-set{kind}state", service, "on" if on else "off"])

    def restore(self, saved: dict[str, Any]) -> None:
        present = set(self._services())
        for service, entry in saved.items():
            if service not in present:
                continue
            for kind in _MAC_KINDS:
                old = entry.get(kind, {})
                server, port = old.get("Server", ""), old.get("Port", "0")
                if server and port.isdigit() and int(port) > 0:
                    self.run(["networksetup", f"-set{kind}", service, server, port])
                state = "on" if old.get("Enabled") == "Yes" else "off"
                self.run(["networksetup", f"-set{kind}state", service, state])
            auto = entry.get("autoproxyurl", {})
            url = auto.get("URL", "")
            if url and url != "(null)":
                self.run(["networksetup", "-setautoproxyurl", service, url])
            state = "on" if auto.get("Enabled") == "Yes" else "off"
            self.run(["networksetup", "-setautoproxystate", service, state])

    def describe(self) -> list[str]:
        lines = []
        for service, entry in self.snapshot().items():
            for kind, values in entry.items():
                shown = ", ".join(f"{k}={v}" for k, v in values.items())
                lines.append(f"{service} {kind}: {shown}")
        return lines


# --- Windows -----------------------------------------------------------------------------------

_WIN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Internet Settings"
_WIN_VALUES = ("ProxyEnable", "ProxyServer", "ProxyOverride", "AutoConfigURL")


def windows_values(target: Target) -> dict[str, int | str | None]:
    """The WinINet registry values for ``target`` (None: delete the value)."""
    if target.pac_url:
        return {"ProxyEnable": 0, "AutoConfigURL": target.pac_url}
    # "host:port" is an HTTP proxy for every scheme; a socks-only inbound must say so
    server = target.address if target.http else f"socks={target.address}"
    return {
        "ProxyEnable": 1,
        "ProxyServer": server,
        "ProxyOverride": ";".join(("<local>", *BYPASS)),
        "AutoConfigURL": None,
    }


class WindowsBackend:
    name = "windows"

    def _key(self, write: bool) -> Any:
        import winreg  # type: ignore[import-not-found,unused-ignore]

        access = winreg.KEY_READ | (winreg.KEY_SET_VALUE if write else 0)
        return winreg.OpenKey(winreg.HKEY_CURRENT_USER, _WIN_KEY, 0, access)

    def snapshot(self) -> dict[str, Any]:
        import winreg  # type: ignore[import-not-found,unused-ignore]

        saved: dict[str, Any] = {}
        with self._key(False) as key:
            for name in _WIN_VALUES:
                try:
                    saved[name] = winreg.QueryValueEx(key, name)[0]
                except FileNotFoundError:
                    saved[name] = None
        return saved

    def apply(self, target: Target) -> None:
        self.restore(windows_values(target))

    def restore(self, saved: dict[str, Any]) -> None:
        import ctypes
        import winreg  # type: ignore[import-not-found,unused-ignore]

        with self._key(True) as key:
            for name, value in saved.items():
                if value is None:
                    try:
                        winreg.DeleteValue(key, name)
                    except FileNotFoundError:
                        pass
                elif isinstance(value, int):
                    winreg.SetValueEx(key, name, 0, winreg.REG_DWORD, value)
                else:
                    winreg.SetValueEx(key, name, 0, winreg.REG_SZ, str(value))
        wininet = ctypes.windll.wininet  # type: ignore[attr-defined,unused-ignore]
        wininet.InternetSetOptionW(None, 39, None, 0)  # INTERNET_OPTION_SETTINGS_CHANGED
        wininet.InternetSetOptionW(None, 37, None, 0)  # INTERNET_OPTION_REFRESH

    def describe(self) -> list[str]:
        return [f"{name}: {value}" for name, value in self.snapshot().items()]


BACKENDS: dict[str, Callable[[], Backend]] = {
    "gnome": GnomeBackend,
    "kde": KdeBackend,
    "macos": MacBackend,
    "windows": WindowsBackend,
}


def choose_backend(name: str | None = None) -> Backend:
    """The backend ``name``, or the one for this platform and desktop."""
    if name is None:
        if sys.platform == "win32":
            name = "windows"
        elif sys.platform == "darwin":
            name = "macos"
        elif "KDE" in os.environ.get("XDG_CURRENT_DESKTOP", "").upper().split(":"):
            name = "kde"
        elif shutil.which("gsettings"):
            name = "gnome"
        else:
            raise SystemProxyError(
                "no supported desktop found (GNOME/gsettings, KDE, macOS, Windows); set the "
                "proxy by hand, or use --backend"
            )
    return BACKENDS[name]()


# --- on / off / status, with the saved state -----------------------------------------------------


def _state_path(state_dir: Path | None) -> Path:
    return (state_dir or default_state_dir()) / STATE_FILE


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SystemProxyError(f"{path}: cannot read the saved settings: {exc}") from None
    if not isinstance(data, dict) or "backend" not in data or "previous" not in data:
        raise SystemProxyError(f"{path}: not a saved system-proxy state")
    return data


def _write_state(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def turn_on(target: Target, backend: Backend, *, state_dir: Path | None = None) -> bool:
    """Save the current settings (unless sidestep already did) and apply ``target``.

    Returns False when sidestep had already turned it on (the original settings are kept).
    """
    path = _state_path(state_dir)
    saved = _read_state(path)
    fresh = saved is None
    if saved is None or saved["backend"] != backend.name:
        saved = {"backend": backend.name, "previous": backend.snapshot()}
        _write_state(path, saved)
    saved["target"] = target.pac_url or target.address
    _write_state(path, saved)
    try:
        backend.apply(target)
    except SystemProxyError:
        if fresh:
            backend.restore(saved["previous"])
            path.unlink(missing_ok=True)
        raise
    return fresh


def turn_off(backend: Backend | None = None, *, state_dir: Path | None = None) -> bool:
    """Put back the settings saved by :func:`turn_on`; False when there was nothing to restore."""
    path = _state_path(state_dir)
    saved = _read_state(path)
    if saved is None:
        return False
    if backend is None or backend.name != saved["backend"]:
        backend = BACKENDS[saved["backend"]]()
    backend.restore(saved["previous"])
    path.unlink(missing_ok=True)
    return True


def status(backend: Backend, *, state_dir: Path | None = None) -> list[str]:
    saved = _read_state(_state_path(state_dir))
    lines = [f"backend: {backend.name}"]
    if saved is not None:
        lines.append(f"set by sidestep: yes, pointing at {saved.get('target', '?')}")
    else:
        lines.append("set by sidestep: no")
    return lines + backend.describe()


# --- the command -------------------------------------------------------------------------------


def add_system_proxy_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "system-proxy",
        help="point the system's proxy setting at sidestep, or restore it",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("action", choices=["on", "off", "status"])
    p.add_argument("-c", "--config", metavar="FILE", help="the config sidestep runs with")
    p.add_argument("--pac", action="store_true", help="use the PAC file instead of a fixed proxy")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="override the detected platform")
    p.set_defaults(handler=run_system_proxy)


def run_system_proxy(args: argparse.Namespace) -> int:
    try:
        backend = choose_backend(args.backend)
        if args.action == "on":
            target = target_from_config(load_config(args.config), pac=args.pac)
            fresh = turn_on(target, backend)
            where = target.pac_url or target.address
            note = "" if fresh else " (already on; your original settings stay saved)"
            print(f"system proxy ({backend.name}) now points at sidestep: {where}{note}")
        elif args.action == "off":
            if turn_off(backend):
                print(f"system proxy ({backend.name}) restored to what it was before")
            else:
                print("sidestep has not changed the system proxy; nothing to restore")
        else:
            print("\n".join(status(backend)))
    except (SystemProxyError, ConfigError) as exc:
        print(f"sidestep: {exc}", file=sys.stderr)
        return 1
    return 0
