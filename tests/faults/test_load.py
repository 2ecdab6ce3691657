"""Load: a thousand concurrent writes on one sink, sixteen threads on one facade, all stored intact within
bounded connections and bounded bytes in flight."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import orjson
import pytest
from support.proxy import FaultProxy

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, S3Sink, SinkSettings
from model_runner.sink.budget import ByteBudget
from model_runner.sink.settings import MiB

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]


def body(features: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def stored(s3: Any, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]


async def test_1000_concurrent_writes_on_one_sink_use_bounded_connections(
    proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    collections = {f"image-{i}": list(synthetic_detections(1 + i % 7, seed=i)) for i in range(1000)}
    sink = AsyncS3Sink(bucket, "load", client=ClientSettings(endpoint_url=proxy.url, max_pool_connections=8))
    async with anyio.create_task_group() as group:
        for image_id, features in collections.items():
            group.start_soon(sink.write, image_id, features)
    assert proxy.count("PutObject") == 1000
    assert proxy.peak_in_flight["PutObject"] <= 8
    for image_id, features in collections.items():
        assert stored(s3, bucket, f"load/{image_id}.geojson") == body(features)


async def test_bytes_in_flight_are_bounded_across_the_writes_of_a_sink(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    # Room for one 5 MiB part at a time across four concurrent multipart writes (their short last parts may share).
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
    client = ClientSettings(endpoint_url=proxy.url, max_bytes_in_flight=5 * MiB)
    collections = {f"big-{i}": list(synthetic_detections(12_000, seed=i)) for i in range(4)}
    sink = AsyncS3Sink(bucket, "bounded", client=client, settings=settings)
    async with anyio.create_task_group() as group:
        for image_id, features in collections.items():
            group.start_soon(sink.write, image_id, features)
    assert proxy.count("UploadPart") >= 8
    assert proxy.peak_bytes_in_flight <= 5 * MiB
    for image_id, features in collections.items():
        assert stored(s3, bucket, f"bounded/{image_id}.geojson") == body(features)
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_16_threads_hammering_one_s3_sink_store_every_object(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    sink = S3Sink(bucket, "threads", client=ClientSettings(endpoint_url=proxy.url, max_pool_connections=8))
    errors: list[BaseException] = []

    def hammer(thread: int) -> None:
        try:
            for i in range(25):
                assert sink.write(f"t{thread}-{i}", list(synthetic_detections(5, seed=thread * 100 + i)))
        except BaseException as error:  # collected, so the test fails on it rather than losing it
            errors.append(error)

    threads = [threading.Thread(target=hammer, args=(thread,)) for thread in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert proxy.count("PutObject") == 400
    assert proxy.peak_in_flight["PutObject"] <= 8
    for thread in range(16):
        for i in range(25):
            features = list(synthetic_detections(5, seed=thread * 100 + i))
            assert stored(s3, bucket, f"threads/t{thread}-{i}.geojson") == body(features)


async def test_a_byte_budget_lets_bodies_through_as_room_frees_and_an_oversize_one_alone() -> None:
    budget = ByteBudget(10)
    order: list[str] = []

    async def take(name: str, size: int, hold: anyio.Event) -> None:
        await budget.acquire(size)
        order.append(name)
        await hold.wait()
        budget.release(size)

    first, second, oversize = anyio.Event(), anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as group:
        group.start_soon(take, "first", 6, first)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(take, "second", 6, second)
        await anyio.wait_all_tasks_blocked()
        assert order == ["first"] and budget.used == 6
        first.set()
        await anyio.wait_all_tasks_blocked()
        assert order == ["first", "second"]
        group.start_soon(take, "oversize", 50, oversize)
        await anyio.wait_all_tasks_blocked()
        assert order == ["first", "second"]
        second.set()
        await anyio.wait_all_tasks_blocked()
        assert order == ["first", "second", "oversize"] and budget.used == 50
        oversize.set()
    assert budget.used == 0
