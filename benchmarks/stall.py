"""
``python -m benchmarks --stall``: every row of issue 12's table in one run, each figure against its target.

Cold rows run in fresh processes: the first write of a process (imports done before the ticker starts), and the
first write on a second event loop of a process that wrote on a first one. Warm rows reuse the harness's child
(warm-up writes first). CPU per small write compares ``AsyncS3Sink`` with obstore (``orjson.dumps`` and
``put_async``) over the same 200 concurrent writes of 500 features. Stall: worst lateness of a 1 ms ticker in the
caller's loop; every figure is the median of ``--repeats`` runs. ``--baseline SRC`` runs each row on another
checkout's ``src`` too (e.g. ``git archive`` of an older commit), interleaved, and prints the ratio.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A cold child imports what a service imports, the sink, and no more: the harness's other modules import boto3
# and the contenders, which would load before the clock what the sink's first write loads.
from benchmarks.probes import CpuClock, LoopStallTicker, StallDiagnoser
from benchmarks.workloads import load_features, make_dataset
from model_runner.sink import AsyncS3Sink

__all__ = ["ROWS", "main"]

BUCKET = "model-runner-stall"
ROOT = Path(__file__).resolve().parent.parent
SMALL = 500
RESULT_MARKER = "STALL-RESULT "


@dataclass(frozen=True)
class Row:
    """
    One row of issue 12's table.

    :param key: Its name.
    :param title: What it measures.
    :param spec: The child's spec, less bucket, prefix and dataset.
    :param figure: The row's figure, in ms, from a child's result.
    :param must: The figure must be at most this (ms, or a ratio to ``versus``); 0 for no target.
    :param goal: The figure should be at most this.
    :param versus: The row whose figure this one's is divided by before comparing with the targets.
    """

    key: str
    title: str
    spec: dict[str, Any]
    figure: Callable[[dict[str, Any]], float]
    must: float = 0
    goal: float = 0
    versus: str | None = None


def _worst(result: dict[str, Any]) -> float:
    return float(result["stall"]["worst_ms"])


def _cpu(result: dict[str, Any]) -> float:
    return float(result["cpu"]["cpu_s"]) / result["writes"] * 1e3


def _warm(writes: int, features: int, contender: str) -> dict[str, Any]:
    return {
        "kind": "warm",
        "workload": {"key": f"{writes}x{features}", "writes": writes, "features": features, "streamed": False},
        "contender": contender,
    }


ROWS = [
    Row("cold-process", "stall: first write of a fresh process", {"kind": "process"}, _worst, 15, 10),
    Row("cold-loop", "stall: first write on a new loop of a process that wrote", {"kind": "loop"}, _worst, 15, 10),
    Row("warm-100k", "stall: 100k features on a warm loop", _warm(1, 100_000, "AsyncS3Sink"), _worst, 10, 5),
    Row("warm-50x500", "stall: 50 concurrent writes of 500 features", _warm(50, 500, "AsyncS3Sink"), _worst, 10, 5),
    Row("to-thread-100k", "stall: to_thread(S3Sink.write, 100k features)", _warm(1, 100_000, "S3Sink"), _worst, 10, 5),
    Row("cpu-obstore", "CPU per write, 200 x 500 features: obstore", _warm(200, 500, "obstore"), _cpu),
    Row(
        "cpu-sink", "CPU per write, 200 x 500: AsyncS3Sink", _warm(200, 500, "AsyncS3Sink"), _cpu, 3, 1.5, "cpu-obstore"
    ),
]


async def _cold_write(features: list[Any], prefix: str, diagnose: bool) -> dict[str, Any]:
    sink = AsyncS3Sink(BUCKET, prefix)
    gc.collect()
    ticker = LoopStallTicker()
    await ticker.start()
    diagnoser = StallDiagnoser(ticker, threshold=0.002) if diagnose else None
    if diagnoser is not None:
        diagnoser.start()
    cpu = CpuClock()
    cpu.start()
    started = time.perf_counter()
    await sink.write("cold", features)
    seconds = time.perf_counter() - started
    figures = cpu.stop()
    await ticker.stop()
    if diagnoser is not None:
        diagnoser.stop()
    return {
        "workload": "cold",
        "contender": "AsyncS3Sink",
        "seconds": seconds,
        "stall": ticker.summary(),
        "cpu": figures,
        "writes": 1,
        "diagnosis": diagnoser.report() if diagnoser is not None else None,
    }


def _cold(spec: dict[str, Any]) -> dict[str, Any]:
    features = load_features(Path(spec["dataset"]), SMALL)
    if spec["kind"] == "loop":
        asyncio.run(AsyncS3Sink(BUCKET, spec["prefix"]).write("first", features))
    return asyncio.run(_cold_write(features, spec["prefix"], bool(spec.get("diagnose"))))


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["kind"] == "warm":
        from benchmarks.child import measure

        return asyncio.run(measure(spec))
    return _cold(spec)


def _run(spec: dict[str, Any], source: str | None) -> dict[str, Any]:
    environment = dict(os.environ)
    paths = [source, str(ROOT), environment.get("PYTHONPATH")]
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.stall", "--child", json.dumps(spec)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            return result
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
    raise RuntimeError("measurement failed:\n" + "\n".join(tail))


def _empty(client: Any) -> None:
    # Dropped after each measurement: a server holding every 52 MB object of the run slows the later ones.
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


def _verdict(row: Row, figure: float, versus: float | None) -> tuple[str, bool]:
    if not row.must:
        return "", True
    if row.versus is not None:
        if not versus:
            return f"(no {row.versus} figure)", True
        figure /= versus
        unit = f"x {row.versus}"
    else:
        unit = " ms"
    state = "goal met" if figure <= row.goal else "ok" if figure <= row.must else "MISSED"
    return f"{figure:.2f}{unit}: must <= {row.must:g}, goal <= {row.goal:g}: {state}", figure <= row.must


def measure_rows(
    rows: list[Row], repeats: int, baseline: str | None, diagnose: bool, log: Callable[[str], None]
) -> dict[str, dict[str, list[float]]]:
    """
    Run every row ``repeats`` times (and on the baseline's sources, interleaved), on a moto server of their own.

    :param rows: The rows.
    :param repeats: Runs of each.
    :param baseline: Another checkout's ``src`` folder, or `None`.
    :param diagnose: Print the stall diagnoser's findings of the last run of each row.
    :param log: Where progress lines go.
    :return: Figures by row key, then by ``new`` / ``base``.
    """
    figures: dict[str, dict[str, list[float]]] = {row.key: {"new": [], "base": []} for row in rows}
    sources = {"new": None, **({"base": baseline} if baseline else {})}
    import boto3

    from benchmarks.report import diagnosis_text
    from model_runner.cli.moto_server import MotoServer

    with tempfile.TemporaryDirectory(prefix="model-runner-stall-") as directory, MotoServer() as server:
        server.apply_environment()
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        dataset = Path(directory) / "features.json"
        make_dataset(dataset, 100_000)
        for repeat in range(repeats):
            for row in rows:
                # Alternated, so that neither side always runs first (and meets the machine in another state).
                pairs = list(sources.items())
                for label, source in pairs if repeat % 2 == 0 else pairs[::-1]:
                    last = diagnose and repeat == repeats - 1 and label == "new"
                    spec = {**row.spec, "bucket": BUCKET, "prefix": f"{row.key}/{label}/{repeat}"}
                    spec.update(dataset=str(dataset), diagnose=last, server_pid=None)
                    result = _run(spec, source)
                    _empty(client)
                    figure = row.figure(result)
                    figures[row.key][label].append(figure)
                    log(f"[{repeat + 1}/{repeats}] {row.key:<15} {label:<4} {figure:8.2f} ms")
                    if last and result.get("diagnosis"):
                        log(diagnosis_text([{**result, "workload": row.key}]))
    return figures


def report(rows: list[Row], figures: dict[str, dict[str, list[float]]]) -> tuple[str, bool]:
    """
    The table: each row's median in ms, its target and verdict, and the baseline's median and ratio if measured.

    :param rows: The rows.
    :param figures: What :func:`measure_rows` returned.
    :return: The table's text, and whether every row meets its must.
    """
    median = {key: {label: statistics.median(v) if v else None for label, v in f.items()} for key, f in figures.items()}
    lines = [f"{'row':<58} {'ms':>8} {'base':>8} {'ratio':>6}  target"]
    met = True
    for row in rows:
        new, base = median[row.key]["new"], median[row.key]["base"]
        assert new is not None
        versus = median.get(row.versus or "", {}).get("new")
        verdict, ok = _verdict(row, new, versus)
        met = met and ok
        base_text = f"{base:8.2f}" if base is not None else f"{'':>8}"
        ratio = f"{new / base:6.2f}" if base else f"{'':>6}"
        lines.append(f"{row.title:<58} {new:8.2f} {base_text} {ratio}  {verdict}")
    return "\n".join(lines), met


def main(argv: list[str]) -> int:
    """
    ``--child SPEC``: one measurement, printed as JSON; else the whole table.

    :param argv: ``[--repeats N] [--rows KEY,...] [--baseline SRC] [--diagnose]``, or ``--child SPEC``.
    :return: The exit status: 1 if a row misses its must.
    """
    if argv[:1] == ["--child"]:
        print(RESULT_MARKER + json.dumps(_child(json.loads(argv[1]))), flush=True)
        return 0
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks --stall", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="", help=f"comma-separated rows: {', '.join(row.key for row in ROWS)}")
    parser.add_argument("--baseline", default=None, help="another checkout's src folder to measure beside")
    parser.add_argument("--diagnose", action="store_true", help="print the stall diagnoser's findings")
    arguments = parser.parse_args(argv)
    keys = [key for key in arguments.rows.split(",") if key]
    rows = [row for row in ROWS if not keys or row.key in keys]
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    figures = measure_rows(rows, arguments.repeats, arguments.baseline, arguments.diagnose, log)
    text, met = report(rows, figures)
    seconds = time.perf_counter() - started
    print(f"\nissue 12 table: median of {arguments.repeats} runs, {seconds:.0f} s, {os.cpu_count()} cores")
    print(text)
    print(
        "\nmoto answers every request with 'Connection: close': each request here also pays a TCP connect "
        "(~15% of a small write's loop time) that S3 with keep-alive does not."
    )
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
