"""Running sidestep as a service: access control, hostile clients, many connections,
reload, drain and clear startup errors."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

from .conftest import BASIC, Origins, ProxyProcess, curl, free_port, requires_curl, run_proxy


def _socks5_connect(port: int, target_port: int, *, src: str | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), 5, source_address=(src, 0) if src else None)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + target_port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        chunk = s.recv(10 - len(reply))
        assert chunk, "proxy closed during the SOCKS5 reply"
        reply += chunk
    assert reply[1] == 0, reply
    s.settimeout(10)
    return s


def test_client_outside_allow_list_is_closed_unread(tmp_path: Path) -> None:
    body = BASIC.replace(
        'listen = "127.0.0.1:{port}"', 'listen = "127.0.0.1:{port}"\nallow = ["127.0.0.5/32"]'
    )
    with run_proxy(tmp_path, body) as p:
        with socket.create_connection(("127.0.0.1", p.port), 5) as s:
            s.sendall(b"\x05\x01\x00")
            s.settimeout(5)
            try:
                data = s.recv(10)
            except ConnectionResetError:
                data = b""
            assert data == b""
        p.wait_log("refused client 127.0.0.1: not in the allow list")
        # the allowed source address gets a proper answer
        with socket.create_connection(
            ("127.0.0.1", p.port), 5, source_address=("127.0.0.5", 0)
        ) as s:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"


def test_refuses_to_listen_publicly_without_allow(tmp_path: Path) -> None:
    cfg = tmp_path / "open.toml"
    cfg.write_text(f'[[inbound]]\nname = "lan"\nlisten = "0.0.0.0:{free_port()}"\n')
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(cfg)],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "allow" in err and "inbound[0].listen" in err and ":3:" in err
    assert "Traceback" not in err


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "busy.toml"
        cfg.write_text(BASIC.replace("{port}", str(port)))
        r = subprocess.run(
            [sys.executable, "-m", "proxy", "run", "--config", str(cfg)],
            capture_output=True,
            timeout=30,
        )
    assert r.returncode == 1
    err = r.stderr.decode().strip()
    assert "already in use" in err and str(port) in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_config_check_and_show(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[relay]\nidle_timeout = 5\nsplize = true\n")
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "config", "check", str(bad)], capture_output=True
    )
    assert r.returncode == 1
    assert f"{bad}:3: relay.splize" in r.stderr.decode()
    good = tmp_path / "good.toml"
    good.write_text(
        '[[inbound]]\nname = "a"\nlisten = "127.0.0.1:1081"\nusers = [{ username = "u", password = "hunter2" }]\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "config", "check", str(good)], capture_output=True
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "proxy", "config", "show", str(good)], capture_output=True
    )
    assert r.returncode == 0
    assert b"hunter2" not in r.stdout and b"127.0.0.1:1081" in r.stdout


async def test_garbage_and_slowloris_clients_do_not_hurt_others(
    tmp_path: Path, origins: Origins
) -> None:
    body = BASIC.replace(
        'listen = "127.0.0.1:{port}"', 'listen = "127.0.0.1:{port}"\nhandshake_timeout = 0.5'
    )
    with run_proxy(tmp_path, body) as p:
        slow = [socket.create_connection(("127.0.0.1", p.port)) for _ in range(20)]
        for i, s in enumerate(slow):
            s.sendall([b"\x05", b"\x05\x01", b"CONNECT exa", b"\x04\x01"][i % 4])
        for junk in (
            b"\x16\x03\x01\xff\xff garbage",
            b"\x05\xff" * 100,
            b"\x00" * 10,
            os.urandom(300),
        ):
            with socket.create_connection(("127.0.0.1", p.port)) as g:
                g.sendall(junk)
        # everyone else is still served meanwhile
        r = await curl(
            "--socks5-hostname", f"127.0.0.1:{p.port}", f"http://localhost:{origins.http[1]}/"
        )
        assert r.stdout.startswith(b"hello from plain")
        # and the slow clients are closed once their handshake time is up
        await trio.sleep(1.0)
        for s in slow:
            s.settimeout(3)
            try:
                rest = s.recv(100)
                while rest and rest[-1:] != b"":
                    more = s.recv(100)
                    if not more:
                        break
            except ConnectionResetError:
                pass
            s.close()
        assert p.proc.poll() is None
        r = await curl("-x", f"http://127.0.0.1:{p.port}", f"http://localhost:{origins.http[1]}/")
        assert r.stdout.startswith(b"hello from plain")


async def test_thousand_concurrent_connections_leak_no_fds(
    proxy: ProxyProcess, origins: Origins
) -> None:
    before = proxy.fd_count()
    n = 1000
    port = origins.http[1]

    def open_many() -> list[socket.socket]:
        return [_socks5_connect(proxy.port, port) for _ in range(n)]

    socks = await trio.to_thread.run_sync(open_many)
    try:
        await trio.sleep(0.2)
        during = proxy.fd_count()
        assert during >= before + 2 * n * 0.95  # each tunnel holds a client and an upstream fd

        # every tunnel works
        def ping_all() -> None:
            for s in socks:
                s.sendall(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
            for s in socks:
                assert s.recv(12).startswith(b"HTTP/1.1 200")

        await trio.to_thread.run_sync(ping_all)
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while proxy.fd_count() > before and time.monotonic() < deadline:
        await trio.sleep(0.1)
    assert proxy.fd_count() <= before


async def test_sighup_reload_keeps_established_connections(
    tmp_path: Path, origins: Origins
) -> None:
    with run_proxy(tmp_path, BASIC) as p:
        tunnel = _socks5_connect(p.port, origins.http[1])
        # new config: same address, now with a password
        second = free_port()
        p.config.write_text(
            BASIC.replace("{port}", str(p.port))
            + f'\n[[inbound]]\nname = "second"\nlisten = "127.0.0.1:{second}"\n'
        )
        text = p.config.read_text().replace(
            'protocol = "mixed"\n',
            'protocol = "mixed"\nusers = [{ username = "u", password = "p" }]\n',
            1,
        )
        p.config.write_text(text)
        p.proc.send_signal(signal.SIGHUP)
        await p.await_log("config reloaded")
        # the tunnel opened before the reload still works
        tunnel.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await trio.to_thread.run_sync(tunnel.recv, 100)).startswith(b"HTTP/1.1 200")
        tunnel.close()
        # the new rules apply to new clients: auth is now required on the first inbound
        r = await curl(
            "--socks5-hostname",
            f"127.0.0.1:{p.port}",
            f"http://localhost:{origins.http[1]}/",
            check=False,
        )
        assert r.returncode != 0
        r = await curl(
            "--socks5-hostname", f"u:p@127.0.0.1:{p.port}", f"http://localhost:{origins.http[1]}/"
        )
        assert r.stdout.startswith(b"hello from plain")
        # and the new inbound listens
        r = await curl("-x", f"http://127.0.0.1:{second}", f"http://localhost:{origins.http[1]}/")
        assert r.stdout.startswith(b"hello from plain")
        # a broken config is refused and the old one keeps running
        p.config.write_text("[[inbound]]\nname = 1\n")
        p.proc.send_signal(signal.SIGHUP)
        await p.await_log("reload refused")
        r = await curl("-x", f"http://127.0.0.1:{second}", f"http://localhost:{origins.http[1]}/")
        assert r.stdout.startswith(b"hello from plain")


async def test_sigterm_drains_then_exits(tmp_path: Path, origins: Origins) -> None:
    with run_proxy(tmp_path, BASIC) as p:
        tunnel = _socks5_connect(p.port, origins.http[1])
        p.proc.send_signal(signal.SIGTERM)
        await p.await_log("draining")
        # no new clients
        await trio.sleep(0.2)
        try:
            with socket.create_connection(("127.0.0.1", p.port), 1):
                refused = False
        except OSError:
            refused = True
        assert refused
        # the open tunnel keeps working during the drain
        tunnel.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await trio.to_thread.run_sync(tunnel.recv, 100)).startswith(b"HTTP/1.1 200")
        # the drain time (2 s) ends it and the process exits cleanly
        assert await trio.to_thread.run_sync(p.proc.wait, 10) == 0
        tunnel.close()
        assert "closing 1 connection" in p.log_text()


@requires_curl
async def test_json_logs_carry_fields(tmp_path: Path, origins: Origins) -> None:
    body = BASIC + "\n[log]\njson = true\n"
    with run_proxy(tmp_path, body) as p:
        await curl(
            "--socks5-hostname", f"127.0.0.1:{p.port}", f"http://localhost:{origins.http[1]}/"
        )
        import json

        text = await p.await_log('"outcome"')
        rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        conn = [r for r in rows if r.get("logger") == "sidestep.conn"]
        assert conn and conn[0]["target"] == f"localhost:{origins.http[1]}"
        assert conn[0]["protocol"] == "socks5" and conn[0]["down"] > 0
