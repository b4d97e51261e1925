"""One scalar YAML node → one config value: `${VAR}` interpolation, then the field type's parser.

Readers raise `BadScalar` with messages that all belong at the node's start; the converter in
`config_loader` attaches the position and dotted path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Annotated, Any, get_args, get_origin

from yaml.nodes import Node, ScalarNode

from gateway.config.rules import did_you_mean
from gateway.config.units import available_cpus
from gateway.config.yaml_nodes import BOOL, FLOAT, INT, NULL, describe, implicit_tag

__all__ = ["BadScalar", "parse_processes", "read_literal", "read_scalar", "scalar_text"]


class BadScalar(Exception):
    """A scalar could not be read; each message is one error at the node's start."""

    def __init__(self, *messages: str) -> None:
        super().__init__(*messages)
        self.messages = messages


def _parse_int(text: str) -> int:
    if implicit_tag(text) != INT:
        raise ValueError(f"expected an integer, got '{text}'")
    if text[:2] in ("0x", "0o"):
        return int(text, 0)
    return int(text, 10)  # base 10, not 0: `010` is ten, as in YAML 1.2


def _parse_float(text: str) -> float:
    tag = implicit_tag(text)
    if tag == INT:
        return float(_parse_int(text))
    if tag != FLOAT:
        raise ValueError(f"expected a number, got '{text}'")
    return float(text)


def _parse_bool(text: str) -> bool:
    if implicit_tag(text) != BOOL:
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


def parse_processes(text: str) -> int:
    """`auto` (one per available CPU) or a whole number; also the CLI's `--workers`."""
    if text == "auto":
        return available_cpus()
    if implicit_tag(text) != INT:
        raise ValueError(f"expected a whole number of processes or auto, got '{text}'")
    return _parse_int(text)


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
    "processes": ("a number of processes or auto", parse_processes),
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def scalar_text(node: ScalarNode, env: Mapping[str, str]) -> str | None:
    """The scalar's text after `${VAR}` interpolation, or None for a plain null."""
    missing: list[str] = []

    def substitute(m: re.Match) -> str:
        value = env.get(m[1])
        if m[2] is not None and not value:  # `:-` also covers a set but empty variable
            return m[2]
        if value is None:
            missing.append(m[1])
            return m[0]
        return value

    text = _VAR.sub(substitute, node.value)
    messages = []
    for name in missing:
        hint = f"write ${{{name}:-default}} to give a default"
        messages.append(f"environment variable {name} is not set ({hint})")
    if messages:
        raise BadScalar(*messages)
    # Only plain scalars read as null: a quoted "null" or "" is the string it says.
    return None if node.style is None and implicit_tag(text) == NULL else text


def _text(node: Node, expected: str, env: Mapping[str, str]) -> str:
    if not isinstance(node, ScalarNode):
        raise BadScalar(f"expected {expected}, got {describe(node)}")
    text = scalar_text(node, env)
    if text is None:
        raise BadScalar(f"expected {expected}, got null")
    return text


def read_scalar(node: Node, tp: Any, env: Mapping[str, str]) -> Any:
    """The value of scalar field type `tp` (a key of `_SCALARS`, maybe inside `Annotated`)."""
    expected, parse = _SCALARS[get_args(tp)[1] if get_origin(tp) is Annotated else tp]
    text = _text(node, expected, env)
    try:
        return parse(text)
    except ValueError as exc:
        raise BadScalar(str(exc)) from None


def read_literal(node: Node, choices: tuple[str, ...], env: Mapping[str, str]) -> str:
    """The node's text, which must be one of `choices`."""
    expected = f"one of {', '.join(choices)}"
    text = _text(node, expected, env)
    if text not in choices:
        raise BadScalar(f"expected {expected}, got '{text}'{did_you_mean(text, choices)}")
    return text
