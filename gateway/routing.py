"""Ordered first-match routing, compiled once per config.

Routes are tried in file order and the first whose every `match` field holds wins. To keep
the cost flat as routes grow, each route is indexed by the only field every request has, its
path: exact paths in a dict, prefixes in a dict per prefix length, and routes without a path
in a list. A request looks up its own path (one dict probe per distinct prefix length), and
only those candidates, merged back into file order, have their other fields checked.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .config import Route

_CANDIDATE_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What routing looks at: the request line, its headers, and the body's "model"."""

    method: str
    path: str
    headers: Mapping[str, str]
    """Case-insensitive lookups (aiohttp's CIMultiDictProxy, or lower-cased keys)."""
    model: str | None


class CompiledRoute:
    __slots__ = ("index", "route", "methods", "model_re", "headers")

    def __init__(self, index: int, route: Route) -> None:
        m = route.match
        self.index = index
        self.route = route
        self.methods = frozenset(m.methods) if m.methods else None
        self.model_re = re.compile(fnmatch.translate(m.model)).match if m.model else None
        self.headers = tuple(m.headers.items())

    def matches(self, facts: RequestFacts) -> bool:
        """Every field but the path (the index has checked that)."""
        if self.methods is not None and facts.method not in self.methods:
            return False
        for name, value in self.headers:
            if facts.headers.get(name) != value:
                return False
        if self.model_re is not None:
            return facts.model is not None and self.model_re(facts.model) is not None
        return True

    def mismatch(self, facts: RequestFacts) -> str | None:
        """Why this route does not match, in words, or None when it does (for `explain`)."""
        m = self.route.match
        if m.path is not None and facts.path != m.path:
            return f"path {facts.path!r} is not {m.path!r}"
        if m.path_prefix is not None and not facts.path.startswith(m.path_prefix):
            return f"path {facts.path!r} does not start with {m.path_prefix!r}"
        if self.methods is not None and facts.method not in self.methods:
            return f"method {facts.method} is not one of {', '.join(sorted(self.methods))}"
        for name, value in self.headers:
            got = facts.headers.get(name)
            if got != value:
                shown = "absent" if got is None else repr(got)
                return f"header {name} is {shown}, not {value!r}"
        if self.model_re is not None:
            if facts.model is None:
                return f'the body has no "model" (route wants {m.model!r})'
            if self.model_re(facts.model) is None:
                return f"model {facts.model!r} does not match {m.model!r}"
        return None


class Router:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.compiled = tuple(CompiledRoute(i, r) for i, r in enumerate(routes))
        self._exact: dict[str, list[CompiledRoute]] = {}
        self._prefix: dict[str, list[CompiledRoute]] = {}
        self._any_path: list[CompiledRoute] = []
        for cr in self.compiled:
            m = cr.route.match
            if m.path is not None:
                self._exact.setdefault(m.path, []).append(cr)
            elif m.path_prefix is not None:
                self._prefix.setdefault(m.path_prefix, []).append(cr)
            else:
                self._any_path.append(cr)
        self._prefix_lengths = sorted({len(p) for p in self._prefix})
        self._candidates_by_path: dict[str, tuple[CompiledRoute, ...]] = {}

    def match(self, facts: RequestFacts) -> Route | None:
        for cr in self._candidates(facts.path):
            if cr.matches(facts):
                return cr.route
        return None

    def _candidates(self, path: str) -> tuple[CompiledRoute, ...]:
        found = self._candidates_by_path.get(path)
        if found is None:
            found = self._collect(path)
            # Paths come from clients, so the cache is bounded; when full it is simply reset.
            if len(self._candidates_by_path) >= _CANDIDATE_CACHE_SIZE:
                self._candidates_by_path.clear()
            self._candidates_by_path[path] = found
        return found

    def _collect(self, path: str) -> tuple[CompiledRoute, ...]:
        found = list(self._exact.get(path, ()))
        for length in self._prefix_lengths:
            if length > len(path):
                break
            found.extend(self._prefix.get(path[:length], ()))
        found.extend(self._any_path)
        found.sort(key=lambda cr: cr.index)
        return tuple(found)
