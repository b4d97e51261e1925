"""The small rules config checks are made of, and the Problem they report."""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterator
from typing import NamedTuple


class Problem(NamedTuple):
    path: str
    message: str
    at_key: bool = False
    """Position at the key rather than the value (the name itself is what is wrong)."""


Problems = Iterator[Problem]


def did_you_mean(word: str, choices: Collection[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def at_least(path: str, value: int, minimum: int) -> Problems:
    if value < minimum:
        yield Problem(path, f"must be at least {minimum}, got {value}")


def positive(path: str, value: float, unit: str = "") -> Problems:
    if value <= 0:
        yield Problem(path, f"must be greater than 0, got {value:g}{unit}")


def absolute_path(path: str, value: str | None) -> Problems:
    if value is not None and not value.startswith("/"):
        yield Problem(path, f"must start with '/', got '{value}'")


def known(path: str, name: str, what: str, names: Collection[str]) -> Problems:
    if name not in names:
        yield Problem(path, f"unknown {what} '{name}'{did_you_mean(name, names)}")
