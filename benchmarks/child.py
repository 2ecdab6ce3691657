"""
One measurement, in a fresh process: ``python -m benchmarks.child SPEC_JSON``.

A fresh process per measurement makes peak RSS growth that measurement's own, and a cold start really cold. The
child imports the module of its contender only (:data:`MODULES`), so a cold measurement of the sink loads
before its clock what a service importing the sink loads, and no more. It prints its :class:`Measurement`,
pickled, after :data:`RESULT_MARKER`.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import importlib
import json
import pickle
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.contenders import IMAGE_ID, Contender, Job
from benchmarks.probes import CpuClock, GcWatch, LoopStallTicker, PeakRss, StallDiagnoser
from benchmarks.results import Measurement
from benchmarks.workloads import POOL_FEATURES, Workload, feature_stream, load_features

__all__ = ["MODULES", "RESULT_MARKER", "Spec", "contender_class", "main", "measure"]

RESULT_MARKER = "BENCH-RESULT "
WARM_UP_WRITES = 8

# Every contender's key and the module that defines it (in its CONTENDERS), in the order reports show them.
MODULES = {
    "seed": "benchmarks.baselines",
    "floor": "benchmarks.baselines",
    "floor-multipart": "benchmarks.baselines",
    "floor-put": "benchmarks.baselines",
    "floor-thread": "benchmarks.baselines",
    "AsyncS3Sink": "benchmarks.contenders",
    "AsyncS3Sink-seq": "benchmarks.contenders",
    "AsyncS3Sink.open": "benchmarks.contenders",
    "S3Sink": "benchmarks.contenders",
    "aioboto3": "benchmarks.peers",
    "obstore": "benchmarks.peers",
    "smart_open": "benchmarks.peers",
    "s3fs": "benchmarks.peers",
}


@dataclass(frozen=True)
class Spec:
    """
    What one child measures.

    :param kind: ``warm``: warm-up writes first; ``process``: the first write of this process, the contender made
        after the ticker starts; ``loop``: the same on a second event loop, after a write on a first.
    :param workload: The writes.
    :param contender: A key of :data:`MODULES`.
    :param bucket: The bucket.
    :param prefix: The measured writes' key prefix.
    :param dataset: The features' file.
    :param server_pid: The S3 server's process, for its CPU time.
    :param diagnose: Run the stall diagnoser too.
    """

    kind: str
    workload: Workload
    contender: str
    bucket: str
    prefix: str
    dataset: str
    server_pid: int | None = None
    diagnose: bool = False

    def to_json(self) -> str:
        """:return: The spec as the child's argument."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        """:return: The spec that :meth:`to_json` gave ``text``."""
        fields = json.loads(text)
        return cls(**{**fields, "workload": Workload(**fields["workload"])})


def contender_class(key: str) -> type[Contender]:
    """:return: The class of the contender ``key`` names, its module only imported."""
    found: type[Contender] = importlib.import_module(MODULES[key]).CONTENDERS[key]
    return found


def _jobs(spec: Spec, kind: type[Contender]) -> list[Job]:
    workload = spec.workload
    if workload.streamed:
        pool = load_features(Path(spec.dataset), min(POOL_FEATURES, workload.features))
        payload = kind.prepare(feature_stream(pool, workload.features))
        return [(IMAGE_ID.format(name=f"{workload.key}-0000"), payload)]
    features = load_features(Path(spec.dataset), workload.total_features)
    size = workload.features
    return [
        (IMAGE_ID.format(name=f"{workload.key}-{i:04d}"), kind.prepare(features[i * size : (i + 1) * size]))
        for i in range(workload.writes)
    ]


async def _first_write(spec: Spec, kind: type[Contender], jobs: list[Job]) -> None:
    async with kind(spec.bucket, spec.prefix + "-first") as contender:
        await contender.run(jobs[:1])


async def measure(spec: Spec) -> Measurement:
    """
    Build the inputs, warm the contender up (``warm``), then time its writes with every probe on.

    :param spec: What to measure.
    :return: The figures.
    """
    kind = contender_class(spec.contender)
    started = time.perf_counter()
    jobs = _jobs(spec, kind)
    setup_seconds = time.perf_counter() - started
    async with AsyncExitStack() as stack:
        contender = None
        if spec.kind == "warm":
            contender = await stack.enter_async_context(kind(spec.bucket, spec.prefix))
            # Enough writes to start the worker threads the measured writes use (a multipart upload: 6 parts).
            await contender.warm_up(max(spec.workload.writes, WARM_UP_WRITES))
        # A full collection over the inputs costs ~300 ms per 100k features: done now, it cannot land in the
        # measured region and pass for a stall of the contender.
        gc.collect()
        ticker = LoopStallTicker()
        await ticker.start()
        diagnoser = StallDiagnoser(ticker, 0.004 if spec.kind == "warm" else 0.002) if spec.diagnose else None
        rss, cpu, collections = PeakRss(), CpuClock(spec.server_pid), GcWatch()
        if diagnoser is not None:
            diagnoser.start()
        rss.start()
        collections.start()
        cpu.start()
        started = time.perf_counter()
        if contender is None:
            # Cold: from nothing to one stored object, making the contender (its client, session...) included.
            contender = await stack.enter_async_context(kind(spec.bucket, spec.prefix))
        stored = await contender.run(jobs)
        seconds = time.perf_counter() - started
        cpu_figures, gc_figures, rss_figures = cpu.stop(), collections.stop(), rss.stop()
        await ticker.stop()
        if diagnoser is not None:
            diagnoser.stop()
    return Measurement(
        kind=spec.kind,
        workload=spec.workload.key,
        contender=spec.contender,
        call_mode=contender.mode(spec.workload.writes),
        seconds=seconds,
        bytes=stored,
        writes=spec.workload.writes,
        features=spec.workload.total_features,
        setup_seconds=setup_seconds,
        stall=ticker.summary(),
        rss=rss_figures,
        cpu=cpu_figures,
        gc=gc_figures,
        diagnosis=diagnoser.report() if diagnoser is not None else None,
        write_figures=contender.write_figures(),
    )


def encode(measurement: Measurement) -> str:
    """:return: The line the child prints: the marker, then the measurement pickled."""
    return RESULT_MARKER + base64.b64encode(pickle.dumps(measurement)).decode("ascii")


def decode(line: str) -> Measurement | None:
    """:return: The measurement a line of the child's output holds, `None` for another line."""
    if not line.startswith(RESULT_MARKER):
        return None
    found: Any = pickle.loads(base64.b64decode(line[len(RESULT_MARKER) :]))
    assert isinstance(found, Measurement)
    return found


def main(argv: list[str]) -> int:
    """
    Run one measurement and print it.

    :param argv: ``[program, spec as JSON]``.
    :return: The exit status.
    """
    spec = Spec.from_json(argv[1])
    if spec.kind == "loop":
        kind = contender_class(spec.contender)
        asyncio.run(_first_write(spec, kind, _jobs(spec, kind)))
    print(encode(asyncio.run(measure(spec))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
