"""YAML text → `GatewayConfig`, with every error positioned as `FILE:LINE:COL: dotted.path: msg`.

The file is composed into a node tree (never `safe_load`, which forgets positions and silently
keeps the last of two duplicate keys), then one generic converter walks nodes and dataclass
type hints together. Conversion collects every error it can and carries on with the siblings
of a bad value; the cross-field checks of `config_checks` run once conversion is clean.

Plain scalars are read by the YAML 1.2 core schema: only `true`/`false` are booleans, so the
key `retry.on` and the value `access_log: off` mean what they say.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import types
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import (
    Annotated,
    Any,
    Literal,
    NamedTuple,
    NoReturn,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.config import Fallback, GatewayConfig, RateLimit, RouteMatch
from gateway.config_checks import Problem, check, did_you_mean
from gateway.errors import ConfigError, ConfigErrors

__all__ = ["load_config", "load_config_text"]


def load_config(path: str, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load and validate the config file at `path`; raises `ConfigErrors` listing every error."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        # Reported like any other config error so `validate` and reload print one format.
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigErrors([ConfigError(path, 1, 1, "", f"cannot read it: {reason}")]) from None
    return load_config_text(text, path, env)


def load_config_text(text: str, source: str, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Parse config `text`; `source` names the file in error messages and `GatewayConfig.source`."""
    root = _compose(text, source)
    converter = _Converter(source, os.environ if env is None else env)
    try:
        cfg = converter.convert(root, GatewayConfig, "")
    except _Invalid:
        raise ConfigErrors(converter.errors) from None
    if converter.errors:  # unknown and duplicate keys are reported without failing the value
        raise ConfigErrors(converter.errors)
    problems = check(cfg)
    if problems:
        raise ConfigErrors([converter.position(p) for p in problems])
    return dataclasses.replace(cfg, source=source)


# ----------------------------------------------------------------- YAML 1.2 scalars

