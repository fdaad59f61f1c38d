"""A real browser: headless Chromium through sidestep into the censor lab, and on the status page.

Chromium's ClientHello is the one censors see from real users: large (a post-quantum key share
makes it well over a kilobyte), with GREASE and extension order of its own. Under ``ru-tspu``:

* ``blocked.lab`` is reset on its SNI: the built-in ``fragment`` policy gets through by cutting
  the hello into TLS records (the censor reads the first record only);
* ``throttled.lab`` is slowed to a crawl: a rule sends it to an upstream SOCKS5 proxy "abroad"
  (:class:`~proxy.lab.outside.OutsideProxy`), whose path the censor never sees;
* ``poisoned.lab`` gets the block page's address from the ISP resolver: sidestep looks names up
  over DNS-over-HTTPS at the lab's DoH service instead.

With ``--proxy-server=socks5://`` Chromium hands host names to the proxy, so all lookups are
sidestep's. The lab CA is trusted through an NSS database in a throwaway ``HOME`` (certutil),
or, without certutil, by its key's hash (``--ignore-certificate-errors-spki-list``). Nothing
may reach the real Internet: background services are switched off, and whatever Chromium
still asks for goes to sidestep, which only resolves inside the lab.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from proxy.config import Config, parse_config
from proxy.lab import world
from proxy.lab.ca import LabCA
from proxy.lab.outside import OutsideProxy
from proxy.lab.scenarios import RunningSidestep, open_sidestep
from proxy.lab.world import Lab, open_lab

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
CERTUTIL = shutil.which("certutil")

pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's chromium)"
    ),
    pytest.mark.slow,
]

#: keep a headless Chromium to itself: no sync, updates, first-run pages or other callers home
QUIET = (
    "--headless=new",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--disable-breakpad",
    "--metrics-recording-only",
    "--password-store=basic",
    "--use-mock-keychain",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
)


@dataclass
class Browser:
    """Runs headless Chromium with a fresh profile and ``HOME`` under ``home``."""

    home: Path
    extra: tuple[str, ...] = ()

    @classmethod
    def trusting(cls, home: Path, ca: LabCA, ca_file: Path) -> Browser:
        """A browser that trusts the lab CA."""
        home.mkdir(parents=True, exist_ok=True)
        if CERTUTIL is None:
            spki = x509.load_pem_x509_certificate(ca.cert_pem).public_key()
            der = spki.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            digest = base64.b64encode(hashlib.sha256(der).digest()).decode()
            return cls(home, (f"--ignore-certificate-errors-spki-list={digest}",))
        nssdb = home / ".pki" / "nssdb"
        nssdb.mkdir(parents=True)
        db = f"sql:{nssdb}"
        subprocess.run([CERTUTIL, "-d", db, "-N", "--empty-password"], check=True)
        subprocess.run(
            [CERTUTIL, "-d", db, "-A", "-t", "C,,", "-n", "sidestep lab", "-i", str(ca_file)],
            check=True,
        )
        return cls(home)

    async def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        assert CHROMIUM is not None
        argv = [
            CHROMIUM,
            *QUIET,
            f"--user-data-dir={self.home / 'profile'}",
            *self.extra,
            *args,
        ]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        env = {
            "HOME": str(self.home),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
        }
        with trio.fail_after(timeout):
            return await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False, env=env
            )

    async def dom(self, url: str, *, proxy: tuple[str, int] | None = None) -> str:
        """The page's DOM after load, as ``--dump-dom`` prints it."""
        args = [f"--proxy-server=socks5://{proxy[0]}:{proxy[1]}"] if proxy else []
        done = await self.run(*args, "--dump-dom", url)
        return done.stdout.decode(errors="replace")


def png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct row bytes) of an 8-bit RGB(A) PNG: enough to tell a real
    screenshot from a blank one."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    pixels = zlib.decompress(idat)
    return size[0], size[1], len(set(pixels))


# --- the lab world ------------------------------------------------------------------------------


def browser_config(outside: tuple[str, int], *, circumvent: bool = True) -> Config:
    """Blocked sites through the built-in fragment policy, throttled.lab abroad, names over
    DoH (``circumvent=False``: everything plain, the negative control)."""
    if not circumvent:
        plain = '[router]\ndefault_policy = "direct"\n[web]\nlisten = "127.0.0.1:0"\n'
        return parse_config(plain, "browser.toml")
    text = f"""
[[strategy]]
name = "outside"
type = "socks5"
server = "{outside[0]}:{outside[1]}"

[[policy]]
name = "abroad"
strategies = ["outside"]

[[rule]]
name = "slow-at-home"
policy = "abroad"
domain = ["{world.THROTTLED}"]

[router]
default_policy = "fragment"

[dns]
resolver = "secure"

[[dns.endpoints]]
url = "https://{world.FAMOUS_DOH}/dns-query"
bootstrap = ["{world.FAMOUS_DOH_IPS[0]}"]

[web]
listen = "127.0.0.1:0"
"""
    return parse_config(text, "browser.toml")


