"""The files in packaging/ are valid for the tools that will read them.

Each file is checked with the real tool where this machine has it (systemd-analyze, sh, nginx,
the system's python3 running the zipapp), and structurally otherwise (launchd plist, OpenWrt
Makefile, Containerfile). Every checker is also shown a broken copy, so a check that cannot fail
would be noticed.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.parsers.expat import ExpatError

import pytest

from proxy.lab.ca import LabCA

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
SIDESTEP = Path(sys.executable).with_name("sidestep")


def _run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False, **kwargs
    )


# --- systemd -----------------------------------------------------------------------------------

_SYSTEMD_COMPLAINTS = re.compile(r"Unknown (key|section)|Invalid|Failed to parse|not executable")


def _verify_unit(text: str, tmp_path: Path) -> str:
    """systemd-analyze's complaints about a unit file (empty when it is clean)."""
    unit = tmp_path / "sidestep.service"
    # the unit names the installed path; point it at this checkout's entry point
    unit.write_text(text.replace("/usr/bin/sidestep", str(SIDESTEP)))
    proc = _run("systemd-analyze", "verify", unit)
    out = proc.stdout + proc.stderr
    return "\n".join(line for line in out.splitlines() if _SYSTEMD_COMPLAINTS.search(line))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    text = (PACKAGING / "systemd" / "sidestep.service").read_text()
    assert _verify_unit(text, tmp_path) == ""
    broken = text.replace("ProtectSystem=strict", "ProtectSystm=strict")
    assert "Unknown key" in _verify_unit(broken, tmp_path)


