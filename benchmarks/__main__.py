"""
``python -m benchmarks``: seed, floor, AsyncS3Sink and S3Sink side by side, on a moto S3 server it starts.

Options: ``--quick`` (smaller sizes, one run each), ``--repeats N``, ``--only WORKLOAD[,WORKLOAD]``,
``--contenders NAME[,NAME]``, ``--json PATH``, ``--diagnose-stalls``. See ``--help``. ``--stall`` (first) runs
issue 12's table instead: see :mod:`benchmarks.stall`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.contenders import CONTENDERS, SEED_NOTES
from benchmarks.report import diagnosis_text, evaluate_targets, summarise, table, targets_text
from benchmarks.runner import Options, parse_arguments, revision, run_all, versions
from benchmarks.workloads import POOL_FEATURES, workloads

__all__ = ["main"]

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
PACKAGES = ("model-runner-sink", "boto3", "botocore", "aiobotocore", "aiohttp", "moto", "orjson", "geojson")

NOTES = [
    SEED_NOTES,
    "Every measurement runs in a fresh subprocess: inputs built, then tiny warm-up writes (as many at once "
    "as the measured writes, at least 8: client, worker threads and executor started), then gc.collect(), "
    "then the clock. Peak RSS growth is that measurement's own: the kernel's peak RSS (VmHWM), reset at the "
    "start of the measured region through /proc/self/clear_refs, minus the RSS then.",
    "Stall: how late a ticker coroutine in the measured loop wakes from 1 ms sleeps. The seed runs on the "
    "loop thread itself for single writes (its stall is its whole duration) and through asyncio.to_thread "
    "for the concurrent workload; the S3Sink facade always runs through asyncio.to_thread (default "
    "executor).",
    f"Streamed workloads: a generator yields fresh dicts cycling through {POOL_FEATURES:,} distinct "
    "features. AsyncS3Sink and S3Sink consume it as it comes; the seed gets it materialised as a list and "
    "the floor as serialised bytes, both before the clock starts: their seconds and RSS leave that out.",
    "Seconds: best of the runs. Stall, RSS and CPU: medians over the runs. CPU s: this process's user+system "
    "time in the measured region; srv CPU: the moto server's. MB/s counts the compact collection for every "
    "contender (the seed sends ~6% more: json.dumps puts spaces after separators).",
    "The moto server answers every request with 'Connection: close', so every request of every contender "
    "opens a new TCP connection; and it shares this machine's cores with the measured process.",
]


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated workloads: single, concurrent, stream-1m, stream-300k (default: all)",
    )
    parser.add_argument(
        "--contenders",
        default=",".join(CONTENDERS),
        help=f"comma-separated contenders (default: {','.join(CONTENDERS)})",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the results (default: %(default)s)"
    )
    parser.add_argument(
        "--max-repeat-seconds",
        type=float,
        default=12.0,
        help="a measurement whose first run takes longer is not repeated (default: %(default)s)",
    )
    parser.add_argument(
        "--diagnose-stalls",
        action="store_true",
        help="afterwards, run AsyncS3Sink and the floor once more per workload with a watchdog that records "
        "what the loop and the other threads were doing whenever the loop is late, and print what it found",
    )


def main(argv: list[str] | None = None) -> int:
    """
    Run the benchmarks, print the table and the targets, and write the results as JSON.

    :param argv: Command-line arguments, ``sys.argv[1:]`` by default.
    :return: The exit status: 0, 1 if a measurement failed, 2 for an unknown workload or contender.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--stall"]:
        # Issue 12's table: cold and warm stalls and CPU per small write, in a run of their own.
        from benchmarks.stall import main as stall_main

        return stall_main(argv[1:])
    arguments = parse_arguments(
        "python -m benchmarks",
        "Benchmark the S3 sinks against the seed and a floor, on a moto S3 server of their own.",
        _options,
        argv,
    )
    available = workloads(arguments.quick)
    selected = [key.strip() for key in arguments.only.split(",") if key.strip()] or list(available)
    contenders = [key.strip() for key in arguments.contenders.split(",") if key.strip()]
    unknown = [key for key in selected if key not in available]
    unknown += [key for key in contenders if key not in CONTENDERS]
    if unknown:
        print(f"unknown workload or contender: {', '.join(unknown)}", file=sys.stderr)
        return 2
    chosen = [available[key] for key in selected]
    options = Options(
        workloads=chosen,
        contenders=contenders,
        repeats=arguments.repeats,
        max_repeat_seconds=arguments.max_repeat_seconds,
        diagnose=arguments.diagnose_stalls,
    )
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    outcome = run_all(options)
    duration = time.perf_counter() - clock

    summary = summarise(outcome["runs"], chosen, contenders)
    targets = evaluate_targets(summary, available)
    print(
        f"\nmodel-runner-sink benchmarks: up to {arguments.repeats} run(s) each, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, moto S3 server on loopback; {duration:.0f} s"
    )
    print(table(summary, chosen))
    if outcome["not_repeated"]:
        limit = arguments.max_repeat_seconds
        print(f"\nrun once (first run over {limit:g} s): {', '.join(outcome['not_repeated'])}")
    legend = "await: awaited by the loop; to_thread: asyncio.to_thread; direct: a blocking call on the loop"
    print(f"\ncall = {legend}")
    print("notes:")
    for note in NOTES:
        print(textwrap.fill(note, width=110, initial_indent="  - ", subsequent_indent="    "))
    print(targets_text(targets, arguments.quick))
    if outcome["diagnoses"]:
        print(diagnosis_text(outcome["diagnoses"]))
    for failure in outcome["failures"]:
        print(f"\nFAILED {failure['workload']} / {failure['contender']}:\n{failure['error']}")

    document: dict[str, Any] = {
        "meta": {
            "started": started.isoformat(),
            "seconds": duration,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "revision": revision(),
            "versions": versions(PACKAGES),
            "options": {
                "quick": arguments.quick,
                "repeats": arguments.repeats,
                "workloads": selected,
                "contenders": contenders,
                "max_repeat_seconds": arguments.max_repeat_seconds,
                "diagnose_stalls": arguments.diagnose_stalls,
            },
            "dataset_features": outcome["dataset_features"],
            "not_repeated": outcome["not_repeated"],
            "notes": NOTES,
        },
        "workloads": {workload.key: workload.as_dict() for workload in chosen},
        "summary": summary,
        "targets": targets,
        "runs": outcome["runs"],
        "diagnoses": outcome["diagnoses"],
        "failures": outcome["failures"],
    }
    arguments.json.parent.mkdir(parents=True, exist_ok=True)
    arguments.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {arguments.json}")
    return 1 if outcome["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
