"""Ordered first-match routing, compiled once per config.

Routes are tried in file order and the first whose every `match` field holds wins. To keep
the cost flat as routes grow, routes are indexed twice:
- by path: exact paths in a dict, prefixes in a dict per prefix length, routes without a
  path in a list; a request probes its own path once per distinct prefix length;
- then, among those, by the literal start of their `model` glob (`tenant-7-*` under
  `tenant-7-`), the same way, so a thousand tenants on one path cost a few dict probes.
Only the candidates found, merged back into file order, have their other fields checked.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.config.routes import Route

_CANDIDATE_CACHE_SIZE = 4096


@dataclass(slots=True)
class RequestFacts:
    """What routing looks at: the request line, its headers, and the body's "model"."""

    method: str
    path: str
    headers: Mapping[str, str]
    """Case-insensitive lookups (aiohttp's CIMultiDictProxy, or lower-cased keys)."""
    model: str | None
    protocol: str = "http"
    """The listener's protocol: "grpc" for a call to `server.grpc_listen`, which only routes
    with a `grpc` block take (and they take nothing else)."""

    @property
    def websocket(self) -> bool:
        """An `Upgrade: websocket` request: only routes with a `websocket` block take it."""
        return self.headers.get("upgrade", "").lower() == "websocket"


def upstream_protocol(route: Route) -> str:
    """Which of its pools' protocol clients a route's tries use: "grpc" for gRPC calls,
    "grpc_bridge" for an HTTP route served from a gRPC method, "websocket" for a WebSocket
    passthrough or an HTTP route bridged to a WebSocket upstream, else "http" (a WebSocket
    client bridged to SSE included)."""
    if route.grpc is not None:
        return "grpc"
    if route.grpc_bridge is not None:
        return "grpc_bridge"
    ws = route.websocket
    if route.websocket_upstream is not None or (ws is not None and ws.upstream == "websocket"):
        return "websocket"
    return "http"


class CompiledRoute:
    __slots__ = ("index", "route", "methods", "model_re", "headers", "websocket", "grpc", "grpc_re")

    def __init__(self, index: int, route: Route) -> None:
        m = route.match
        self.index = index
        self.route = route
        self.methods = frozenset(m.methods) if m.methods else None
        self.model_re = re.compile(fnmatch.translate(m.model)).match if m.model else None
        self.headers = tuple(m.headers.items())
        self.websocket = route.websocket is not None
        self.grpc = route.grpc is not None
        glob = route.grpc.method if self.grpc and route.grpc.method != "*" else None
        self.grpc_re = re.compile(fnmatch.translate(glob)).match if glob else None

    def matches(self, facts: RequestFacts) -> bool:
        """Every field but the path (the index has checked that)."""
        if self.websocket != facts.websocket or self.grpc != (facts.protocol == "grpc"):
            return False
        if self.grpc_re is not None and self.grpc_re(facts.path) is None:
            return False
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
        if self.grpc != (facts.protocol == "grpc"):
            if self.grpc:
                return "a gRPC route, and this is no gRPC call"
            return "a gRPC call, and this route has no grpc block"
        if self.grpc_re is not None and self.grpc_re(facts.path) is None:
            return f"method {facts.path!r} does not match {self.route.grpc.method!r}"
        if self.websocket != facts.websocket:
            if self.websocket:
                return "a WebSocket route, and this is no Upgrade: websocket request"
            return "an Upgrade: websocket request, and this route has no websocket block"
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


class ModelIndex:
    """The routes of one path, indexed by the literal prefix of their `model` glob."""

    __slots__ = ("_any_model", "_exact", "_prefixed", "_lengths", "_unindexed")

    def __init__(self, routes: tuple[CompiledRoute, ...]) -> None:
        self._any_model: list[CompiledRoute] = []  # no model constraint
        self._exact: dict[str, list[CompiledRoute]] = {}  # a glob with no wildcard
        self._prefixed: dict[str, list[CompiledRoute]] = {}
        self._unindexed: list[CompiledRoute] = []  # a glob that starts with a wildcard
        for cr in routes:
            pattern = cr.route.match.model
            if pattern is None:
                self._any_model.append(cr)
                continue
            prefix, literal = _literal_prefix(pattern)
            if literal:
                self._exact.setdefault(prefix, []).append(cr)
            elif prefix:
                self._prefixed.setdefault(prefix, []).append(cr)
            else:
                self._unindexed.append(cr)
        self._lengths = sorted({len(p) for p in self._prefixed})

    def candidates(self, model: str | None) -> list[CompiledRoute]:
        found = list(self._any_model)
        if model is not None:
            found.extend(self._exact.get(model, ()))
            for length in self._lengths:
                if length > len(model):
                    break
                found.extend(self._prefixed.get(model[:length], ()))
            found.extend(self._unindexed)
            found.sort(key=_file_order)
        return found


def _literal_prefix(pattern: str) -> tuple[str, bool]:
    """The part of a glob before its first wildcard, and whether that is all of it."""
    for i, char in enumerate(pattern):
        if char in "*?[":
            return pattern[:i], False
    return pattern, True


def _file_order(cr: CompiledRoute) -> int:
    return cr.index


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
        self._by_path: dict[str, ModelIndex] = {}

    def match(self, facts: RequestFacts) -> Route | None:
        for cr in self._index(facts.path).candidates(facts.model):
            if cr.matches(facts):
                return cr.route
        return None

    def _index(self, path: str) -> ModelIndex:
        index = self._by_path.get(path)
        if index is None:
            index = ModelIndex(self._collect(path))
            # Paths come from clients, so the cache is bounded; when full it is simply reset.
            if len(self._by_path) >= _CANDIDATE_CACHE_SIZE:
                self._by_path.clear()
            self._by_path[path] = index
        return index

    def _collect(self, path: str) -> tuple[CompiledRoute, ...]:
        found = list(self._exact.get(path, ()))
        for length in self._prefix_lengths:
            if length > len(path):
                break
            found.extend(self._prefix.get(path[:length], ()))
        found.extend(self._any_path)
        found.sort(key=_file_order)
        return tuple(found)
