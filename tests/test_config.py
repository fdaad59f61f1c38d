"""Tests for proxy.config and the generic loader behind it (proxy.configschema)."""

from __future__ import annotations

import dataclasses
import ipaddress
import textwrap
import typing
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import (
    DEFAULT_SOURCE,
    LOOPBACK_NETWORKS,
    Config,
    DnsConfig,
    InboundConfig,
    InboundProtocol,
    LogConfig,
    LogLevel,
    OutboundConfig,
    PipelineConfig,
    RelayConfig,
    ShutdownConfig,
    UserConfig,
    default_config,
    default_config_text,
    load_config,
    parse_config,
    parse_listen,
    render_config,
)
from proxy.configschema import KeyLocator, from_toml, option, positive, to_toml
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
# bridge.toml is the bridge server's config (proxy/bridge/config.py, tests/bridge/), not the proxy's
EXAMPLES = sorted(p for p in (ROOT / "configs").glob("*.toml") if p.name != "bridge.toml")


def toml(text: str) -> str:
    """Dedent a test document; its first line is line 1."""
    return textwrap.dedent(text).lstrip("\n")


def error_for(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(toml(text), "test.toml")
    return info.value


# --- shipped files -----------------------------------------------------------------------------


def test_config_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"default.toml", "lan.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_config_every_example_file_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.inbound


def test_config_embedded_default_is_configs_default_byte_for_byte() -> None:
    shipped = (ROOT / "configs" / "default.toml").read_bytes()
    embedded = (ROOT / "proxy" / "default.toml").read_bytes()
    assert embedded == shipped
    assert default_config_text().encode() == shipped


def test_config_embedded_default_spells_out_the_code_defaults() -> None:
    assert default_config() == Config()
    assert load_config(None) == default_config()
    assert parse_config("", "empty.toml") == Config()


def test_config_default_listens_on_loopback_as_mixed() -> None:
    (inbound,) = default_config().inbound
    assert (inbound.name, inbound.protocol, inbound.listen) == ("mixed", "mixed", "127.0.0.1:1080")
    assert inbound.effective_allow == LOOPBACK_NETWORKS


def test_config_embedded_default_documents_every_key() -> None:
    text = default_config_text()
    rendered = render_config(default_config(), mask_secrets=False)
    for line in rendered.splitlines():
        if " = " in line:
            key = line.split(" = ")[0]
            assert f"\n{key} = " in text or f"# {key} = " in text, key
    assert "# file = " in text


def test_config_lan_example_shares_with_private_networks_only() -> None:
    (inbound,) = load_config(ROOT / "configs" / "lan.toml").inbound
    assert inbound.address == ("0.0.0.0", 1080)
    assert not inbound.is_loopback
    assert inbound.effective_allow == (
        ipaddress.ip_network("192.168.0.0/16"),
        ipaddress.ip_network("10.0.0.0/8"),
    )
    assert inbound.users and inbound.users[0].password


# --- values ------------------------------------------------------------------------------------


def test_config_reads_every_section() -> None:
    config = parse_config(
        toml(
            """
            [[inbound]]
            name = "s5"
            protocol = "socks5"
            listen = "[::1]:1081"
            handshake_timeout = 3
            udp = false

            [outbound]
            connect_timeout = 4.5
            [pipeline]
            first_flight_max = 1
            [relay]
            buffer_size = 4096
            splice = false
            [dns]
            timeout = 2
            [log]
            level = "debug"
            json = true
            file = "/tmp/s.log"
            [shutdown]
            drain_timeout = 0
            """
        ),
        "t.toml",
    )
    (inbound,) = config.inbound
    assert inbound == InboundConfig(
        name="s5", protocol="socks5", listen="[::1]:1081", handshake_timeout=3.0, udp=False
    )
    assert inbound.address == ("::1", 1081)
    assert config.outbound == OutboundConfig(connect_timeout=4.5)
    assert config.pipeline.first_flight_max == 1
    assert config.relay == RelayConfig(buffer_size=4096, splice=False)
    assert config.dns == DnsConfig(timeout=2.0)
    assert config.log == LogConfig(level="debug", json=True, file="/tmp/s.log")
    assert config.shutdown.drain_timeout == 0.0


def test_config_integer_accepted_where_a_number_is_expected() -> None:
    config = parse_config("[relay]\nidle_timeout = 5\n", "t.toml")
    assert config.relay.idle_timeout == 5.0
    assert type(config.relay.idle_timeout) is float


def test_config_is_immutable() -> None:
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.relay = RelayConfig()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.relay.idle_timeout = 1.0  # type: ignore[misc]


# --- unknown keys ------------------------------------------------------------------------------


def test_config_rejects_unknown_top_level_key() -> None:
    err = error_for(
        """
        # a comment
        [relay]
        idle_timeout = 3

        timeout = 5
        """
    )
    assert err.key == "relay.timeout"
    assert err.line == 5


def test_config_rejects_unknown_section() -> None:
    err = error_for(
        """
        [relay]
        idle_timeout = 3

        [realy]
        splice = false
        """
    )
    assert err.key == "realy"
    assert err.line == 4
    assert "relay" in err.message and "allowed keys" in err.message


def test_config_rejects_unknown_key_in_table_and_suggests() -> None:
    err = error_for(
        """
        [outbound]
        connect_timeout = 3

        [relay]
        idle_timout = 3
        """
    )
    assert err.key == "relay.idle_timout"
    assert err.line == 5
    assert "did you mean 'idle_timeout'" in err.message
    assert "buffer_size" in err.message


def test_config_rejects_unknown_key_in_array_of_tables() -> None:
    err = error_for(
        """
        [[inbound]]
        name = "a"
        listen = "127.0.0.1:1080"

        [[inbound]]
        name = "b"
        lisen = "127.0.0.1:1081"
        """
    )
    assert err.key == "inbound[1].lisen"
    assert err.line == 7
    assert "listen" in err.message


def test_config_rejects_unknown_key_in_inline_table() -> None:
    err = error_for(
        """
        [[inbound]]
        name = "a"
        users = [
            { username = "u", password = "p" },
            { username = "v", pasword = "p" },
        ]
        """
    )
    assert err.key == "inbound[0].users[1].pasword"
    assert err.line == 5


def test_config_rejects_unknown_dotted_key() -> None:
    err = error_for(
        """
        log.level = "debug"
        log.colour = true
        """
    )
    assert err.key == "log.colour"
    assert err.line == 2


# --- types and values --------------------------------------------------------------------------


def test_config_wrong_type_says_what_was_expected() -> None:
    err = error_for(
        """
        [relay]
        idle_timeout = "5"
        """
    )
    assert err.key == "relay.idle_timeout"
    assert err.line == 2
    assert err.message == "expected a number, got string"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("buffer_size = true", "expected an integer, got boolean"),
        ("buffer_size = 65536.0", "expected an integer, got float"),
        ("splice = 1", "expected true or false, got integer"),
        ("idle_timeout = false", "expected a number, got boolean"),
        ("idle_timeout = [1]", "expected a number, got array"),
        ("idle_timeout = 1979-05-27", "expected a number, got date/time"),
    ],
)
def test_config_bool_and_numbers_do_not_mix(line: str, message: str) -> None:
    err = error_for(f"[relay]\n{line}\n")
    assert err.message == message
    assert err.line == 2


