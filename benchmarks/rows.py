"""
Issue 12's rows: the caller's loop stall cold and warm, and the CPU per write against its floors.

A :class:`Case` is one measurement (repeated); a :class:`Row` reads one figure from a case, and may divide it by
another row's figure before checking it against its targets. Cases that rows share are measured once per
repeat. To add a row, add its case to :data:`CASES` (a new way of writing is a contender class and a line in
:data:`benchmarks.child.MODULES`) and its rows to :data:`ROWS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.report import median
from benchmarks.results import Measurement
from benchmarks.runner import Harness, log
from benchmarks.workloads import Workload

__all__ = ["CASES", "ROWS", "Case", "Row", "lower_share", "measure_rows", "rows_text"]


@dataclass(frozen=True)
class Case:
    """
    One measurement of the rows, repeated.

    :param kind: ``process`` (first write of a fresh process: imports done, then the ticker starts), ``loop``
        (first write on a new loop of a process that wrote on another) or ``warm`` (after warm-up writes).
    :param contender: A key of :data:`benchmarks.child.MODULES`.
    :param writes: Concurrent writes.
    :param features: Features in each.
    """

    kind: str
    contender: str
    writes: int
    features: int

    @property
    def workload(self) -> Workload:
        """The writes, named after the case."""
        return Workload(f"{self.kind}-{self.writes}x{self.features}", self.writes, self.features, False)


def stall_ms(run: Measurement) -> float:
    """:return: The worst lateness of the caller's loop, ms."""
    return run.stall.worst_ms


def cpu_ms(run: Measurement) -> float:
    """:return: The process CPU per write, ms."""
    return run.cpu_ms_per_write


def rss_mb(run: Measurement) -> float:
    """:return: The peak RSS growth, MB."""
    return run.rss.peak_growth_mb


@dataclass(frozen=True)
class Row:
    """
    One figure of issue 12's tables.

    :param key: Its name (``--rows``).
    :param title: What it measures.
    :param case: The key of its case in :data:`CASES`.
    :param figure: Reads the figure from a measurement.
    :param unit: The figure's unit.
    :param must: The figure (or its ratio to ``versus``) must be at most this; `None`: no target.
    :param goal: It should be at most this.
    :param versus: The row whose figure this one's is divided by before the targets are checked.
    """

    key: str
    title: str
    case: str
    figure: Callable[[Measurement], float]
    unit: str
    must: float | None = None
    goal: float | None = None
    versus: str | None = None


CASES = {
    "cold-process": Case("process", "AsyncS3Sink", 1, 500),
    "cold-loop": Case("loop", "AsyncS3Sink", 1, 500),
    "warm-100k": Case("warm", "AsyncS3Sink", 1, 100_000),
    "warm-50x500": Case("warm", "AsyncS3Sink", 50, 500),
    "seq-100k": Case("warm", "AsyncS3Sink-seq", 1, 100_000),
    "write-60k": Case("warm", "AsyncS3Sink", 1, 60_000),
    "open-60k": Case("warm", "AsyncS3Sink.open", 1, 60_000),
    "to-thread-100k": Case("warm", "S3Sink", 1, 100_000),
    "floor-thread-100k": Case("warm", "floor-thread", 1, 100_000),
    "floor-multipart-100k": Case("warm", "floor-multipart", 1, 100_000),
    "floor-put-100k": Case("warm", "floor-put", 1, 100_000),
    "obstore-200x500": Case("warm", "obstore", 200, 500),
    "sink-200x500": Case("warm", "AsyncS3Sink", 200, 500),
}

ROWS = [
    Row("cold-process", "stall: first write of a fresh process", "cold-process", stall_ms, "ms", 15, 10),
    Row("cold-loop", "stall: first write on a new loop of a process that wrote", "cold-loop", stall_ms, "ms", 15, 10),
    Row("warm-100k", "stall: 100k features (~52 MB) on a warm loop", "warm-100k", stall_ms, "ms", 10, 5),
    Row("warm-100k-rss", "peak RSS growth: 100k features on a warm loop", "warm-100k", rss_mb, "MB"),
    Row("seq-100k", "stall: 100k features as a GeoJSON text sequence", "seq-100k", stall_ms, "ms", 10, 5),
    Row("seq-100k-rss", "peak RSS growth: 100k features as a text sequence", "seq-100k", rss_mb, "MB"),
    Row("write-60k", "stall: write of 60k features", "write-60k", stall_ms, "ms", 10, 5),
    Row("write-60k-rss", "peak RSS growth: write of 60k features", "write-60k", rss_mb, "MB"),
    Row("open-60k", "stall: open(), 60k features in 240 batches from 8 tasks", "open-60k", stall_ms, "ms", 10, 5),
    Row("open-60k-rss", "peak RSS growth: open(), 60k features, 240 batches", "open-60k", rss_mb, "MB"),
    Row("warm-50x500", "stall: 50 concurrent writes of 500 features", "warm-50x500", stall_ms, "ms", 10, 5),
    Row("to-thread-100k", "stall: to_thread(S3Sink.write, 100k features)", "to-thread-100k", stall_ms, "ms", 10, 5),
    Row("to-thread-floor", "stall: to_thread(multipart floor on its own loop)", "floor-thread-100k", stall_ms, "ms"),
    Row(
        "to-thread-vs-floor",
        "stall: to_thread S3Sink vs its floor",
        "to-thread-100k",
        stall_ms,
        "ms",
        versus="to-thread-floor",
    ),
    Row(
        "cpu-floor-multipart",
        "CPU 100k: multipart floor (8 MiB parts, 4 at once)",
        "floor-multipart-100k",
        cpu_ms,
        "ms",
    ),
    Row("cpu-floor-put", "CPU 100k: single-PutObject floor", "floor-put-100k", cpu_ms, "ms"),
    Row(
        "cpu-big",
        "CPU 100k: AsyncS3Sink vs multipart floor",
        "warm-100k",
        cpu_ms,
        "ms",
        1.2,
        1.2,
        "cpu-floor-multipart",
    ),
    Row(
        "cpu-big-put",
        "CPU 100k: AsyncS3Sink vs single-PutObject floor",
        "warm-100k",
        cpu_ms,
        "ms",
        versus="cpu-floor-put",
    ),
    Row("cpu-obstore", "CPU per write, 200 x 500 features: obstore", "obstore-200x500", cpu_ms, "ms"),
    Row(
        "cpu-small",
        "CPU per write, 200 x 500: AsyncS3Sink vs obstore",
        "sink-200x500",
        cpu_ms,
        "ms",
        3,
        1.5,
        "cpu-obstore",
    ),
]

