"""PNG plots from the scenarios' raw series (matplotlib, headless).

ttfc.png (TTFC distribution), chunk_gaps.png, throughput.png, resources.png (proxy CPU and
RSS over time), disconnect.png. A plot whose scenario did not run is skipped.
"""

from __future__ import annotations

from pathlib import Path

from .results_model import ScenarioResult

COLOURS = {"direct": "#555555", "gateway": "#1f77b4", "gateway+access_log": "#17becf",
           "nginx": "#2ca02c"}


def write(results: list[ScenarioResult], out_dir: Path) -> dict[str, str]:
    """Write every plot it has data for; {title: file name}. Without matplotlib (the `bench`
    extra), no plots: the numbers are still reported."""
    try:
        import matplotlib
    except ImportError:
        from .progress import say

        say("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return {}

    matplotlib.use("Agg")
    series = {r.key: r.series for r in results if not r.error}
    made: dict[str, str] = {}
    for title, name, draw in PLOTS:
        figure = draw(series)
        if figure is not None:
            figure.savefig(out_dir / name, dpi=110, bbox_inches="tight")
            made[title] = name
            import matplotlib.pyplot as plt

            plt.close(figure)
    return made


def _cdf(ax, values, label, scale=1000.0) -> None:
    import numpy as np

    if len(values) == 0:
        return
    xs = np.sort(np.asarray(values)) * scale
    ys = np.arange(1, len(xs) + 1) / len(xs)
    ax.plot(xs, ys, label=f"{label} (n={len(xs):,})", color=COLOURS.get(label))


def _ttfc(series):
    import matplotlib.pyplot as plt

    levels = series.get("ttfc", {}).get("ttfc")
    if not levels:
        return None
    fig, axes = plt.subplots(1, len(levels), figsize=(6 * len(levels), 4), squeeze=False)
    for ax, (level, by_target) in zip(axes[0], levels.items(), strict=True):
        for target, values in by_target.items():
            _cdf(ax, values, target)
        ax.set_xscale("log")
        ax.set(title=f"time to first chunk, {level}", xlabel="ms (log)", ylabel="fraction ≤ x")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return fig


def _gaps(series):
    import matplotlib.pyplot as plt
    import numpy as np

    gaps = series.get("cpu_per_chunk", {}).get("gaps")
    if not gaps:
        return None
    fig, (hist, tail) = plt.subplots(1, 2, figsize=(12, 4))
    for target, values in gaps.items():
        ms = np.asarray(values) * 1000
        if not len(ms):
            continue
        hist.hist(ms, bins=np.linspace(0, 40, 161), histtype="step", density=True,
                  label=target, color=COLOURS.get(target))
        xs = np.sort(ms)
        tail.plot(xs, 1 - np.arange(len(xs)) / len(xs), label=target, color=COLOURS.get(target))
    hist.set(title="chunk gaps at the client (paced 20 ms)", xlabel="ms", ylabel="density")
    tail.set(title="chunk gap tail", xlabel="ms", ylabel="fraction > x", yscale="log")
    for ax in (hist, tail):
        ax.grid(True, alpha=0.3)
        ax.legend()
    return fig


def _throughput(series):
    import matplotlib.pyplot as plt

    curves = series.get("cpu_per_chunk", {}).get("throughput")
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(10, 4))
    for target, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=target, color=COLOURS.get(target))
    ax.set(title="chunks received per second (paced load)", xlabel="s", ylabel="chunks/s")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


def _resources(series):
    import matplotlib.pyplot as plt

    panels = [("paced load", series.get("cpu_per_chunk", {}).get("resources")),
              ("slow streams opened, held, closed",
               series.get("memory", {}).get("resources_memory"))]
    panels = [(title, data) for title, data in panels if data]
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(7 * len(panels), 7), squeeze=False)
    for col, (title, data) in enumerate(panels):
        cpu_ax, rss_ax = axes[0][col], axes[1][col]
        for target, s in data.items():
            cpu_ax.plot(s["t"], s["cpu_pct"], label=target, color=COLOURS.get(target))
            rss_ax.plot(s["t"], s["rss_mib"], label=target, color=COLOURS.get(target))
        cpu_ax.set(title=f"proxy CPU, {title}", ylabel="% of one core")
        rss_ax.set(title=f"proxy RSS, {title}", xlabel="s", ylabel="MiB")
        for ax in (cpu_ax, rss_ax):
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    return fig


def _disconnect(series):
    import matplotlib.pyplot as plt
    import numpy as np

    data = series.get("disconnect", {}).get("disconnect")
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (target, values) in enumerate(data.items()):
        ms = np.asarray(values) * 1000
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(ms))
        ax.scatter(ms, i + jitter, s=10, color=COLOURS.get(target), alpha=0.7)
    ax.set_yticks(range(len(data)), list(data))
    ax.set(title="client close → upstream sees it gone", xlabel="ms (log)", xscale="log")
    ax.grid(True, which="both", alpha=0.3)
    return fig


PLOTS = [
    ("Time to first chunk", "ttfc.png", _ttfc),
    ("Chunk gaps", "chunk_gaps.png", _gaps),
    ("Throughput over time", "throughput.png", _throughput),
    ("Proxy CPU and RSS over time", "resources.png", _resources),
    ("Disconnect latency", "disconnect.png", _disconnect),
]
