"""From measurements to the summary, the side-by-side table, the targets and the stall diagnosis, as text."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from benchmarks.results import Measurement
from benchmarks.workloads import Workload

__all__ = ["Figures", "Target", "diagnosis_text", "evaluate_targets", "summarise", "table", "targets_text"]

MB = 1_000_000


def median(values: Iterable[float]) -> float:
    """:return: The median of ``values``, NaN for none."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


@dataclass
class Figures:
    """
    One contender on one workload over its runs: seconds the best of them, the rest medians (``_max``: worst).

    :param seconds_from: ``clock``, or ``WriteResult`` where the peers report reads the sink's own figure.
    """

    runs: int
    call_mode: str
    seconds: float
    payload_mb: float
    mb_per_s: float
    writes_per_s: float
    stall_ms: float
    stall_ms_max: float
    rss_growth_mb: float
    cpu_s: float
    cpu_ms_per_write: float
    server_cpu_s: float | None
    verified: bool
    speedup_vs_seed: float | None = None
    x_of_floor: float | None = None
    seconds_from: str = "clock"


Summary = dict[str, dict[str, Figures]]


def _figures(workload: Workload, mine: list[Measurement], payload: int) -> Figures:
    seconds = min(run.seconds for run in mine)
    server = [run.cpu.server_cpu_s for run in mine if run.cpu.server_cpu_s is not None]
    return Figures(
        runs=len(mine),
        call_mode=mine[0].call_mode,
        seconds=seconds,
        payload_mb=payload / MB,
        mb_per_s=payload / MB / seconds,
        writes_per_s=workload.writes / seconds,
        stall_ms=median(run.stall.worst_ms for run in mine),
        stall_ms_max=max(run.stall.worst_ms for run in mine),
        rss_growth_mb=median(run.rss.peak_growth_mb for run in mine),
        cpu_s=median(run.cpu.cpu_s for run in mine),
        cpu_ms_per_write=median(run.cpu_ms_per_write for run in mine),
        server_cpu_s=median(server) if server else None,
        verified=all(run.verified for run in mine),
        seconds_from=mine[0].seconds_from,
    )


def summarise(runs: list[Measurement], workloads: list[Workload], contenders: list[str]) -> Summary:
    """
    Aggregate the runs of each workload and contender.

    :param runs: Every measurement.
    :param workloads: The workloads, in order.
    :param contenders: The contenders, in order.
    :return: ``{workload: {contender: figures}}``.
    """
    summary: Summary = {}
    for workload in workloads:
        here = [run for run in runs if run.workload == workload.key]
        # Throughput counts the compact collection's bytes, the smallest body sent, for every contender, those
        # that send more included (json.dumps puts spaces after separators): it is the same collection.
        payload = min((run.bytes for run in here), default=0)
        by_contender: dict[str, Figures] = {}
        for contender in contenders:
            mine = [run for run in here if run.contender == contender]
            if mine:
                by_contender[contender] = _figures(workload, mine, payload)
        seed, floor = by_contender.get("seed"), by_contender.get("floor")
        for figures in by_contender.values():
            figures.speedup_vs_seed = seed.seconds / figures.seconds if seed else None
            figures.x_of_floor = figures.seconds / floor.seconds if floor else None
        summary[workload.key] = by_contender
    return summary


def number(value: float | None, digits: int = 1) -> str:
    """:return: ``value`` for a table with ``digits`` decimals, ``-`` when missing."""
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def table(summary: Summary, workloads: list[Workload]) -> str:
    """
    The side-by-side table, one block per workload.

    :param summary: From :func:`summarise`.
    :param workloads: The workloads, in order.
    :return: The table as text.
    """
    header = (
        f"{'contender':<15} {'call':<9} {'n':>2} {'seconds':>8} {'MB/s':>7} {'writes/s':>9} "
        f"{'stall ms med (max)':>19} {'ΔRSS MB':>8} {'CPU s':>6} {'CPU ms/w':>8} {'srv CPU':>7} {'vs seed':>8} "
        f"{'x floor':>8}"
    )
    lines: list[str] = []
    for workload in workloads:
        figures = summary.get(workload.key, {})
        if not figures:
            continue
        payload = next(iter(figures.values())).payload_mb
        lines += ["", f"{workload.key}: {workload.title()}, {payload:,.1f} MB", header, "-" * len(header)]
        for contender, row in figures.items():
            stall = f"{number(row.stall_ms)} ({number(row.stall_ms_max)})"
            lines.append(
                f"{contender:<15} {row.call_mode:<9} {row.runs:>2} {row.seconds:>8.3f} "
                f"{row.mb_per_s:>7.1f} {number(row.writes_per_s, 2):>9} {stall:>19} "
                f"{row.rss_growth_mb:>8.1f} {row.cpu_s:>6.2f} {row.cpu_ms_per_write:>8.1f} "
                f"{number(row.server_cpu_s, 2):>7} {_ratio(row.speedup_vs_seed):>8} {_ratio(row.x_of_floor):>8}"
                + ("" if row.verified else "  (objects NOT verified)")
            )
    return "\n".join(lines)