# One figure per row and source (``new``, or ``base`` for --baseline), per repeat.
Figures = dict[str, dict[str, list[float]]]


def measure_rows(
    harness: Harness, rows: list[Row], repeats: int, baseline: str | None, diagnose: bool
) -> tuple[Figures, list[tuple[str, Measurement]]]:
    """
    Measure the rows' cases ``repeats`` times, on this checkout and, interleaved, on the baseline's.

    :param harness: The server and data set.
    :param rows: The rows.
    :param repeats: Runs of each case.
    :param baseline: Another checkout's ``src`` folder, or `None`.
    :param diagnose: Run the stall diagnoser on the last run of each case.
    :return: The figures, and the diagnosed runs.
    """
    figures: Figures = {row.key: {"new": [], "base": []} for row in rows}
    diagnosed: list[tuple[str, Measurement]] = []
    sources = [("new", None), *([("base", baseline)] if baseline else [])]
    cases = list(dict.fromkeys(row.case for row in rows))
    for repeat in range(repeats):
        for name in cases:
            case = CASES[name]
            # Alternated, so that neither side always runs first (and meets the machine in another state).
            for label, source in sources if repeat % 2 == 0 else sources[::-1]:
                last = diagnose and repeat == repeats - 1 and label == "new"
                run = harness.measure(case.kind, case.workload, case.contender, diagnose=last, source=source)
                if last:
                    diagnosed.append((name, run))
                for row in rows:
                    if row.case == name:
                        figures[row.key][label].append(row.figure(run))
                        log(f"[{repeat + 1}/{repeats}] {row.key:<20} {label:<4} {row.figure(run):9.2f} {row.unit}")
    return figures, diagnosed


def _verdict(row: Row, figure: float, versus: float | None) -> tuple[str, str, bool]:
    # The ratio to the row divided by (if any), the target and the state, and whether the must is met.
    ratio = ""
    if row.versus is not None:
        if not versus:
            return "", f"(no {row.versus} figure)", row.must is None
        figure /= versus
        ratio = f"{figure:.2f}x"
    if row.must is None:
        return ratio, "", True
    goal = row.goal if row.goal is not None else row.must
    state = "goal met" if figure <= goal else "must met" if figure <= row.must else "MISSED"
    unit = "x" if row.versus else f" {row.unit}"
    return ratio, f"must <= {row.must:g}{unit}, goal <= {goal:g}{unit}: {state}", figure <= row.must


def lower_share(new: list[float], base: list[float]) -> float:
    """
    How often this checkout's figure is below the baseline's, over every pair of their runs (ties count half): a
    check on a ratio of medians, which one noisy run can swing; pooled over several runs it settles.

    :param new: This checkout's figures.
    :param base: The baseline's.
    :return: The share of pairs, from 0 to 1; NaN without figures on both sides.
    """
    if not new or not base:
        return float("nan")
    below = sum((a < b) + 0.5 * (a == b) for a in new for b in base)
    return below / (len(new) * len(base))


def rows_text(rows: list[Row], figures: Figures) -> tuple[str, bool]:
    """
    Each row's median, its target and verdict, and the baseline's median, the ratio and :func:`lower_share` if
    measured.

    :param rows: The rows.
    :param figures: From :func:`measure_rows`.
    :return: The table's text, and whether every row meets its must.
    """
    medians = {key: {label: median(values) for label, values in sides.items()} for key, sides in figures.items()}
    lines = [f"{'row':<55} {'median':>10} {'base':>8} {'/base':>6} {'lower':>6} {'ratio':>6}  target"]
    met = True
    for row in rows:
        new, base = medians[row.key]["new"], medians[row.key]["base"]
        ratio, target, ok = _verdict(row, new, medians.get(row.versus or "", {}).get("new"))
        met = met and ok
        base_text, change, lower = ("", "", "")
        if base == base:
            share = lower_share(figures[row.key]["new"], figures[row.key]["base"])
            base_text, change, lower = f"{base:8.2f}", f"{new / base:6.2f}", f"{share:6.0%}"
        lines.append(
            f"{row.title:<55} {new:7.2f} {row.unit:<2} {base_text:>8} {change:>6} {lower:>6} {ratio:>6}  {target}"
        )
    return "\n".join(lines), met
