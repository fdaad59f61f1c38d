"""Binding TOML text to frozen dataclasses, and back.

The schema *is* the dataclasses: :func:`from_toml` reads each class's type hints and builds
instances from the parsed TOML, so adding a config section means declaring a dataclass and a
field for it, nothing more. Supported field types:

* ``str``, ``int``, ``float`` (an integer is accepted and widened), ``bool`` (never an integer);
* ``Literal["a", "b"]`` - one of the listed values;
* ``tuple[X, ...]`` - a TOML array whose items are each an ``X``;
* a dataclass - a TOML table; ``tuple[SomeDataclass, ...]`` - an array of tables;
* ``X | None`` - an optional key; it must default to ``None`` (TOML has no null);
* ``int | Literal["auto"]`` - the first member the value fits (errors come from the last one).

Per-field rules go in :func:`option` (``check=`` for the value, ``each=`` for every item of an
array, ``secret=`` to mask it when rendering). Rules spanning several fields go in a
``validate(self)`` method on the dataclass; it raises :class:`ConfigError` whose ``key`` is
relative to that dataclass (``"allow"``, ``"inbound[1].name"``), and the loader turns it into
the full key path and finds its line.

tomllib reports no positions for values, so :class:`KeyLocator` scans the text once to map key
paths (``inbound[1].allow[0]``) to the line they are written on.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar, Union

from proxy.errors import ConfigError

T = TypeVar("T")
Check = Callable[[Any], None]

MASK = "***"


# --- declaring fields --------------------------------------------------------------------------


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    check: Check | None = None,
    each: Check | None = None,
    secret: bool = False,
) -> Any:
    """A dataclass field with config rules attached.

    ``check`` gets the converted value and raises ``ValueError`` saying what is allowed;
    ``each`` does the same for every item of an array; ``secret`` masks the value in renders.
    """
    metadata = {"check": check, "each": each, "secret": secret}
    # a secret stays out of repr() too, so logging a config object can never show it
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata=metadata, repr=not secret
    )


def positive(value: float) -> None:
    """A duration or amount that must be a finite number above zero."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a number greater than 0, got {value!r}")


def non_negative(value: float) -> None:
    """A finite number that may be zero."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"must be a number of at least 0, got {value!r}")


def between(low: int, high: int) -> Check:
    """An integer from ``low`` to ``high`` inclusive."""

    def check(value: int) -> None:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")

    return check


def not_empty(value: str) -> None:
    if not value:
        raise ValueError("must not be empty")


# --- reading -----------------------------------------------------------------------------------


def from_toml(cls: type[T], text: str, source: str) -> T:
    """Parse ``text`` and build a ``cls`` from it; every problem is a :class:`ConfigError`."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(str(exc), source) from None
    return _Builder(source, KeyLocator(text)).table(cls, data, "")


def _syntax_error(message: str, source: str) -> ConfigError:
    found = re.search(r"\(at line (\d+), column (\d+)\)", message)
    if found is None:
        return ConfigError(f"invalid TOML: {message}", source=source)
    line, column = int(found[1]), found[2]
    reason = message[: found.start()].rstrip()
    return ConfigError(f"invalid TOML: {reason} (column {column})", line=line, source=source)


def join_key(path: str, key: str) -> str:
    """``join_key("inbound[0]", "allow") == "inbound[0].allow"``; indexes attach directly."""
    if not path or not key:
        return path or key
    return f"{path}{key}" if key.startswith("[") else f"{path}.{key}"