@dataclass
class Target:
    """A target of the sink's table: what is checked, the value, ``<=`` or ``>=`` the limit, and if met."""

    target: str
    check: str
    value: float | None
    comparison: str
    limit: float
    met: bool | None = field(init=False)

    def __post_init__(self) -> None:
        higher = self.comparison == ">="
        value = self.value
        self.met = None if value is None else value >= self.limit if higher else value <= self.limit


def evaluate_targets(summary: Summary, workloads: dict[str, Workload]) -> list[Target]:
    """
    Judge AsyncS3Sink against its targets.

    :param summary: From :func:`summarise`.
    :param workloads: The workloads of this run's sizes, by key, for the sizes in the targets' names.
    :return: One target per check.
    """

    def ratio(workload: str, top: str, bottom: str, field: str) -> float | None:
        found = summary.get(workload, {})
        if top not in found or bottom not in found:
            return None
        return float(getattr(found[top], field) / getattr(found[bottom], field))

    def sink(workload: str, field: str) -> float | None:
        found = summary.get(workload, {}).get("AsyncS3Sink")
        return None if found is None else float(getattr(found, field))

    size, many = workloads["single"].features, workloads["concurrent"]
    writes = f"{many.writes} concurrent {many.features}-feature writes"
    sink_ms = "ms, median over runs of each run's worst"
    return [
        Target(
            f"worst event-loop stall during one {size:,}-feature write", sink_ms, sink("single", "stall_ms"), "<=", 10
        ),
        Target(
            f"one {size:,}-feature write vs the seed",
            "speedup: seed seconds / AsyncS3Sink seconds",
            ratio("single", "seed", "AsyncS3Sink", "seconds"),
            ">=",
            3,
        ),
        Target(
            f"one {size:,}-feature write vs the floor",
            "x of floor: AsyncS3Sink seconds / floor seconds",
            ratio("single", "AsyncS3Sink", "floor", "seconds"),
            "<=",
            1.15,
        ),
        Target(
            f"{writes} vs the seed through to_thread",
            "writes/s ratio: AsyncS3Sink / seed",
            ratio("concurrent", "AsyncS3Sink", "seed", "writes_per_s"),
            ">=",
            3,
        ),
        Target(
            f"{writes} vs the floor",
            "x of floor: floor writes/s / AsyncS3Sink writes/s",
            ratio("concurrent", "floor", "AsyncS3Sink", "writes_per_s"),
            "<=",
            1.1,
        ),
        Target(
            f"peak RSS growth streaming {workloads['stream-300k'].features:,} features from a generator",
            "MB, median over runs",
            sink("stream-300k", "rss_growth_mb"),
            "<=",
            100,
        ),
    ]


def targets_text(targets: list[Target], quick: bool) -> str:
    """
    The targets, one line each, with whether each is met.

    :param targets: From :func:`evaluate_targets`.
    :param quick: Whether sizes were reduced, which makes the targets indicative only.
    :return: The text.
    """
    title = "targets (AsyncS3Sink)" + (" — quick run: smaller sizes, indicative only" if quick else "")
    lines = ["", title]
    for target in targets:
        state = {True: "MET ", False: "MISS", None: "n/a "}[target.met]
        value = "not measured" if target.value is None else f"{target.value:.2f}"
        lines.append(f"  [{state}] {target.target}: {value} {target.comparison} {target.limit:g} ({target.check})")
    return "\n".join(lines)


def diagnosis_text(runs: list[tuple[str, Measurement]]) -> str:
    """
    What the stall diagnoser found, per diagnostic run.

    :param runs: Each diagnostic run, with a label.
    :return: The text.
    """
    lines = ["", "stall diagnosis (runs with the watchdog on: the table's are extra runs, the rows' their last run)"]
    for label, run in runs:
        found, stall = run.diagnosis, run.stall
        if found is None:
            continue
        lines += [
            "",
            f"{label}: {run.seconds:.3f} s, worst stall {stall.worst_ms:.1f} ms, p99 {stall.p99_ms:.1f} ms, "
            f"{stall.over_10ms} ticks over 10 ms, {found.stalls} stalls over {found.threshold_ms:.0f} ms",
        ]
        if found.window_ms:
            window = found.window_ms
            lines.append(
                f"  loop thread over {window:.0f} ms of stalls: on a CPU {found.on_cpu_ms / window:.0%} (running "
                f"callbacks), runnable but waiting for a core {found.waiting_for_core_ms / window:.0%}, "
                f"blocked {found.blocked_ms / window:.0%} (asleep on the GIL another thread holds)"
            )
        collections = ", ".join(
            f"{generation} x{count} (longest {longest:.1f} ms)"
            for generation, (count, longest) in found.collections.items()
        )
        lines.append(f"  garbage collections: {collections}")
        lines.append(f"  loop callbacks over the threshold: {found.slow_callback_count}")
        lines += [f"    {ms:7.1f} ms  {callback}" for ms, callback in found.slow_callbacks]
        for title, frames in (("busy threads", found.busy_frames), ("loop thread", found.loop_frames)):
            if frames:
                lines.append(f"  {title} while the loop was late (samples):")
                lines += [f"    {count:4d}  {frame}" for frame, count in frames]
        for lateness, sample in found.longest[:3]:
            lines.append(f"  stall of {lateness:.1f} ms, first sample:")
            for thread, stack in sample.items():
                lines.append(f"    [{thread}]")
                lines += [f"      {entry}" for entry in stack[-6:]]
    return "\n".join(lines)
