"""From raw measurements to the summary, the side-by-side table, the targets and the stall diagnosis."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

from benchmarks.workloads import Workload

__all__ = ["diagnosis_text", "evaluate_targets", "summarise", "table", "targets_text"]

MB = 1_000_000


def _median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def _figures(workload: Workload, mine: list[dict[str, Any]], payload: int) -> dict[str, Any]:
    seconds = min(run["seconds"] for run in mine)
    server = [run["cpu"]["server_cpu_s"] for run in mine if run["cpu"]["server_cpu_s"] is not None]
    return {
        "runs": len(mine),
        "call_mode": mine[0]["call_mode"],
        "seconds": seconds,
        "seconds_all": [run["seconds"] for run in mine],
        "payload_mb": payload / MB,
        "sent_mb": mine[0]["bytes"] / MB,
        "mb_per_s": payload / MB / seconds,
        "writes_per_s": workload.writes / seconds,
        "stall_ms": _median(run["stall"]["worst_ms"] for run in mine),
        "stall_ms_max": max(run["stall"]["worst_ms"] for run in mine),
        "stall_p99_ms": _median(run["stall"]["p99_ms"] for run in mine),
        "rss_growth_mb": _median(run["rss"]["peak_growth_mb"] for run in mine),
        "rss_growth_mb_max": max(run["rss"]["peak_growth_mb"] for run in mine),
        "cpu_s": _median(run["cpu"]["cpu_s"] for run in mine),
        "server_cpu_s": _median(server) if server else None,
        "full_collections": _median(run["gc"]["collections"][2] for run in mine),
        "verified": all(run.get("verified", False) for run in mine),
    }


def summarise(runs: list[dict[str, Any]], workloads: list[Workload], contenders: list[str]) -> dict[str, Any]:
    """
    Aggregate the runs of each workload and contender.

    Wall time is the best of the runs, the usual estimate of what the code costs when the machine does not get
    in the way; the other figures are medians over the runs (worst stall: the median of each run's worst, with
    the worst of all beside it).

    :param runs: Every measurement.
    :param workloads: The workloads, in order.
    :param contenders: The contenders, in order.
    :return: ``{workload: {contender: figures}}``.
    """
    summary: dict[str, Any] = {}
    for workload in workloads:
        here = [run for run in runs if run["workload"] == workload.key]
        # Throughput counts the compact collection's bytes, the smallest body sent, for every contender, those
        # that send more included (json.dumps puts spaces after separators): it is the same collection.
        payload = min((run["bytes"] for run in here), default=0)
        by_contender: dict[str, Any] = {}
        for contender in contenders:
            mine = [run for run in here if run["contender"] == contender]
            if mine:
                by_contender[contender] = _figures(workload, mine, payload)
        seed, floor = by_contender.get("seed"), by_contender.get("floor")
        for figures in by_contender.values():
            figures["speedup_vs_seed"] = seed["seconds"] / figures["seconds"] if seed else None
            figures["x_of_floor"] = figures["seconds"] / floor["seconds"] if floor else None
        summary[workload.key] = by_contender
    return summary


def _number(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value else "-"


def table(summary: dict[str, Any], workloads: list[Workload]) -> str:
    """
    The side-by-side table, one block per workload.

    :param summary: From :func:`summarise`.
    :param workloads: The workloads, in order.
    :return: The table as text.
    """
    header = (
        f"{'contender':<12} {'call':<9} {'n':>2} {'seconds':>8} {'MB/s':>7} {'writes/s':>9} "
        f"{'stall ms med (max)':>19} {'ΔRSS MB':>8} {'CPU s':>6} {'srv CPU':>7} {'vs seed':>8} "
        f"{'x floor':>8}"
    )
    lines: list[str] = []
    for workload in workloads:
        figures = summary.get(workload.key, {})
        if not figures:
            continue
        payload = next(iter(figures.values()))["payload_mb"]
        lines += ["", f"{workload.key}: {workload.title()}, {payload:,.1f} MB", header, "-" * len(header)]
        for contender, row in figures.items():
            stall = f"{_number(row['stall_ms'])} ({_number(row['stall_ms_max'])})"
            lines.append(
                f"{contender:<12} {row['call_mode']:<9} {row['runs']:>2} {row['seconds']:>8.3f} "
                f"{row['mb_per_s']:>7.1f} {_number(row['writes_per_s'], 2):>9} {stall:>19} "
                f"{row['rss_growth_mb']:>8.1f} {row['cpu_s']:>6.2f} {_number(row['server_cpu_s'], 2):>7} "
                f"{_ratio(row['speedup_vs_seed']):>8} {_ratio(row['x_of_floor']):>8}"
                + ("" if row["verified"] else "  (objects NOT verified)")
            )
    return "\n".join(lines)


def _target(name: str, check: str, value: float | None, limit: float, higher: bool) -> dict[str, Any]:
    met = None if value is None else (value >= limit if higher else value <= limit)
    return {
        "target": name,
        "check": check,
        "value": value,
        "comparison": ">=" if higher else "<=",
        "limit": limit,
        "met": met,
    }


def evaluate_targets(summary: dict[str, Any], workloads: dict[str, Workload]) -> list[dict[str, Any]]:
    """
    Judge AsyncS3Sink against its targets.

    :param summary: From :func:`summarise`.
    :param workloads: The workloads of this mode by key, for the sizes in the targets' names.
    :return: One entry per check: ``target``, ``check``, ``value``, ``comparison``, ``limit`` and ``met``
        (`None` when not measured).
    """
    single, concurrent = summary.get("single", {}), summary.get("concurrent", {})
    sink, sink_many = single.get("AsyncS3Sink"), concurrent.get("AsyncS3Sink")
    sink_stream = summary.get("stream-300k", {}).get("AsyncS3Sink")

    def ratio(numerator: dict[str, Any] | None, denominator: dict[str, Any] | None, key: str) -> float | None:
        if numerator is None or denominator is None:
            return None
        return float(numerator[key] / denominator[key])

    size = f"{workloads['single'].features:,}"
    many = f"{workloads['concurrent'].writes} concurrent {workloads['concurrent'].features}-feature writes"
    streamed = f"{workloads['stream-300k'].features:,}"
    return [
        _target(
            f"worst event-loop stall during one {size}-feature AsyncS3Sink write",
            "ms, median over runs of each run's worst",
            sink["stall_ms"] if sink else None,
            10.0,
            higher=False,
        ),
        _target(
            f"one {size}-feature write vs the seed",
            "speedup: seed seconds / AsyncS3Sink seconds",
            ratio(single.get("seed"), sink, "seconds"),
            3.0,
            higher=True,
        ),
        _target(
            f"one {size}-feature write vs the floor",
            "x of floor: AsyncS3Sink seconds / floor seconds",
            ratio(sink, single.get("floor"), "seconds"),
            1.15,
            higher=False,
        ),
        _target(
            f"{many} vs the seed through to_thread",
            "writes/s ratio: AsyncS3Sink / seed",
            ratio(sink_many, concurrent.get("seed"), "writes_per_s"),
            3.0,
            higher=True,
        ),
        _target(
            f"{many} vs the floor",
            "x of floor: floor writes/s / AsyncS3Sink writes/s",
            ratio(concurrent.get("floor"), sink_many, "writes_per_s"),
            1.1,
            higher=False,
        ),
        _target(
            f"peak RSS growth streaming {streamed} features from a generator",
            "MB, median over runs",
            sink_stream["rss_growth_mb"] if sink_stream else None,
            100.0,
            higher=False,
        ),
    ]


def targets_text(targets: list[dict[str, Any]], quick: bool) -> str:
    """
    The targets, one line each, with whether each is met.

    :param targets: From :func:`evaluate_targets`.
    :param quick: Whether sizes were reduced, which makes the targets indicative only.
    :return: The text.
    """
    title = "targets (AsyncS3Sink)" + (" — quick run: smaller sizes, indicative only" if quick else "")
    lines = ["", title]
    for target in targets:
        state = {True: "MET ", False: "MISS", None: "n/a "}[target["met"]]
        value = "not measured" if target["value"] is None else f"{target['value']:.2f}"
        limit = f"{target['comparison']} {target['limit']:g}"
        lines.append(f"  [{state}] {target['target']}: {value} {limit} ({target['check']})")
    return "\n".join(lines)


def _scheduler_line(scheduler: dict[str, float]) -> str:
    window = scheduler["window_ms"]
    running, waiting = scheduler["on_cpu_ms"] / window, scheduler["waiting_for_core_ms"] / window
    return (
        f"  loop thread over {window:.0f} ms of stalls: on a CPU {running:.0%} (running callbacks), "
        f"runnable but waiting for a core {waiting:.0%}, "
        f"blocked {scheduler['blocked_ms'] / window:.0%} (asleep on the GIL another thread holds)"
    )


def diagnosis_text(diagnoses: list[dict[str, Any]]) -> str:
    """
    What the stall diagnoser found, per diagnostic run.

    :param diagnoses: The diagnostic runs' results.
    :return: The text.
    """
    lines = ["", "stall diagnosis (extra runs with the watchdog on; their figures are not in the table)"]
    for run in diagnoses:
        report = run.get("diagnosis") or {}
        stall, threshold = run["stall"], report.get("threshold_ms", 0)
        lines += [
            "",
            f"{run['workload']} / {run['contender']}: {run['seconds']:.3f} s, worst stall "
            f"{stall['worst_ms']:.1f} ms, p99 {stall['p99_ms']:.1f} ms, {stall['over_10ms']} ticks over "
            f"10 ms, {report.get('stalls_over_threshold', 0)} stalls over {threshold:.0f} ms",
        ]
        scheduler = report.get("scheduler")
        if scheduler and scheduler["window_ms"]:
            lines.append(_scheduler_line(scheduler))
        collections = ", ".join(
            f"{generation} x{figures['count']} (longest {figures['longest_ms']:.1f} ms)"
            for generation, figures in report.get("collections", {}).items()
        )
        lines.append(f"  garbage collections: {collections}")
        lines.append(f"  loop callbacks over the threshold: {report.get('slow_callback_count', 0)}")
        slow = report.get("slow_callbacks", [])
        lines += [f"    {callback['ms']:7.1f} ms  {callback['callback']}" for callback in slow]
        if report.get("busy_thread_frames"):
            lines.append("  busy threads while the loop was late (samples):")
            lines += [f"    {count:4d}  {frame}" for frame, count in report["busy_thread_frames"]]
        if report.get("loop_thread_frames"):
            lines.append("  loop thread while late (samples):")
            lines += [f"    {count:4d}  {frame}" for frame, count in report["loop_thread_frames"]]
        for episode in report.get("longest", [])[:3]:
            lines.append(f"  stall of {episode['lateness_ms']:.1f} ms, first sample:")
            for label, stack in episode["first_sample"].items():
                lines.append(f"    [{label}]")
                lines += [f"      {entry}" for entry in stack[-6:]]
    return "\n".join(lines)
