"""The user documentation stays true: README.md and the generated docs/configuration.md.

The reference is regenerated from the config dataclasses and compared with the committed file;
the README's commands are checked against ``sidestep --help``; its troubleshooting table must
explain every verdict and outcome name the log can show.
"""

from __future__ import annotations

import contextlib
import io
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from proxy import checkcli, configdoc
from proxy.cli import _parser, main
from proxy.config import (
    Config,
    DnsConfig,
    LogConfig,
    default_config,
    parse_config,
    render_config,
)
from proxy.configschema import between, non_negative
from proxy.detect.outcome import Outcome
from proxy.detect.verdict import Verdict

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "configuration.md"


def _help(*command: str) -> str:
    """What ``sidestep COMMAND --help`` prints (in-process: the same parser, no interpreter start)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*command, "--help"])
    return out.getvalue()


def _subcommands(help_text: str) -> set[str]:
    """The names argparse lists under "positional arguments" (4-space indented)."""
    section = help_text.split("positional arguments:", 1)[-1].split("options:", 1)[0]
    return {m[1] for m in re.finditer(r"^ {4}([a-z][a-z0-9-]*)", section, re.MULTILINE)}


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:sh|shell|console)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def _readme_commands() -> list[list[str]]:
    """``sidestep ...`` invocations in the README's shell blocks, as word lists after the name."""
    commands = []
    for block in _shell_blocks(README.read_text(encoding="utf-8")):
        for line in block.splitlines():
            line = line.split("#", 1)[0]
            for part in re.split(r"&&|\|\||;|\|", line):
                words = part.split()
                if words and re.fullmatch(r"(?:\S*/)?sidestep", words[0]):
                    commands.append(words[1:])
    return commands


# --- (a) the reference is generated and current ------------------------------------------------


def test_configuration_reference_is_current() -> None:
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    if committed != configdoc.render():
        pytest.fail(
            f"docs/configuration.md is stale; refresh it with: {configdoc.REFRESH_COMMAND}",
            pytrace=False,
        )


def test_configuration_reference_lists_every_key_config_show_renders() -> None:
    documented = {
        (section.header.strip("[]"), key.name)
        for section in configdoc.sections()
        for key in section.keys
    }
    rendered = tomllib.loads(render_config(default_config()))
    headers = {s.header.strip("[]") for s in configdoc.sections()}

    def walk(table: dict[str, Any], path: str) -> None:
        for key, value in table.items():
            here = f"{path}.{key}" if path else key
            if isinstance(value, dict):
                walk(value, here)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                walk(value[0], here)
            elif path or key not in headers:
                assert (path, key) in documented, f"{here} is missing from the reference"

    walk(rendered, "")
    assert set(Config.__dataclass_fields__) <= headers, "every top-level section has a heading"


def test_configuration_reference_describes_every_key_and_rule() -> None:
    roots = [root for _, _, root in configdoc.parts()]
    assert Config in roots and len(roots) >= 2  # the proxy and the bridge server
    undescribed = []
    unexplained = []
    for root in roots:
        for section in configdoc.sections(root):
            for key in section.keys:
                if not key.description:
                    undescribed.append(f"{section.header} {key.name}")
                if configdoc.UNDESCRIBED in key.allowed:
                    unexplained.append(f"{section.header} {key.name}")
    assert not undescribed, (
        f"write a `#:` comment above these config fields (or add them to configdoc): {undescribed}"
    )
    assert not unexplained, f"say what these keys allow in configdoc._CHECK_WORDS: {unexplained}"


def test_configuration_reference_shows_types_defaults_and_allowed_values() -> None:
    text = configdoc.render()
    assert (
        '| `resolver` | string | `"system"` | `"system"`, `"udp"`, `"secure"`, `"auto"` |' in text
    )
    assert "| `buffer_size` | integer | `65536` | 4096 to 1048576 |" in text
    assert "| `name` | string | *required* |" in text
    assert "| `allow` | array of strings | `[]` | each: an IP address or network" in text
    assert 'shown as `"***"`' in text  # the passwords are flagged secret
    assert 'Default: one table: `name = "mixed"`.' in text  # the default inbound
    assert "### `[[dns.endpoints]]`" in text and "### `[dns.server]`" in text
    assert "### `[bridge]`" in text and "### `[destinations]`" in text