def test_config_table_expected() -> None:
    err = error_for("outbound = 5\n")
    assert (err.key, err.line, err.message) == ("outbound", 1, "expected a table, got integer")
    err = error_for('inbound = "x"\n')
    assert err.message == "expected an array, got string"


def test_config_bad_enum_value_lists_allowed_values() -> None:
    err = error_for(
        """
        [[inbound]]
        name = "x"
        protocol = "socks6"
        """
    )
    assert err.key == "inbound[0].protocol"
    assert err.line == 3
    assert err.message == (
        'must be one of "mixed", "socks5", "socks4", "http", "transparent"; got "socks6"'
    )
    err = error_for("[log]\nlevel = 3\n")
    assert '"debug", "info", "warning", "error"' in err.message


@pytest.mark.parametrize(
    ("section", "line"),
    [
        ("pipeline", "first_flight_max = 0"),
        ("pipeline", "first_flight_max = 65537"),
        ("relay", "buffer_size = 4095"),
        ("relay", "buffer_size = 1048577"),
        ("relay", "idle_timeout = 0"),
        ("relay", "idle_timeout = -1"),
        ("relay", "idle_timeout = nan"),
        ("relay", "idle_timeout = inf"),
        ("outbound", "happy_eyeballs_delay = -0.1"),
        ("shutdown", "drain_timeout = -1"),
    ],
)
def test_config_out_of_range_values_refused(section: str, line: str) -> None:
    err = error_for(f"[{section}]\n{line}\n")
    assert err.key == f"{section}.{line.split(' = ')[0]}"
    assert err.line == 2
    assert "must be" in err.message