_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose plain scalars follow the YAML 1.2 core schema (`on`, `yes` are strings).

    The resolver table is this class's own, so `yaml.SafeLoader` stays untouched.
    """

    yaml_implicit_resolvers: dict = {}  # PyYAML keeps the table on the class


# (tag, regexp, possible first characters): PyYAML only tries the resolvers registered for a
# scalar's first character. No `.inf`/`.nan`, timestamps or merge keys: no config field wants them.
_CORE_SCHEMA = (
    (_BOOL, r"true|True|TRUE|false|False|FALSE", "tTfF"),
    (_INT, r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (_FLOAT, r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?", "-+.0123456789"),
    (_NULL, r"~|null|Null|NULL|", ["~", "n", "N", ""]),
)
for tag, pattern, first in _CORE_SCHEMA:
    _Yaml12Loader.add_implicit_resolver(tag, re.compile(f"^(?:{pattern})$"), list(first))
del tag, pattern, first


def _implicit_tag(text: str) -> str:
    """The tag a plain scalar with this text resolves to (as PyYAML's resolver would)."""
    for tag, regexp in _Yaml12Loader.yaml_implicit_resolvers.get(text[:1], []):
        if regexp.match(text):
            return tag
    return _STR


def _at(source: str, mark: yaml.Mark | None, path: str, message: str) -> ConfigError:
    """A ConfigError at a PyYAML mark (0-based) in 1-based line and column."""
    line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    return ConfigError(source, line, column, path, message)


def _compose(text: str, source: str) -> Node:
    try:
        root = yaml.compose(text, Loader=_Yaml12Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"invalid YAML: {exc.problem or exc.context}"
        if mark and text[mark.index - 1 : mark.index] == "$":  # `{a: ${X}}` reads `{` as flow
            message += " (inside [...] or {...}, quote values that use ${...})"
        raise ConfigErrors([_at(source, mark, "", message)]) from None
    except yaml.YAMLError as exc:  # reader errors (bad characters) carry no mark
        raise ConfigErrors([ConfigError(source, 1, 1, "", f"invalid YAML: {exc}")]) from None
    if root is None:
        raise ConfigErrors([ConfigError(source, 1, 1, "", "the file is empty")])
    return root


def _parse_int(text: str) -> int:
    if _implicit_tag(text) != _INT:
        raise ValueError(f"expected an integer, got '{text}'")
    if text[:2] in ("0x", "0o"):
        return int(text, 0)
    return int(text, 10)  # base 10, not 0: `010` is ten, as in YAML 1.2


def _parse_float(text: str) -> float:
    tag = _implicit_tag(text)
    if tag == _INT:
        return float(_parse_int(text))
    if tag != _FLOAT:
        raise ValueError(f"expected a number, got '{text}'")
    return float(text)


def _parse_bool(text: str) -> bool:
    if _implicit_tag(text) != _BOOL:
        raise ValueError(f"expected true or false, got '{text}'")
    return text.lower() == "true"


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)?")
_SECONDS = {"ms": (1, 1000), "s": (1, 1), None: (1, 1), "m": (60, 1), "h": (3600, 1)}


def _parse_duration(text: str) -> float:
    m = _DURATION.fullmatch(text.removeprefix("-"))
    if m is None:
        raise ValueError(
            f"invalid duration '{text}' (use a number with ms, s, m or h, e.g. 250ms, 5s, 2m)"
        )
    if text.startswith("-"):
        raise ValueError(f"duration must not be negative, got '{text}'")
    times, per = _SECONDS[m[2]]
    return float(m[1]) * times / per  # divide for ms: 100/1000 is exactly 0.1, 100*0.001 is not


_SIZE = re.compile(r"(\d+(?:\.\d+)?)(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?")
_BYTES = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_BYTES |= {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _parse_size(text: str) -> int:
    m = _SIZE.fullmatch(text)
    size = Decimal(m[1]) * _BYTES[m[2]] if m else Decimal(-1)  # Decimal: 1.5MiB is exact
    if size < 0 or size != size.to_integral_value():
        raise ValueError(
            f"invalid size '{text}' (use a whole number of bytes or a unit:"
            " B, KB, MB, GB, KiB, MiB, GiB, e.g. 512KiB, 4MiB)"
        )
    return int(size)


_HOSTPORT = re.compile(r"(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)")


def _parse_hostport(text: str) -> tuple[str, int]:
    m = _HOSTPORT.fullmatch(text)
    if m is None:
        raise ValueError(
            f"invalid address '{text}' (use HOST:PORT, e.g. 0.0.0.0:8080, [::1]:8080 or :8080)"
        )
    if int(m["port"]) > 65535:
        raise ValueError(f"invalid address '{text}' (port must be 0-65535)")
    return (m["ipv6"] or m["host"] or "0.0.0.0", int(m["port"]))


# Scalar field types (a Python type, or the tag in `Annotated[...]`): what they are called in
# "expected ..." messages, and how their text is parsed.
_SCALARS: dict[object, tuple[str, Callable[[str], Any]]] = {
    int: ("an integer", _parse_int),
    float: ("a number", _parse_float),
    bool: ("true or false", _parse_bool),
    str: ("a string", str),
    "duration": ("a duration", _parse_duration),
    "size": ("a size", _parse_size),
    "hostport": ("an address HOST:PORT", _parse_hostport),
}


# ----------------------------------------------------------------- schema tweaks

# Dataclasses that may also be written as a bare scalar, giving this one field.
_SHORTHAND = {Fallback: "upstream"}


def _lower_header_key(key: str) -> str:
    return key.lower() if key.lower().startswith("header:") else key


def _upper_all(methods: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if methods is None else tuple(m.upper() for m in methods)


def _lower_keys(headers: Mapping[str, str]) -> Mapping[str, str]:
    # Header names are case-insensitive; the router compares against lower-cased request names.
    return types.MappingProxyType({k.lower(): v for k, v in headers.items()})


# Applied to a field's converted value: normal forms the rest of the gateway can rely on.
_NORMALIZE: dict[tuple[type, str], Callable[[Any], Any]] = {
    (RouteMatch, "methods"): _upper_all,
    (RouteMatch, "headers"): _lower_keys,
    (RateLimit, "key"): _lower_header_key,
}


class _FieldSpec(NamedTuple):
    attr: str
    type: Any
    required: bool


@functools.cache
def _yaml_fields(cls: type) -> dict[str, _FieldSpec]:
    """YAML key → field, for the fields that are YAML keys (metadata `yaml=None` ones are not)."""
    hints = get_type_hints(cls, include_extras=True)  # resolves config.py's string annotations
    return {
        f.metadata.get("yaml", f.name): _FieldSpec(
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
        if f.metadata.get("yaml", f.name) is not None
    }


def _kind_of(cls: type) -> str:
    return get_args(_yaml_fields(cls)["kind"].type)[0]


# ----------------------------------------------------------------- the converter

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Invalid(Exception):
    """A value could not be converted; its error is already recorded."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parent(path: str) -> str:
    return path[: max(path.rfind("."), path.rfind("["), 0)]


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    return "a list" if isinstance(node, SequenceNode) else f"'{node.value}'"


class _Converter:
    """Walks nodes and type hints together, recording errors and where each path was written."""

    def __init__(self, source: str, env: Mapping[str, str]) -> None:
        self.source = source
        self.env = env
        self.errors: list[ConfigError] = []
        self.marks: dict[str, yaml.Mark] = {}  # dotted path → start of its value
        self.key_marks: dict[str, yaml.Mark] = {}  # dotted path → start of its key

    def convert(self, node: Node, tp: Any, path: str) -> Any:
        self.marks.setdefault(path, node.start_mark)
        if dataclasses.is_dataclass(tp):
            return self._dataclass(node, tp, path)
        return _BY_ORIGIN.get(get_origin(tp), _Converter._scalar)(self, node, tp, path)

    # -- errors and positions

    def error(self, mark: yaml.Mark, path: str, message: str) -> None:
        self.errors.append(_at(self.source, mark, path, message))

    def fail(self, node: Node, path: str, message: str) -> NoReturn:
        self.error(node.start_mark, path, message)
        raise _Invalid

    def position(self, problem: Problem) -> ConfigError:
        """A check's problem positioned at its path, or the nearest ancestor written in the file."""
        marks = self.key_marks if problem.at_key else self.marks
        path = problem.path
        while path and path not in marks:
            path = _parent(path)
        return _at(self.source, marks.get(path) or self.marks[""], problem.path, problem.message)

    # -- scalars

    def _value(self, node: ScalarNode, path: str) -> str | None:
        """The scalar's text after `${VAR}` interpolation, or None for a plain null."""
        missing: list[str] = []

        def substitute(m: re.Match) -> str:
            value = self.env.get(m[1])
            if m[2] is not None and not value:  # `:-` also covers a set but empty variable
                return m[2]
            if value is None:
                missing.append(m[1])
                return m[0]
            return value

        text = _VAR.sub(substitute, node.value)
        for name in missing:
            hint = f"write ${{{name}:-default}} to give a default"
            self.error(node.start_mark, path, f"environment variable {name} is not set ({hint})")
        if missing:
            raise _Invalid
        # Only plain scalars read as null: a quoted "null" or "" is the string it says.
        return None if node.style is None and _implicit_tag(text) == _NULL else text

    def _text(self, node: Node, path: str, expected: str) -> str:
        if not isinstance(node, ScalarNode):
            self.fail(node, path, f"expected {expected}, got {_describe(node)}")
        text = self._value(node, path)
        if text is None:
            self.fail(node, path, f"expected {expected}, got null")
        return text

    def _scalar(self, node: Node, tp: Any, path: str) -> Any:
        expected, parse = _SCALARS[get_args(tp)[1] if get_origin(tp) is Annotated else tp]
        text = self._text(node, path, expected)
        try:
            return parse(text)
        except ValueError as exc:
            self.fail(node, path, str(exc))

    def _literal(self, node: Node, tp: Any, path: str) -> str:
        choices = get_args(tp)
        expected = f"one of {', '.join(choices)}"
        text = self._text(node, path, expected)
        if text not in choices:
            self.fail(node, path, f"expected {expected}, got '{text}'{did_you_mean(text, choices)}")
        return text

    # -- collections

    def _entries(self, node: Node, path: str) -> list[tuple[str, Node, Node]]:
        """A mapping's (key, key node, value node), minus duplicates, which are reported."""
        if not isinstance(node, MappingNode):
            self.fail(node, path, f"expected a mapping, got {_describe(node)}")
        entries: dict[str, tuple[str, Node, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node.start_mark, path, "keys must be plain strings")
                continue
            key = key_node.value
            if key in entries:
                first = entries[key][1].start_mark.line + 1
                message = f"duplicate key '{key}' (first at line {first})"
                self.error(key_node.start_mark, _join(path, key), message)
                continue
            self.key_marks[_join(path, key)] = key_node.start_mark
            entries[key] = (key, key_node, value_node)
        return list(entries.values())

    def _sequence(self, node: Node, tp: Any, path: str) -> tuple:
        if not isinstance(node, SequenceNode):
            self.fail(node, path, f"expected a list, got {_describe(node)}")
        items, failed = [], False
        for i, item in enumerate(node.value):
            try:
                items.append(self.convert(item, get_args(tp)[0], f"{path}[{i}]"))
            except _Invalid:
                failed = True
        if failed:
            raise _Invalid
        return tuple(items)

    def _mapping(self, node: Node, tp: Any, path: str) -> Mapping:
        value_type = get_args(tp)[1]
        result, failed = {}, False
        for key, _, value_node in self._entries(node, path):
            try:
                result[key] = self.convert(value_node, value_type, _join(path, key))
            except _Invalid:
                failed = True
        if failed:
            raise _Invalid
        return types.MappingProxyType(result)

    # -- dataclasses and unions

    def _dataclass(self, node: Node, cls: type, path: str) -> Any:
        if isinstance(node, ScalarNode) and cls in _SHORTHAND:
            return cls(**{_SHORTHAND[cls]: self.convert(node, str, path)})
        fields = _yaml_fields(cls)
        values, failed, seen = {}, False, set()
        for key, key_node, value_node in self._entries(node, path):
            spec = fields.get(key)
            seen.add(key)
            if spec is None:
                message = f"unknown key '{key}'{did_you_mean(key, fields)}"
                self.error(key_node.start_mark, _join(path, key), message)
                continue
            try:
                values[spec.attr] = self._field(cls, spec, value_node, _join(path, key))
            except _Invalid:
                failed = True
        for key in (k for k, spec in fields.items() if spec.required and k not in seen):
            self.error(node.start_mark, path, f"missing required key '{key}'")
            failed = True
        if failed:
            raise _Invalid
        return cls(**values)

    def _field(self, cls: type, spec: _FieldSpec, node: Node, path: str) -> Any:
        value = self.convert(node, spec.type, path)
        normalize = _NORMALIZE.get((cls, spec.attr))
        return normalize(value) if normalize else value

    def _union(self, node: Node, tp: Any, path: str) -> Any:
        members = [m for m in get_args(tp) if m is not type(None)]
        nullable = len(members) < len(get_args(tp))
        if nullable and isinstance(node, ScalarNode) and self._value(node, path) is None:
            return None
        if len(members) == 1:
            return self.convert(node, members[0], path)
        return self.convert(node, self._discriminate(node, members, path), path)

    def _discriminate(self, node: Node, members: list[type], path: str) -> type:
        """Which dataclass of a union a mapping is, by its `kind` (or, without one, its keys)."""
        by_kind = {_kind_of(m): m for m in members}
        if not isinstance(node, MappingNode):
            return members[0]  # converting it reports "expected a mapping"
        keys = {k.value: v for k, v in reversed(node.value) if isinstance(k, ScalarNode)}
        if "kind" in keys:
            kind = self.convert(keys["kind"], Literal[tuple(by_kind)], _join(path, "kind"))
            return by_kind[kind]
        for member in members:
            required = {k for k, spec in _yaml_fields(member).items() if spec.required}
            if required <= keys.keys():
                return member
        self.fail(node, path, f"missing required key 'kind' ({' or '.join(by_kind)})")


_BY_ORIGIN: dict[Any, Callable[[_Converter, Node, Any, str], Any]] = {
    tuple: _Converter._sequence,
    Mapping: _Converter._mapping,
    Literal: _Converter._literal,
    Union: _Converter._union,
    types.UnionType: _Converter._union,
}
