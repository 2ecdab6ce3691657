"""S3Sink interrupted: Ctrl-C, interpreter exit and ``timeout=`` cancel the write, which leaves nothing behind."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import ClientSettings, S3Sink, SinkSettings
from model_runner.sink.settings import MiB

pytestmark = pytest.mark.timeout(120)

# Parts as small as S3 allows, so a collection of ~12 MB makes three of them.
SMALL_PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=2)
MULTIPART_COUNT = 25_000
# Requests a rule holds back are held this long: far longer than any write here may take to end once cancelled.
HELD_SECONDS = 30.0
# A guard against a hang, not a speed check.
CHILD_SECONDS = 90

CHILD_PREAMBLE = """
import sqlite3, sys, threading, time
import boto3
from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import ClientSettings, S3Sink, SinkSettings
from model_runner.sink.settings import MiB
bucket, endpoint = sys.argv[1:3]
settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=2)
sink = S3Sink(bucket, "out", client=ClientSettings(endpoint_url=endpoint), settings=settings)
features = list(synthetic_detections(25_000, seed=5))

def wait_for_upload():
    s3 = boto3.client("s3")
    deadline = time.monotonic() + 60
    while "Uploads" not in s3.list_multipart_uploads(Bucket=bucket) and time.monotonic() < deadline:
        time.sleep(0.02)
