"""Throughput, CPU and added time to first byte through a sidestep bridge (issue #7, item 8).

``python -m bench bridge`` runs on loopback a sink that sends ``--mib`` MiB as soon as it is
connected to, and fetches it these ways, interleaved ``--repeat`` times:

- **plain relay**: through sidestep's TCP relay (:func:`proxy.net.relay.relay`, splice on
  Linux) in this process, the baseline; **copying relay**: the same without splice;
- **raw bridge**: :class:`~proxy.strategies.bridge.BridgeStrategy` in this process to a real
  ``sidestep bridge`` process on the raw carrier (a bridge is another machine: it gets its own
  process; the handshake is done beforehand and the session reused, as in real use);
- **ws bridge**: the same over the WebSocket carrier behind a real nginx (TLS, built from
  packaging/nginx), when nginx is installed.
- **split / poll bridge**: the CDN carriers (:class:`~proxy.strategies.front.FrontStrategy`,
  split HTTP and polling) through that same nginx.

Figures: MB/s (median) and the ratio to the plain relay; CPU seconds per GiB of this process
plus the bridge process (nginx's own CPU is not counted); and the median time to first byte
of a fresh stream (connect + first byte) minus the plain relay's. Target: raw bridge >= 0.3x
the plain relay.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from proxy.bridge.identity import BridgeURI, generate_identity, write_identity
from proxy.inbound.base import Target
from proxy.lab.ca import LabCA
from proxy.net.relay import relay
from proxy.strategies.bridge import BridgeStrategy
from proxy.strategies.front import FrontStrategy

MiB = 1 << 20
GiB = 1 << 30
PACKAGING = Path(__file__).resolve().parents[1] / "packaging" / "nginx"
SECRET = "/bench-secret"
CHUNK = bytes(256 * 1024)

Opener = Callable[[], Awaitable[trio.abc.Stream]]


def find_nginx() -> str | None:
    """nginx on the PATH, or where Debian puts it (often outside a user's PATH)."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def nginx_in_front(
    workdir: Path,
    ca: LabCA,
    name: str,
    listen: tuple[str, int],
    backend: tuple[str, int],
    secret: str,
) -> Iterator[Path]:
    """A real nginx (``master_process off``, all paths in ``workdir``) running the packaged
    site config for ``name`` on ``listen``, forwarding ``secret`` to ``backend``; yields the
    cover site's root. The tests use it too."""
    nginx = find_nginx() or "nginx"
    issued = ca.issue(name)
    (workdir / "cert.pem").write_bytes(issued.cert_pem)
    (workdir / "key.pem").write_bytes(issued.key_pem)
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_text("<html><body>my little blog</body></html>\n")
    snippet = (PACKAGING / "sidestep-bridge-proxy.conf").read_text()
    (workdir / "snippet.conf").write_text(
        snippet.replace("127.0.0.1:8443", f"{backend[0]}:{backend[1]}")
    )
    site = (PACKAGING / "sidestep-bridge.conf").read_text()
    site = re.sub(r"server \{\n    listen 80;.*?\n\}\n", "", site, flags=re.S)  # no :80 redirect
    site = (
        site.replace("listen 443 ssl http2;", f"listen {listen[0]}:{listen[1]} ssl http2;")
        .replace("    listen [::]:443 ssl http2;\n", "")
        .replace("bridge.example", name)
        .replace(f"/etc/letsencrypt/live/{name}/fullchain.pem", str(workdir / "cert.pem"))
        .replace(f"/etc/letsencrypt/live/{name}/privkey.pem", str(workdir / "key.pem"))
        .replace(f"/var/www/{name}", str(www))
        .replace("/etc/nginx/snippets/sidestep-bridge-proxy.conf", str(workdir / "snippet.conf"))
        .replace("/SECRET-PATH", secret)
    )
    (workdir / "site.conf").write_text(site)
    temps = "".join(
        f"  {kind}_temp_path {workdir}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (workdir / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\npid {workdir}/nginx.pid;\n"
        f"error_log {workdir}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n{temps}  include {workdir}/site.conf;\n}}\n"
    )
    proc = subprocess.Popen(
        [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield www
    finally:
        proc.terminate()
        proc.wait(10)


async def wait_listening(address: tuple[str, int]) -> None:
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream(*address)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


async def _serve_sink(size: int, *, task_status: trio.TaskStatus[int]) -> None:
    async def sink(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                left = size
                while left > 0:
                    piece = CHUNK[: min(left, len(CHUNK))]
                    await stream.send_all(piece)
                    left -= len(piece)
            except trio.BrokenResourceError:
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, sink, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


async def _serve_relay(
    target: int, splice: bool = True, *, task_status: trio.TaskStatus[int]
) -> None:
    async def one(stream: trio.SocketStream) -> None:
        async with stream, await trio.open_tcp_stream("127.0.0.1", target) as out:
            await relay(stream, out, idle_timeout=60, closing=True, splice=splice)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, one, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


def _child_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes ``pids``."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


async def _fetch(
    open_stream: Opener, size: int, pids: list[int] | None = None
) -> tuple[float, float, float]:
    """(seconds to first byte, seconds for all, CPU seconds) of one download."""
    children = pids or []
    cpu0, start = time.process_time() + _child_cpu(children), time.perf_counter()
    stream = await open_stream()
    first = None
    got = 0
    async with stream:
        while got < size:
            data = await stream.receive_some(256 * 1024)
            if not data:
                raise RuntimeError(f"stream ended after {got} of {size} bytes")
            if first is None:
                first = time.perf_counter() - start
            got += len(data)
    took = time.perf_counter() - start
    return first or 0.0, took, time.process_time() + _child_cpu(children) - cpu0


async def _spawn_bridge(
    workdir: Path, name: str, listen: tuple[str, int], extra: str
) -> trio.Process:
    """``python -m proxy bridge`` with the identity in ``workdir``; returns once it listens."""
    config = workdir / f"{name}.toml"
    config.write_text(
        f'[bridge]\nidentity = "bridge.key"\nlisten = "{listen[0]}:{listen[1]}"\n'
        f'sessions_per_minute = 0\n{extra}[destinations]\nallow_networks = ["127.0.0.0/8"]\n'
    )
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "proxy", "bridge", "--config", str(config)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    said = b""
    with trio.fail_after(20):
        while b"listening on" not in said:
            chunk = await proc.stderr.receive_some()
            if not chunk:
                raise RuntimeError(f"the bridge did not start: {said.decode(errors='replace')}")
            said += chunk
    return proc


async def _bench(size: int, repeat: int, ttfb_samples: int, paths: frozenset[str]) -> None:
    ca = LabCA.create()
    workdir = Path(tempfile.mkdtemp(prefix="sidestep-bench-"))
    try:
        async with trio.open_nursery() as nursery:
            sink = await nursery.start(_serve_sink, size)
            small = await nursery.start(_serve_sink, 1)
            relay_port = await nursery.start(_serve_relay, sink)
            small_relay = await nursery.start(_serve_relay, small)
            plain_copy = await nursery.start(_serve_relay, sink, False)
            identity = generate_identity()
            write_identity(workdir / "bridge.key", identity, force=False)
            procs: list[trio.Process] = []
            strategies: dict[str, BridgeStrategy] = {}
            pids: dict[str, list[int]] = {}
            if "raw" in paths:
                raw_address = ("127.0.0.1", free_port())
                procs.append(await _spawn_bridge(workdir, "raw", raw_address, ""))
                raw_uri = BridgeURI(
                    short_id=identity.short_id, public_key=identity.public_key,
                    secret=identity.secret, carrier="raw", host=raw_address[0],
                    port=raw_address[1],
                )  # fmt: skip
                strategies["raw bridge"] = BridgeStrategy("raw", raw_uri)
                pids["raw bridge"] = [procs[-1].pid]
            nginx = find_nginx() if "ws" in paths else None
            ws_stack = None
            if nginx is not None:
                backend = ("127.0.0.1", free_port())
                front = ("127.0.0.1", free_port())
                extra = f'carrier = "ws"\npath = "{SECRET}"\n'
                procs.append(await _spawn_bridge(workdir, "ws", backend, extra))
                ws_stack = nginx_in_front(workdir, ca, "bridge.bench", front, backend, SECRET)
                ws_stack.__enter__()
                await wait_listening(front)
                ca_file = ca.write_cert(workdir / "ca.pem")
                ws_uri = BridgeURI(
                    short_id=identity.short_id, public_key=identity.public_key,
                    secret=identity.secret, carrier="ws", host=front[0], port=front[1],
                    path=SECRET, sni="bridge.bench",
                )  # fmt: skip
                strategies["ws bridge (nginx)"] = BridgeStrategy("ws", ws_uri, cafile=str(ca_file))
                pids["ws bridge (nginx)"] = [procs[-1].pid]
                for carrier in ("split", "poll"):  # the CDN carriers, through the same nginx
                    name = f"{carrier} bridge (nginx)"
                    strategies[name] = FrontStrategy(
                        carrier, ws_uri, carriers=[carrier], cafile=str(ca_file)
                    )
                    pids[name] = [procs[-1].pid]
            try:
                for strategy in strategies.values():
                    await strategy.session()  # handshakes out of the measurement

                def via(strategy: BridgeStrategy, target: int) -> Opener:
                    async def open_stream() -> trio.abc.Stream:
                        return await strategy.connect(Target("127.0.0.1", target), [], b"")

                    return open_stream

                def plain(target: int) -> Opener:
                    async def open_stream() -> trio.abc.Stream:
                        return await trio.open_tcp_stream("127.0.0.1", target)

                    return open_stream

                big = {"plain relay": plain(relay_port), "copying relay": plain(plain_copy)}
                tiny = {"plain relay": plain(small_relay)}
                for name, strategy in strategies.items():
                    big[name] = via(strategy, sink)
                    tiny[name] = via(strategy, small)
                speed: dict[str, list[float]] = {k: [] for k in big}
                cpu: dict[str, list[float]] = {k: [] for k in big}
                first: dict[str, list[float]] = {k: [] for k in big}
                for _ in range(repeat):
                    for name, opener in big.items():
                        _, took, used = await _fetch(opener, size, pids.get(name))
                        speed[name].append(size / took / 1e6)
                        cpu[name].append(used / size * GiB)
                for _ in range(ttfb_samples):
                    for name, opener in tiny.items():
                        first[name].append((await _fetch(opener, 1))[0])
                base = statistics.median(speed["plain relay"])
                base_ttfb = statistics.median(first["plain relay"])
                print(f"bridge bench: {size // MiB} MiB x {repeat}, loopback, bridge in a process")
                print(f"{'path':<20}{'MB/s':>9}{'x plain':>9}{'CPU s/GiB':>11}{'+TTFB ms':>10}")
                for name in big:
                    mbps = statistics.median(speed[name])
                    added = (
                        f"{(statistics.median(first[name]) - base_ttfb) * 1e3:>10.2f}"
                        if first[name] else f"{'-':>10}"
                    )  # fmt: skip
                    print(
                        f"{name:<20}{mbps:>9.0f}{mbps / base:>9.2f}"
                        f"{statistics.median(cpu[name]):>11.2f}{added}"
                    )
                if nginx is None and "ws" in paths:
                    print("ws bridge: skipped (nginx is not installed)")
            finally:
                for strategy in strategies.values():
                    await strategy.aclose()
                if ws_stack is not None:
                    ws_stack.__exit__(None, None, None)
                for proc in procs:
                    proc.terminate()
                    await proc.wait()
                    if proc.stderr is not None:
                        await proc.stderr.aclose()
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_bridge_bench(args: argparse.Namespace) -> None:
    paths = frozenset(args.paths.split(","))
    unknown = paths - {"raw", "ws"}
    if unknown:
        raise SystemExit(f"bench bridge: unknown --paths {', '.join(sorted(unknown))} (raw, ws)")
    trio.run(_bench, args.mib * MiB, args.repeat, args.ttfb_samples, paths)


def add_bridge_bench_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bridge", help="throughput/CPU/TTFB through the bridge vs a plain relay")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--ttfb-samples", type=int, default=20)
    p.add_argument(
        "--paths", default="raw,ws", help="bridge paths to measure: raw, ws or raw,ws (default)"
    )


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="bench.bridge")
    add_bridge_bench_parser(parser.add_subparsers(dest="cmd", required=True))
    run_bridge_bench(parser.parse_args(["bridge", *sys.argv[1:]]))
