"""Assumed-role credentials: one AssumeRole per role and event loop, refreshed before expiry, failures named.

STS is reached through the fault proxy, which counts the AssumeRole calls and can refuse them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import orjson
import pytest
from botocore.exceptions import ClientError
from support.proxy import FaultProxy, Rule

from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, InvalidAssumedRoleException, S3Sink

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

ROLE = "arn:aws:iam::123456789012:role/detections-writer"
FEATURES = list(synthetic_detections(20, seed=4))


class Clock:
    """A clock the test moves forward; sinks given it judge expiry by it, and the proxy's STS issues by it."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


def role_sink(
    proxy: FaultProxy,
    bucket: str,
    prefix: str = "role",
    client: ClientSettings | None = None,
    clock: Clock | None = None,
    **options: Any,
) -> AsyncS3Sink:
    # S3 goes straight to moto through the standard variables; only STS goes through the proxy.
    client = dataclasses.replace(client or ClientSettings(), sts_endpoint_url=proxy.url)
    if clock is not None:
        client = dataclasses.replace(client, clock=clock)
    return AsyncS3Sink(bucket, prefix, ROLE, client=client, **options)


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
    sync_sinks = [
        S3Sink(bucket, f"sync-{i}", ROLE, client=ClientSettings(sts_endpoint_url=proxy.url)) for i in range(3)
    ]
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
    clock = proxy.sts_clock = Clock()
    sink = role_sink(proxy, bucket, client=ClientSettings(credential_refresh_seconds=1800), clock=clock)
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
        await AsyncS3Sink(bucket, "p", arn, client=ClientSettings(sts_endpoint_url=proxy.url)).write("x", FEATURES)
    assert raised.value.role_arn == arn
    assert proxy.log == []