@pytest.mark.parametrize(
    ("section", "line", "allowed"),
    [
        ("dns", "cache_size = -1", "between 0 and 10000000"),
        ("dns", "min_ttl = -1", "between 0 and 86400"),
        ("dns", "max_ttl = 604801", "between 0 and 604800"),
        ("dns", "negative_ttl = 86401", "between 0 and 86400"),
        ("dns", "serve_stale = -5", "between 0 and 604800"),
        ("dns", "prefetch = 1", "expected true or false"),
        ("dns.server", "rate_limit = -1", "between 0 and 1000000"),
        ("dns.server", "burst = 0", "between 1 and 1000000"),
        ("dns.server", "tcp_idle_timeout = 0", "must be"),
        ("dns.server", 'listen = "example.org:53"', "not an IP address"),
        ("dns.server", 'allow = ["192.168.1"]', "not an IP address or network"),
    ],
)
def test_config_dns_cache_and_server_bad_values(section: str, line: str, allowed: str) -> None:
    err = error_for(f"[{section}]\n{line}\n")
    assert err.key is not None and err.key.startswith(f"{section}.{line.split(' = ')[0]}")
    assert err.line == 2
    assert allowed in err.message


def test_config_dns_server_rules() -> None:
    err = error_for('[dns.server]\nenabled = true\nlisten = "0.0.0.0:53"\n')
    assert (err.key, err.line) == ("dns.server.listen", 3)
    assert "allow" in err.message and "open resolver" in err.message
    err = error_for("[dns]\nmin_ttl = 600\nmax_ttl = 60\n")
    assert err.key == "dns.min_ttl" and err.line == 2 and "at most max_ttl" in err.message
    config = parse_config(
        '[dns.server]\nenabled = true\nlisten = "[::]:53"\nallow = ["fd00::/8"]\n', "t"
    )
    assert config.dns.server.effective_allow == (ipaddress.ip_network("fd00::/8"),)
    assert DnsConfig().server.effective_allow == LOOPBACK_NETWORKS
    assert not DnsConfig().server.enabled  # off on the laptop default ...
    lan = load_config(ROOT / "configs" / "lan.toml").dns.server
    assert lan.enabled and lan.address == ("0.0.0.0", 53) and lan.allow  # ... on for a LAN


@pytest.mark.parametrize(
    ("line", "allowed"),
    [
        ("enabled = 1", "expected true or false"),
        ('listen = "status.local:9099"', "not an IP address"),
        ('listen = "127.0.0.1:70000"', "65535"),
        ('allow = ["10.0.0.300/8"]', "not an IP address or network"),
        ("timeout = 0", "must be"),
    ],
)
def test_config_web_bad_values(line: str, allowed: str) -> None:
    err = error_for(f"[web]\n{line}\n")
    assert err.key is not None and err.key.startswith(f"web.{line.split(' = ')[0]}")
    assert err.line == 2
    assert allowed in err.message


def test_config_web_off_loopback_needs_allow() -> None:
    err = error_for('[web]\nlisten = "0.0.0.0:9099"\n')
    assert (err.key, err.line) == ("web.listen", 2)
    assert "allow" in err.message
    config = parse_config('[web]\nlisten = "[::]:9099"\nallow = ["fd00::/8"]\n', "t")
    assert config.web.effective_allow == (ipaddress.ip_network("fd00::/8"),)
    # switched off, it needs nothing
    assert not parse_config('[web]\nenabled = false\nlisten = "0.0.0.0:9099"\n', "t").web.enabled
    default = load_config(None).web
    assert default.enabled and default.address == ("127.0.0.1", 9099)
    assert default.effective_allow == LOOPBACK_NETWORKS
    assert load_config(ROOT / "configs" / "lan.toml").web.address[0] == "127.0.0.1"


