"""The request target → the path the gateway routes on and the target it forwards upstream.

One rule keeps a path inside its route: what is routed is what is forwarded. Routing on the raw
target and forwarding it verbatim let `/v1/../admin/config` match the `/v1/` prefix and then
reach `/admin/config` on a backend that resolves dot segments itself. So the target is
normalised once, before routing:

- absolute-form (`http://host:port/p?q`, RFC 9112 3.2.2) is reduced to its origin-form `/p?q`;
  the authority is ignored, because the upstream only ever comes from the config;
- dot segments are removed (RFC 3986 5.2.4); the result never climbs above `/`;
- what cannot be normalised safely is refused (`BadTarget`, 400): percent-encoded dot segments,
  `/` or `\\` (a backend decoding them would see other segments than the router did), NUL and
  other control characters, malformed escapes, a backslash, and any other form of target.

The query string is forwarded unchanged. Most targets hold no `/.`, `%` or `\\`: for them this
is three substring checks and no allocation beyond the query split.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

from gateway.errors import BadRequest


class BadTarget(BadRequest):
    """A request target the gateway will not route (400)."""

    type = "bad_request_target"
    condition = "bad_request_target"


class Target(NamedTuple):
    path: str
    """Normalised and percent-decoded: what routes match against."""
    forward: str
    """Normalised, still percent-encoded, query included: what goes upstream."""


_ABSOLUTE = re.compile(r"[hH][tT][tT][pP][sS]?://[^/?#]*")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Decoded from an escape, these change how a backend splits or ends the path.
_UNSAFE_DECODED = frozenset("/\\\x7f") | frozenset(map(chr, range(0x20)))


def parse_target(raw: str) -> Target:
    """Normalise the request target as sent (`request.raw_path`); raise `BadTarget` if unsafe."""
    if raw[:1] != "/":
        raw = _origin_form(raw)
    path, sep, query = raw.partition("?")
    if "/." not in path and "%" not in path and "\\" not in path and "#" not in path:
        return Target(path, raw)  # the common case: nothing to normalise
    if "\\" in path or "#" in path:
        raise BadTarget("the request path holds a backslash or a fragment")
    if "%" in path:
        _check_escapes(path)
    if "/." in path:
        path = remove_dot_segments(path)
    decoded = unquote(path) if "%" in path else path
    return Target(decoded, path + sep + query)


def _origin_form(raw: str) -> str:
    m = _ABSOLUTE.match(raw)
    if m is None:
        raise BadTarget("the request target must be a path (origin-form) or an http(s) URL")
    rest = raw[m.end() :]
    if rest[:1] == "#":
        raise BadTarget("the request target holds a fragment")
    return rest if rest[:1] == "/" else "/" + rest


def _check_escapes(path: str) -> None:
    if _ESCAPE.search(path):
        raise BadTarget("the request path holds a malformed percent escape")
    for segment in path.split("/"):
        if "%" not in segment:
            continue
        decoded = unquote(segment)
        if decoded in (".", "..") or not _UNSAFE_DECODED.isdisjoint(decoded):
            raise BadTarget(
                "the request path holds an encoded dot segment, slash, backslash or control"
                " character"
            )


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path: `.` goes, `..` drops the segment before it."""
    out: list[str] = []
    segments = path.split("/")
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # `/a/b/..` is the directory `/a/`, trailing slash kept
    return "/" + "/".join(out)
