"""How the loader reads the declarations: which YAML key is which field, the dataclasses that
may be written as one scalar, and the normal forms and dependent defaults applied on load.
Shared by the loader and the JSON Schema generator, so the two cannot drift apart."""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, get_args, get_type_hints

from gateway.config.model import EndpointConfig, RateLimit, TokenBudget
from gateway.config.routes import (
    DEFAULT_FALLBACK_ON,
    AnswerEnd,
    Fallback,
    FramingConfig,
    RetryPolicy,
    RouteMatch,
)

# Dataclasses that may also be written as a bare scalar, giving this one field.
SHORTHAND = {Fallback: "upstream", FramingConfig: "kind", AnswerEnd: "kind"}


def _lower_header_key(key: str) -> str:
    return key.lower() if key.lower().startswith("header:") else key


def _upper_all(methods: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return None if methods is None else tuple(m.upper() for m in methods)


def _lower_keys(headers: Mapping[str, str]) -> Mapping[str, str]:
    # Header names are case-insensitive; the router compares against lower-cased request names.
    return types.MappingProxyType({k.lower(): v for k, v in headers.items()})


def _http_scheme(url: str) -> str:
    # A WebSocket server is an HTTP server (the upgrade is an HTTP request): `ws://` is dialled
    # as `http://` for plain requests and health probes, and back as `ws://` for sessions.
    for ws, http in (("ws://", "http://"), ("wss://", "https://")):
        if url[: len(ws)].lower() == ws:
            return http + url[len(ws) :]
    return url


# Applied to a field's converted value: normal forms the rest of the gateway can rely on.
NORMALIZE: dict[tuple[type, str], Callable[[Any], Any]] = {
    (EndpointConfig, "url"): _http_scheme,
    (RouteMatch, "methods"): _upper_all,
    (RouteMatch, "headers"): _lower_keys,
    (RateLimit, "key"): _lower_header_key,
    (TokenBudget, "key"): _lower_header_key,
}


def _retry_defaults(values: dict[str, Any]) -> None:
    # A condition the operator retries on the same upstream must not be overridden by the
    # *default* fallback_on (which fallback_on wins): `on: [first_chunk_timeout]` means retry
    # it. An explicit fallback_on is kept as written (config_checks rejects overlaps).
    if "on" in values and "fallback_on" not in values:
        on = values["on"]
        values["fallback_on"] = tuple(c for c in DEFAULT_FALLBACK_ON if c not in on)


# Applied to a dataclass's converted fields before it is built: defaults that depend on others.
COMPLETE: dict[type, Callable[[dict[str, Any]], None]] = {RetryPolicy: _retry_defaults}


class FieldSpec(NamedTuple):
    attr: str
    type: Any
    required: bool


@functools.cache
def yaml_fields(cls: type) -> dict[str, FieldSpec]:
    """YAML key → field, for the fields that are YAML keys (metadata `yaml=None` ones are not)."""
    hints = get_type_hints(cls, include_extras=True)  # resolves config.py's string annotations
    return {
        f.metadata.get("yaml", f.name): FieldSpec(
            f.name,
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
        if f.metadata.get("yaml", f.name) is not None
    }


def kind_of(cls: type) -> str:
    return get_args(yaml_fields(cls)["kind"].type)[0]
