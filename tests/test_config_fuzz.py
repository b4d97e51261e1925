"""`streamgate validate` never crashes, whatever the file holds, and every error it prints is
one `FILE:LINE:COL: ...` line at the true position (issue 12, finding 7).

The fuzz is bounded and deterministic: a fixed seed, a few hundred mutations of the shipped
configs, run in-process (a second or two); a few known cases also go through the real CLI."""

from __future__ import annotations

import contextlib
import io
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.__main__ import validate

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([ROOT / "config/gateway.yaml", *(ROOT / "config/examples").glob("*.yaml")])
ERROR_LINE = re.compile(r"^[^:]+:\d+:\d+: ")
SEED, VARIANTS = 12, 300

# What a mutation may insert: YAML syntax, escapes, characters YAML forbids, odd scalars.
# fmt: off
PALETTE = [
    "\x00", "\x07", "\x1b", "\t", "\r", "\u2028", "\ufeff", "\ud800", "é", "😀",
    '"\\ud800"', '"\\udfff x"', '"\\x00"', '"\\u2029"', "'", '"', "\\",
    ":", ": ", "- ", "{", "}", "[", "]", ",", "#", "&a ", "*a", "!!binary ", "!!python/name:x",
    "? ", "|", ">", "%YAML 1.1\n", "---\n", "...\n", "<<: *a\n",
    "${", "${X}", "${X:-", "}", "-1", "1e400", "0x", "0o9", ".inf", "~", "null", "[]", "{}",
    "9" * 5000, "99999999999999999999", "1.5.5", "10q", "250ms", "-5s",
]
# fmt: on


def _mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(text) + 1)
        kind = rng.randrange(5)
        if kind == 0:
            text = text[:at] + rng.choice(PALETTE) + text[at:]
        elif kind == 1:
            text = text[:at] + text[at + rng.randint(1, 12) :]
        elif kind == 2:  # replace a value after a colon
            colon = text.find(": ", at)
            end = text.find("\n", colon)
            if colon != -1 and end != -1:
                text = text[: colon + 2] + rng.choice(PALETTE) + text[end:]
        elif kind == 3:  # duplicate, or re-indent, a line
            lines = text.split("\n")
            i = rng.randrange(len(lines))
            lines.insert(i, rng.choice([lines[i], " " + lines[i], lines[i].lstrip()]))
            text = "\n".join(lines)
        else:  # nest deeply
            text = text[:at] + "[" * rng.choice([50, 2000]) + text[at:]
    return text


def _variants() -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    sources = [(p.name, p.read_text(encoding="utf-8")) for p in SHIPPED]
    return [
        (f"{name}#{i}", _mutate(text, rng))
        for i, (name, text) in enumerate(rng.choice(sources) for _ in range(VARIANTS))
    ]


def _check_output(out: str, code: int, path: Path) -> None:
    assert code in (0, 1)
    lines = out.splitlines()
    if code == 0:
        assert lines == [f"{path}: ok"]
        return
    assert lines, "exit 1 without a word"
    for line in lines:
        assert ERROR_LINE.match(line), line
        assert "internal error" not in line, line  # validate's own last resort: a bug here


def test_mutated_configs_never_crash_validate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOSTED_API_KEY", "k")
    outcomes = {0: 0, 1: 0}
    for name, text in _variants():
        path = tmp_path / "gw.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        code = validate(str(path))
        captured = capsys.readouterr()
        assert captured.err == "", name
        _check_output(captured.out, code, path)
        outcomes[code] += 1
    assert outcomes[1] > VARIANTS // 2  # the mutations do break configs


def _line_col(text: str, needle: str) -> tuple[int, int]:
    index = text.index(needle)
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


GATEWAY_YAML = (ROOT / "config/gateway.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "old, new, needle, message",
    [
        pytest.param(
            "upstream: local",
            'upstream: "\\ud800"',
            '"\\ud800"',
            "unknown upstream '\\ud800'",
            id="lone-surrogate-escape",
        ),
        pytest.param("name: chat", "name: ch\x00at", "\x00", "character U+0000", id="nul"),
        pytest.param("name: chat", "name: ch\x07at", "\x07", "character U+0007", id="bell"),
    ],
)
def test_validate_reports_bad_characters_on_one_line_at_their_position(
    tmp_path, old, new, needle, message
):
    text = GATEWAY_YAML.replace(old, new, 1)
    path = tmp_path / "gw.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert done.returncode == 1 and done.stderr == ""
    line, column = _line_col(text, needle)
    assert done.stdout.splitlines()[0].startswith(f"{path}:{line}:{column}: ")
    assert message in done.stdout


def test_positions_count_lines_as_editors_do(tmp_path, capsys):
    """PyYAML also ends lines at U+0085, U+2028 and U+2029; editors do not."""
    text = GATEWAY_YAML.replace("name: chat", 'name: "ch\x85a\u2028t"', 1)
    text = text.replace("upstream: local", "upstream: locl", 1)
    path = tmp_path / "gw.yaml"
    path.write_text(text, encoding="utf-8")
    assert validate(str(path)) == 1
    line, column = _line_col(text, "locl")
    assert capsys.readouterr().out.startswith(f"{path}:{line}:{column}: routes[0].upstream: ")


def test_a_file_that_is_not_utf8_is_reported_at_the_bad_byte(tmp_path, capsys):
    path = tmp_path / "gw.yaml"
    path.write_bytes(b"server:\n  listen: \xff\n")
    assert validate(str(path)) == 1
    assert capsys.readouterr().out == f"{path}:2:11: cannot read it: not UTF-8 text (byte 0xff)\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        pytest.param("a: " + "[" * 5000 + "]" * 5000, "gw.yaml:1:104:", id="flow-sequences"),
        pytest.param("upstreams:\n  x: " + "{a: " * 3000, "gw.yaml:2:406:", id="flow-mappings"),
    ],
)
def test_nesting_too_deep_for_the_parser_is_one_positioned_error(tmp_path, text, expected):
    """PyYAML composes recursively: thousands of nested brackets are a RecursionError inside
    it, which must still be one error line at the bracket that went too deep."""
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert validate(str(path)) == 1
    (line,) = out.getvalue().splitlines()
    assert line.startswith(str(tmp_path / expected)) and "nested more than 100 deep" in line