def test_config_range_limits_are_inclusive() -> None:
    config = parse_config(
        "[pipeline]\nfirst_flight_max = 65536\n[relay]\nbuffer_size = 4096\n", "t"
    )
    assert (config.pipeline.first_flight_max, config.relay.buffer_size) == (65536, 4096)


def test_config_missing_required_key_points_at_its_table() -> None:
    err = error_for(
        """
        [[inbound]]
        name = "a"

        [[inbound]]
        listen = "127.0.0.1:1081"
        """
    )
    assert err.key == "inbound[1].name"
    assert err.line == 4
    assert "required" in err.message


def test_config_bad_name_refused() -> None:
    err = error_for('[[inbound]]\nname = "my proxy"\n')
    assert err.key == "inbound[0].name"


def test_config_empty_inbound_list_refused() -> None:
    err = error_for("inbound = []\n")
    assert err.key == "inbound"
    assert err.line == 1


# --- inbounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:1080", "[::]:1080", "192.168.1.5:1080", "[fe80::1]:9"])
def test_config_non_loopback_listen_without_allow_refused(listen: str) -> None:
    err = error_for(
        f"""
        [[inbound]]
        name = "lan"
        listen = "{listen}"
        """
    )
    assert err.key == "inbound[0].listen"
    assert err.line == 3
    assert "allow" in err.message and "open proxy" in err.message


def test_config_non_loopback_listen_with_allow_accepted() -> None:
    config = parse_config(
        '[[inbound]]\nname = "lan"\nlisten = "[::]:1080"\nallow = ["fd00::/8"]\n', "t"
    )
    assert config.inbound[0].effective_allow == (ipaddress.ip_network("fd00::/8"),)


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:1080", "127.0.0.2:1", "[::1]:1080", "localhost:8080"]
)
def test_config_loopback_listen_admits_loopback_clients_only(listen: str) -> None:
    config = parse_config(f'[[inbound]]\nname = "x"\nlisten = "{listen}"\n', "t")
    inbound = config.inbound[0]
    assert inbound.is_loopback
    assert inbound.effective_allow == LOOPBACK_NETWORKS


def test_config_allow_is_stored_as_written_and_parsed_leniently() -> None:
    config = parse_config('[[inbound]]\nname = "x"\nallow = ["10.1.2.3/8", "192.168.1.7"]\n', "t")
    assert config.inbound[0].allow == ("10.1.2.3/8", "192.168.1.7")
    assert config.inbound[0].effective_allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
    )


def test_config_duplicate_inbound_names_refused() -> None:
    err = error_for(
        """
        [[inbound]]
        name = "proxy"
        listen = "127.0.0.1:1080"

        [[inbound]]
        name = "proxy"
        listen = "127.0.0.1:1081"
        """
    )
    assert err.key == "inbound[1].name"
    assert err.line == 6
    assert "inbound[0]" in err.message


def test_config_same_listen_address_twice_refused() -> None:
    err = error_for(
        """
        [[inbound]]
        name = "a"
        [[inbound]]
        name = "b"
        """
    )
    assert err.key == "inbound[1].listen"
    assert err.line == 3
    assert "'a' already listens" in err.message


def test_config_port_zero_may_repeat() -> None:
    text = '[[inbound]]\nname = "a"\nlisten = "127.0.0.1:0"\n[[inbound]]\nname = "b"\nlisten = "127.0.0.1:0"\n'
    assert [i.address for i in parse_config(text, "t").inbound] == [("127.0.0.1", 0)] * 2


def test_config_bad_cidr_refused_on_its_line() -> None:
    err = error_for(
        """
        [[inbound]]
        name = "lan"
        listen = "0.0.0.0:1080"
        allow = [
            "10.0.0.0/8",
            "192.168.0.0/33",
        ]
        """
    )
    assert err.key == "inbound[0].allow[1]"
    assert err.line == 6
    assert "192.168.0.0/33" in err.message


