"""
``python -m benchmarks`` (``make bench``): the sinks beside the seed and the floor, then issue 12's rows;
``python -m benchmarks --peers`` (``make bench-report``): the sinks beside the libraries a user would pick instead.
The method is described in ``benchmarks/README.md``; ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import textwrap
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.chart import draw, markdown
from benchmarks.child import MODULES
from benchmarks.report import diagnosis_text, evaluate_targets, median, summarise, table, targets_text
from benchmarks.results import Measurement
from benchmarks.rows import CASES, ROWS, measure_rows, rows_text
from benchmarks.runner import Harness, interleaved, log, revision, versions
from benchmarks.workloads import POOL_FEATURES, Workload, workloads

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
SINK_TABLE = ["seed", "floor", "AsyncS3Sink", "S3Sink"]
OURS = ["AsyncS3Sink", "S3Sink", "seed", "floor"]
PEERS = ["aioboto3", "obstore", "smart_open", "s3fs"]
PEER_WORKLOADS = ["single", "concurrent", "stream-300k"]
# The peers report's cold start: one collection of 500 features, the first write of a fresh process.
COLD = Workload("cold-500", 1, 500, False)
PACKAGES = (
    *("model-runner-sink", "aioboto3", "aiobotocore", "aiohttp", "boto3", "botocore", "obstore", "orjson"),
    *("smart-open", "s3fs", "fsspec", "geojson", "moto", "matplotlib", "psutil"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    add = parser.add_argument
    add("--peers", action="store_true", help="the peers report (report.json, report.png) instead")
    add("--stall", action="store_true", help="issue 12's rows only; exit 1 if a row misses its must")
    add("--quick", action="store_true", help="smaller sizes and one run each: a smoke run")
    add("--repeats", type=int, default=None, help="runs of each measurement (default 3, quick 1)")
    add("--only", default="", help="comma-separated workloads of the table (default: all)")
    add("--contenders", default="", help="comma-separated contenders (default: all of the table or report)")
    add("--rows", default="", help=f"comma-separated rows: {', '.join(row.key for row in ROWS)}")
    add("--baseline", default=None, help="another checkout's src folder: the rows measured on it too")
    add("--diagnose", action="store_true", help="run the stall diagnoser on extra (table) or last (rows) runs")
    add("--server-core", action="store_true", help="pin the S3 server to a core of its own (a diagnosis)")
    add("--json", type=Path, default=None, help="where the results go (default: results/latest.json)")
    add("--out", type=Path, default=RESULTS, help="--peers: where report.json and report.png go")
    return parser


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _plain(value: Any) -> Any:
    # Dataclasses, tuples and the rest as JSON-ready data.
    return json.loads(json.dumps(value, default=lambda found: asdict(found)))


def _notes(text: str) -> None:
    print("\nnotes:")
    for note in text.strip().split("\n- "):
        print(textwrap.fill(note.lstrip("- "), width=110, initial_indent="  - ", subsequent_indent="    "))


NOTES = """
- Method and contenders: benchmarks/README.md. Seconds: best of the runs; stall, RSS growth and CPU: medians.
- moto answers every request with 'Connection: close': each request here also pays a TCP connect (~15% of a small
write's loop time) that S3 with keep-alive does not; moto shares this machine's cores with the measured process.
"""


def _progress(run: Measurement, label: str) -> None:
    log(
        f"{label} {run.workload:<12} {run.contender:<12} {run.seconds:8.3f} s  stall {run.stall.worst_ms:8.1f} ms  "
        f"ΔRSS {run.rss.peak_growth_mb:7.1f} MB" + ("" if run.verified else "  NOT VERIFIED")
    )


def _sink_table(harness: Harness, arguments: argparse.Namespace, chosen: list[Workload]) -> dict[str, Any]:
    contenders = _split(arguments.contenders) or SINK_TABLE
    runs, failures, once = interleaved(harness, [(w, contenders) for w in chosen], arguments.repeats, 12.0, _progress)
    summary = summarise(runs, chosen, contenders)
    targets = evaluate_targets(summary, workloads(arguments.quick))
    print(table(summary, chosen))
    if once:
        print(f"\nrun once (first run over 12 s): {', '.join(once)}")
    print(targets_text(targets, arguments.quick))
    diagnosed = []
    if arguments.diagnose:
        for workload in chosen:
            for contender in ("AsyncS3Sink", "floor"):
                run = harness.measure("warm", workload, contender, diagnose=True)
                diagnosed.append((f"{workload.key} / {contender}", run))
        print(diagnosis_text(diagnosed))
    return {"summary": summary, "targets": targets, "runs": runs, "failures": failures, "not_repeated": once}


def _rows(harness: Harness, arguments: argparse.Namespace) -> tuple[dict[str, Any], bool]:
    keys = _split(arguments.rows)
    rows = [row for row in ROWS if not keys or row.key in keys]
    # A ratio's row needs the row it divides by.
    rows = [row for row in ROWS if row in rows or any(other.versus == row.key for other in rows)]
    figures, diagnosed = measure_rows(harness, rows, arguments.repeats, arguments.baseline, arguments.diagnose)
    text, met = rows_text(rows, figures)
    print(f"\nissue 12's rows: median of {arguments.repeats} run(s)\n{text}")
    if diagnosed:
        print(diagnosis_text(diagnosed))
    return {"rows": {row.key: {"case": asdict(CASES[row.case]), **figures[row.key]} for row in rows}}, met


def _use_write_results(runs: list[Measurement]) -> None:
    # This project's sinks: seconds from their WriteResults where one spans the measured region (one write, or
    # writes awaited together); S3Sink's concurrent writes queue for to_thread's workers before their clocks start.
    for run in runs:
        run.clock_seconds = run.seconds
        found = run.write_figures
        if found is not None:
            run.bytes = found.bytes
            if found.writes == 1 or run.call_mode == "await":
                run.seconds, run.seconds_from = found.seconds, "WriteResult"


def _peers(harness: Harness, arguments: argparse.Namespace, chosen: list[Workload]) -> dict[str, Any]:
    contenders = _split(arguments.contenders) or [*OURS, *PEERS]
    runs, failures, once = interleaved(harness, [(w, contenders) for w in chosen], arguments.repeats, 8.0, _progress)
    _use_write_results(runs)
    summary = summarise(runs, chosen, contenders)
    cold: dict[str, list[Measurement]] = {name: [] for name in contenders}
    for repeat in range(arguments.repeats):
        for name in contenders:
            try:
                cold[name].append(harness.measure("process", COLD, name))
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                failures.append((COLD.key, name, str(error)))
            if cold[name]:
                log(f"[cold {repeat + 1}/{arguments.repeats}] {name:<12} {cold[name][-1].stall.worst_ms:8.1f} ms")
    cold_figures = {
        name: {"stall_ms": median(r.stall.worst_ms for r in found), "cpu_ms": median(r.cpu_ms_per_write for r in found)}
        for name, found in cold.items()
        if found
    }
    print(table(summary, chosen))
    print(f"\ncold start: the first write of {COLD.features} features in a fresh process (median of runs)")
    print(f"{'contender':<15} {'stall ms':>9} {'CPU ms':>8}")
    for name, figures in cold_figures.items():
        print(f"{name:<15} {figures['stall_ms']:9.1f} {figures['cpu_ms']:8.1f}")
    if once:
        print(f"\nrun once (first run over 8 s): {', '.join(once)}")
    measured = {run.contender for run in runs}
    left_out = {c: e.strip().splitlines()[-1] for _, c, e in failures if c not in measured and e.strip()}
    for name, reason in left_out.items():
        print(f"\nleft out: {name}: {reason}")
    caption = (
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {_cpu_model()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, moto on loopback; best of {arguments.repeats} run(s)"
        + (", quick sizes" if arguments.quick else "")
    )
    text = markdown(summary, cold_figures)
    arguments.out.mkdir(parents=True, exist_ok=True)
    draw(summary, {w.key: w.title() for w in chosen}, arguments.out / "report.png", caption)
    print(f"\n{text}")
    return {
        "caption": caption,
        "summary": summary,
        "cold_start": cold_figures,
        "left_out": left_out,
        "markdown": text,
        "runs": runs,
        "cold_runs": cold,
        "failures": failures,
        "not_repeated": once,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    """
    Run the benchmarks, print the tables and write the results as JSON.

    :param argv: Command-line arguments, ``sys.argv[1:]`` by default.
    :return: 0; 1 if a measurement failed (or, with ``--stall``, a row missed its must); 2 for a bad argument.
    """
    parser = _parser()
    arguments = parser.parse_args(argv)
    arguments.repeats = arguments.repeats or (1 if arguments.quick else 3)
    available = workloads(arguments.quick)
    chosen = [available[key] for key in (PEER_WORKLOADS if arguments.peers else _split(arguments.only) or available)]
    unknown = [key for key in _split(arguments.contenders) if key not in MODULES]
    if unknown or arguments.repeats < 1:
        parser.error(f"unknown contenders: {', '.join(unknown)}" if unknown else "--repeats must be at least 1")
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    needed = [w.total_features if not w.streamed else min(POOL_FEATURES, w.features) for w in chosen]
    met, document = True, {}
    features = max([*needed, *(case.writes * case.features for case in CASES.values())])
    with Harness(features, server_core=arguments.server_core) as harness:
        print(f"\nmodel-runner-sink benchmarks: {os.cpu_count()} cores, Python {platform.python_version()}")
        print(harness.placement)
        if arguments.peers:
            document = _peers(harness, arguments, chosen)
        else:
            if not arguments.stall:
                document = _sink_table(harness, arguments, chosen)
            found, met = _rows(harness, arguments)
            document.update(found)
    duration = time.perf_counter() - clock
    print(f"\n{duration:.0f} s")
    _notes(NOTES)
    document["meta"] = {
        "started": started.isoformat(),
        "seconds": duration,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "placement": harness.placement,
        "revision": revision(),
        "versions": versions(PACKAGES),
        "arguments": {key: str(value) for key, value in vars(arguments).items()},
        "workloads": {w.key: w.title() for w in chosen},
    }
    path = arguments.json or (arguments.out / "report.json" if arguments.peers else RESULTS / "latest.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_plain(document), indent=2) + "\n")
    print(f"results: {path}")
    failed = [f for f in document.get("failures", []) if not arguments.peers or f[1] in OURS]
    return 1 if failed or (arguments.stall and not met) else 0


if __name__ == "__main__":
    raise SystemExit(main())
