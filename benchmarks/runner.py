"""The harness's own process: the S3 server, the data set, and one child process per measurement."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
import psutil

from benchmarks.child import Spec, decode
from benchmarks.contenders import WARM_UP
from benchmarks.results import Measurement
from benchmarks.workloads import Workload, make_dataset
from model_runner.cli.moto_server import MotoServer

__all__ = ["BUCKET", "ROOT", "Harness", "log", "revision", "versions"]

BUCKET = "model-runner-bench"
ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    """
    A progress line, on stderr.

    :param message: The line.
    """
    print(message, file=sys.stderr, flush=True)


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


class Harness:
    """
    A moto S3 server with a bucket, a data set of synthetic features, and :meth:`measure`; a context manager.

    :param features: Distinct features the data set holds.
    :param timeout: Seconds a measurement may take, its setup included.
    :param server_core: Pin the S3 server to one core and the measured processes to the others, as a remote S3
        would leave them: a diagnosis of how much of a stall is the server taking the measured process's core.
    """

    def __init__(self, features: int, timeout: float = 600.0, *, server_core: bool = False) -> None:
        self.features = features
        self.timeout = timeout
        self.server_core = server_core
        self.placement = "the S3 server shares every core with the measured processes"
        self._stack = ExitStack()

    def __enter__(self) -> Harness:
        directory = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="model-runner-bench-"))
        server = self._stack.enter_context(MotoServer())
        server.apply_environment()
        # Any: the lint extra pins no stubs of boto3's S3 client.
        self.client: Any = boto3.client("s3")
        self.client.create_bucket(Bucket=BUCKET)
        self.server_pid = _server_pid(server)
        if self.server_core:
            self._pin_server()
        self.dataset = Path(directory) / "features.json"
        log(f"making {self.features:,} synthetic features; S3 server at {server.endpoint_url}")
        make_dataset(self.dataset, self.features)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stack.close()

    def _pin_server(self) -> None:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2 or self.server_pid is None:
            raise RuntimeError("--server-core needs two cores and the server's process")
        # The server's request threads are started by its main thread and inherit its core; the measured
        # processes inherit this process's cores.
        os.sched_setaffinity(self.server_pid, cores[-1:])
        os.sched_setaffinity(0, cores[:-1])
        self.placement = f"the S3 server pinned to core {cores[-1]}, the measured processes to cores {cores[:-1]}"

    def measure(
        self, kind: str, workload: Workload, contender: str, *, diagnose: bool = False, source: str | None = None
    ) -> Measurement:
        """
        One measurement in a child process; then the objects are checked and the bucket emptied.

        :param kind: ``warm``, ``process`` or ``loop`` (see :class:`benchmarks.child.Spec`).
        :param workload: The writes.
        :param contender: The contender's key.
        :param diagnose: Run the stall diagnoser too.
        :param source: Another checkout's ``src`` to import the sink from, or `None`.
        :return: The figures, ``verified`` set.
        :raises RuntimeError: If the child failed.
        :raises subprocess.TimeoutExpired: If it took longer than the timeout.
        """
        prefix = f"bench/{workload.key}/{contender}/{kind}"
        spec = Spec(kind, workload, contender, BUCKET, prefix, str(self.dataset), self.server_pid, diagnose)
        environment = dict(os.environ)
        paths = [source, str(ROOT), environment.get("PYTHONPATH")]
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        try:
            completed = subprocess.run(
                [sys.executable, "-m", "benchmarks.child", spec.to_json()],
                cwd=ROOT,
                env=environment,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                check=False,
            )
            found = [m for m in map(decode, completed.stdout.splitlines()) if m is not None]
            if not found:
                tail = (completed.stderr or completed.stdout).strip().splitlines()[-15:]
                raise RuntimeError(f"measurement failed (exit {completed.returncode}):\n" + "\n".join(tail))
            count, size = self._stored(prefix)
            found[0].verified = count == workload.writes and size == found[0].bytes
            return found[0]
        finally:
            self._empty()

    def _stored(self, prefix: str) -> tuple[int, int]:
        count = size = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/"):
            for item in page.get("Contents", []):
                if not item["Key"].rsplit("/", 1)[-1].startswith(WARM_UP):
                    count += 1
                    size += item["Size"]
        return count, size

    def _empty(self) -> None:
        # Every measurement leaves up to ~0.5 GB in the server: dropped, so the server does not grow all run long.
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})
        for upload in self.client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []):
            self.client.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])


def interleaved(
    harness: Harness,
    cells: list[tuple[Workload, list[str]]],
    repeats: int,
    once_past: float,
    on_result: Callable[[Measurement, str], None],
) -> tuple[list[Measurement], list[tuple[str, str, str]], list[str]]:
    """
    Warm measurements of each workload's contenders, repeated in rounds whose order rotates, so that a noisy
    neighbour or a slow spell of a shared machine falls on all contenders alike.

    :param harness: The harness.
    :param cells: Each workload and its contenders, in order.
    :param repeats: Rounds.
    :param once_past: A measurement whose first run takes longer than this many seconds runs once.
    :param on_result: Told each measurement and its round's label.
    :return: The measurements, the failures (workload, contender, error) and what ran once.
    """
    runs: list[Measurement] = []
    failures: list[tuple[str, str, str]] = []
    once: set[str] = set()
    for repeat in range(repeats):
        for index, (workload, contenders) in enumerate(cells):
            shift = (repeat + index) % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                name = f"{workload.key}/{contender}"
                if repeat and name in once:
                    continue
                try:
                    run = harness.measure("warm", workload, contender)
                except (RuntimeError, subprocess.TimeoutExpired) as error:
                    log(f"[round {repeat + 1}/{repeats}] {name} FAILED: {error}")
                    failures.append((workload.key, contender, str(error)))
                    continue
                run.repeat = repeat
                runs.append(run)
                on_result(run, f"[round {repeat + 1}/{repeats}]")
                if repeat == 0 and run.seconds > once_past:
                    once.add(name)
    return runs, failures, sorted(once)
