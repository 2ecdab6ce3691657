"""The backfill on Dask when a worker dies mid-batch or a Ctrl-C cannot wait for every batch: each file is counted
and the summary is printed, and no multipart upload is left behind."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import distributed
import orjson
import pytest
from support.proxy import FaultProxy, Rule

from model_runner.cli.backfill.job import backfill
from model_runner.cli.backfill.writes import Target
from model_runner.cli.synthetic import synthetic_detections

pytestmark = pytest.mark.timeout(240)

PREFIX = "backfill"
# About 15 MB encoded: a multipart upload of two parts at the sink's default 8 MiB.
BIG_FEATURES = 30_000
# Seconds a held request waits at the proxy: longer than any test runs.
HELD_SECONDS = 600.0


@pytest.fixture(scope="module")
def big_features() -> list[dict[str, Any]]:
    return list(synthetic_detections(BIG_FEATURES, seed=30))


def write_lines(path: Path, features: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(orjson.dumps(feature) + b"\n" for feature in features))


def collection(features: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def uploads(s3: Any, bucket: str) -> list[dict[str, Any]]:
    """The multipart uploads in progress, asked of the server itself, not through the proxy."""
    found: list[dict[str, Any]] = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return found


def stored_keys(s3: Any, bucket: str) -> list[str]:
    return sorted(item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []))


def wait_for(condition: Callable[[], object], what: str, seconds: float = 90.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.05)


class BackfillThread(threading.Thread):
    """The backfill command run in a thread, so that the test can act on its cluster meanwhile."""

    def __init__(self, paths: Sequence[Path], target: Target, dask: str) -> None:
        super().__init__(name="backfill", daemon=True)
        self.out, self.err = io.StringIO(), io.StringIO()
        self.status: int | None = None
        self._job = partial(backfill, paths, target, dask=dask, out=self.out, err=self.err)

    def run(self) -> None:
        self.status = self._job()

    def result(self) -> tuple[int | None, list[str], str]:
        self.join(timeout=120)
        assert not self.is_alive(), f"the backfill did not end: {self.err.getvalue()}"
        return self.status, self.out.getvalue().splitlines(), self.err.getvalue()


def kill_the_busy_worker(client: Any) -> None:
    """Kill the process of the one worker running a task, as the OOM killer would: no code of it runs after."""
    busy: dict[str, Sequence[str]] = {}

    def one_task_running() -> bool:
        busy.clear()
        busy.update((worker, keys) for worker, keys in client.processing().items() if keys)
        return len(busy) == 1 and len(next(iter(busy.values()))) == 1

    wait_for(one_task_running, "one batch running alone")
    (worker,) = busy
    os.kill(client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)


def test_a_worker_killed_mid_batch_fails_its_files_and_leaves_no_upload(
    tmp_path: Path,
    bucket: str,
    s3: Any,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    big_features: list[dict[str, Any]],
) -> None:
    write_lines(tmp_path / "big.ndjson", big_features)
    for index in range(3):
        write_lines(tmp_path / f"small-{index}.ndjson", list(synthetic_detections(5, seed=index)))
    held_parts = proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD_SECONDS))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)  # the local cluster's workers inherit it
    job = BackfillThread([tmp_path], Target(bucket, PREFIX), dask="local")
    job.start()
    wait_for(
        lambda: held_parts.applied and len(uploads(s3, bucket)) == 1 and len(stored_keys(s3, bucket)) == 3,
        "the small files written and the big one mid-upload",
    )
    kill_the_busy_worker(distributed.default_client())

    status, out, err = job.result()
    assert (status, out[-1]) == (1, "written 3, skipped 0, failed 1"), err
    assert f"failed {tmp_path / 'big.ndjson'}: the dask worker writing its batch died (KilledWorker)" in err
    assert uploads(s3, bucket) == []
    assert stored_keys(s3, bucket) == [f"{PREFIX}/small-{index}.geojson" for index in range(3)]


def test_a_batch_run_again_after_its_worker_died_first_aborts_what_that_worker_left(
    tmp_path: Path,
    bucket: str,
    s3: Any,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    big_features: list[dict[str, Any]],
) -> None:
    write_lines(tmp_path / "big.ndjson", big_features)
    held_part = proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD_SECONDS, times=1))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    # A scheduler of the user's, which runs a task again on another worker when its worker dies, as dask does by
    # default: the batch's second run writes the file.
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, dashboard_address=None, scheduler_kwargs={"allowed_failures": 3}
        ) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        job = BackfillThread([tmp_path], Target(bucket, PREFIX), dask=cluster.scheduler_address)
        job.start()
        wait_for(lambda: held_part.applied and len(uploads(s3, bucket)) == 1, "the file mid-upload")
        kill_the_busy_worker(client)
        status, out, err = job.result()

    assert (status, out[-1]) == (0, "written 1, skipped 0, failed 0"), err
    assert uploads(s3, bucket) == []
    assert s3.get_object(Bucket=bucket, Key=f"{PREFIX}/big.geojson")["Body"].read() == collection(big_features)


def test_ctrl_c_waits_for_the_batches_together_then_aborts_what_they_could_not(
    tmp_path: Path,
    bucket: str,
    s3: Any,
    proxy: FaultProxy,
    subprocess_environment: dict[str, str],
    big_features: list[dict[str, Any]],
) -> None:
    for name in ("a", "b"):
        write_lines(tmp_path / f"{name}.ndjson", big_features)  # two batches, one file each
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD_SECONDS))
    # Each batch's abort is held, so neither can stop; the driver's own aborts, which come after, pass.
    held_aborts = proxy.add_rule(Rule({"AbortMultipartUpload"}, "delay", delay=HELD_SECONDS, times=2))
    arguments = [str(tmp_path), "--bucket", bucket, "--prefix", PREFIX, "--dask", "local", "--stop-timeout", "5"]
    process = subprocess.Popen(
        [sys.executable, "-m", "model_runner", "backfill", *arguments],
        env={**subprocess_environment, "AWS_ENDPOINT_URL_S3": proxy.url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(uploads(s3, bucket)) == 2 or process.poll() is not None, "both files mid-upload")
        # To the process group, as a terminal's Ctrl-C: dask's worker processes get it too.
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()

    assert process.returncode == 130, err
    assert out.splitlines()[-1] == "written 0, skipped 0, failed 0"
    assert "interrupted: 2 files not done" in err
    # The job ended with both batches still aborting: the only aborts answered are the driver's, one per upload.
    assert held_aborts.applied == 2
    assert proxy.count("AbortMultipartUpload") == 2
    assert uploads(s3, bucket) == []