@dataclass
class World:
    lab: Lab
    side: RunningSidestep
    outside: OutsideProxy
    browser: Browser

    @property
    def web(self) -> str:
        address = self.side.app.web.address
        assert address is not None, "the status page did not start"
        return f"http://{address[0]}:{address[1]}/"

    async def page(self, name: str) -> str:
        return await self.browser.dom(self.lab.url(name), proxy=self.side.address)


@asynccontextmanager
async def browsing(tmp_path: Path, ca: LabCA, *, circumvent: bool = True) -> AsyncIterator[World]:
    async with open_lab("ru-tspu", ca=ca) as lab:
        outside = OutsideProxy(lab)
        address = await lab.start_service(outside.serve)
        config = browser_config(address, circumvent=circumvent)
        async with open_sidestep(lab, config) as side:
            browser = Browser.trusting(tmp_path / "browser", ca, lab.ca_file)
            yield World(lab, side, outside, browser)


def hello(name: str) -> str:
    return f"hello from {name} (host {name}"


# --- item 6: censored pages in a real browser ---------------------------------------------------


@pytest.mark.parametrize("name", [world.BLOCKED, world.THROTTLED, world.POISONED])
async def test_browser_loads_censored_page_through_sidestep(
    name: str, tmp_path: Path, lab_ca: LabCA
) -> None:
    async with browsing(tmp_path, lab_ca) as w:
        dom = await w.page(name)
        assert hello(name) in dom, dom[:2000]
        lines = [
            line
            for line in w.side.connections.lines.values()
            if str(line["target"]).startswith(f"{name}:")
        ]
        assert lines, "the page did not come through sidestep"
        # Chromium still asks for a few Google hosts at start (sign-in, updates); inside the
        # lab their names do not resolve, so nothing was ever dialled towards the Internet
        stray = [
            line
            for line in w.side.connections.lines.values()
            if not str(line["target"]).rsplit(":", 1)[0].endswith(".lab")
        ]
        assert all(
            line["outcome"].startswith("resolve-error") and line["down"] == 0 for line in stray
        ), stray
        if name == world.BLOCKED:
            # the plain attempt was reset on the SNI; a fragment strategy carried the hello
            carried = [line for line in lines if line["verdict"] == "sni-reset"]
            assert carried, lines
            assert carried[0]["strategy"].startswith("tls-record-split"), carried[0]
            # Chromium's ClientHello alone is ~1.9 KB (1949 bytes from Chromium 156): more than
            # one Ethernet-sized TCP segment, replayed whole through the fragment strategy
            assert carried[0]["up"] > 1900
            assert any(e.name == name and e.action == "reset" for e in w.lab.events(name))
        elif name == world.THROTTLED:
            assert any(name in c for c in w.outside.connections), w.outside.connections
            assert {line["strategy"] for line in lines} == {"outside"}
        else:
            # the ISP resolver never got to send anyone to the block page: the lab's DoH
            # service gave the name, and the site answered a plain connection
            assert [e for e in w.lab.dns_log() if e.qname == name] == []
            endpoints = w.side.app.status_document()["dns"]["endpoints"]
            assert sum(ep["successes"] for ep in endpoints) > 0, endpoints
            assert any(
                line["strategy"] == "direct" and line["verdict"] == "ok" for line in lines
            ), lines


async def test_browser_without_circumvention_is_blocked(tmp_path: Path, lab_ca: LabCA) -> None:
    """The negative control: plain connections and the ISP's DNS fail in the same browser."""
    async with browsing(tmp_path, lab_ca, circumvent=False) as w:
        assert hello(world.BLOCKED) not in await w.page(world.BLOCKED)
        assert hello(world.POISONED) not in await w.page(world.POISONED)
        assert any(e.action == "reset" for e in w.lab.events(world.BLOCKED))


# --- item 4: the status page in a real browser --------------------------------------------------


async def test_browser_status_page_renders_and_screenshots(tmp_path: Path, lab_ca: LabCA) -> None:
    async with browsing(tmp_path, lab_ca) as w:
        assert hello(world.BLOCKED) in await w.page(world.BLOCKED)
        with trio.fail_after(10):  # the verdict is recorded once the attempts are judged
            while w.side.app.memory is None or not w.side.app.memory.entries():
                await trio.sleep(0.05)

        dom = await w.browser.dom(w.web)
        assert "sidestep status" in dom
        for section in ('id="connections"', 'id="sites"', 'id="evidence"', 'id="dns"'):
            assert section in dom
        sites = dom[dom.index('id="sites"') : dom.index('id="evidence"')]
        assert world.BLOCKED in sites and "tls-record-split" in sites and "sni-reset" in sites
        evidence = dom[dom.index('id="evidence"') : dom.index('id="dns"')]
        assert "<svg" in evidence and "<circle" in evidence  # the timeline was drawn
        dns = dom[dom.index('id="dns"') :]
        assert "secure" in dns and world.FAMOUS_DOH_IPS[0] in dns

        shot = tmp_path / "status.png"
        done = await w.browser.run(
            f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", w.web
        )
        assert shot.exists(), done.stderr.decode(errors="replace")[-2000:]
        width, height, distinct = png_facts(shot.read_bytes())
        assert (width, height) == (1280, 900)
        assert shot.stat().st_size > 20_000 and distinct > 50  # text and colours, not a blank
