"""overwrite=False under races and faults: of writers racing for a key exactly one wins; a request S3 applied whose
answer was lost is retried, meets the object it stored, and succeeds; S3's 409 conflicts are retried."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from botocore.exceptions import ClientError
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, ObjectExistsError, S3Sink, SinkSettings
from model_runner.sink.settings import MiB
from model_runner.sink.upload.conditional import CONFLICT_RETRIES

pytestmark = [pytest.mark.timeout(120)]

SMALL_PARTS = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
KEY = "conditional/image.geojson"
STORE = {"single": "PutObject", "multipart": "CompleteMultipartUpload"}


def collection(features: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def features_for(size: str, seed: int) -> list[dict[str, Any]]:
    return list(synthetic_detections(25_000 if size == "multipart" else 50, seed=seed))


def sink_through(proxy: FaultProxy, bucket: str) -> AsyncS3Sink:
    return AsyncS3Sink(bucket, "conditional", client=ClientSettings(endpoint_url=proxy.url), settings=SMALL_PARTS)


@pytest.mark.anyio
@pytest.mark.parametrize("size", ["single", "multipart"])
async def test_of_two_writers_racing_for_a_key_exactly_one_wins(
    size: str, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    # Both writes are under way at once (their uploads overlap); the first request that would store an object is
    # held back, so that the other's reaches S3 first: moto checks If-None-Match and then stores, not atomically as
    # S3 does, so two stores arriving together could both pass its check.
    proxy.add_rule(Rule({STORE[size]}, "delay", delay=2.0, times=1))
    contents = {writer: features_for(size, seed) for seed, writer in enumerate(["first", "second"])}
    outcomes: dict[str, str] = {}

    async def write(writer: str) -> None:
        try:
            await sink_through(proxy, bucket).write_with_result("image", contents[writer], overwrite=False)
            outcomes[writer] = "won"
        except ObjectExistsError:
            outcomes[writer] = "refused"

    async with anyio.create_task_group() as group:
        for writer in contents:
            group.start_soon(write, writer)
    assert sorted(outcomes.values()) == ["refused", "won"]
    winner = next(writer for writer, outcome in outcomes.items() if outcome == "won")
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == collection(contents[winner])
    assert proxy.count(STORE[size]) == 2
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


@pytest.mark.anyio
@pytest.mark.parametrize("size", ["single", "multipart"])
async def test_a_store_applied_whose_answer_was_lost_succeeds(
    size: str, proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    proxy.add_rule(Rule({STORE[size]}, "error500_after", times=1))
    features = features_for(size, 7)
    result = await sink_through(proxy, bucket).write_with_result("image", features, overwrite=False)
    stored = s3.get_object(Bucket=bucket, Key=KEY)["Body"].read()
    assert stored == collection(features)
    assert result.bytes == len(stored) and result.retries >= 1
    # botocore sent it again after the 500; S3 had applied the first.
    assert proxy.count(STORE[size]) == 2
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_the_sync_sink_recognises_its_own_object_after_a_lost_answer(proxy: FaultProxy, s3: Any, bucket: str) -> None:
    proxy.add_rule(Rule({"PutObject"}, "error500_after", times=1))
    features = features_for("single", 8)
    sink = S3Sink(bucket, "conditional", client=ClientSettings(endpoint_url=proxy.url))
    assert sink.write("image", features, overwrite=False) is True
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == collection(features)


@pytest.mark.anyio
async def test_a_lost_answer_over_another_writers_object_is_still_refused(
    proxy: FaultProxy, s3: Any, bucket: str
) -> None:
    # The retried PutObject meets 412 from an object this write did not store: same key, other bytes.
    s3.put_object(Bucket=bucket, Key=KEY, Body=b"another writer's")
    proxy.add_rule(Rule({"PutObject"}, "slowdown", times=1))
    with pytest.raises(ObjectExistsError):
        await sink_through(proxy, bucket).write("image", features_for("single", 9), overwrite=False)
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == b"another writer's"


@pytest.mark.anyio
@pytest.mark.parametrize("size", ["single", "multipart"])
async def test_conditional_request_conflicts_are_retried(size: str, proxy: FaultProxy, s3: Any, bucket: str) -> None:
    conflict = proxy.add_rule(
        Rule({STORE[size]}, "refuse", status=409, code="ConditionalRequestConflict", times=CONFLICT_RETRIES)
    )
    features = features_for(size, 10)
    await sink_through(proxy, bucket).write("image", features, overwrite=False)
    assert conflict.applied == CONFLICT_RETRIES
    stored = s3.get_object(Bucket=bucket, Key=KEY)["Body"].read()
    assert stored == collection(features)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


@pytest.mark.anyio
async def test_conflicts_past_the_retries_fail_and_leave_no_upload(proxy: FaultProxy, s3: Any, bucket: str) -> None:
    proxy.add_rule(Rule({"CompleteMultipartUpload"}, "refuse", status=409, code="ConditionalRequestConflict"))
    with pytest.raises(ClientError, match="ConditionalRequestConflict"):
        await sink_through(proxy, bucket).write("image", features_for("multipart", 11), overwrite=False)
    assert proxy.count("CompleteMultipartUpload") == CONFLICT_RETRIES + 1
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)
