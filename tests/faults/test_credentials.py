"""Assumed-role credentials: one AssumeRole per role and event loop, refreshed before expiry, failures named.

STS is reached through the fault proxy, which counts the AssumeRole calls and can refuse them.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import orjson
import pytest

from model_runner.demo import synthetic_detections
from model_runner.sink import AsyncS3Sink, InvalidAssumedRoleException, S3Sink

from .proxy import FaultProxy, Rule

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

ROLE = "arn:aws:iam::123456789012:role/detections-writer"
FEATURES = list(synthetic_detections(20, seed=4))


class Clock:
    """A clock the test moves forward; sinks given it judge expiry by it, and the proxy's STS issues by it."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


def role_sink(proxy: FaultProxy, bucket: str, prefix: str = "role", **options: Any) -> AsyncS3Sink:
    # S3 goes straight to moto through the standard variables; only STS goes through the proxy.
    return AsyncS3Sink(bucket, prefix, ROLE, sts_endpoint_url=proxy.url, **options)


async def test_55_writes_over_4_sinks_make_one_assume_role_call(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    sinks = [role_sink(proxy, bucket, f"sink-{i}") for i in range(4)]
    async with anyio.create_task_group() as group:
        for i in range(55):
            group.start_soon(sinks[i % 4].write, f"image-{i}", FEATURES)
    assert proxy.count("AssumeRole") == 1
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 55


async def test_100_concurrent_writes_on_fresh_sinks_make_one_assume_role_call(proxy: FaultProxy, bucket: str) -> None:
    async with anyio.create_task_group() as group:
        for i in range(100):
            group.start_soon(role_sink(proxy, bucket).write, f"image-{i}", FEATURES)
    assert proxy.count("AssumeRole") == 1


def test_sync_and_async_sinks_share_credentials_one_fetch_per_event_loop(proxy: FaultProxy, bucket: str) -> None:
    sync_sinks = [S3Sink(bucket, f"sync-{i}", ROLE, sts_endpoint_url=proxy.url) for i in range(3)]
    for i, sink in enumerate(sync_sinks * 3):
        assert sink.write(f"image-{i}", FEATURES)
    # Every S3Sink runs on the one private loop: one fetch for all of them, whatever thread calls.
    assert proxy.count("AssumeRole") == 1

    async def write_async() -> None:
        assert await role_sink(proxy, bucket).write("async", FEATURES)
        assert await role_sink(proxy, bucket).write("async-2", FEATURES)

    anyio.run(write_async)
    assert proxy.count("AssumeRole") == 2


@pytest.mark.parametrize(
    ("minutes_left", "refreshed"),
    [(5, True), (9, True), (12, True), (20, False), (50, False)],
)
async def test_credentials_near_expiry_are_refreshed_on_the_next_write(
    proxy: FaultProxy, bucket: str, minutes_left: int, refreshed: bool
) -> None:
    clock = proxy.sts_clock = Clock()
    sink = role_sink(proxy, bucket, clock=clock)
    assert await sink.write("first", FEATURES)
    # Credentials last the default 3,600 s: move the clock so that only minutes_left remain.
    clock.offset = timedelta(minutes=60 - minutes_left)
    assert await sink.write("second", FEATURES)
    assert proxy.count("AssumeRole") == (2 if refreshed else 1)


async def test_refresh_window_is_configurable(proxy: FaultProxy, bucket: str) -> None:
    from model_runner.sink import SinkSettings

    clock = proxy.sts_clock = Clock()
    sink = role_sink(proxy, bucket, clock=clock, settings=SinkSettings(credential_refresh_seconds=1800))
    assert await sink.write("first", FEATURES)
    clock.offset = timedelta(minutes=35)
    assert await sink.write("second", FEATURES)
    assert proxy.count("AssumeRole") == 2


async def test_a_denied_role_raises_naming_the_arn_without_retrying(proxy: FaultProxy, bucket: str, s3: Any) -> None:
    proxy.add_rule(Rule({"AssumeRole"}, "refuse", status=403, code="AccessDenied"))
    with anyio.fail_after(10), pytest.raises(InvalidAssumedRoleException) as raised:
        await role_sink(proxy, bucket).write("denied", FEATURES)
    assert raised.value.role_arn == ROLE
    assert ROLE in str(raised.value) and "AccessDenied" in str(raised.value)
    assert proxy.count("AssumeRole") == 1
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


async def test_validate_s3_bucket_raises_for_a_denied_role(proxy: FaultProxy, bucket: str) -> None:
    proxy.add_rule(Rule({"AssumeRole"}, "refuse", status=403, code="AccessDenied"))
    with pytest.raises(InvalidAssumedRoleException, match=re.escape(ROLE)):
        await role_sink(proxy, bucket).validate_s3_bucket()


@pytest.mark.parametrize("arn", ["not-an-arn", "arn:aws:iam::12:role/x", "arn:aws:s3:::bucket", ""])
async def test_a_malformed_role_arn_raises_before_any_request(proxy: FaultProxy, bucket: str, arn: str) -> None:
    with pytest.raises(InvalidAssumedRoleException) as raised:
        await AsyncS3Sink(bucket, "p", arn, sts_endpoint_url=proxy.url).write("x", FEATURES)
    assert raised.value.role_arn == arn
    assert proxy.log == []


async def test_the_sts_endpoint_comes_from_the_standard_variable(
    proxy: FaultProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", proxy.url)
    assert await AsyncS3Sink(bucket, "env", ROLE).write("image", FEATURES)
    assert proxy.count("AssumeRole") == 1


async def test_the_role_session_name_and_duration_are_sent(proxy: FaultProxy, bucket: str) -> None:
    from model_runner.sink import SinkSettings

    settings = SinkSettings(role_session_name="inference-7", role_duration_seconds=1800)
    assert await role_sink(proxy, bucket, settings=settings).write("image", FEATURES)
    body = proxy.query_bodies("AssumeRole")[0].decode()
    assert "inference-7" in body
    expiration = re.search(r"<Expiration>([^<]+)</Expiration>", body)
    assert expiration is not None
    lifetime = datetime.fromisoformat(expiration.group(1).replace("Z", "+00:00")) - datetime.now(timezone.utc)
    assert timedelta(minutes=25) < lifetime <= timedelta(minutes=30)


async def test_no_credential_appears_in_logs_reprs_or_errors(
    proxy: FaultProxy, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="model_runner")
    sink = role_sink(proxy, bucket)
    assert await sink.write("image", FEATURES)
    assert await AsyncS3Sink("missing-bucket-for-role", "p", ROLE, sts_endpoint_url=proxy.url).write("x", []) is False
    body = proxy.query_bodies("AssumeRole")[0].decode()
    secrets = [
        re.search(rf"<{name}>([^<]+)</{name}>", body).group(1)  # type: ignore[union-attr]
        for name in ("AccessKeyId", "SecretAccessKey", "SessionToken")
    ]
    proxy.add_rule(Rule({"AssumeRole"}, "refuse", status=403, code="AccessDenied"))
    with pytest.raises(InvalidAssumedRoleException) as raised:
        await AsyncS3Sink(bucket, "p", "arn:aws:iam::123456789012:role/other", sts_endpoint_url=proxy.url).write(
            "x", []
        )
    seen = "\n".join([caplog.text, repr(sink), str(sink), str(raised.value), repr(raised.value)])
    assert caplog.records
    for secret in [*secrets, "testing"]:
        assert secret not in seen


def access_key_ids(proxy: FaultProxy, operation: str) -> list[str]:
    keys = []
    for name, authorization in proxy.header_values("Authorization"):
        if name == operation and authorization:
            keys.append(re.search(r"Credential=([^/]+)/", authorization).group(1))  # type: ignore[union-attr]
    return keys


async def test_credentials_expiring_mid_upload_are_refreshed_and_the_upload_completes(
    proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    from model_runner.sink import SinkSettings
    from model_runner.sink.settings import MiB

    clock = proxy.sts_clock = Clock()
    # One slow part at a time, so the clock moves while the upload is under way.
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=0.3))
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=1)
    features = list(synthetic_detections(30_000, seed=8))
    sink = AsyncS3Sink(
        bucket, "mid", ROLE, endpoint_url=proxy.url, sts_endpoint_url=proxy.url, settings=settings, clock=clock
    )
    async with anyio.create_task_group() as group:
        group.start_soon(sink.write_with_result, "image", features)
        while proxy.count("UploadPart") < 1:  # noqa: ASYNC110 - the proxy counts in its own thread
            await anyio.sleep(0.01)
        clock.offset = timedelta(minutes=58)
    assert proxy.count("AssumeRole") == 2
    first, second = (
        re.search(r"<AccessKeyId>([^<]+)</AccessKeyId>", body.decode()).group(1)  # type: ignore[union-attr]
        for body in proxy.query_bodies("AssumeRole")
    )
    parts = access_key_ids(proxy, "UploadPart")
    assert parts[0] == first and parts[-1] == second
    assert access_key_ids(proxy, "CompleteMultipartUpload") == [second]
    stored = s3.get_object(Bucket=bucket, Key="mid/image.geojson")["Body"].read()
    assert orjson.loads(stored)["features"] == features