async def test_the_sts_endpoint_comes_from_the_standard_variable(
    proxy: FaultProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", proxy.url)
    assert await AsyncS3Sink(bucket, "env", ROLE).write("image", FEATURES)
    assert proxy.count("AssumeRole") == 1


async def test_the_role_session_name_and_duration_are_sent(proxy: FaultProxy, bucket: str) -> None:
    client = ClientSettings(role_session_name="inference-7", role_duration_seconds=1800)
    assert await role_sink(proxy, bucket, client=client).write("image", FEATURES)
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
    assert (
        await AsyncS3Sink(
            "missing-bucket-for-role", "p", ROLE, client=ClientSettings(sts_endpoint_url=proxy.url)
        ).write("x", [])
        is False
    )
    body = proxy.query_bodies("AssumeRole")[0].decode()
    secrets = [
        re.search(rf"<{name}>([^<]+)</{name}>", body).group(1)  # type: ignore[union-attr]
        for name in ("AccessKeyId", "SecretAccessKey", "SessionToken")
    ]
    proxy.add_rule(Rule({"AssumeRole"}, "refuse", status=403, code="AccessDenied"))
    with pytest.raises(InvalidAssumedRoleException) as raised:
        await AsyncS3Sink(
            bucket, "p", "arn:aws:iam::123456789012:role/other", client=ClientSettings(sts_endpoint_url=proxy.url)
        ).write("x", [])
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
    client = ClientSettings(endpoint_url=proxy.url, sts_endpoint_url=proxy.url, clock=clock)
    sink = AsyncS3Sink(bucket, "mid", ROLE, client=client, settings=settings)
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


# -- STS outages, denials, short lifetimes and clock skew --------------------------------------------------------

STS_FAULTS = {
    "unavailable": Rule({"AssumeRole"}, "refuse", status=503, code="ServiceUnavailable", message="busy"),
    "throttled": Rule({"AssumeRole"}, "refuse", status=400, code="Throttling", message="Rate exceeded"),
    "reset": Rule({"AssumeRole"}, "reset"),
}


def issued_key_ids(proxy: FaultProxy) -> list[str]:
    return [
        re.search(r"<AccessKeyId>([^<]+)</AccessKeyId>", body.decode()).group(1)  # type: ignore[union-attr]
        for body in proxy.query_bodies("AssumeRole")
    ]


def warnings_about_refresh(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "model_runner.sink.credentials" and record.levelno == logging.WARNING
    ]


def uploads_left(s3: Any, bucket: str) -> list[str]:
    return [upload["Key"] for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


@pytest.mark.parametrize("fault", sorted(STS_FAULTS))
async def test_sts_failing_near_expiry_keeps_the_current_credentials_until_they_expire(
    proxy: FaultProxy, bucket: str, s3: Any, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="model_runner")
    clock = proxy.sts_clock = Clock()
    sink = AsyncS3Sink(
        bucket, "outage", ROLE, client=ClientSettings(endpoint_url=proxy.url, sts_endpoint_url=proxy.url, clock=clock)
    )
    assert await sink.write("before", FEATURES)
    rule = proxy.add_rule(STS_FAULTS[fault])
    # Inside the 10-minute window where botocore raises every refresh failure, then a minute before expiry.
    for minutes_left in (8, 1):
        clock.offset = timedelta(minutes=60 - minutes_left)
        assert await sink.write(f"left-{minutes_left}", FEATURES)
    assert rule.applied >= 2, "each write past the pause tries STS again"
    [first] = issued_key_ids(proxy)
    assert set(access_key_ids(proxy, "PutObject")) == {first}
    assert len(warnings_about_refresh(caplog)) == 1, "one warning per run of failures"
    # STS back: the next write past the pause gets new credentials.
    proxy.clear_rules()
    clock.offset = timedelta(minutes=60, seconds=-20)
    assert await sink.write("after", FEATURES)
    assert access_key_ids(proxy, "PutObject")[-1] == issued_key_ids(proxy)[-1] != first
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 4


async def test_concurrent_writes_during_an_sts_outage_share_one_refresh_attempt(proxy: FaultProxy, bucket: str) -> None:
    clock = proxy.sts_clock = Clock()
    sink = role_sink(proxy, bucket, clock=clock)
    assert await sink.write("before", FEATURES)
    proxy.add_rule(STS_FAULTS["unavailable"])
    clock.offset = timedelta(minutes=55)
    stored: list[bool] = []

    async def write(i: int) -> None:
        stored.append(await sink.write(f"image-{i}", FEATURES))

    async with anyio.create_task_group() as group:
        for i in range(20):
            group.start_soon(write, i)
    assert stored == [True] * 20
    # The writes waiting for the refresh carry on when it fails, rather than each asking STS again in turn.
    attempts_of_one_refresh = 3  # botocore's standard mode
    assert proxy.count("AssumeRole") == 1 + attempts_of_one_refresh


async def test_credentials_expired_while_sts_is_down_fail_the_write_naming_the_cause(
    proxy: FaultProxy, bucket: str
) -> None:
    clock = proxy.sts_clock = Clock()
    sink = role_sink(proxy, bucket, clock=clock)
    assert await sink.write("before", FEATURES)
    proxy.add_rule(STS_FAULTS["unavailable"])
    clock.offset = timedelta(minutes=61)
    with pytest.raises(InvalidAssumedRoleException, match="ServiceUnavailable") as raised:
        await sink.write("after", FEATURES)
    assert "expired" in str(raised.value) and raised.value.role_arn == ROLE


@pytest.mark.parametrize("minutes_left", [12, 5])
async def test_a_denial_near_expiry_fails_new_writes_at_once(
    proxy: FaultProxy, bucket: str, s3: Any, minutes_left: int
) -> None:
    clock = proxy.sts_clock = Clock()
    sink = role_sink(proxy, bucket, clock=clock)
    assert await sink.write("before", FEATURES)
    proxy.add_rule(Rule({"AssumeRole"}, "refuse", status=403, code="AccessDenied"))
    # 12 minutes left is botocore's advisory window, where it ignores any failure, a denial too.
    clock.offset = timedelta(minutes=60 - minutes_left)
    for attempt in range(2):
        with anyio.fail_after(10), pytest.raises(InvalidAssumedRoleException, match="AccessDenied"):
            await sink.write(f"denied-{attempt}", FEATURES)
    # Not retried, and the second write learns of the denial without asking STS again.
    assert proxy.count("AssumeRole") == 2
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 1


def multipart_role_sink(proxy: FaultProxy, bucket: str, clock: Clock) -> AsyncS3Sink:
    from model_runner.sink import SinkSettings
    from model_runner.sink.settings import MiB

    # One slow part at a time, so that STS can fail and the clock move while the upload is under way.
    proxy.add_rule(Rule({"UploadPart"}, "delay", delay=0.3))
    settings = SinkSettings(part_size=5 * MiB, multipart_threshold=5 * MiB, max_parts_in_flight=1)
    client = ClientSettings(endpoint_url=proxy.url, sts_endpoint_url=proxy.url, clock=clock)
    return AsyncS3Sink(bucket, "mid", ROLE, client=client, settings=settings)


async def wait_for(proxy: FaultProxy, operation: str, count: int) -> None:
    with anyio.fail_after(60):
        while proxy.count(operation) < count:  # noqa: ASYNC110 - the proxy counts in its own thread
            await anyio.sleep(0.01)


LARGE = list(synthetic_detections(30_000, seed=8))


@pytest.mark.parametrize("sts_answer", ["ServiceUnavailable", "AccessDenied"])
async def test_sts_failing_mid_upload_lets_the_upload_complete_with_the_current_credentials(
    proxy: FaultProxy, bucket: str, s3: Any, sts_answer: str
) -> None:
    clock = proxy.sts_clock = Clock()
    sink = multipart_role_sink(proxy, bucket, clock)
    async with anyio.create_task_group() as group:
        group.start_soon(sink.write_with_result, "image", LARGE)
        await wait_for(proxy, "UploadPart", 1)
        status = 503 if sts_answer == "ServiceUnavailable" else 403
        proxy.add_rule(Rule({"AssumeRole"}, "refuse", status=status, code=sts_answer))
        clock.offset = timedelta(minutes=52)  # 8 minutes left: every request now asks STS first
    assert proxy.count("AssumeRole") > 1
    [first] = issued_key_ids(proxy)
    assert set(access_key_ids(proxy, "UploadPart")) == {first}
    assert access_key_ids(proxy, "CompleteMultipartUpload") == [first]
    assert orjson.loads(s3.get_object(Bucket=bucket, Key="mid/image.geojson")["Body"].read())["features"] == LARGE
    assert uploads_left(s3, bucket) == []


@pytest.mark.parametrize("ending", ["failed", "cancelled"])
async def test_an_upload_ending_during_an_sts_outage_is_aborted_with_the_current_credentials(
    proxy: FaultProxy, bucket: str, s3: Any, ending: str
) -> None:
    clock = proxy.sts_clock = Clock()
    sink = multipart_role_sink(proxy, bucket, clock)

    async def write() -> None:
        with pytest.raises(ClientError, match="InvalidRequest") if ending == "failed" else contextlib.nullcontext():
            await sink.write_with_result("image", LARGE)

    async with anyio.create_task_group() as group:
        group.start_soon(write)
        await wait_for(proxy, "UploadPart", 1)
        proxy.clear_rules()
        if ending == "failed":
            proxy.add_rule(Rule({"UploadPart"}, "refuse", status=400, code="InvalidRequest"))
        else:
            # The next parts are held: the cancellation lands while one signed through the failing refresh is in
            # flight, never after the upload completed.
            proxy.add_rule(Rule({"UploadPart"}, "delay", delay=10))
            proxy.peak_in_flight.pop("UploadPart", None)
        proxy.add_rule(STS_FAULTS["unavailable"])
        clock.offset = timedelta(minutes=52)
        if ending == "cancelled":
            await wait_for(proxy, "AssumeRole", 4)
            with anyio.fail_after(60):
                while not proxy.peak_in_flight.get("UploadPart"):  # noqa: ASYNC110 - the proxy counts in its own thread
                    await anyio.sleep(0.01)
            group.cancel_scope.cancel()
    [first] = issued_key_ids(proxy)
    assert access_key_ids(proxy, "AbortMultipartUpload") == [first]
    assert uploads_left(s3, bucket) == []
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


async def test_credentials_expiring_mid_upload_while_sts_is_down_fail_the_write_naming_the_cause(
    proxy: FaultProxy, bucket: str, s3: Any
) -> None:
    clock = proxy.sts_clock = Clock()
    sink = multipart_role_sink(proxy, bucket, clock)

    async def write() -> None:
        with pytest.raises(InvalidAssumedRoleException, match=r"ServiceUnavailable.*expired"):
            await sink.write_with_result("image", LARGE)

    async with anyio.create_task_group() as group:
        group.start_soon(write)
        await wait_for(proxy, "UploadPart", 1)
        proxy.add_rule(STS_FAULTS["unavailable"])
        clock.offset = timedelta(minutes=61)
    # Nothing can sign the abort: the upload stays until a lifecycle rule (AbortIncompleteMultipartUpload) ends it.
    assert uploads_left(s3, bucket) == ["mid/image.geojson"]
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket)


async def test_short_lived_credentials_are_refreshed_only_near_expiry(proxy: FaultProxy, bucket: str) -> None:
    clock = proxy.sts_clock = Clock()
    sink = role_sink(proxy, bucket, client=ClientSettings(role_duration_seconds=900), clock=clock)
    for i in range(5):
        assert await sink.write(f"image-{i}", FEATURES)
    assert proxy.count("AssumeRole") == 1
    # Derived windows for 900 s: every write refreshes past 225 s left, the first to come past 450 s left.
    clock.offset = timedelta(seconds=420)
    assert await sink.write("still-fresh", FEATURES)
    assert proxy.count("AssumeRole") == 1
    clock.offset = timedelta(seconds=480)
    assert await sink.write("refreshed", FEATURES)
    assert await sink.write("refreshed-once", FEATURES)
    assert proxy.count("AssumeRole") == 2


@pytest.mark.parametrize(("duration", "refresh_seconds"), [(900, 451), (3600, 1801), (3600, -1)])
def test_an_explicit_refresh_window_over_half_the_credentials_life_is_refused(
    duration: int, refresh_seconds: int
) -> None:
    with pytest.raises(ValueError, match="half of role_duration_seconds"):
        ClientSettings(role_duration_seconds=duration, credential_refresh_seconds=refresh_seconds)


def test_the_refresh_window_is_derived_from_the_duration_unless_given() -> None:
    from model_runner.sink.credentials import refresh_windows

    assert ClientSettings().credential_refresh_seconds is None
    assert ClientSettings(role_duration_seconds=900, credential_refresh_seconds=450).credential_refresh_seconds == 450
    assert refresh_windows(3600) == (600, 900)
    assert refresh_windows(900) == (225, 450)
    assert refresh_windows(43200) == (600, 900)
    assert refresh_windows(3600, 1800) == (1800, 2100)
    assert refresh_windows(900, 0) == (0, 225)


@pytest.mark.parametrize("minutes_ahead", [61, 50])
async def test_a_local_clock_far_ahead_of_sts_raises_naming_the_clock_skew(
    proxy: FaultProxy, bucket: str, minutes_ahead: int
) -> None:
    # STS answers by the real time; the sink's clock is ahead of it.
    clock = Clock()
    clock.offset = timedelta(minutes=minutes_ahead)
    sink = role_sink(proxy, bucket, clock=clock)
    with pytest.raises(InvalidAssumedRoleException, match="clock skew") as raised:
        await sink.write("skewed", FEATURES)
    assert raised.value.role_arn == ROLE
    assert proxy.count("AssumeRole") == 1
