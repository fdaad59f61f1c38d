"""Tests for proxy.bridge.identity and `sidestep keygen`: the 0600 file and the bridge URI."""

from __future__ import annotations

import os
import stat
import string
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.bridge.identity import (
    CARRIERS,
    BridgeIdentity,
    BridgeURI,
    identity_text,
    load_identity,
    parse_bridge_uri,
    write_identity,
)
from proxy.cli import main
from proxy.errors import ConfigError

IDENTITY = BridgeIdentity(bytes(range(32)), bytes(range(32, 64)), bytes(range(8)))
PK = "A" * 43
SECRET = "B" * 42 + "A"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    """A permissive umask, so the tests show the 0600 mode is ours, not the umask's."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_identity_file_is_created_0600_and_reads_back(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "bridge.key"
    write_identity(path, IDENTITY, force=False)
    assert mode_of(path) == 0o600
    assert load_identity(path) == IDENTITY


def test_identity_file_is_never_overwritten_without_force(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "bridge.key"
    write_identity(path, IDENTITY, force=False)
    other = BridgeIdentity(bytes(32), bytes(32), bytes(8))
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        write_identity(path, other, force=False)
    assert load_identity(path) == IDENTITY
    write_identity(path, other, force=True)
    assert load_identity(path) == other
    assert mode_of(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridge.key"]


def test_identity_write_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / "bridge.key").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="already exists"):
        write_identity(tmp_path / "bridge.key", IDENTITY, force=False)
    assert (tmp_path / "elsewhere").read_text() == "x"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o602, 0o610])
def test_identity_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "bridge.key"
    path.write_text(identity_text(IDENTITY))
    path.chmod(mode)
    with pytest.raises(
        ConfigError, match=f"open to other users \\(mode {mode:04o}\\); run `chmod 600"
    ):
        load_identity(path)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_identity_private_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "bridge.key"
    path.write_text(identity_text(IDENTITY))
    path.chmod(mode)
    assert load_identity(path) == IDENTITY


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ('private_key = "x"\nsecret = "x"\nshort_id = "x"\n', "private_key: must be 32 bytes"),
        (f'private_key = "{PK}"\nsecret = "short"\nshort_id = "0011223344556677"\n', "secret"),
        (f'private_key = "{PK}"\nsecret = "{SECRET}"\nshort_id = "00"\n', "short_id"),
        (
            f'private_key = "{PK}"\nsecret = "{SECRET}"\nshort_id = "0011223344556677"\nx = 1\n',
            "unknown key 'x'",
        ),
    ],
)
def test_identity_bad_contents_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bridge.key"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=message):
        load_identity(path)


def test_identity_missing_file_and_directory_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the identity"):
        load_identity(tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_identity(tmp_path)


def test_identity_repr_hides_the_private_parts() -> None:
    text = repr(IDENTITY)
    assert IDENTITY.private_key.hex() not in text and str(IDENTITY.private_key) not in text
    assert str(IDENTITY.secret) not in text


# ---------------------------------------------------------------------------------- the URI

LABEL_CHARS = string.ascii_lowercase + string.digits
PATH_CHARS = string.ascii_letters + string.digits + "._~-"
labels = st.text(LABEL_CHARS, min_size=1, max_size=10)
names = st.lists(labels, min_size=1, max_size=3).map(lambda parts: ".".join([*parts, "test"]))
hosts = st.one_of(names, st.ip_addresses().map(lambda ip: ip.compressed))
paths = st.lists(st.text(PATH_CHARS, min_size=1, max_size=12), min_size=1, max_size=3).map(
    lambda parts: "/" + "/".join(parts)
)


@st.composite
def uris(draw: st.DrawFn) -> BridgeURI:
    carrier = draw(st.sampled_from(CARRIERS))
    web = carrier != "raw"
    return BridgeURI(
        short_id=draw(st.binary(min_size=8, max_size=8)),
        public_key=draw(st.binary(min_size=32, max_size=32)),
        secret=draw(st.binary(min_size=32, max_size=32)),
        carrier=carrier,
        host=draw(hosts),
        port=draw(st.integers(1, 65535)),
        path=draw(paths) if web else "",
        front=draw(st.none() | names) if web else None,
        sni=draw(st.none() | names),
        prefix="none" if web else draw(st.sampled_from(["none", "ascii", "tls"])),
    )


@given(uris())
def test_bridge_uri_round_trips(uri: BridgeURI) -> None:
    text = str(uri)
    assert text.startswith("sidestep://") and " " not in text and "\n" not in text
    assert parse_bridge_uri(text) == uri
    assert parse_bridge_uri(f"  {text}\n") == uri


def test_bridge_uri_web_carrier_url() -> None:
    uri = BridgeURI(
        short_id=bytes(8),
        public_key=bytes(32),
        secret=bytes(32),
        carrier="ws",
        host="Bridge.Example.org",
        port=443,
        path="/abc",
    )
    assert uri.host == "bridge.example.org"
    assert uri.url == "https://bridge.example.org/abc"
    six = BridgeURI(
        short_id=bytes(8),
        public_key=bytes(32),
        secret=bytes(32),
        carrier="raw",
        host="2001:db8::0:1",
        port=8443,
    )
    assert six.url is None
    assert "@[2001:db8::1]:8443?" in str(six)
    assert six.line().server_public == bytes(32)


GOOD = str(
    BridgeURI(
        short_id=bytes(range(8)),
        public_key=bytes(32),
        secret=b"\x01" * 32,
        carrier="ws",
        host="bridge.example.org",
        port=443,
        path="/abc",
    )
)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("https://x", "scheme"),
        (GOOD + "#frag", "fragment"),
        (GOOD.replace("0001020304050607@", ""), "short id"),
        (GOOD.replace("0001020304050607", "00010203"), "short id"),
        (GOOD.replace(":443", ":0"), "address"),
        (GOOD.replace(":443", ""), "address"),
        (GOOD.replace("bridge.example.org", "bad_host!"), "address"),
        (GOOD.replace("pk=", "pk=x"), "pk"),
        (GOOD.replace("pk=", "xk="), "xk"),
        (GOOD.replace("&secret=", "&secret=AA"), "secret"),
        (GOOD + "&secret=" + "A" * 43, "secret"),
        (GOOD.replace("carrier=ws", "carrier=pigeon"), "carrier"),
        (GOOD.replace("&carrier=ws", ""), "carrier"),
        (GOOD.replace("/abc", ""), "path"),
        (GOOD.replace("carrier=ws", "carrier=raw"), "path"),
        (GOOD + "&front=bad name", "front"),
        (GOOD + "&sni=", "sni"),
    ],
)
def test_bridge_uri_errors_name_the_wrong_part(text: str, part: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bridge_uri(text)
    assert str(caught.value).startswith(f"bridge URI: {part}: ")
    assert "AQEBAQEB" not in str(caught.value)  # the secret is never echoed


def test_bridge_uri_raw_carrier_cannot_be_fronted() -> None:
    with pytest.raises(ConfigError, match="front: fronting needs a web carrier"):
        BridgeURI(
            short_id=bytes(8),
            public_key=bytes(32),
            secret=bytes(32),
            carrier="raw",
            host="192.0.2.1",
            port=443,
            front="cdn.example",
        )


@pytest.mark.parametrize(
    ("carrier", "prefix", "message"),
    [("raw", "http", "prefix: 'http' is not one of"), ("ws", "tls", "only the raw carrier")],
)
def test_bridge_uri_prefix_is_raw_only_and_known(carrier: str, prefix: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BridgeURI(
            short_id=bytes(8), public_key=bytes(32), secret=bytes(32), carrier=carrier,
            host="192.0.2.1", port=443, path="/a" if carrier == "ws" else "", prefix=prefix,
        )  # fmt: skip


# ----------------------------------------------------------------------- sidestep keygen


def test_keygen_writes_identity_and_prints_one_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bridge.key"
    code = main(
        [
            "keygen",
            "--out",
            str(out),
            "--url",
            "https://bridge.example.org/s3cret",
            "--front",
            "cdn.example.net",
            "--sni",
            "cdn.example.net",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1
    uri = parse_bridge_uri(printed)
    identity = load_identity(out)
    assert (uri.carrier, uri.url, uri.front) == (
        "ws",
        "https://bridge.example.org/s3cret",
        "cdn.example.net",
    )
    assert uri.line() == identity.line()
    key_text = out.read_text().split('private_key = "')[1][:43]
    assert key_text not in printed
    assert mode_of(out) == 0o600


def test_keygen_refuses_to_overwrite_and_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bridge.key"
    assert main(["keygen", "--out", str(out), "--address", "192.0.2.7:443"]) == 0
    first = out.read_text()
    assert parse_bridge_uri(capsys.readouterr().out).carrier == "raw"
    assert main(["keygen", "--out", str(out), "--address", "192.0.2.7:443"]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert out.read_text() == first
    assert main(["keygen", "--out", str(out), "--force", "--address", "[2001:db8::1]:443"]) == 0
    assert out.read_text() != first
    for bad, message in [
        (["--address", "192.0.2.7"], "address"),
        (["--address", "192.0.2.7:443", "--carrier", "ws"], "needs --url"),
        (["--url", "https://b.example/p", "--carrier", "raw"], "needs --address"),
        (["--url", "http://b.example/p"], "https://"),
        (["--url", "https://b.example/"], "path"),
    ]:
        other = tmp_path / "other.key"
        assert main(["keygen", "--out", str(other), *bad]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
        assert not other.exists()


def test_keygen_runs_as_a_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "keygen", "--out", "id.key", "--address", "192.0.2.9:8443"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert parse_bridge_uri(result.stdout).port == 8443
    assert mode_of(tmp_path / "id.key") == 0o600
