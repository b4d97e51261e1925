"""YAML text → `GatewayConfig`, with every error positioned as `FILE:LINE:COL: dotted.path: msg`.

The file is composed into a node tree by `config_yaml` (never `safe_load`, which forgets
positions and silently keeps the last of two duplicate keys), then one generic converter walks
nodes and dataclass type hints together, leaving single scalars to `config_scalars`. Conversion
collects every error it can and carries on with the siblings of a bad value; the cross-field
checks of `config_checks` run once conversion is clean.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, NoReturn, Union, get_args, get_origin, get_type_hints

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.config.checks import Problem, check, did_you_mean
from gateway.config.model import (
    DEFAULT_FALLBACK_ON,
    Fallback,
    FramingConfig,
    GatewayConfig,
    RateLimit,
    RetryPolicy,
    RouteMatch,
)
from gateway.config.scalars import BadScalar, read_literal, read_scalar, scalar_text
from gateway.config.yaml_nodes import at, compose, describe, position
from gateway.errors import ConfigError, ConfigErrors

__all__ = ["load_config", "load_config_text"]


def load_config(path: str, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load and validate the config file at `path`; raises `ConfigErrors` listing every error."""
    # Errors are reported like any other config error so `validate` and reload print one format.
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        message = f"cannot read it: {exc.strerror}"
        raise ConfigErrors([ConfigError(path, 1, 1, "", message)]) from None
    try:
        # Universal newlines, as text mode reads them: a bare CR ends a line in editors too.
        text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8")
        line, column = position(before, len(before))
        message = f"cannot read it: not UTF-8 text (byte 0x{data[exc.start]:02x})"
        raise ConfigErrors([ConfigError(path, line, column, "", message)]) from None
    return load_config_text(text, path, env)


def load_config_text(text: str, source: str, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Parse config `text`; `source` names the file in error messages and `GatewayConfig.source`."""
    root = compose(text, source)
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


# ----------------------------------------------------------------- schema tweaks

# Dataclasses that may also be written as a bare scalar, giving this one field.
_SHORTHAND = {Fallback: "upstream", FramingConfig: "kind"}


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


def _retry_defaults(values: dict[str, Any]) -> None:
    # A condition the operator retries on the same upstream must not be overridden by the
    # *default* fallback_on (which fallback_on wins): `on: [first_chunk_timeout]` means retry
    # it. An explicit fallback_on is kept as written (config_checks rejects overlaps).
    if "on" in values and "fallback_on" not in values:
        on = values["on"]
        values["fallback_on"] = tuple(c for c in DEFAULT_FALLBACK_ON if c not in on)


# Applied to a dataclass's converted fields before it is built: defaults that depend on others.
_COMPLETE: dict[type, Callable[[dict[str, Any]], None]] = {RetryPolicy: _retry_defaults}


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


class _Invalid(Exception):
    """A value could not be converted; its error is already recorded."""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _parent(path: str) -> str:
    return path[: max(path.rfind("."), path.rfind("["), 0)]


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
        self.errors.append(at(self.source, mark, path, message))

    def fail(self, node: Node, path: str, message: str) -> NoReturn:
        self.error(node.start_mark, path, message)
        raise _Invalid

    def position(self, problem: Problem) -> ConfigError:
        """A check's problem positioned at its path, or the nearest ancestor written in the file."""
        marks = self.key_marks if problem.at_key else self.marks
        path = problem.path
        while path and path not in marks:
            path = _parent(path)
        return at(self.source, marks.get(path) or self.marks[""], problem.path, problem.message)

    # -- scalars: every error of reading one lands at the node's start

    def _read(self, node: Node, path: str, read: Callable[..., Any], *args: Any) -> Any:
        try:
            return read(node, *args, self.env)
        except BadScalar as exc:
            for message in exc.messages:
                self.error(node.start_mark, path, message)
            raise _Invalid from None

    def _scalar(self, node: Node, tp: Any, path: str) -> Any:
        return self._read(node, path, read_scalar, tp)

    def _literal(self, node: Node, tp: Any, path: str) -> str:
        return self._read(node, path, read_literal, get_args(tp))

    # -- collections

    def _entries(self, node: Node, path: str) -> list[tuple[str, Node, Node]]:
        """A mapping's (key, key node, value node), minus duplicates, which are reported."""
        if not isinstance(node, MappingNode):
            self.fail(node, path, f"expected a mapping, got {describe(node)}")
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
            self.fail(node, path, f"expected a list, got {describe(node)}")
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
            spec = _yaml_fields(cls)[_SHORTHAND[cls]]
            return cls(**{spec.attr: self.convert(node, spec.type, path)})
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
        complete = _COMPLETE.get(cls)
        if complete is not None:
            complete(values)
        return cls(**values)

    def _field(self, cls: type, spec: _FieldSpec, node: Node, path: str) -> Any:
        value = self.convert(node, spec.type, path)
        normalize = _NORMALIZE.get((cls, spec.attr))
        return normalize(value) if normalize else value

    def _union(self, node: Node, tp: Any, path: str) -> Any:
        members = [m for m in get_args(tp) if m is not type(None)]
        nullable = len(members) < len(get_args(tp))
        if (
            nullable
            and isinstance(node, ScalarNode)
            and self._read(node, path, scalar_text) is None
        ):
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