"""


def assert_nothing_left(s3: Any, bucket: str) -> None:
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


def start_child(script: str, bucket: str, proxy: FaultProxy, environment: dict[str, str]) -> subprocess.Popen[str]:
    source = CHILD_PREAMBLE + textwrap.dedent(script)
    return subprocess.Popen(
        [sys.executable, "-W", "always::ResourceWarning", "-c", source, bucket, proxy.url],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(condition: Callable[[], bool], seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the child never got there"
        time.sleep(0.01)


def test_ctrl_c_during_a_multipart_write_aborts_it_then_raises(
    proxy: FaultProxy, bucket: str, s3: Any, subprocess_environment: dict[str, str]
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD_SECONDS))
    child = start_child('sink.write("scene", features)', bucket, proxy, subprocess_environment)
    wait_until(lambda: proxy.peak_in_flight.get("UploadPart", 0) >= 1)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=CHILD_SECONDS)
    # An uncaught KeyboardInterrupt ends Python by SIGINT.
    assert child.returncode == -signal.SIGINT, stderr
    assert "KeyboardInterrupt" in stderr
    # It ended while its parts were still held: it did not wait for the write, only for the abort.
    assert proxy.count("UploadPart") == 0
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)


def test_a_caller_told_of_ctrl_c_finds_the_write_already_aborted(
    proxy: FaultProxy, bucket: str, s3: Any, subprocess_environment: dict[str, str]
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD_SECONDS))
    script = """
        try:
            sink.write("scene", features)
        except KeyboardInterrupt:
            # A program that carries on after Ctrl-C: nothing may be stored behind its back.
            uploads = boto3.client("s3").list_multipart_uploads(Bucket=bucket).get("Uploads", [])
            print("uploads left:", len(uploads), flush=True)
    """
    child = start_child(script, bucket, proxy, subprocess_environment)
    wait_until(lambda: proxy.peak_in_flight.get("UploadPart", 0) >= 1)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=CHILD_SECONDS)
    assert child.returncode == 0, stderr
    assert stdout == "uploads left: 0\n"
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)


@pytest.mark.parametrize("ending", ["end-of-script", "sys.exit"])
def test_exiting_with_a_write_in_flight_in_another_thread_aborts_it(
    proxy: FaultProxy, bucket: str, s3: Any, subprocess_environment: dict[str, str], ending: str
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD_SECONDS))
    script = f"""
        import atexit
        outcome = []
        def work():
            try:
                outcome.append(sink.write("scene", features))
            except BaseException as error:
                outcome.append(type(error).__name__ + ": " + str(error))
        thread = threading.Thread(target=work, daemon=True)
        # Registered before the sink's own exit handler, so it runs after it: it sees what the thread was told.
        atexit.register(lambda: (thread.join(30), print(outcome, flush=True)))
        thread.start()
        wait_for_upload()
        {"sys.exit(0)" if ending == "sys.exit" else "pass"}
    """
    child = start_child(script, bucket, proxy, subprocess_environment)
    stdout, stderr = child.communicate(timeout=CHILD_SECONDS)
    assert child.returncode == 0, stderr
    assert proxy.count("UploadPart") == 0
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)
    assert "SinkError" in stdout and "was cancelled: the interpreter is exiting" in stdout
    for marker in ("Unclosed", "unclosed", "ResourceWarning", "Exception ignored", "Traceback"):
        assert marker not in stderr, stderr


def test_ctrl_c_while_the_caller_pulls_features_aborts_the_write(
    proxy: FaultProxy, bucket: str, s3: Any, subprocess_environment: dict[str, str]
) -> None:
    script = """
        import orjson
        db = sqlite3.connect(":memory:")
        db.execute("create table detections (feature text)")
        db.executemany("insert into detections values (?)", [(orjson.dumps(f).decode(),) for f in features])

        def source():
            for (text,) in db.execute("select feature from detections"):
                yield orjson.loads(text)
            print("stalled", flush=True)
            time.sleep(3600)  # a model still working on the next feature

        sink.write("scene", source())
    """
    child = start_child(script, bucket, proxy, subprocess_environment)
    assert child.stdout is not None
    assert child.stdout.readline() == "stalled\n"
    wait_until(lambda: proxy.count("UploadPart") >= 1)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=CHILD_SECONDS)
    assert child.returncode == -signal.SIGINT, stderr
    assert "KeyboardInterrupt" in stderr
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)


@pytest.fixture(scope="module")
def multipart_features() -> list[dict[str, Any]]:
    return list(synthetic_detections(MULTIPART_COUNT, seed=5))


def sink_through(proxy: FaultProxy, bucket: str) -> S3Sink:
    return S3Sink(bucket, "out", client=ClientSettings(endpoint_url=proxy.url), settings=SMALL_PARTS)


def test_a_timeout_while_parts_upload_aborts_the_write(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]]
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=HELD_SECONDS))
    sink = sink_through(proxy, bucket)
    with pytest.raises(TimeoutError, match="did not finish within 5 s"):
        sink.write("scene", multipart_features, timeout=5)
    assert proxy.count("UploadPart") == 0
    assert proxy.accepted("AbortMultipartUpload") == 1
    assert_nothing_left(s3, bucket)
    # The sink's loop goes on serving.
    proxy.clear_rules()
    assert sink.write("after", multipart_features[:10], timeout=60)


def test_a_timeout_before_a_single_put_object_stores_nothing(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    proxy.add_rule(Rule({"HeadBucket"}, "delay", delay=HELD_SECONDS))
    with pytest.raises(TimeoutError):
        sink_through(proxy, bucket).write_with_result("scene", list(synthetic_detections(20)), timeout=1)
    assert proxy.count("PutObject") == 0
    assert_nothing_left(s3, bucket)


def test_a_timeout_on_the_bucket_check(proxy: FaultProxy, bucket: str) -> None:
    proxy.add_rule(Rule({"HeadBucket"}, "delay", delay=HELD_SECONDS))
    with pytest.raises(TimeoutError, match=f"check of bucket {bucket} did not finish within 0.5 s"):
        sink_through(proxy, bucket).validate_s3_bucket(timeout=0.5)


def test_a_write_that_finishes_in_time_is_stored(bucket: str, s3: Any) -> None:
    features = list(synthetic_detections(20, seed=3))
    assert S3Sink(bucket, "out").write("scene", iter(features), timeout=60)
    stored = orjson.loads(s3.get_object(Bucket=bucket, Key="out/scene.geojson")["Body"].read())
    assert stored["features"] == features


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_a_timeout_must_be_positive(bucket: str, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        S3Sink(bucket, "out").write("scene", [], timeout=timeout)


class StallingSource:
    """Features, then one more every ``pause`` seconds, forever: a source that has stalled."""

    def __init__(self, features: Iterator[dict[str, Any]], pause: float) -> None:
        self.features = features
        self.pause = pause
        self.stalled_features = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.features
        while True:
            time.sleep(self.pause)
            self.stalled_features += 1
            yield {"type": "Feature", "geometry": None, "properties": {"late": self.stalled_features}}


@pytest.mark.parametrize("count", [0, MULTIPART_COUNT], ids=["single-put", "multipart"])
def test_a_timeout_while_the_caller_pulls_features_cancels_the_write(
    proxy: FaultProxy, bucket: str, s3: Any, multipart_features: list[dict[str, Any]], count: int
) -> None:
    db = sqlite3.connect(":memory:")
    db.execute("create table detections (feature text)")
    db.executemany("insert into detections values (?)", [(orjson.dumps(f).decode(),) for f in multipart_features])
    rows = db.execute("select feature from detections limit ?", (count,))
    source = StallingSource((orjson.loads(text) for (text,) in rows), pause=0.01)
    sink = sink_through(proxy, bucket)
    with pytest.raises(TimeoutError):
        sink.write("scene", source, timeout=5)
    # The deadline is checked between features, not only between batches.
    assert source.stalled_features < sink.settings.encode_batch_features
    assert proxy.count("PutObject") == 0
    assert proxy.count("CompleteMultipartUpload") == 0
    assert proxy.count("AbortMultipartUpload") == proxy.count("CreateMultipartUpload") == (1 if count else 0)
    assert_nothing_left(s3, bucket)
