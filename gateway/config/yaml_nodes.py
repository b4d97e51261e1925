"""Config text → a YAML node tree that remembers where every value was written.

The file is composed into nodes (never `safe_load`, which forgets positions and silently keeps
the last of two duplicate keys), so later stages can point errors at `FILE:LINE:COL`.

Plain scalars are read by the YAML 1.2 core schema: only `true`/`false` are booleans, so the
key `retry.on` and the value `access_log: off` mean what they say.
"""

from __future__ import annotations

import re

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from gateway.errors import ConfigError, ConfigErrors

STR = "tag:yaml.org,2002:str"
NULL = "tag:yaml.org,2002:null"
BOOL = "tag:yaml.org,2002:bool"
INT = "tag:yaml.org,2002:int"
FLOAT = "tag:yaml.org,2002:float"


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader whose plain scalars follow the YAML 1.2 core schema (`on`, `yes` are strings).

    The resolver table is this class's own, so `yaml.SafeLoader` stays untouched.
    """

    yaml_implicit_resolvers: dict = {}  # PyYAML keeps the table on the class


# (tag, regexp, possible first characters): PyYAML only tries the resolvers registered for a
# scalar's first character. No `.inf`/`.nan`, timestamps or merge keys: no config field wants them.
_CORE_SCHEMA = (
    (BOOL, r"true|True|TRUE|false|False|FALSE", "tTfF"),
    (INT, r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (FLOAT, r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?", "-+.0123456789"),
    (NULL, r"~|null|Null|NULL|", ["~", "n", "N", ""]),
)
for tag, pattern, first in _CORE_SCHEMA:
    _Yaml12Loader.add_implicit_resolver(tag, re.compile(f"^(?:{pattern})$"), list(first))
del tag, pattern, first


def implicit_tag(text: str) -> str:
    """The tag a plain scalar with this text resolves to (as PyYAML's resolver would)."""
    for tag, regexp in _Yaml12Loader.yaml_implicit_resolvers.get(text[:1], []):
        if regexp.match(text):
            return tag
    return STR


def at(source: str, mark: yaml.Mark | None, path: str, message: str) -> ConfigError:
    """A ConfigError at a PyYAML mark, in 1-based line and column as an editor counts them.

    PyYAML's own line count also breaks lines at U+0085, U+2028 and U+2029 (YAML 1.1), so a
    file holding one would be misreported from there on; the mark's index into the text is
    exact, and lines are counted from it (errors only, so the scan costs nothing at run time)."""
    if mark is None:
        return ConfigError(source, 1, 1, path, message)
    if isinstance(mark.buffer, str):
        line, column = position(mark.buffer, mark.index)
    else:
        line, column = mark.line + 1, mark.column + 1
    return ConfigError(source, line, column, path, message)


def compose(text: str, source: str) -> Node:
    """The root node of `text`; raises `ConfigErrors` if it is not YAML or is empty."""
    try:
        root = yaml.compose(text, Loader=_Yaml12Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = f"invalid YAML: {exc.problem or exc.context}"
        if mark and text[mark.index - 1 : mark.index] == "$":  # `{a: ${X}}` reads `{` as flow
            message += " (inside [...] or {...}, quote values that use ${...})"
        raise ConfigErrors([at(source, mark, "", message)]) from None
    except yaml.reader.ReaderError as exc:  # a character YAML forbids: no mark, a position
        line, column = position(text, exc.position)
        message = f"invalid YAML: character {_codepoint(exc.character)} is not allowed here"
        raise ConfigErrors([ConfigError(source, line, column, "", message)]) from None
    except yaml.YAMLError as exc:  # nothing else is expected; still one line, never a crash
        first = str(exc).split("\n", 1)[0]
        raise ConfigErrors([ConfigError(source, 1, 1, "", f"invalid YAML: {first}")]) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        line, column = position(text, _too_deep_at(text))
        message = f"invalid YAML: collections nested more than {MAX_FLOW_DEPTH} deep"
        raise ConfigErrors([ConfigError(source, line, column, "", message)]) from None
    if root is None:
        raise ConfigErrors([ConfigError(source, 1, 1, "", "the file is empty")])
    return root


MAX_FLOW_DEPTH = 100
"""Deeper `[` / `{` nesting than any config needs; where the error is placed when PyYAML's
recursive composer gives up on a file."""


def _too_deep_at(text: str) -> int:
    """Index of the first bracket that opens past MAX_FLOW_DEPTH (0 when none is found)."""
    depth = 0
    for index, char in enumerate(text):
        if char in "[{":
            depth += 1
            if depth > MAX_FLOW_DEPTH:
                return index
        elif char in "]}":
            depth = max(0, depth - 1)
    return 0


def position(text: str, index: int) -> tuple[int, int]:
    """1-based line and column of `text[index]`."""
    line_start = text.rfind("\n", 0, index) + 1
    return text.count("\n", 0, index) + 1, index - line_start + 1


def _codepoint(character: int | bytes) -> str:
    value = character if isinstance(character, int) else ord(character)
    return f"U+{value:04X}"


def describe(node: Node) -> str:
    """A node as "got ..." messages name it."""
    if isinstance(node, MappingNode):
        return "a mapping"
    return "a list" if isinstance(node, SequenceNode) else f"'{node.value}'"
