"""Fixtures for end-to-end tests: a real ``sidestep run`` process, real origins, real curl."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from proxy.lab.ca import LabCA
from proxy.lab.origin import OriginServer

CURL = shutil.which("curl")
requires_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    log: Path
    state: Path

    @property
    def url_socks5(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    async def await_log(self, needle: str, timeout: float = 10.0) -> str:
        """Like :meth:`wait_log` but lets the trio loop (and the origins) run meanwhile."""
        with trio.move_on_after(timeout):
            while needle not in (text := self.log_text()):
                await trio.sleep(0.02)
            return text
        raise AssertionError(f"{needle!r} not in log:\n{self.log_text()}")

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            if needle in text:
                return text
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in log:\n{self.log_text()}")


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sidestep exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"sidestep did not listen on {port}:\n{log.read_text()}")


@contextlib.contextmanager
def run_proxy(tmp_path: Path, body: str, *, port: int | None = None) -> Iterator[ProxyProcess]:
    """Start ``sidestep run`` with ``body`` as config; ``{port}`` in it is filled in."""
    port = port or free_port()
    cfg = tmp_path / f"sidestep-{port}.toml"
    cfg.write_text(body.replace("{port}", str(port)))
    log = tmp_path / f"sidestep-{port}.log"
    # learned memory and evidence go to the test's own folder, never the user's home
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / f"state-{port}")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(cfg), "--log-level", "debug"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_port(port, proc, log)
        yield ProxyProcess(proc, port, cfg, log, tmp_path / f"state-{port}" / "sidestep")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)


BASIC = """
[[inbound]]
name = "mixed"
protocol = "mixed"
listen = "127.0.0.1:{port}"

[shutdown]
drain_timeout = 2
"""


@pytest.fixture(scope="session")
def lab_ca() -> LabCA:
    return LabCA.create()


@pytest.fixture(scope="session")
def ca_file(lab_ca: LabCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lab_ca.write_cert(tmp_path_factory.mktemp("ca") / "ca.pem")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with run_proxy(tmp_path_factory.mktemp("proxy"), BASIC) as p:
        yield p


@dataclass
class Origins:
    http: tuple[str, int]
    https: tuple[str, int]
    http_server: OriginServer
    https_server: OriginServer


@pytest.fixture
async def origins(lab_ca: LabCA, nursery: trio.Nursery) -> Origins:
    plain = OriginServer("plain")
    tls = OriginServer("secure", tls=lab_ca.issue("localhost", "127.0.0.1").server_context())
    http_addr = await nursery.start(plain.serve)
    https_addr = await nursery.start(tls.serve)
    return Origins(http_addr, https_addr, plain, tls)


async def curl(
    *args: str, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[bytes]:
    """Run the real curl binary without blocking the trio loop."""
    assert CURL is not None
    with trio.fail_after(timeout):
        result = await trio.run_process(
            [CURL, "--silent", "--show-error", "--max-time", str(int(timeout)), *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    if check and result.returncode != 0:
        raise AssertionError(f"curl {args} failed ({result.returncode}): {result.stderr.decode()}")
    return result