@pytest.mark.parametrize(
    ("listen", "hint"),
    [
        ("127.0.0.1:65536", "port"),
        ("127.0.0.1:-1", "port"),
        ("127.0.0.1:http", "port"),
        ("127.0.0.1:", "port"),
        ("127.0.0.1", "host:port"),
        (":1080", "host:port"),
        ("::1:1080", "brackets"),
        ("[::1]1080", "host:port"),
        ("[127.0.0.1]:1080", "IPv6"),
        ("example.com:1080", "not an IP address"),
        ("127.0.0.1:\uff11\uff10\uff18\uff10", "port"),
    ],
)
def test_config_bad_listen_refused(listen: str, hint: str) -> None:
    err = error_for(f'[[inbound]]\nname = "x"\nlisten = "{listen}"\n')
    assert err.key == "inbound[0].listen"
    assert err.line == 3
    assert hint in err.message


def test_parse_listen_forms() -> None:
    assert parse_listen("127.0.0.1:1080") == ("127.0.0.1", 1080)
    assert parse_listen("[::]:1") == ("::", 1)
    assert parse_listen("localhost:65535") == ("localhost", 65535)


def test_config_users_rules() -> None:
    err = error_for('[[inbound]]\nname = "x"\nusers = [{ username = "a:b", password = "p" }]\n')
    assert (err.key, err.line) == ("inbound[0].users[0].username", 3)
    err = error_for('[[inbound]]\nname = "x"\nusers = [{ username = "a", password = "" }]\n')
    assert err.key == "inbound[0].users[0].password"
    err = error_for(
        '[[inbound]]\nname = "x"\nusers = [{ username = "a", password = "p" }, '
        '{ username = "a", password = "q" }]\n'
    )
    assert err.key == "inbound[0].users[1].username"
    err = error_for(
        '[[inbound]]\nname = "x"\nprotocol = "socks4"\nusers = [{ username = "a", password = "p" }]\n'
    )
    assert (err.key, err.line) == ("inbound[0].users", 4)
    err = error_for('[[inbound]]\nname = "x"\nusers = [{ username = "a" }]\n')
    assert err.key == "inbound[0].users[0].password"


# --- syntax, files, messages -------------------------------------------------------------------


def test_config_toml_syntax_error_gives_line() -> None:
    err = error_for(
        """
        [relay]
        idle_timeout = 3
        splice = yes
        """
    )
    assert err.line == 3
    assert err.key is None
    assert err.message.startswith("invalid TOML")
    assert "column" in err.message
    assert str(err).startswith("test.toml:3: invalid TOML")


def test_config_error_str_format() -> None:
    err = error_for("[relay]\nidle_timeout = 'x'\n")
    assert str(err) == "test.toml:2: relay.idle_timeout: expected a number, got string"


def test_config_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert "cannot read" in str(info.value)


def test_config_load_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# ok\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.line == 2


def test_config_load_reports_the_file_as_source(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[dns]\nresolver = 'doh'\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f'{path}:2: dns.resolver: must be one of "system"')


def test_config_default_source_name() -> None:
    assert DEFAULT_SOURCE == "<embedded default>"
    with pytest.raises(ConfigError) as info:
        parse_config("x = 1\n", DEFAULT_SOURCE)
    assert str(info.value).startswith("<embedded default>:1: x: unknown key")


# --- rendering ---------------------------------------------------------------------------------


def test_config_render_masks_passwords() -> None:
    config = load_config(ROOT / "configs" / "lan.toml")
    secret = config.inbound[0].users[0].password
    shown = render_config(config)
    assert secret not in shown
    assert '"***"' in shown
    assert secret in render_config(config, mask_secrets=False)
    masked = parse_config(shown, "shown")
    assert masked.inbound[0].users[0].password == "***"


def test_config_render_default_round_trips() -> None:
    config = default_config()
    assert parse_config(render_config(config), "r") == config


def test_config_render_escapes_awkward_strings() -> None:
    user = UserConfig(username='q"\\\n\t\x7f\x00é', password="'''\"\"\"#[x]")
    inbound = InboundConfig(name="x", users=(user,))
    config = Config(inbound=(inbound,), log=LogConfig(file="C:\\logs\\s.log"))
    assert parse_config(render_config(config, mask_secrets=False), "r") == config


floats_positive = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False)
floats_non_negative = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
credentials = st.text(min_size=1, max_size=12)
networks = st.one_of(
    st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=4), st.integers(0, 32)),
    st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=6), st.integers(0, 128)),
    st.ip_addresses().map(str),
)


