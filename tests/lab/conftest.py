"""Fixtures that start the censor lab, and sidestep inside it, for integration tests.

* ``lab`` is a running :class:`~proxy.lab.world.Lab` under the profile ``lab_profile`` names
  ("none" unless a test says otherwise: ``@pytest.mark.parametrize("lab_profile", ["cn"])``).
* ``sidestep`` is an in-process sidestep on the embedded default config, pointed into ``lab``
  (its SOCKS5 address and its connection log lines).
* ``lab_ca`` is one CA for the session, so labs start quickly; ``curl`` runs the real binary
  (and skips the test where there is none).

Every fixture stops what it started when the test ends, failed or not.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator

import pytest
import trio

from proxy.lab.ca import LabCA
from proxy.lab.scenarios import RunningSidestep, open_sidestep
from proxy.lab.world import Lab, open_lab


@pytest.fixture(scope="session")
def lab_ca() -> LabCA:
    return LabCA.create()


@pytest.fixture
def lab_profile() -> str:
    """The profile the ``lab`` fixture runs; parametrize this name to choose another."""
    return "none"


@pytest.fixture
async def lab(lab_profile: str, lab_ca: LabCA) -> AsyncIterator[Lab]:
    async with open_lab(lab_profile, ca=lab_ca) as running:
        yield running


@pytest.fixture
async def sidestep(lab: Lab) -> AsyncIterator[RunningSidestep]:
    async with open_sidestep(lab) as running:
        yield running


class Curl:
    """The real curl binary, run without blocking the trio loop the lab lives in."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def __call__(
        self, *args: str, max_time: float = 10.0
    ) -> subprocess.CompletedProcess[bytes]:
        with trio.fail_after(max_time + 5):
            return await trio.run_process(
                [self.path, "--silent", "--show-error", "--max-time", f"{max_time:g}", *args],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )

    @staticmethod
    def to(lab: Lab, name: str, scheme: str = "https", ip: str | None = None) -> list[str]:
        """``--resolve`` (and ``--cacert``) arguments that send curl to ``name`` in the lab."""
        port = lab.ports.of(scheme)
        address = ip or lab.address(name, scheme)[0]
        args = ["--resolve", f"{name}:{port}:{address}"]
        return [*args, "--cacert", str(lab.ca_file)] if scheme == "https" else args


@pytest.fixture
def curl() -> Curl:
    """Skips the test when curl is not installed."""
    path = shutil.which("curl")
    if path is None:
        pytest.skip("curl is not installed")
    return Curl(path)
