"""
One measurement, in a fresh process: ``python -m benchmarks.child SPEC_JSON``.

A fresh process per contender, workload and repeat makes peak RSS growth that measurement's own: no allocator
arenas, caches or garbage left over from another contender. The result is printed as one JSON line after
:data:`RESULT_MARKER`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.contenders import IMAGE_ID, Job, make_contender
from benchmarks.probes import CpuClock, GcWatch, LoopStallTicker, PeakRss, StallDiagnoser
from benchmarks.workloads import POOL_FEATURES, Workload, feature_stream, load_features

__all__ = ["RESULT_MARKER", "main", "measure"]

RESULT_MARKER = "BENCH-RESULT "
WARM_UP_WRITES = 8


def _jobs(spec: dict[str, Any], workload: Workload, prepare: Any) -> list[Job]:
    dataset = Path(spec["dataset"])
    if workload.streamed:
        pool = load_features(dataset, min(POOL_FEATURES, workload.features))
        payload = prepare(feature_stream(pool, workload.features))
        return [(IMAGE_ID.format(name=f"{workload.key}-0000"), payload)]
    features = load_features(dataset, workload.total_features)
    jobs = []
    for index in range(workload.writes):
        chunk = features[index * workload.features : (index + 1) * workload.features]
        jobs.append((IMAGE_ID.format(name=f"{workload.key}-{index:04d}"), prepare(chunk)))
    return jobs


async def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """
    Build the inputs, warm the contender up, then time its writes with every probe on.

    :param spec: ``workload`` (a :class:`Workload` as a dict), ``contender``, ``bucket``, ``prefix``,
        ``dataset``, ``server_pid`` and ``diagnose``.
    :return: The measurement's figures.
    """
    workload = Workload(**spec["workload"])
    contender = make_contender(spec["contender"], spec["bucket"], spec["prefix"])
    started = time.perf_counter()
    jobs = _jobs(spec, workload, contender.prepare)
    setup_seconds = time.perf_counter() - started
    async with contender:
        # Enough writes to start the worker threads the measured writes use (a multipart upload: 6 parts).
        await contender.warm_up(max(workload.writes, WARM_UP_WRITES))
        # A full collection over the inputs costs ~300 ms per 100k features: done now, it cannot land in the
        # measured region and pass for a stall of the contender.
        gc.collect()
        ticker = LoopStallTicker()
        await ticker.start()
        diagnoser = StallDiagnoser(ticker) if spec.get("diagnose") else None
        rss, cpu, collections = PeakRss(), CpuClock(spec.get("server_pid")), GcWatch()
        if diagnoser is not None:
            diagnoser.start()
        rss.start()
        collections.start()
        cpu.start()
        started = time.perf_counter()
        stored = await contender.run(jobs)
        seconds = time.perf_counter() - started
        cpu_figures = cpu.stop()
        gc_figures = collections.stop()
        rss_figures = rss.stop()
        await ticker.stop()
        if diagnoser is not None:
            diagnoser.stop()
    return {
        "workload": workload.key,
        "contender": contender.key,
        "call_mode": contender.call_mode(workload.writes),
        "seconds": seconds,
        "bytes": stored,
        "writes": workload.writes,
        "features": workload.total_features,
        "setup_seconds": setup_seconds,
        "stall": ticker.summary(),
        "rss": rss_figures,
        "cpu": cpu_figures,
        "gc": gc_figures,
        "diagnosis": diagnoser.report() if diagnoser is not None else None,
        "write_results": contender.write_results(),
    }


def main(argv: list[str]) -> int:
    """
    Run one measurement and print its result.

    :param argv: ``[program, spec as JSON]``.
    :return: The exit status.
    """
    spec = json.loads(argv[1])
    result = asyncio.run(measure(spec))
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
