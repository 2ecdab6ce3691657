"""The harness's own process: the S3 server, the data set, and one subprocess per measurement, interleaved."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import boto3
import psutil

from benchmarks.child import RESULT_MARKER
from benchmarks.contenders import WARM_UP
from benchmarks.workloads import Workload, dataset_size, make_dataset
from model_runner.cli.moto_server import MotoServer

__all__ = ["BUCKET", "ROOT", "Options", "parse_arguments", "revision", "run_all", "versions"]

BUCKET = "model-runner-bench"
ROOT = Path(__file__).resolve().parent.parent


def parse_arguments(
    prog: str, description: str, add: Callable[[argparse.ArgumentParser], None], argv: list[str] | None
) -> argparse.Namespace:
    """
    Parse a report's command line: ``--quick`` and ``--repeats`` (3 runs, 1 when quick), and its own options.

    :param prog: The command.
    :param description: What it does.
    :param add: Adds the report's own options to the parser.
    :param argv: Command-line arguments, ``sys.argv[1:]`` by default.
    :return: The arguments.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and one run each: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each measurement (default 3, quick 1)")
    add(parser)
    arguments = parser.parse_args(argv)
    if arguments.repeats is None:
        arguments.repeats = 1 if arguments.quick else 3
    if arguments.repeats < 1:
        parser.error("--repeats must be at least 1")
    return arguments


def versions(names: Iterable[str]) -> dict[str, str]:
    """
    Installed versions of packages.

    :param names: Distribution names.
    :return: Each name's version, or ``not installed``.
    """
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def revision() -> str | None:
    """
    The checkout's commit.

    :return: ``HEAD``'s hash, with `` (src modified)`` when ``src`` has uncommitted changes; `None` outside git.
    """
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + (" (src modified)" if dirty.stdout.strip() else "")


@dataclass
class Options:
    """
    What to run.

    :param workloads: The workloads, in order.
    :param contenders: The contenders' keys, in order.
    :param repeats: Runs of each contender on each workload.
    :param max_repeat_seconds: A measurement whose first run is longer than this is not repeated.
    :param diagnose: After the measurements, run AsyncS3Sink (and the floor, for comparison) once more per
        workload with the stall diagnoser on.
    :param child_timeout: Seconds a measurement may take, its setup included.
    """

    workloads: list[Workload]
    contenders: list[str]
    repeats: int = 3
    max_repeat_seconds: float = 12.0
    diagnose: bool = False
    child_timeout: float = 600.0
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr, flush=True))


def _server_pid(server: MotoServer) -> int | None:
    # MotoServer keeps its process private; find it among our children by its port.
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "moto.server" in command and str(server.port) in command:
            return int(child.pid)
    return None


def _stored(client: Any, prefix: str) -> tuple[int, int]:
    count = size = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            if not item["Key"].rsplit("/", 1)[-1].startswith(WARM_UP):
                count += 1
                size += item["Size"]
    return count, size


def _empty_bucket(client: Any) -> None:
    # Every measurement leaves up to ~0.5 GB in the server: drop it so the server does not grow all run long.
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
    for upload in client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
        client.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])


def _run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.child", json.dumps(spec)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - started
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            result["process_seconds"] = wall
            return result
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
    raise RuntimeError(f"measurement failed (exit {completed.returncode}):\n" + "\n".join(tail))


def run_all(options: Options) -> dict[str, Any]:
    """
    Start the server, make the data set, and run every measurement.

    Repeats are interleaved: each round runs every workload with every contender, in an order rotated from
    round to round, so that a noisy neighbour or a slow spell of a shared machine falls on all contenders
    alike.

    :param options: What to run.
    :return: ``runs`` (every measurement's figures), ``failures``, ``diagnoses``, ``server_url`` and
        ``dataset_features``.
    """
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    diagnoses: list[dict[str, Any]] = []
    features = dataset_size(options.workloads)
    with tempfile.TemporaryDirectory(prefix="model-runner-bench-") as directory, MotoServer() as server:
        server.apply_environment()
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        server_pid = _server_pid(server)
        dataset = Path(directory) / "features.json"
        options.log(f"making {features:,} synthetic features; S3 server at {server.endpoint_url}")
        make_dataset(dataset, features)

        def measure(workload: Workload, contender: str, label: str, diagnose: bool) -> dict[str, Any] | None:
            prefix = f"bench/{workload.key}/{contender}"
            spec = {
                "workload": {k: v for k, v in workload.as_dict().items() if k != "title"},
                "contender": contender,
                "bucket": BUCKET,
                "prefix": prefix,
                "dataset": str(dataset),
                "server_pid": server_pid,
                "diagnose": diagnose,
            }
            try:
                result = _run_child(spec, options.child_timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                options.log(f"{label} {workload.key:<12} {contender:<12} FAILED: {error}")
                failures.append({"workload": workload.key, "contender": contender, "error": str(error)})
                _empty_bucket(client)
                return None
            count, size = _stored(client, prefix)
            result["verified"] = count == workload.writes and size == result["bytes"]
            _empty_bucket(client)
            stall, growth = result["stall"]["worst_ms"], result["rss"]["peak_growth_mb"]
            options.log(
                f"{label} {workload.key:<12} {contender:<12} {result['seconds']:8.3f} s  "
                f"stall {stall:8.1f} ms  ΔRSS {growth:7.1f} MB"
                + ("" if result["verified"] else f"  NOT VERIFIED: {count} objects, {size} bytes stored")
            )
            return result

        long_running: set[tuple[str, str]] = set()
        for repeat in range(options.repeats):
            for index, workload in enumerate(options.workloads):
                shift = (repeat + index) % len(options.contenders)
                order = options.contenders[shift:] + options.contenders[:shift]
                for contender in order:
                    if repeat and (workload.key, contender) in long_running:
                        continue
                    result = measure(workload, contender, f"[round {repeat + 1}/{options.repeats}]", False)
                    if result is None:
                        continue
                    result["repeat"] = repeat
                    runs.append(result)
                    if repeat == 0 and result["seconds"] > options.max_repeat_seconds:
                        long_running.add((workload.key, contender))
        if options.diagnose:
            for workload in options.workloads:
                for contender in ("AsyncS3Sink", "floor"):
                    if contender in options.contenders:
                        result = measure(workload, contender, "[diagnose]", True)
                        if result is not None:
                            diagnoses.append(result)
    return {
        "runs": runs,
        "failures": failures,
        "diagnoses": diagnoses,
        "server_url": server.endpoint_url,
        "dataset_features": features,
        "not_repeated": sorted(f"{w}/{c}" for w, c in long_running),
    }
