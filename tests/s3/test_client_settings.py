"""ClientSettings decide the S3 client; SinkSettings only shape objects; the moved keywords still work, deprecated."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest

from model_runner.sink import AsyncS3Sink, ClientSettings, S3Sink, SinkSettings, clients
from model_runner.sink.settings import MiB

FEATURES = [{"type": "Feature", "geometry": None, "properties": {"n": n}} for n in range(3)]


def _clients_after_writes(sinks: list[AsyncS3Sink]) -> list[clients.SharedClient]:
    # A loop of its own: its registry holds exactly the clients these writes made.
    async def main() -> list[clients.SharedClient]:
        for sink in sinks:
            assert await sink.write("image", FEATURES)
        return list(clients.SharedClients.of_running_loop()._entries.values())

    return asyncio.run(main())


def test_sinks_differing_only_in_object_options_share_one_client(bucket: str, s3: Any) -> None:
    variants = [
        SinkSettings(),
        SinkSettings(acl=None),
        SinkSettings(storage_class="STANDARD_IA"),
        SinkSettings(server_side_encryption="AES256"),
        SinkSettings(content_type="application/json"),
        SinkSettings(part_size=16 * MiB, multipart_threshold=16 * MiB, max_parts_in_flight=2),
    ]
    sinks = [AsyncS3Sink(bucket, f"variant-{i}", settings=settings) for i, settings in enumerate(variants)]
    # One client, so one connection pool, one byte budget and one thread limiter for all of them.
    assert len(_clients_after_writes(sinks)) == 1
    # Each object still got its own options.
    assert s3.head_object(Bucket=bucket, Key="variant-2/image.geojson")["StorageClass"] == "STANDARD_IA"
    assert s3.head_object(Bucket=bucket, Key="variant-3/image.geojson")["ServerSideEncryption"] == "AES256"
    assert s3.head_object(Bucket=bucket, Key="variant-4/image.geojson")["ContentType"] == "application/json"


def test_sinks_with_other_client_settings_get_their_own_client(bucket: str) -> None:
    sinks = [
        AsyncS3Sink(bucket, "a", client=ClientSettings(max_pool_connections=8)),
        AsyncS3Sink(bucket, "b", client=ClientSettings(max_bytes_in_flight=64 * MiB)),
        AsyncS3Sink(bucket, "c", client=ClientSettings(max_bytes_in_flight=64 * MiB), settings=SinkSettings(acl=None)),
    ]
    made = _clients_after_writes(sinks)
    assert len(made) == 2
    assert sorted(entry.budget.limit for entry in made) == [64 * MiB, 256 * MiB]


def test_a_moved_setting_given_to_sink_settings_is_folded_into_the_client(bucket: str) -> None:
    with pytest.warns(DeprecationWarning, match=r"client=ClientSettings\(max_pool_connections=\.\.\.\)") as caught:
        old = SinkSettings(max_pool_connections=8, acl=None)
    assert caught[0].filename == __file__
    sinks = [
        AsyncS3Sink(bucket, "old", settings=old),
        AsyncS3Sink(bucket, "new", client=ClientSettings(max_pool_connections=8)),
    ]
    assert sinks[0].client == sinks[1].client == ClientSettings(max_pool_connections=8)
    assert len(_clients_after_writes(sinks)) == 1


@pytest.mark.parametrize("sink_class", [AsyncS3Sink, S3Sink])
def test_the_documented_keywords_still_work_with_a_warning_naming_client_settings(sink_class: Any) -> None:
    with pytest.warns(DeprecationWarning, match=r"client=ClientSettings\(endpoint_url, region_name=\.\.\.\)") as caught:
        sink = sink_class("bucket", "p", endpoint_url="http://127.0.0.1:9", region_name="eu-west-2")
    assert caught[0].filename == __file__
    # S3Sink's own default: one worker thread beside its private loop thread.
    threads = 1 if sink_class is S3Sink else 2
    assert sink.client == ClientSettings(
        endpoint_url="http://127.0.0.1:9", region_name="eu-west-2", max_worker_threads=threads
    )
    with pytest.warns(DeprecationWarning):
        sink = sink_class("bucket", "p", sts_endpoint_url="http://127.0.0.1:9", client_config=None)
    assert sink.client == ClientSettings(sts_endpoint_url="http://127.0.0.1:9", max_worker_threads=threads)


@pytest.mark.parametrize("sink_class", [AsyncS3Sink, S3Sink])
def test_a_value_given_both_ways_is_refused(sink_class: Any) -> None:
    with pytest.raises(TypeError, match="endpoint_url given both"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        sink_class("bucket", "p", endpoint_url="http://a", client=ClientSettings(endpoint_url="http://a"))
    with pytest.raises(TypeError, match=r"max_attempts given both in SinkSettings \(3\) and in ClientSettings \(5\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            settings = SinkSettings(max_attempts=3)
        sink_class("bucket", "p", settings=settings, client=ClientSettings(max_attempts=5))
    with pytest.raises(TypeError, match="unexpected keyword argument 'endpoint'"):
        sink_class("bucket", "p", endpoint="http://a")
    with pytest.raises(TypeError, match="client must be a ClientSettings"):
        sink_class("bucket", "p", client=SinkSettings())


def test_the_same_value_given_both_ways_is_accepted() -> None:
    with pytest.warns(DeprecationWarning):
        settings = SinkSettings(max_attempts=3, role_duration_seconds=1800)
    sink = AsyncS3Sink("bucket", "p", settings=settings, client=ClientSettings(max_attempts=3))
    assert sink.client == ClientSettings(max_attempts=3, role_duration_seconds=1800)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_pool_connections": 0}, "max_pool_connections must be at least 1"),
        ({"max_bytes_in_flight": 0}, "max_bytes_in_flight must be at least 1"),
        ({"max_worker_threads": 0}, "max_worker_threads must be at least 1"),
        ({"max_attempts": 0}, "max_attempts must be at least 1"),
        ({"role_duration_seconds": 899}, "role_duration_seconds must be between 900 and 43200"),
        ({"role_duration_seconds": 900, "credential_refresh_seconds": 451}, "half of role_duration_seconds"),
    ],
)
def test_bad_client_settings_are_refused_both_ways(fields: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientSettings(**fields)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        SinkSettings(**fields)  # type: ignore[arg-type]


def test_client_settings_with_equal_configs_are_equal_and_hashable() -> None:
    from botocore.config import Config

    first = ClientSettings(client_config=Config(connect_timeout=7))
    second = ClientSettings(client_config=Config(connect_timeout=7))
    assert first == second and hash(first) == hash(second)
    assert first != ClientSettings(client_config=Config(connect_timeout=8))
