"""S3Sink mirrors every public operation of AsyncS3Sink, and takes at least the same arguments."""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any

import pytest
from support.proxy import FaultProxy, Rule

from model_runner.cli.moto_server import MotoServer
from model_runner.sink import AsyncS3Sink, ClientSettings, S3Sink

FEATURES = [{"type": "Feature", "geometry": None, "properties": {"n": n}} for n in range(3)]

# The synchronous twin of an asynchronous name.
TWINS = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}

# Public names of AsyncS3Sink that S3Sink deliberately lacks, and why. None today: add one only with a reason.
EXEMPT: dict[str, str] = {}

# What S3Sink adds to an operation: its caller's thread waits, so it may give up (and cancel) after a while.
SYNC_ONLY_PARAMETERS = {"timeout"}


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")} | {
        name for name in ("__aenter__", "__aexit__", "__enter__", "__exit__") if hasattr(cls, name)
    }


def _instance_attributes() -> set[str]:
    return {name for name in vars(AsyncS3Sink("bucket", "prefix")) if not name.startswith("_")}


def _mirrored() -> list[str]:
    return sorted((_public(AsyncS3Sink) | _instance_attributes()) - set(EXEMPT))


@pytest.mark.parametrize("name", _mirrored())
def test_s3_sink_has_the_twin_of_every_public_operation(name: str) -> None:
    assert hasattr(S3Sink, TWINS.get(name, name)), f"S3Sink lacks {TWINS.get(name, name)}, the twin of {name}"


@pytest.mark.parametrize("name", sorted(name for name in _public(AsyncS3Sink) if callable(getattr(AsyncS3Sink, name))))
def test_each_twin_takes_the_same_arguments(name: str) -> None:
    if name in EXEMPT:
        return
    asynchronous = inspect.signature(getattr(AsyncS3Sink, name)).parameters
    synchronous = inspect.signature(getattr(S3Sink, TWINS.get(name, name))).parameters
    assert list(asynchronous) == [parameter for parameter in synchronous if parameter not in SYNC_ONLY_PARAMETERS]
    for parameter, expected in asynchronous.items():
        assert synchronous[parameter].kind == expected.kind, parameter
        assert synchronous[parameter].default == expected.default, parameter


def test_the_constructors_take_the_same_arguments() -> None:
    assert inspect.signature(S3Sink.__init__) == inspect.signature(AsyncS3Sink.__init__)


def test_every_exemption_names_an_operation_of_the_async_sink() -> None:
    assert set(EXEMPT) <= _public(AsyncS3Sink)


def test_the_sync_twins_answer_as_the_async_ones(bucket: str) -> None:
    with S3Sink(bucket, "twins") as sink:
        assert sink.object_key("s3://imagery/a/scene.tif") == "twins/scene.tif.geojson"
        assert sink.object_metadata("scene") is None
        assert sink.write("scene", [], metadata={"source": "tile-7"})
        assert sink.object_metadata("scene") == {"source": "tile-7"}


def test_close_waits_for_the_writes_started_from_other_threads(moto_server: MotoServer, bucket: str, s3: Any) -> None:
    with FaultProxy(moto_server.endpoint_url, seed=0) as proxy:
        proxy.add_rule(Rule({"PutObject"}, "delay", delay=1.0))
        sink = S3Sink(bucket, "closing", client=ClientSettings(endpoint_url=proxy.url))
        writer = threading.Thread(target=sink.write, args=("scene", FEATURES))
        writer.start()
        deadline = time.monotonic() + 30
        # The proxy counts a request as it arrives, before the delay.
        while proxy.peak_in_flight.get("PutObject", 0) == 0:
            assert time.monotonic() < deadline, "the write never reached S3"
            time.sleep(0.01)
        sink.close()
        # Stored by the time close returned, not after.
        assert s3.head_object(Bucket=bucket, Key="closing/scene.geojson")["ContentLength"] > 0
        writer.join()
