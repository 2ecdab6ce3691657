"""The open writer: features added a batch at a time, from many tasks or threads, land whole and in order in one
object stored when the block ends, or nothing at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.lowlevel
import orjson
import pytest
from support.threads import run_on_threads

from model_runner.sink import AsyncS3Sink, ClientSettings, FeatureEncodingError, ObjectExistsError, S3Sink, SinkSettings
from model_runner.sink.clients import shared_client
from model_runner.sink.settings import MiB

pytestmark = pytest.mark.timeout(180)


def tile(source: str, number: int, size: int) -> list[dict[str, Any]]:
    return [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [number, n]},
            "properties": {"b": [source, number, n]},
        }
        for n in range(size)
    ]


def batches_of(stored: bytes) -> list[tuple[str, int]]:
    """The batches an object holds, in order, each checked whole (its features contiguous and in order)."""
    features = orjson.loads(stored)["features"]
    found: list[tuple[str, int]] = []
    position = 0
    while position < len(features):
        source, number, first = features[position]["properties"]["b"]
        assert first == 0, f"batch {source}/{number} starts at feature {first}"
        size = 0
        while position + size < len(features) and features[position + size]["properties"]["b"][:2] == [source, number]:
            assert features[position + size]["properties"]["b"][2] == size
            size += 1
        found.append((source, number))
        position += size
    return found


def uploads_left(s3: Any, bucket: str) -> list[Any]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


async def wait_for_upload(s3: Any, bucket: str) -> None:
    deadline = time.monotonic() + 60
    while not await anyio.to_thread.run_sync(uploads_left, s3, bucket):
        assert time.monotonic() < deadline, "no multipart upload started"
        await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_8_tasks_adding_per_tile_batches_store_each_batch_whole_in_add_call_order(
    bucket: str, read_object: Callable[[str], bytes]
) -> None:
    calls: list[tuple[str, int]] = []
    async with AsyncS3Sink(bucket, "tiles") as sink:

        async def model(task: int) -> None:
            for number in range(30):
                features = tile(f"task-{task}", number, 40 + number)
                calls.append((f"task-{task}", number))
                await writer.add(features)
                if number % 3 == 0:
                    await anyio.lowlevel.checkpoint()

        async with sink.open("scene") as writer, anyio.create_task_group() as group:
            for task in range(8):
                group.start_soon(model, task)
    assert writer.result is not None
    assert writer.result.features == sum(40 + number for number in range(30)) * 8
    stored = read_object("tiles/scene.geojson")
    assert batches_of(stored) == calls
    assert len(set(calls)) == 240


@pytest.mark.anyio
async def test_batches_may_be_any_iterable_or_async_iterable(bucket: str, read_object: Callable[[str], bytes]) -> None:
    async def produced() -> AsyncIterator[dict[str, Any]]:
        for feature in tile("async", 2, 5):
            await anyio.lowlevel.checkpoint()
            yield feature

    async with AsyncS3Sink(bucket, "kinds") as sink:
        async with sink.open("scene", metadata={"model": "m1"}) as writer:
            await writer.add(tile("list", 0, 3))
            await writer.add(feature for feature in tile("generator", 1, 4))
            await writer.add(produced())
            await writer.add(tuple(tile("tuple", 3, 2)))
            with pytest.raises(TypeError, match=r"collection\['features'\]"):
                await writer.add({"type": "FeatureCollection", "features": []})
        assert await sink.object_metadata("scene") == {"model": "m1"}
    assert batches_of(read_object("kinds/scene.geojson")) == [("list", 0), ("generator", 1), ("async", 2), ("tuple", 3)]


@pytest.mark.anyio
async def test_tens_of_mb_added_hold_no_more_than_the_byte_budget_s_bound(
    bucket: str, read_object: Callable[[str], bytes]
) -> None:
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
    client = ClientSettings(max_bytes_in_flight=8 * MiB)
    pad = "x" * 4000
    async with AsyncS3Sink(bucket, "large", settings=settings, client=client) as sink:
        async with sink.open("scene") as writer:
            for number in range(30):
                # Built as added, so the test itself never holds the collection.
                batch = tile("large", number, 500)
                for feature in batch:
                    feature["properties"]["pad"] = pad
                await writer.add(batch)
        async with shared_client(sink._client_options) as shared:
            peak, used = shared.budget.peak, shared.budget.used
    assert writer.result is not None
    assert writer.result.bytes > 55 * MiB
    assert writer.result.parts >= 12
    # The documented bound: the budget's limit plus one body (the part size here), plus one encoded batch (about a
    # millisecond of orjson: well under 8 MiB); a fraction of the object.
    assert peak <= client.max_bytes_in_flight + settings.part_size + 8 * MiB
    assert peak < writer.result.bytes / 3
    assert used == 0
    assert len(batches_of(read_object("large/scene.geojson"))) == 30


@pytest.mark.anyio
async def test_an_exception_inside_the_block_stores_nothing_and_leaves_no_upload(
    bucket: str, s3: Any, stored_keys: Callable[[], list[str]]
) -> None:
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
    async with AsyncS3Sink(bucket, "failed", settings=settings) as sink:
        with pytest.raises(LookupError, match="the model failed"):
            async with sink.open("scene") as writer:
                for number in range(4):
                    await writer.add(tile("big", number, 20_000))
                await wait_for_upload(s3, bucket)
                raise LookupError("the model failed")
        with pytest.raises(RuntimeError, match="not open"):
            await writer.add(tile("late", 0, 1))
    assert writer.result is None
    assert stored_keys() == []
    assert uploads_left(s3, bucket) == []


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["task.cancel", "wait_for", "anyio"])
async def test_a_cancellation_inside_the_block_stores_nothing_and_leaves_no_upload(
    bucket: str, s3: Any, stored_keys: Callable[[], list[str]], how: str
) -> None:
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
    sink = AsyncS3Sink(bucket, "cancelled", settings=settings)
    started = anyio.Event()

    async def produce() -> None:
        async with sink.open("scene") as writer:
            for number in range(4):
                await writer.add(tile("big", number, 20_000))
            await wait_for_upload(s3, bucket)
            started.set()
            await anyio.sleep_forever()

    if how == "anyio":
        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            await started.wait()
            group.cancel_scope.cancel()
    else:
        coroutine = produce() if how == "task.cancel" else asyncio.wait_for(produce(), 3600)
        task = asyncio.ensure_future(coroutine)
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await sink.aclose()
    assert stored_keys() == []
    assert uploads_left(s3, bucket) == []


@pytest.mark.anyio
async def test_a_feature_that_cannot_be_encoded_poisons_the_writer_naming_its_index_within_the_object(
    bucket: str, s3: Any, stored_keys: Callable[[], list[str]]
) -> None:
    async with AsyncS3Sink(bucket, "poisoned") as sink:
        with pytest.raises(FeatureEncodingError) as raised:
            async with sink.open("scene") as writer:
                await writer.add(tile("good", 0, 10))
                bad = tile("bad", 1, 5)
                bad[3]["properties"]["value"] = {1, 2}
                # Encoded as it is added: the add that holds the bad feature raises, and so does every add after it.
                with pytest.raises(FeatureEncodingError) as at_add:
                    await writer.add(bad)
                with pytest.raises(FeatureEncodingError) as later:
                    await writer.add(tile("after", 2, 1))
                assert at_add.value.index == later.value.index == 13
    assert raised.value.index == 13
    assert "feature 13" in str(raised.value)
    assert writer.result is None
    assert stored_keys() == []
    assert uploads_left(s3, bucket) == []


@pytest.mark.anyio
async def test_a_writer_that_got_no_feature_stores_an_empty_collection(
    bucket: str, read_object: Callable[[str], bytes]
) -> None:
    async with AsyncS3Sink(bucket, "empty") as sink, sink.open("scene") as writer:
        pass
    assert read_object("empty/scene.geojson") == b'{"type":"FeatureCollection","features":[]}'
    assert writer.result is not None and writer.result.features == 0


@pytest.mark.anyio
async def test_add_outside_the_block_and_a_second_open_are_refused(bucket: str) -> None:
    async with AsyncS3Sink(bucket, "outside") as sink:
        writer = sink.open("scene")
        with pytest.raises(RuntimeError, match="not open"):
            await writer.add(tile("early", 0, 1))
        async with writer:
            await writer.add(tile("inside", 0, 1))
        with pytest.raises(RuntimeError, match="not open"):
            await writer.add(tile("late", 0, 1))
        with pytest.raises(RuntimeError, match="once"):
            async with writer:
                pass
        assert writer.result is not None and writer.result.features == 1


@pytest.mark.anyio
async def test_overwrite_false_with_an_existing_object_raises_and_leaves_it_untouched(
    bucket: str, s3: Any, read_object: Callable[[str], bytes]
) -> None:
    async with AsyncS3Sink(bucket, "exists") as sink:
        await sink.write("scene", tile("first", 0, 2))
        before = read_object("exists/scene.geojson")
        with pytest.raises(TypeError, match="overwrite"):
            sink.open("scene", overwrite="no")  # type: ignore[arg-type]
        with pytest.raises(ObjectExistsError):
            async with sink.open("scene", overwrite=False) as writer:
                await writer.add(tile("second", 0, 3))
        settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
        large = AsyncS3Sink(bucket, "exists", settings=settings)
        with pytest.raises(ObjectExistsError):
            async with large.open("scene", overwrite=False) as writer:
                for number in range(4):
                    await writer.add(tile("big", number, 20_000))
    assert read_object("exists/scene.geojson") == before
    assert uploads_left(s3, bucket) == []


def test_the_sync_writer_takes_batches_from_4_threads(bucket: str, read_object: Callable[[str], bytes]) -> None:
    sink = S3Sink(bucket, "threads")

    def model(thread: int) -> None:
        for number in range(20):
            features = tile(f"thread-{thread}", number, 25)
            # A generator every other batch: pulled on this thread.
            writer.add(features if number % 2 else (feature for feature in features), timeout=60)

    with sink.open("scene") as writer:
        run_on_threads(model, 4)
    assert writer.result is not None and writer.result.features == 4 * 20 * 25
    found = batches_of(read_object("threads/scene.geojson"))
    assert sorted(found) == sorted((f"thread-{thread}", number) for thread in range(4) for number in range(20))
    for thread in range(4):
        assert [number for source, number in found if source == f"thread-{thread}"] == list(range(20))
    with pytest.raises(RuntimeError, match="not open"):
        writer.add(tile("late", 0, 1))


def test_the_sync_writer_stores_nothing_when_its_block_raises(
    bucket: str, s3: Any, stored_keys: Callable[[], list[str]]
) -> None:
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB)
    sink = S3Sink(bucket, "interrupted", settings=settings)
    # KeyboardInterrupt is what Ctrl-C raises in the block.
    with pytest.raises(KeyboardInterrupt), sink.open("scene") as writer:
        for number in range(4):
            writer.add(tile("big", number, 20_000))
        deadline = time.monotonic() + 60
        while not uploads_left(s3, bucket):
            assert time.monotonic() < deadline, "no multipart upload started"
            time.sleep(0.05)
        raise KeyboardInterrupt
    assert writer.result is None
    assert stored_keys() == []
    assert uploads_left(s3, bucket) == []


def test_the_sync_writer_reports_a_bad_feature_at_its_add(bucket: str, stored_keys: Callable[[], list[str]]) -> None:
    sink = S3Sink(bucket, "bad")
    bad = tile("bad", 0, 3)
    bad[1]["geometry"] = {"type": "Point", "coordinates": [float("nan"), 0.0]}
    added = []
    with pytest.raises(FeatureEncodingError) as raised, sink.open("scene") as writer:
        writer.add(tile("good", 0, 4))
        added.append("good")
        writer.add(bad)
        added.append("bad")
    assert added == ["good"]
    assert raised.value.index == 5
    assert stored_keys() == []
    with pytest.raises(TypeError, match="overwrite"):
        sink.open("scene", overwrite=1)  # type: ignore[arg-type]
