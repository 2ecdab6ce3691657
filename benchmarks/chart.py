"""The peers report's chart (throughput, worst event-loop stall, peak RSS growth) and its Markdown table."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen here: render to a file only

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from benchmarks.report import Summary

__all__ = ["draw", "markdown", "short"]

OURS = ("AsyncS3Sink", "S3Sink")
WORKLOADS = ("single", "concurrent", "stream-300k")
COLOURS = {"single": "#1f77b4", "concurrent": "#ff7f0e", "stream-300k": "#2ca02c"}
RATES = {
    "single": ("mb_per_s", "MB/s"),
    "concurrent": ("writes_per_s", "writes/s"),
    "stream-300k": ("mb_per_s", "MB/s"),
}
# Panel title, log scale, and per workload the figure drawn and its unit.
PANELS: tuple[tuple[str, bool, dict[str, tuple[str, str]]], ...] = (
    ("throughput (higher is better)", False, RATES),
    ("worst event-loop stall, ms (log scale; lower is better)", True, dict.fromkeys(WORKLOADS, ("stall_ms", "ms"))),
    ("peak RSS growth, MB (lower is better)", False, dict.fromkeys(WORKLOADS, ("rss_growth_mb", "MB"))),
)


def short(value: float) -> str:
    """
    A figure as the chart and the README show it.

    :param value: The figure.
    :return: No decimals from 10 on, one below.
    """
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def draw(summary: Summary, titles: dict[str, str], path: Path, caption: str) -> None:
    """
    Three panels side by side, the contenders down each, a bar per workload with its value at the end.

    :param summary: ``{workload: {contender: figures}}``, with ``single``, ``concurrent`` and ``stream-300k``.
    :param titles: Each workload's one-line description, for the legend.
    :param path: Where to write the PNG.
    :param caption: A line under the title: the date and the machine.
    """
    workloads = [key for key in WORKLOADS if summary.get(key)]
    contenders = list(dict.fromkeys(name for key in workloads for name in summary[key]))
    figure, axes = plt.subplots(
        1, len(PANELS), figsize=(17, 0.25 * len(workloads) * len(contenders) + 2.6), sharey=True
    )
    height = 0.8 / len(workloads)
    for axis, (title, log, shown) in zip(axes, PANELS, strict=True):
        for slot, workload in enumerate(workloads):
            key, unit = shown[workload]
            offset = (slot - (len(workloads) - 1) / 2) * height
            figures = summary[workload]
            rows = [
                (i + offset, float(getattr(figures[name], key))) for i, name in enumerate(contenders) if name in figures
            ]
            # A bar of 0 has no place on a log scale: drawn as 0.05, labelled with its value.
            axis.barh([y for y, _ in rows], [max(v, 0.05) for _, v in rows], height, color=COLOURS[workload])
            for y, value in rows:
                axis.annotate(f" {short(value)} {unit}", (max(value, 0.05), y), va="center", fontsize=7.5)
        axis.set_title(title, fontsize=10)
        if log:
            axis.set_xscale("log")
        axis.margins(x=0.3)
        axis.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(contenders)), contenders)
    axes[0].invert_yaxis()
    for label in axes[0].get_yticklabels():
        if label.get_text() in OURS:
            label.set_fontweight("bold")
    axes[0].set_xlabel("MB/s for one write (single, stream-300k), writes/s for the concurrent writes", fontsize=8)
    handles = [Rectangle((0, 0), 1, 1, color=COLOURS[key]) for key in workloads]
    legend = [f"{key}: {titles[key]}" for key in workloads]
    figure.legend(handles, legend, loc="lower center", ncol=len(workloads), fontsize=8.5, frameon=False)
    figure.suptitle(f"model-runner-sink and its peers, writing GeoJSON to S3 (moto)\n{caption}", fontsize=11)
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(summary: Summary, cold: dict[str, dict[str, float]]) -> str:
    """
    The chart's figures as a Markdown table: a row per contender; per workload throughput, stall, RSS growth and
    CPU per write; then the cold start's stall.

    :param summary: The peers report's summary.
    :param cold: Per contender, the cold start's ``stall_ms``.
    :return: The table.
    """
    shown = [key for key in WORKLOADS if summary.get(key)]
    head = ["contender", "call"]
    for key in shown:
        head += [f"{key} {RATES[key][1]}", "stall ms", "ΔRSS MB", "CPU ms/write"]
    head.append("cold-start stall ms")
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for name in dict.fromkeys(name for key in shown for name in summary[key]):
        rows = [summary[key].get(name) for key in shown]
        modes = dict.fromkeys(row.call_mode for row in rows if row)
        cells = [f"**{name}**" if name in OURS else name, " / ".join(modes)]
        for key, row in zip(shown, rows, strict=True):
            figures = (RATES[key][0], "stall_ms", "rss_growth_mb", "cpu_ms_per_write")
            cells += [short(float(getattr(row, figure))) if row else "-" for figure in figures]
        cells.append(short(cold[name]["stall_ms"]) if name in cold else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
