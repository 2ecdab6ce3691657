"""
``python -m benchmarks.peers`` (``make bench-report``): this project's sinks, the seed, the floor and the peers
a user would pick instead, side by side on a moto S3 server of their own.

Options: ``--quick`` (smaller sizes, one run each), ``--repeats N``, ``--contenders NAME[,NAME]``,
``--out DIR``. Prints the table and writes ``report.json`` and ``report.png`` to ``benchmarks/results``.
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
from benchmarks.peers.chart import OURS, RATES, WORKLOADS, draw, short
from benchmarks.peers.contenders import PEERS
from benchmarks.report import summarise, table
from benchmarks.runner import Options, parse_arguments, revision, run_all, versions
from benchmarks.workloads import workloads

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent.parent / "results"
# A measurement whose first run takes longer runs once: the seed's streamed write (~12 s), to stay within ~7 min.
ONCE_PAST_SECONDS = 8.0
ALL = [*CONTENDERS, *PEERS]
PACKAGES = (
    "model-runner-sink",
    *("aioboto3", "aiobotocore", "aiohttp", "boto3", "botocore", "obstore", "orjson", "smart-open", "s3fs"),
    *("fsspec", "geojson", "moto", "matplotlib", "psutil"),
)
NOTES = [
    "AsyncS3Sink and S3Sink: bytes, features and retries are read from the WriteResult of each write "
    "(write_with_result); so are seconds where a WriteResult spans the measured region: a single write, and "
    "AsyncS3Sink's concurrent writes (awaited together: the longest write's seconds). S3Sink's concurrent "
    "writes queue for asyncio.to_thread's worker threads before their own clocks start, so there, as for every "
    "other contender, seconds are the harness's clock around the same call (kept as clock_seconds for all).",
    "aioboto3: json.dumps of the whole collection (stdlib, default separators: ~8% more bytes) into a BytesIO, "
    "upload_fileobj, awaited. obstore: orjson.dumps of the whole collection, obstore.put_async to an S3Store, "
    "awaited. s3fs: orjson.dumps of the whole collection, S3FileSystem._pipe_file (its async API), awaited. "
    "smart_open: smart_open.open('s3://...', 'wb') on a boto3 client, written a feature at a time with "
    "orjson.dumps, through asyncio.to_thread. Each with its library's defaults; serialising is in the clock "
    "for all of them, as for the sinks.",
    "stream-300k: the sinks and smart_open consume the generator as it comes; aioboto3, obstore and s3fs "
    "serialise whole collections, so they get the features as a list made before the clock starts (as the "
    "seed does): their seconds and RSS growth leave that list out.",
    "The boto-based peers (aioboto3, smart_open, s3fs) do not SHA-256 request bodies, as the seed, floor and "
    "sinks, because botocore does that only over plain HTTP (this moto endpoint), not over HTTPS. obstore "
    "keeps its default, signed bodies, since it signs them on real S3 too.",
    SEED_NOTES,
    "Floor: aiobotocore sending bytes serialised before the clock starts. Seconds: best of the runs; stall, "
    "RSS growth and CPU: medians. MB/s counts the compact collection for every contender. Stall: how late a "
    "1 ms ticker in the measured loop wakes. CPU s: the measuring process's user+system time. Each "
    "measurement runs in a fresh process; moto shares the two cores and closes every connection.",
]


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--contenders", default=",".join(ALL), help="comma-separated (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where report.json and report.png go")


def _machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def _read_write_results(runs: list[dict[str, Any]]) -> None:
    # This project's contenders: figures from their WriteResults, the harness's clock kept beside them. Seconds
    # too where a WriteResult spans the measured region: one write, or writes awaited together. S3Sink's
    # concurrent writes wait for a worker thread of asyncio.to_thread before their WriteResult's clock starts.
    for run in runs:
        results = run.get("write_results")
        run["seconds_from"] = "clock"
        if results:
            run["clock_seconds"], run["bytes"] = run["seconds"], results["bytes"]
            run["features_stored"], run["retries"] = results["features"], results["retries"]
            if results["writes"] == 1 or run["call_mode"] == "await":
                run["seconds"], run["seconds_from"] = results["seconds"], "WriteResult"


def _left_out(outcome: dict[str, Any], contenders: list[str]) -> dict[str, str]:
    # A contender with no measurement at all, and the last line of its first failure.
    measured = {run["contender"] for run in outcome["runs"]}
    reasons = {}
    for failure in outcome["failures"]:
        if failure["contender"] not in measured and failure["contender"] in contenders:
            lines = failure["error"].strip().splitlines() or ["failed"]
            reasons.setdefault(failure["contender"], lines[-1])
    return reasons


def markdown(summary: dict[str, Any]) -> str:
    """
    The chart's figures as a Markdown table: a row per contender; per workload, throughput, stall and RSS growth.

    :param summary: From :func:`benchmarks.report.summarise`.
    :return: The table.
    """
    shown = [key for key in WORKLOADS if summary.get(key)]
    head = ["contender", "call"]
    for key in shown:
        head += [f"{key} {RATES[key][1]}", "stall ms", "ΔRSS MB"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for name in dict.fromkeys(name for key in shown for name in summary[key]):
        rows = [summary[key].get(name) for key in shown]
        modes = dict.fromkeys(row["call_mode"] for row in rows if row)
        cells = [f"**{name}**" if name in OURS else name, " / ".join(modes)]
        for key, row in zip(shown, rows, strict=True):
            figures = (RATES[key][0], "stall_ms", "rss_growth_mb")
            cells += [short(row[figure]) if row else "-" for figure in figures]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """
    Run every contender on the single and concurrent workloads; print, and write the report and chart.

    :param argv: Command-line arguments, ``sys.argv[1:]`` by default.
    :return: 0, or 1 if a measurement of this project's contenders, the seed or the floor failed.
    """
    arguments = parse_arguments(
        "python -m benchmarks.peers",
        "This project's S3 sinks beside the seed, the floor and the peers a user would pick instead.",
        _options,
        argv,
    )
    contenders = [name.strip() for name in arguments.contenders.split(",") if name.strip()]
    unknown = sorted(set(contenders) - set(ALL))
    if unknown:
        print(f"unknown contenders: {', '.join(unknown)}", file=sys.stderr)
        return 2
    chosen = [workloads(arguments.quick)[key] for key in WORKLOADS]
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    options = Options(chosen, contenders, arguments.repeats, max_repeat_seconds=ONCE_PAST_SECONDS)
    outcome = run_all(options)
    duration = time.perf_counter() - clock
    _read_write_results(outcome["runs"])
    summary = summarise(outcome["runs"], chosen, contenders)
    for run in outcome["runs"]:
        summary[run["workload"]][run["contender"]]["seconds_from"] = run["seconds_from"]
    left_out = _left_out(outcome, contenders)
    machine = _machine()
    caption = (
        f"{started:%Y-%m-%d}, {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"moto on loopback; best of {arguments.repeats} run(s)" + (", quick sizes" if arguments.quick else "")
    )
    print(f"\nmodel-runner-sink and its peers: {caption}; {duration:.0f} s")
    print(table(summary, chosen))
    if outcome["not_repeated"]:
        print(f"\nrun once (first run over {ONCE_PAST_SECONDS:g} s): {', '.join(outcome['not_repeated'])}")
    for name, reason in left_out.items():
        print(f"\nleft out: {name}: {reason}")
    print("\nnotes:")
    for note in NOTES:
        print(textwrap.fill(note, width=110, initial_indent="  - ", subsequent_indent="    "))
    document = {
        "date": started.isoformat(),
        "seconds": duration,
        "machine": machine,
        "versions": versions(PACKAGES),
        "revision": revision(),
        "options": {"quick": arguments.quick, "repeats": arguments.repeats, "contenders": contenders},
        "workloads": {workload.key: workload.as_dict() for workload in chosen},
        "summary": summary,
        "left_out": left_out,
        "notes": NOTES,
        "markdown": markdown(summary),
        "runs": outcome["runs"],
        "failures": outcome["failures"],
        "not_repeated": outcome["not_repeated"],
    }
    arguments.out.mkdir(parents=True, exist_ok=True)
    (arguments.out / "report.json").write_text(json.dumps(document, indent=2) + "\n")
    draw(summary, {workload.key: workload.title() for workload in chosen}, arguments.out / "report.png", caption)
    print(f"\n{document['markdown']}\n\nreport: {arguments.out / 'report.json'}, {arguments.out / 'report.png'}")
    return 1 if any(failure["contender"] in CONTENDERS for failure in outcome["failures"]) else 0


if __name__ == "__main__":
    sys.exit(main())