class _Builder:
    def __init__(self, source: str, locator: KeyLocator) -> None:
        self.source = source
        self.locator = locator

    def error(self, message: str, key: str) -> ConfigError:
        return ConfigError(
            message, key=key or None, line=self.locator.line_of(key), source=self.source
        )

    def table(self, cls: type[T], data: Any, path: str) -> T:
        if not isinstance(data, dict):
            raise self.error(f"expected a table, got {_kind(data)}", path)
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key in data:
            if key not in fields:
                raise self.error(_unknown_key_message(key, list(fields)), join_key(path, key))
        hints = _hints(cls)
        values: dict[str, Any] = {}
        for name, field in fields.items():
            key = join_key(path, name)
            if name not in data:
                if (
                    field.default is dataclasses.MISSING
                    and field.default_factory is dataclasses.MISSING
                ):
                    raise self.error("this key is required but missing", key)
                continue
            value = self.value(hints[name], data[name], key)
            self.run_checks(field.metadata, value, key)
            values[name] = value
        obj = cls(**values)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            try:
                validate()
            except ConfigError as exc:
                raise self.error(exc.message, join_key(path, exc.key or "")) from None
        return obj

    def value(self, tp: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) > 1:  # like int | Literal["auto"]: the first member that fits
                for member in members[:-1]:
                    try:
                        return self.value(member, value, key)
                    except ConfigError:
                        pass
                return self.value(members[-1], value, key)
            return self.value(_unwrap_optional(tp), value, key)
        if origin is Literal:
            allowed = typing.get_args(tp)
            if not any(type(value) is type(a) and value == a for a in allowed):
                choices = ", ".join(_render_value(a) for a in allowed)
                got = _render_value(value) if isinstance(value, str | int | float) else _kind(value)
                raise self.error(f"must be one of {choices}; got {got}", key)
            return value
        if origin is tuple:
            item_type = _tuple_item(tp)
            if not isinstance(value, list):
                raise self.error(f"expected an array, got {_kind(value)}", key)
            return tuple(self.value(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
        if dataclasses.is_dataclass(tp):
            return self.table(tp, value, key)  # type: ignore[arg-type]
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                try:
                    return float(value)
                except OverflowError:
                    raise self.error(f"{value} is too large", key) from None
        elif tp is str:
            if isinstance(value, str):
                return value
        else:
            raise TypeError(f"config field type {tp!r} is not supported")
        raise self.error(f"expected {_EXPECTED[tp]}, got {_kind(value)}", key)

    def run_checks(self, metadata: typing.Mapping[str, Any], value: Any, key: str) -> None:
        each = metadata.get("each")
        if each is not None and value is not None:
            for i, item in enumerate(value):
                try:
                    each(item)
                except ValueError as exc:
                    raise self.error(str(exc), f"{key}[{i}]") from None
        check = metadata.get("check")
        if check is not None and value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise self.error(str(exc), key) from None


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind(value: Any) -> str:
    """What a parsed TOML value is, in the words a user reads in a message."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _unknown_key_message(key: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(allowed) if allowed else "none"
    return f"unknown key{hint}; allowed keys here: {listed}"


def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) != 1:
        raise TypeError(f"only `X | None` unions are supported in config, not {tp!r}")
    return args[0]


def _tuple_item(tp: Any) -> Any:
    args = typing.get_args(tp)
    if len(args) != 2 or args[1] is not Ellipsis:
        raise TypeError(f"config arrays are declared tuple[X, ...], not {tp!r}")
    return args[0]


# --- finding lines -----------------------------------------------------------------------------


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BASIC_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_ML_BASIC_STRING = re.compile(r'"""(?:[^\\]|\\.)*?"""(?!")', re.DOTALL)
_ML_LITERAL_STRING = re.compile(r"'''.*?'''(?!')", re.DOTALL)
_LITERAL_STRING = re.compile(r"'[^'\n]*'")
_SCALAR = re.compile(r"[^,\]}#\r\n]+")


class KeyLocator:
    """Maps key paths to the 1-based line where they are written.

    Understands table headers (counting ``[[array]]`` occurrences, also nested ones), dotted and
    quoted keys, arrays spread over several lines and inline tables. It runs on text tomllib has
    already accepted, and it is best effort: an unknown path falls back to its nearest written
    parent (a missing key is reported on its table's header), or ``None``.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self._lines: dict[str, int] = {}
        self._array_tables: dict[str, int] = {}
        try:
            self._document()
        except (IndexError, ValueError, tomllib.TOMLDecodeError):
            pass  # keep whatever was found before the scanner got lost

    def line_of(self, path: str) -> int | None:
        while path:
            if path in self._lines:
                return self._lines[path]
            path = _parent(path)
        return None

    # the scanner: each method starts at self._pos and leaves it after what it consumed

    def _record(self, path: str, pos: int) -> None:
        self._lines.setdefault(path, bisect.bisect_left(self._newlines, pos) + 1)

    def _skip(self, newlines: bool) -> None:
        text = self._text
        while self._pos < len(text):
            c = text[self._pos]
            if c in " \t" or (newlines and c in "\r\n"):
                self._pos += 1
            elif c == "#" and newlines:
                end = text.find("\n", self._pos)
                self._pos = len(text) if end < 0 else end
            else:
                return

    def _expect(self, token: str) -> None:
        self._skip(newlines=False)
        if not self._text.startswith(token, self._pos):
            raise ValueError(f"expected {token!r} at {self._pos}")
        self._pos += len(token)

    def _document(self) -> None:
        table = ""
        while True:
            self._skip(newlines=True)
            if self._pos >= len(self._text):
                return
            start = self._pos
            if self._text.startswith("[[", start):
                self._pos += 2
                *parent, name = self._key()
                self._expect("]]")
                array = join_key(self._resolve(parent, start), name)
                index = self._array_tables.get(array, 0)
                self._array_tables[array] = index + 1
                self._record(array, start)
                table = f"{array}[{index}]"
                self._record(table, start)
            elif self._text[start] == "[":
                self._pos += 1
                table = self._resolve(self._key(), start)
                self._expect("]")
            else:
                self._key_value(table)

    def _resolve(self, segments: list[str], start: int) -> str:
        """The path of a header, with the current index of every array of tables on the way."""
        path = ""
        for segment in segments:
            path = join_key(path, segment)
            if path in self._array_tables:
                path += f"[{self._array_tables[path] - 1}]"
            self._record(path, start)
        return path

    def _key(self) -> list[str]:
        segments = []
        while True:
            self._skip(newlines=False)
            text, pos = self._text, self._pos
            if text[pos] == '"':
                found = _BASIC_STRING.match(text, pos)
                if found is None:
                    raise ValueError("unterminated key")
                segments.append(tomllib.loads(f"k = {found[0]}")["k"])
                self._pos = found.end()
            elif text[pos] == "'":
                end = text.index("'", pos + 1)
                segments.append(text[pos + 1 : end])
                self._pos = end + 1
            else:
                found = _BARE_KEY.match(text, pos)
                if found is None:
                    raise ValueError(f"no key at {pos}")
                segments.append(found[0])
                self._pos = found.end()
            self._skip(newlines=False)
            if not text.startswith(".", self._pos):
                return segments
            self._pos += 1

    def _key_value(self, table: str) -> None:
        start = self._pos
        path = table
        for segment in self._key():
            path = join_key(path, segment)
            self._record(path, start)
        self._expect("=")
        self._value(path)

    def _value(self, path: str) -> None:
        self._skip(newlines=False)
        text, pos = self._text, self._pos
        if text[pos] == "[":
            self._pos += 1
            index = 0
            while True:
                self._skip(newlines=True)
                if text[self._pos] == "]":
                    self._pos += 1
                    return
                item = f"{path}[{index}]"
                self._record(item, self._pos)
                self._value(item)
                self._skip(newlines=True)
                if text[self._pos] == ",":
                    self._pos += 1
                index += 1
        elif text[pos] == "{":
            self._pos += 1
            while True:
                self._skip(newlines=True)
                if text[self._pos] == "}":
                    self._pos += 1
                    return
                self._key_value(path)
                self._skip(newlines=True)
                if text[self._pos] == ",":
                    self._pos += 1
        else:
            for pattern in _VALUE_PATTERNS:
                found = pattern.match(text, pos)
                if found is not None:
                    self._pos = found.end()
                    return
            raise ValueError(f"no value at {pos}")


_VALUE_PATTERNS = (_ML_BASIC_STRING, _ML_LITERAL_STRING, _BASIC_STRING, _LITERAL_STRING, _SCALAR)


def _parent(path: str) -> str:
    if path.endswith("]"):
        return path[: path.rindex("[")]
    return path[: max(path.rfind("."), 0)]


# --- writing -----------------------------------------------------------------------------------


def to_toml(obj: Any, *, mask_secrets: bool = True) -> str:
    """Render a config dataclass as TOML that :func:`from_toml` reads back to an equal object
    (unless secrets are masked: those come back as ``"***"``)."""
    lines: list[str] = []
    _render_table(obj, [], lines, mask_secrets)
    return "\n".join(lines).strip("\n") + "\n"


def _render_table(obj: Any, header: list[str], lines: list[str], mask: bool) -> None:
    later: list[tuple[str, Any, bool]] = []
    hints = _hints(type(obj))
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            later.append((field.name, value, False))
        elif _is_table_array(hints[field.name], value, top=not header):
            later.append((field.name, value, True))
        else:
            if field.metadata.get("secret") and mask:
                value = MASK
            lines.append(f"{_render_key(field.name)} = {_render_value(value, mask)}")
    for name, value, is_array in later:
        path = [*header, name]
        title = ".".join(_render_key(k) for k in path)
        for item in value if is_array else (value,):
            lines.append("")
            lines.append(f"[[{title}]]" if is_array else f"[{title}]")
            _render_table(item, path, lines, mask)


def _is_table_array(tp: Any, value: Any, *, top: bool) -> bool:
    """Arrays of tables are written as ``[[name]]`` sections at the top level and whenever
    their tables contain tables; small ones inside a section are written inline."""
    if not value or typing.get_origin(tp) is not tuple:
        return False
    item = _tuple_item(tp)
    if not dataclasses.is_dataclass(item):
        return False
    return top or not all(_is_flat(hint) for hint in _hints(item).values())


def _is_flat(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return all(_is_flat(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return _is_flat(_tuple_item(tp))
    return not dataclasses.is_dataclass(tp)


def _render_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _render_string(key)


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _render_string(value: str) -> str:
    out = []
    for c in value:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _render_value(value: Any, mask: bool = True) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _render_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_render_value(v, mask) for v in value) + "]"
    if dataclasses.is_dataclass(value):
        pairs = []
        for field in dataclasses.fields(value):
            v = getattr(value, field.name)
            if v is None:
                continue
            if field.metadata.get("secret") and mask:
                v = MASK
            pairs.append(f"{_render_key(field.name)} = {_render_value(v, mask)}")
        return "{ " + ", ".join(pairs) + " }" if pairs else "{}"
    raise TypeError(f"cannot render {value!r} as TOML")
