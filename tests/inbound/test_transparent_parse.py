"""The transparent inbound's name finding, and the nftables script `sidestep router-rules` makes."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.inbound.transparent import http_host
from proxy.routerrules import RouterRules


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"GET / HTTP/1.1\r\nHost: site.example\r\n\r\n", "site.example"),
        (b"GET / HTTP/1.1\r\nhOsT:\tSite.Example:8080\r\nAccept: */*\r\n\r\n", "site.example"),
        (b"GET / HTTP/1.1\r\nHost: site.example.\r\n\r\n", "site.example"),
        (b"GET / HTTP/1.1\r\nHost: 198.51.100.1\r\n\r\n", "198.51.100.1"),
        (b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: bad name\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n", None),
        (b"\x16\x03\x01\x02\x00", None),
        (b"", None),
        # a Host header in the body does not count
        (b"POST / HTTP/1.1\r\nContent-Length: 30\r\n\r\nx\r\nHost: evil.example\r\n", None),
    ],
)
def test_http_host(head: bytes, name: str | None) -> None:
    assert http_host(head) == name


@given(st.binary(max_size=300))
def test_http_host_never_raises(data: bytes) -> None:
    name = http_host(data)
    assert name is None or (name.isascii() and " " not in name and name == name.lower())


CAN_CHECK = os.geteuid() == 0 and shutil.which("nft") is not None


@pytest.mark.skipif(not CAN_CHECK, reason="needs root and nft (nft -c checks without applying)")
@pytest.mark.parametrize(
    "rules",
    [
        RouterRules(("br-lan",), 1081),
        RouterRules(("br-lan", "wlan0"), 1081, (80, 443, 8443), dns_port=5353, reject_quic=True),
    ],
)
def test_nft_accepts_the_script(rules: RouterRules) -> None:
    proc = subprocess.run(
        ["nft", "-c", "-f", "-"], input=rules.script(), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    broken = rules.script().replace("redirect to", "redirekt to")
    proc = subprocess.run(
        ["nft", "-c", "-f", "-"], input=broken, capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0
