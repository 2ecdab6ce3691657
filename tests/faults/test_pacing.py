"""The writes sharing a client keep what they put on its event loop at once bounded."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings
from model_runner.sink.clients import PUT_SLOTS

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


async def test_concurrent_small_writes_send_at_most_put_slots_put_objects_at_once(
    proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    # Slow answers keep every request in flight long enough for all the writes to be waiting together.
    proxy.add_rule(Rule({"PutObject"}, "delay", delay=0.2))
    sink = AsyncS3Sink(bucket, "paced", client=ClientSettings(endpoint_url=proxy.url))
    await sink.validate_s3_bucket()
    collections = {f"image-{index}": list(synthetic_detections(20, seed=index)) for index in range(5 * PUT_SLOTS)}
    async with anyio.create_task_group() as group:
        for image_id, features in collections.items():
            group.start_soon(sink.write, image_id, features)
    # Bounded, yet not one at a time: the writes still overlap on the network.
    assert proxy.peak_in_flight["PutObject"] == PUT_SLOTS
    for image_id, features in collections.items():
        stored = s3.get_object(Bucket=bucket, Key=f"paced/{image_id}.geojson")["Body"].read()
        assert stored == orjson.dumps({"type": "FeatureCollection", "features": features})