def test_systemd_unit_is_hardened() -> None:
    text = (PACKAGING / "systemd" / "sidestep.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["DynamicUser"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes"
    assert set(settings["CapabilityBoundingSet"].split()) <= {
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_ADMIN",
    }
    assert settings["StateDirectory"] == "sidestep"
    assert settings["ExecReload"].endswith("-HUP $MAINPID")


# --- OpenWrt -----------------------------------------------------------------------------------


def test_openwrt_init_script_parses(tmp_path: Path) -> None:
    script = PACKAGING / "openwrt" / "files" / "sidestep.init"
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/bin/sh /etc/rc.common\n")
    assert _run("sh", "-n", script).returncode == 0
    broken = tmp_path / "broken.init"
    broken.write_text(script.read_text() + "\nif true; then\n")  # an if never closed
    assert _run("sh", "-n", broken).returncode != 0


def _makefile_problems(text: str, package_dir: Path) -> list[str]:
    problems = []
    defines = re.findall(r"^define ", text, re.M)
    if len(defines) != len(re.findall(r"^endef$", text, re.M)):
        problems.append("define/endef do not pair up")
    for name in ("PKG_NAME", "PKG_VERSION", "PKG_RELEASE", "PKG_LICENSE"):
        if not re.search(rf"^{name}:=\S", text, re.M):
            problems.append(f"{name} missing")
    if "$(eval $(call BuildPackage,sidestep))" not in text:
        problems.append("no BuildPackage call")
    in_recipe = False
    for line in text.splitlines():
        if re.match(r"define (Build|Package)/\S+/(install|Compile)|define Build/Compile", line):
            in_recipe = True
            continue
        if line == "endef":
            in_recipe = False
        elif in_recipe and line.strip() and not line.startswith("\t"):
            problems.append(f"recipe line without a tab: {line!r}")
    for ref in re.findall(r"\./(files/\S+)", text):
        if not (package_dir / ref).exists():
            problems.append(f"{ref} does not exist")
    return problems


def test_openwrt_makefile_is_well_formed() -> None:
    package_dir = PACKAGING / "openwrt"
    text = (package_dir / "Makefile").read_text()
    assert _makefile_problems(text, package_dir) == []
    broken = text.replace("\t$(INSTALL_DIR) $(1)/usr/bin", "    $(INSTALL_DIR) $(1)/usr/bin")
    assert _makefile_problems(broken, package_dir)
    uci = (package_dir / "files" / "sidestep.config").read_text()
    assert re.search(r"^config sidestep 'main'$", uci, re.M)
    assert "option enabled" in uci


def test_openwrt_ships_a_valid_config() -> None:
    """The package installs configs/router.toml as the router's config: it must load."""
    proc = _run(SIDESTEP, "config", "check", ROOT / "configs" / "router.toml")
    assert proc.returncode == 0, proc.stderr


# --- launchd, container --------------------------------------------------------------------------


def test_launchd_plist_loads() -> None:
    with (PACKAGING / "launchd" / "org.sidestep.proxy.plist").open("rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "org.sidestep.proxy"
    command = plist["ProgramArguments"]
    assert command[:2] == ["/bin/sh", "-c"]
    assert "sidestep run --config" in command[2]
    assert plist["RunAtLoad"] is True
    with pytest.raises((plistlib.InvalidFileException, ExpatError)):
        plistlib.loads(b"<plist><dict><key>Label</key></plist>")


_DOCKER_INSTRUCTIONS = {
    "FROM", "RUN", "COPY", "ADD", "ENV", "WORKDIR", "USER", "EXPOSE", "VOLUME", "ENTRYPOINT",
    "CMD", "ARG", "LABEL", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "ONBUILD",
}  # fmt: skip


def _containerfile_problems(text: str) -> list[str]:
    problems = []
    logical = re.sub(r"\\\n", " ", text)
    stages: list[dict[str, str]] = []
    for line in logical.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() not in _DOCKER_INSTRUCTIONS:
            problems.append(f"unknown instruction {word!r}")
            continue
        if word == "FROM":
            stages.append({})
        elif not stages:
            problems.append(f"{word} before FROM")
            continue
        else:
            stages[-1][word] = rest
        if word == "COPY" and "--from=" not in rest:
            for source in rest.split()[:-1]:
                if not (ROOT / source).exists():
                    problems.append(f"COPY source {source} does not exist")
    if len(stages) < 2:
        problems.append("not a multi-stage build")
    elif stages[-1].get("USER", "root") in ("root", "0"):
        problems.append("the final stage runs as root")
    return problems


def test_containerfile_is_multistage_and_non_root() -> None:
    text = (PACKAGING / "container" / "Containerfile").read_text()
    assert _containerfile_problems(text) == []
    assert "the final stage runs as root" in _containerfile_problems(
        text.replace("USER sidestep\n", "")
    )
    proc = _run(SIDESTEP, "config", "check", ROOT / "configs" / "container.toml")
    assert proc.returncode == 0, proc.stderr


# --- nginx ---------------------------------------------------------------------------------------


def _nginx_test(site: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` on a minimal main config that includes the bridge site and snippet."""
    issued = LabCA.create().issue("bridge.example")
    (tmp_path / "cert.pem").write_bytes(issued.cert_pem)
    (tmp_path / "key.pem").write_bytes(issued.key_pem)
    snippet = (PACKAGING / "nginx" / "sidestep-bridge-proxy.conf").read_text()
    (tmp_path / "snippet.conf").write_text(snippet)
    site = (
        site.replace(
            "/etc/nginx/snippets/sidestep-bridge-proxy.conf", str(tmp_path / "snippet.conf")
        )
        .replace("/etc/letsencrypt/live/bridge.example/fullchain.pem", str(tmp_path / "cert.pem"))
        .replace("/etc/letsencrypt/live/bridge.example/privkey.pem", str(tmp_path / "key.pem"))
    )
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
        "events {}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path};\n"
        f"  include {tmp_path}/site.conf;\n}}\n"
    )
    return _run("nginx", "-t", "-q", "-p", tmp_path, "-c", tmp_path / "nginx.conf")


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed")
def test_nginx_bridge_snippet_passes_nginx_t(tmp_path: Path) -> None:
    site = (PACKAGING / "nginx" / "sidestep-bridge.conf").read_text()
    proc = _nginx_test(site, tmp_path)
    assert proc.returncode == 0, proc.stderr
    broken = site.replace("location = /SECRET-PATH {", "location = /SECRET-PATH {{")
    assert _nginx_test(broken, tmp_path).returncode != 0


# --- zipapp --------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python3")
def test_zipapp_builds_and_runs_on_the_system_python(tmp_path: Path) -> None:
    """The single-file build runs on a Python that has none of our dependencies installed."""
    out = tmp_path / "sidestep.pyz"
    proc = _run(sys.executable, PACKAGING / "zipapp" / "build.py", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "cryptography" in proc.stdout  # named as left out: it must come from the system
    assert os.access(out, os.X_OK)
    # -I: isolated, so nothing from this virtualenv or the user's site-packages is used
    version = _run("/usr/bin/python3", "-I", out, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith("sidestep ")
    check = _run("/usr/bin/python3", "-I", out, "config", "check", ROOT / "configs" / "lan.toml")
    assert check.returncode == 0, check.stderr
    show = _run("/usr/bin/python3", "-I", out, "config", "show")
    assert show.returncode == 0, show.stderr
    assert 'listen = "127.0.0.1:1080"' in show.stdout