@st.composite
def inbounds(draw: st.DrawFn) -> InboundConfig:
    protocol: InboundProtocol = draw(st.sampled_from(typing.get_args(InboundProtocol)))
    host = draw(st.sampled_from(["127.0.0.1", "localhost", "[::1]", "0.0.0.0", "[::]", "10.1.2.3"]))
    port = draw(st.integers(0, 65535))
    loopback = host in ("127.0.0.1", "localhost", "[::1]")
    allow = draw(st.lists(networks, min_size=0 if loopback else 1, max_size=3))
    users: list[UserConfig] = []
    if protocol != "socks4":
        users = draw(
            st.lists(
                st.builds(
                    UserConfig,
                    username=credentials.filter(lambda u: ":" not in u),
                    password=credentials,
                ),
                max_size=3,
                unique_by=lambda u: u.username,
            )
        )
    return InboundConfig(
        name=draw(st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True)),
        protocol=protocol,
        listen=f"{host}:{port}",
        allow=tuple(allow),
        users=tuple(users),
        handshake_timeout=draw(floats_positive),
        udp=draw(st.booleans()),
        idle_timeout=draw(floats_positive),
    )


configs = st.builds(
    Config,
    inbound=st.lists(
        inbounds(), min_size=1, max_size=4, unique_by=(lambda i: i.name, lambda i: i.address)
    ).map(tuple),
    outbound=st.builds(
        OutboundConfig, connect_timeout=floats_positive, happy_eyeballs_delay=floats_non_negative
    ),
    pipeline=st.builds(
        PipelineConfig,
        first_flight_max=st.integers(1, 65536),
        first_flight_wait=floats_non_negative,
        first_flight_timeout=floats_positive,
    ),
    relay=st.builds(
        RelayConfig,
        idle_timeout=floats_positive,
        buffer_size=st.integers(4096, 1048576),
        splice=st.booleans(),
    ),
    dns=st.builds(DnsConfig, timeout=floats_positive),
    log=st.builds(
        LogConfig,
        level=st.sampled_from(typing.get_args(LogLevel)),
        json=st.booleans(),
        file=st.none() | st.text(min_size=1, max_size=20),
    ),
    shutdown=st.builds(ShutdownConfig, drain_timeout=floats_non_negative),
)


@given(configs)
def test_config_render_parse_round_trip(config: Config) -> None:
    text = render_config(config, mask_secrets=False)
    assert parse_config(text, "rendered") == config


@given(configs)
def test_config_masked_render_hides_only_passwords(config: Config) -> None:
    shown = parse_config(render_config(config), "shown")
    expected = dataclasses.replace(
        config,
        inbound=tuple(
            dataclasses.replace(
                i, users=tuple(dataclasses.replace(u, password="***") for u in i.users)
            )
            for i in config.inbound
        ),
    )
    assert shown == expected