def test_configdoc_reads_doc_comments_from_the_source() -> None:
    comments = configdoc.field_comments(DnsConfig)
    assert comments["timeout"] == "seconds to wait for an answer"
    assert comments["resolver"].startswith('"system" asks the operating system')
    assert comments["resolver"].endswith("switches to `endpoints`")  # several lines, joined
    assert "level" not in configdoc.field_comments(LogConfig)  # no `#:` above it


def test_configdoc_describes_value_rules() -> None:
    assert configdoc.describe_check(between(3, 9)) == "3 to 9"
    assert configdoc.describe_check(non_negative) == "0 or more"

    def odd(value: int) -> None:
        """An odd number.

        More words that are not shown."""

    assert configdoc.describe_check(odd) == "An odd number"
    assert configdoc.describe_check(lambda value: None) == "checked when loaded"


def test_configdoc_type_words() -> None:
    hints = typing.get_type_hints(DnsConfig)
    assert configdoc.describe_type(hints["check_cafile"]) == "string, optional"
    assert configdoc.describe_type(hints["endpoints"]) == "array of tables"
    assert configdoc.describe_type(hints["canaries"]) == "array of strings"
    assert configdoc.describe_type(hints["server"]) == "table"
    assert configdoc.describe_type(hints["order"]) == "string"
    assert configdoc.describe_type(hints["stagger"]) == "number"


def test_configdoc_command_line_check_and_write(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "docs" / "configuration.md"
    assert configdoc.main(["--out", str(out)]) == 0
    assert configdoc.main(["--check", str(out)]) == 0
    out.write_text("old\n", encoding="utf-8")
    assert configdoc.main(["--check", str(out)]) == 1
    assert configdoc.REFRESH_COMMAND in capsys.readouterr().err
    assert configdoc.main(["--check", str(tmp_path / "absent.md")]) == 1


def test_sidestep_config_reference_prints_the_reference(capsys: Any) -> None:
    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == configdoc.render()


# --- (b) every command the README shows exists -------------------------------------------------


def test_readme_commands_exist() -> None:
    commands = _readme_commands()
    assert len(commands) >= 10, "the README's shell blocks should show sidestep's commands"
    top = _subcommands(_help())
    config_actions = _subcommands(_help("config"))
    for words in commands:
        assert words, "a bare `sidestep` in the README"
        name = words[0]
        assert name in top, f"README shows `sidestep {name}`, which `sidestep --help` lacks"
        if name == "config":
            action = words[1] if len(words) > 1 else ""
            assert action in config_actions, f"README shows `sidestep config {action}`: no such"


def _parse_like_main(words: list[str]) -> None:
    """Parse ``sidestep WORDS`` the way :func:`proxy.cli.main` does, without running it."""
    if words[:1] == ["check"]:
        checkcli.check_parser().parse_args(words[1:])
    elif words[:1] == ["probe"] and checkcli.wants_site_probe(words[1:]):
        checkcli.probe_parser().parse_args(words[1:])
    else:
        _parser().parse_args(words)


def test_readme_command_options_parse() -> None:
    """Each README invocation is accepted by sidestep's own parsers (options and their values)."""
    for words in _readme_commands():
        try:
            _parse_like_main(words)
        except SystemExit as exc:  # argparse's way of refusing
            pytest.fail(f"`sidestep {' '.join(words)}` does not parse (exit {exc.code})")


# --- (c) the README starts with the two commands -----------------------------------------------


def test_readme_starts_with_make_run_and_make_test() -> None:
    text = README.read_text(encoding="utf-8")
    title, _, rest = text.partition("\n")
    assert title.startswith("# ")
    first = re.match(r"\s*```sh\n(.*?)```", rest, re.DOTALL)
    assert first is not None, "the first thing after the title must be a shell block"
    commands = [line.split("#", 1)[0].strip() for line in first[1].splitlines()]
    assert commands == ["make run", "make test"]


# --- (d) troubleshooting explains every name the log shows -------------------------------------


def _troubleshooting_names() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.MULTILINE))


def test_readme_troubleshooting_explains_every_verdict() -> None:
    names = _troubleshooting_names()
    missing = [v.value for v in Verdict if v.value not in names]
    assert not missing, f"add these verdicts to the README's troubleshooting table: {missing}"


def test_readme_troubleshooting_explains_every_outcome() -> None:
    names = _troubleshooting_names()
    missing = [o.value for o in Outcome if o.value not in names]
    assert not missing, f"add these outcomes to the README's troubleshooting table: {missing}"


def test_readme_config_examples_are_valid() -> None:
    blocks = re.findall(r"^```toml\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        parse_config(block, f"README.md toml block {i + 1}")  # raises ConfigError if not
