"""The report: Markdown (headline table, one section per scenario, plots) and results.json."""

from __future__ import annotations

import json
from pathlib import Path

from .results_model import TARGETS, Row, ScenarioResult


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    size = abs(value)
    if size >= 1000:
        return f"{value:,.0f}"
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    if size >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cells(row: Row) -> list[str]:
    others = ", ".join(f"{k}: {fmt(v)}" for k, v in row.values.items() if k not in TARGETS)
    verdict = {True: "✅", False: "❌", None: ""}[row.ok]
    rel = f"{row.ratio:.2f}× {row.ratio_of}" if row.ratio is not None else ""
    return [f"{row.metric} ({row.unit})", *(fmt(row.values.get(t)) for t in TARGETS), others,
            rel, row.goal, verdict]


HEADER = ["metric", *TARGETS, "other", "gateway ÷", "goal", ""]


def _markdown_table(rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return lines


def headline(results: list[ScenarioResult]) -> list[Row]:
    return [r for res in results for r in res.rows if r.headline]


def markdown(results: list[ScenarioResult], images: dict[str, str], meta: dict) -> str:
    out = [
        "# streamgate load test report",
        "",
        f"Reproduce: `{meta['command']}` ({meta['seconds'] / 60:.1f} min, {meta['date']}).",
        "",
        f"- machine: {meta['machine']}; {meta['layout']}; load average at the end "
        f"{' '.join(meta['loadavg'])} (the machine is shared: other jobs run beside this)",
        f"- python {meta['python']}, aiohttp {meta['aiohttp']}, uvloop {meta['uvloop']}; "
        f"{meta['nginx']}; {meta['wrk']}; streamgate at `{meta['commit']}` (gateway run from "
        f"{meta['gateway_source']})",
        "- direct = the client straight to fake-llm; gateway = streamgate in front of it; "
        "nginx = Debian's nginx (`proxy_buffering off`, one worker, kept-alive upstream) in "
        "front of the same fake-llm, in the same run. Ratios are gateway ÷ the named baseline.",
        *(["", "Where the gateway's CPU goes under the same loads: "
            "[profile/PROFILE.md](profile/PROFILE.md) (`python -m loadtests --profile`)."]
          if meta.get("profiled") else []),
        "",
        "## Headline",
        "",
        *_markdown_table(headline(results)),
        "",
    ]
    for res in results:
        out += [f"## {res.title}", ""]
        if res.error:
            out += [f"**Failed:** `{res.error}`", ""]
            continue
        out += [res.measures, "", *_markdown_table(res.rows), ""]
        out += [f"- {note}" for note in res.notes]
        out += ["", f"_{res.seconds:.0f} s_", ""]
    if images:
        out += ["## Plots", ""]
        for title, name in images.items():
            out += [f"### {title}", "", f"![{title}]({name})", ""]
    return "\n".join(out)


def write(results: list[ScenarioResult], images: dict[str, str], meta: dict,
          out_dir: Path) -> Path:
    path = out_dir / "REPORT.md"
    path.write_text(markdown(results, images, meta))
    data = {
        "meta": meta,
        "scenarios": [
            {"key": r.key, "title": r.title, "seconds": round(r.seconds, 1), "error": r.error,
             "notes": r.notes,
             "rows": [{"metric": x.metric, "unit": x.unit, "values": x.values,
                       "ratio": x.ratio, "ratio_of": x.ratio_of, "goal": x.goal, "ok": x.ok}
                      for x in r.rows]}
            for r in results
        ],
    }
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    return path


def console_table(results: list[ScenarioResult]) -> str:
    rows = [HEADER] + [_cells(r) for res in results for r in res.rows]
    rows += [[f"{res.title}: FAILED {res.error}"] + [""] * (len(HEADER) - 1)
             for res in results if res.error]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    widths[0] = min(widths[0], 60)
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