# --- the generic loader ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Leaf:
    weight: float = option(1.0, check=positive)
    tags: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Branch:
    name: str
    leaf: Leaf | None = None
    leaves: tuple[Leaf, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Tree:
    kind: Literal["oak", "elm"] = "oak"
    label: str | None = None
    branch: tuple[Branch, ...] = ()


def test_configschema_builds_nested_and_optional_fields() -> None:
    text = toml(
        """
        kind = "elm"
        [[branch]]
        name = "a"
        leaves = [{ weight = 2 }, { tags = ["x"] }]
        [branch.leaf]
        weight = 3
        [[branch]]
        name = "b"
        """
    )
    tree = from_toml(Tree, text, "tree.toml")
    assert tree == Tree(
        kind="elm",
        branch=(
            Branch(name="a", leaf=Leaf(3.0), leaves=(Leaf(2.0), Leaf(tags=("x",)))),
            Branch(name="b"),
        ),
    )
    assert tree.label is None
    assert from_toml(Tree, to_toml(tree), "again") == tree


@dataclasses.dataclass(frozen=True, slots=True)
class Pair:
    low: int = 0
    high: int = 0

    def validate(self) -> None:
        if self.low > self.high:
            raise ConfigError("low must not exceed high")


def test_configschema_validate_hook_without_key_points_at_the_table() -> None:
    with pytest.raises(ConfigError) as info:
        from_toml(Pair, "low = 2\nhigh = 1\n", "pair.toml")
    assert (info.value.key, info.value.line) == (None, None)
    assert str(info.value) == "pair.toml: low must not exceed high"


def test_configschema_nested_array_of_tables_lines() -> None:
    text = toml(
        """
        [[branch]]
        name = "a"
        [[branch.leaves]]
        weight = 1
        [[branch]]
        name = "b"
        [[branch.leaves]]
        weight = 1
        [[branch.leaves]]
        weight = 0
        """
    )
    with pytest.raises(ConfigError) as info:
        from_toml(Tree, text, "tree.toml")
    assert (info.value.key, info.value.line) == ("branch[1].leaves[1].weight", 10)


def test_key_locator_handles_quotes_strings_and_comments() -> None:
    text = toml(
        '''
        # [[fake]] in a comment
        title = """
        [[not_a_header]]
        x = 1
        """
        "quoted.key" = 'lit # not a comment'
        a . b = { c = 1, d = [1, 2,
          3] }  # trailing
        [[t]]
        [[t]]
        [t.sub]
        k = 'v'
        '''
    )
    locator = KeyLocator(text)
    assert locator.line_of("title") == 2
    assert locator.line_of("x") is None
    assert locator.line_of("quoted.key") == 6
    assert locator.line_of("a.b.d[2]") == 8
    assert locator.line_of("a.b.c") == 7
    assert locator.line_of("t[1]") == 10
    assert locator.line_of("t[1].sub.k") == 12
    assert locator.line_of("t[1].sub.missing") == 11
    assert locator.line_of("nothing") is None


def test_configschema_huge_integer_for_a_number() -> None:
    err = error_for("[relay]\nidle_timeout = 1" + "0" * 400 + "\n")
    assert (err.key, err.line) == ("relay.idle_timeout", 2)
    assert "too large" in err.message


# --- [dns]: the chain and the tampering checks -------------------------------------------------


@pytest.mark.parametrize(
    ("line", "key", "says"),
    [
        ('order = "random"', "dns.order", '"race", "fallback"'),
        ("stagger = -0.5", "dns.stagger", "at least 0"),
        ('canaries = ["ok.org", "bad..name"]', "dns.canaries[1]", "not a DNS name"),
        ('canaries = ["white space.org"]', "dns.canaries[0]", "not a DNS name"),
        ('nxdomain_suffix = ""', "dns.nxdomain_suffix", "not a DNS name"),
        ('silent_server = "resolver.example"', "dns.silent_server", "not an IP address"),
        ('silent_server = "192.0.2.53:99999"', "dns.silent_server", "not a port"),
        ('local_networks = ["192.168.0.0/33"]', "dns.local_networks[0]", "not an IP address or"),
        ('blockpage_ips = ["blockpage.example"]', "dns.blockpage_ips[0]", "not an IP address"),
        ('check_cafile = ""', "dns.check_cafile", "must"),
        ("check_port = 0", "dns.check_port", "between 1 and 65535"),
        ("check_port = 70000", "dns.check_port", "between 1 and 65535"),
        ("check_interval = 0", "dns.check_interval", "greater than 0"),
        ('decoy = "yes"', "dns.decoy", "true or false"),
        ('via = ["no-such-strategy"]', "dns.via[0]", "not a socks5, http or tor strategy"),
    ],
)
def test_config_dns_check_keys_refuse_bad_values(line: str, key: str, says: str) -> None:
    err = error_for(f"[dns]\n{line}\n")
    assert err.key == key
    assert err.line == 2
    assert says in err.message


def test_config_dns_auto_needs_endpoints_and_via_needs_a_carrier() -> None:
    err = error_for('[dns]\nresolver = "auto"\n')
    assert err.key == "dns.endpoints" and "auto" in err.message
    err = error_for(
        """
        [[strategy]]
        name = "plain"
        type = "direct"
        [dns]
        via = ["plain"]
        """
    )
    assert err.key == "dns.via[0]" and "known: none are configured" in err.message
    config = parse_config(
        toml(
            """
            [[strategy]]
            name = "vps"
            type = "socks5"
            server = "127.0.0.1:1081"
            [dns]
            resolver = "auto"
            via = ["vps"]
            canaries = ["example.org"]
            [[dns.endpoints]]
            url = "https://dns.example/dns-query"
            bootstrap = ["192.0.2.1"]
            """
        ),
        "t",
    )
    assert config.dns.via == ("vps",) and config.dns.order == "race"
