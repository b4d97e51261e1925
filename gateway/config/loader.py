"""YAML text → `GatewayConfig`, with every error positioned as `FILE:LINE:COL: dotted.path: msg`.

The file is composed into a node tree by `config_yaml` (never `safe_load`, which forgets
positions and silently keeps the last of two duplicate keys), then one generic converter walks
nodes and dataclass type hints together, leaving single scalars to `config_scalars`. Conversion
collects every error it can and carries on with the siblings of a bad value; the cross-field
checks of `config_checks` run once conversion is clean.
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.config.checks import check
from gateway.config.descriptor_sets import anchor_descriptor_sets
from gateway.config.fields import COMPLETE, NORMALIZE, SHORTHAND, FieldSpec, kind_of, yaml_fields
from gateway.config.model import GatewayConfig
from gateway.config.rules import Problem, did_you_mean
from gateway.config.scalars import BadScalar, read_literal, read_scalar, scalar_text
from gateway.config.yaml_nodes import at, compose, describe, position
from gateway.errors import ConfigError, ConfigErrors

__all__ = ["load_config", "load_config_text", "read_config_text"]


def load_config(
    path: str, env: Mapping[str, str] | None = None, workers: int | None = None
) -> GatewayConfig:
    """Load and validate the config file at `path`; raises `ConfigErrors` listing every error.
    `workers` (the command line's `--workers`) replaces `server.workers` before the checks."""
    return load_config_text(read_config_text(path), path, env, workers)


def read_config_text(path: str) -> str:
    """The config file's text; raises `ConfigErrors` when it cannot be read as UTF-8."""
    # Errors are reported like any other config error so `validate` and reload print one format.
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        message = f"cannot read it: {exc.strerror}"
        raise ConfigErrors([ConfigError(path, 1, 1, "", message)]) from None
    try:
        # Universal newlines, as text mode reads them: a bare CR ends a line in editors too.
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8")
        line, column = position(before, len(before))
        message = f"cannot read it: not UTF-8 text (byte 0x{data[exc.start]:02x})"
        raise ConfigErrors([ConfigError(path, line, column, "", message)]) from None


def load_config_text(
    text: str, source: str, env: Mapping[str, str] | None = None, workers: int | None = None
) -> GatewayConfig:
    """Parse config `text`; `source` names the file in error messages and `GatewayConfig.source`."""
    root = compose(text, source)
    converter = _Converter(source, os.environ if env is None else env)
    try:
        cfg = converter.convert(root, GatewayConfig, "")
    except _Invalid:
        raise ConfigErrors(converter.errors) from None
    if converter.errors:  # unknown and duplicate keys are reported without failing the value
        raise ConfigErrors(converter.errors)
    cfg = anchor_descriptor_sets(cfg, os.path.dirname(source))
    if workers is not None:
        cfg = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, workers=workers))
    problems = check(cfg)
    if problems:
        raise ConfigErrors([converter.position(p) for p in problems])
    return dataclasses.replace(cfg, source=source)


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
        if isinstance(node, ScalarNode) and cls in SHORTHAND:
            spec = yaml_fields(cls)[SHORTHAND[cls]]
            return cls(**{spec.attr: self.convert(node, spec.type, path)})
        fields = yaml_fields(cls)
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
        complete = COMPLETE.get(cls)
        if complete is not None:
            complete(values)
        return cls(**values)

    def _field(self, cls: type, spec: FieldSpec, node: Node, path: str) -> Any:
        value = self.convert(node, spec.type, path)
        normalize = NORMALIZE.get((cls, spec.attr))
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
        by_kind = {kind_of(m): m for m in members}
        if not isinstance(node, MappingNode):
            return members[0]  # converting it reports "expected a mapping"
        keys = {k.value: v for k, v in reversed(node.value) if isinstance(k, ScalarNode)}
        if "kind" in keys:
            kind = self.convert(keys["kind"], Literal[tuple(by_kind)], _join(path, "kind"))
            return by_kind[kind]
        for member in members:
            required = {k for k, spec in yaml_fields(member).items() if spec.required}
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
