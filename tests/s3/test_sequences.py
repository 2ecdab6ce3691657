"""GeoJSON text sequences: output_format="geojsonseq" writes one feature a line to <prefix>/<name>.geojsonl."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import geojson
import orjson
import pytest

from model_runner.cli import build_parser, main
from model_runner.cli.backfill.job import backfill
from model_runner.cli.backfill.writes import Target
from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, FeatureEncodingError, S3Sink, SinkSettings
from model_runner.sink.async_s3_sink import object_key
from model_runner.sink.encoding import OUTPUT_FORMATS, EncodingStats, encode_collection

pytestmark = pytest.mark.timeout(120)

SEQ = SinkSettings(output_format="geojsonseq")
MULTIPART_SEQ = SinkSettings(output_format="geojsonseq", part_size=5 * 1024 * 1024, multipart_threshold=1024)
FEATURES = list(synthetic_detections(300, seed=4))


def lines_of(features: Iterable[Any]) -> bytes:
    return b"".join(orjson.dumps(feature) + b"\n" for feature in features)


def assert_one_feature_a_line(body: bytes, features: list[Any]) -> None:
    assert body.endswith(b"\n")
    lines = body.split(b"\n")[:-1]
    assert len(lines) == len(features)
    assert [orjson.loads(line) for line in lines] == features
    assert body == lines_of(features)


async def agen(features: Iterable[Any]) -> AsyncIterator[Any]:
    for feature in features:
        await anyio.lowlevel.checkpoint()
        yield feature


async def encode(features: Any, **options: Any) -> tuple[bytes, EncodingStats]:
    stats = EncodingStats()
    pieces = [bytes(chunk) async for chunk in encode_collection(features, stats=stats, **options)]
    return b"".join(pieces), stats


# The encoder


@pytest.mark.anyio
@pytest.mark.parametrize("batch", [1, 2, 7, 256, 5000])
@pytest.mark.parametrize("kind", ["list", "generator", "async"])
async def test_any_batching_of_any_source_gives_one_feature_a_line(batch: int, kind: str) -> None:
    source = {"list": FEATURES, "generator": iter(FEATURES), "async": agen(FEATURES)}[kind]
    body, stats = await encode(source, batch_features=batch, output_format="geojsonseq")
    assert_one_feature_a_line(body, FEATURES)
    assert (stats.features, stats.bytes) == (300, len(body))


@pytest.mark.anyio
async def test_no_feature_is_no_byte() -> None:
    assert await encode([], output_format="geojsonseq") == (b"", EncodingStats())


@pytest.mark.anyio
async def test_features_with_non_string_keys_among_others_give_one_feature_a_line() -> None:
    odd = [
        {"type": "Feature", "geometry": None, "properties": {1: "one", "two": 2}},
        {"type": "Feature", "geometry": None, "properties": {"text": "a\x1eb\nc"}},
    ]
    features = [*FEATURES[:20], *odd, *FEATURES[20:40]]
    body, _ = await encode(features, batch_features=64, output_format="geojsonseq")
    lines = body.split(b"\n")[:-1]
    assert len(lines) == len(features)
    assert orjson.loads(lines[20])["properties"] == {"1": "one", "two": 2}
    assert orjson.loads(lines[21])["properties"] == {"text": "a\x1eb\nc"}
    assert lines[:20] + lines[22:] == lines_of(FEATURES[:40]).split(b"\n")[:-1]


@pytest.mark.anyio
async def test_a_fragment_holding_the_marker_byte_does_not_cut_lines_wrong() -> None:
    # A raw 0x1E is not valid JSON, but orjson writes a Fragment as it is: the lines must still be the features.
    odd = {"type": "Feature", "geometry": None, "properties": {"raw": orjson.Fragment(b'"a\x1eb"')}}
    features = [*FEATURES[:20], odd, *FEATURES[20:40]]
    body, _ = await encode(features, batch_features=64, output_format="geojsonseq")
    lines = body.split(b"\n")[:-1]
    assert len(lines) == len(features)
    assert lines[20] == b'{"type":"Feature","geometry":null,"properties":{"raw":"a\x1eb"}}'
    assert lines[:20] + lines[21:] == lines_of(FEATURES[:40]).split(b"\n")[:-1]


@pytest.mark.anyio
async def test_a_bad_feature_names_its_index_within_the_sequence() -> None:
    features = [*FEATURES, {"type": "Feature", "geometry": {"type": "Point", "coordinates": [float("nan"), 1]}}]
    with pytest.raises(FeatureEncodingError, match="feature 300"):
        await encode(features, batch_features=7, output_format="geojsonseq")


@pytest.mark.anyio
async def test_the_encoder_refuses_members_and_unknown_formats_before_any_chunk() -> None:
    with pytest.raises(ValueError, match="not the collection's 'bbox'"):
        await encode(FEATURES, members={"bbox": [0, 0, 1, 1]}, output_format="geojsonseq")
    with pytest.raises(ValueError, match="must be one of 'geojson', 'geojsonseq', not 'csv'"):
        await encode(FEATURES, output_format="csv")


# Settings and keys


def test_an_unknown_output_format_is_refused_at_construction_naming_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="output_format must be one of 'geojson', 'geojsonseq', not 'ndjson'"):
        SinkSettings(output_format="ndjson")  # type: ignore[arg-type]


def test_the_content_type_follows_the_format_unless_set() -> None:
    assert SinkSettings().effective_content_type == "application/geo+json"
    assert SEQ.effective_content_type == "application/geo+json-seq"
    assert SinkSettings(output_format="geojsonseq", content_type="text/plain").effective_content_type == "text/plain"


@pytest.mark.parametrize("sink_class", [S3Sink, AsyncS3Sink])
def test_a_sequence_is_keyed_geojsonl(sink_class: type[S3Sink] | type[AsyncS3Sink]) -> None:
    assert object_key("out", "s3://imagery/scene-1.tif", "geojsonseq") == "out/scene-1.tif.geojsonl"
    assert sink_class("results-bucket", "out", settings=SEQ).object_key("a/b") == "out/b.geojsonl"
    assert sink_class("results-bucket", "out").object_key("a/b") == "out/b.geojson"


# Writes on the server


@pytest.mark.anyio
async def test_async_sink_writes_a_sequence(bucket: str, s3: Any, read_object: Callable[[str], bytes]) -> None:
    async with AsyncS3Sink(bucket, "out", settings=SEQ) as sink:
        assert await sink.write("s3://imagery/scene", FEATURES) is True
        result = await sink.write_with_result("async", agen(FEATURES))
    assert (result.key, result.features, result.bytes) == ("out/async.geojsonl", 300, len(lines_of(FEATURES)))
    for key in ("out/scene.geojsonl", "out/async.geojsonl"):
        assert_one_feature_a_line(read_object(key), FEATURES)
        assert s3.head_object(Bucket=bucket, Key=key)["ContentType"] == "application/geo+json-seq"


def test_s3_sink_writes_a_multipart_sequence(bucket: str, s3: Any, read_object: Callable[[str], bytes]) -> None:
    features = list(synthetic_detections(15_000, seed=5))  # about 7 MB: two parts of 5 MiB
    sink = S3Sink(bucket, "out", settings=MULTIPART_SEQ)
    assert sink.write("scene", iter(features)) is True
    result = sink.write_with_result("again", features)
    assert (result.parts, result.features) == (2, 15_000)
    for key in ("out/scene.geojsonl", "out/again.geojsonl"):
        assert_one_feature_a_line(read_object(key), features)
        assert s3.head_object(Bucket=bucket, Key=key)["ContentType"] == "application/geo+json-seq"
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_a_collection_without_members_is_written_as_its_features(
    bucket: str, read_object: Callable[[str], bytes]
) -> None:
    collection = geojson.FeatureCollection([geojson.Feature(**feature) for feature in FEATURES[:5]])
    assert S3Sink(bucket, "out", settings=SEQ).write("scene", collection)
    # geojson's objects round coordinates to 6 decimals: what is written is what orjson makes of them.
    assert_one_feature_a_line(read_object("out/scene.geojsonl"), orjson.loads(orjson.dumps(collection["features"])))


def test_an_empty_sequence_is_an_empty_object(bucket: str, read_object: Callable[[str], bytes]) -> None:
    assert S3Sink(bucket, "out", settings=SEQ).write("empty", [])
    assert read_object("out/empty.geojsonl") == b""


def test_an_explicit_content_type_wins(bucket: str, s3: Any) -> None:
    settings = SinkSettings(output_format="geojsonseq", content_type="application/x-ndjson")
    assert S3Sink(bucket, "out", settings=settings).write("scene", FEATURES[:3])
    assert s3.head_object(Bucket=bucket, Key="out/scene.geojsonl")["ContentType"] == "application/x-ndjson"


@pytest.mark.anyio
@pytest.mark.parametrize("settings", [SEQ, MULTIPART_SEQ], ids=["single", "multipart"])
async def test_a_collection_with_members_a_sequence_cannot_hold_is_refused_naming_them(
    bucket: str, s3: Any, stored_keys: Callable[[], list[str]], settings: SinkSettings
) -> None:
    collection = geojson.FeatureCollection(FEATURES, bbox=[0, 0, 1, 1], name="scene")
    says = "a GeoJSON text sequence holds features only, not the collection's 'bbox', 'name'"
    async with AsyncS3Sink(bucket, "out", settings=settings) as sink:
        with pytest.raises(ValueError, match=says):
            await sink.write("scene", collection)
        with pytest.raises(ValueError, match=says):
            await sink.write_with_result("scene", dict(collection))
    with pytest.raises(ValueError, match=says):
        S3Sink(bucket, "out", settings=settings).write("scene", collection)
    assert stored_keys() == []
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


# The backfill


def test_backfill_format_geojsonseq(
    tmp_path: Path, bucket: str, s3: Any, read_object: Callable[[str], bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    sources = {"a": FEATURES[:10], "b": FEATURES[10:50]}
    (tmp_path / "a.geojson").write_bytes(orjson.dumps({"type": "FeatureCollection", "features": sources["a"]}))
    (tmp_path / "b.ndjson").write_bytes(lines_of(sources["b"]))
    arguments = ["backfill", str(tmp_path), "--bucket", bucket, "--prefix", "bf", "--format", "geojsonseq"]
    assert main(arguments) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "written 2, skipped 0, failed 0"
    for stem, features in sources.items():
        assert_one_feature_a_line(read_object(f"bf/{stem}.geojsonl"), features)
        assert s3.head_object(Bucket=bucket, Key=f"bf/{stem}.geojsonl")["ContentType"] == "application/geo+json-seq"
    # Resumed by the digests the sequences carry.
    assert main(arguments) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "written 0, skipped 2, failed 0"
    # The default format is a collection beside them.
    assert main(arguments[:-2]) == 0
    assert orjson.loads(read_object("bf/a.geojson"))["features"] == sources["a"]


def test_backfill_writes_a_large_sequence_in_parts(tmp_path: Path, bucket: str, s3: Any) -> None:
    features = list(synthetic_detections(30_000, seed=6))
    (tmp_path / "huge.geojsonl").write_bytes(lines_of(features))
    out, err = io.StringIO(), io.StringIO()
    assert backfill([tmp_path], Target(bucket, "bf", output_format="geojsonseq"), out=out, err=err) == 0
    stored = s3.get_object(Bucket=bucket, Key="bf/huge.geojsonl")
    assert re.search(r"-\d+\"$", stored["ETag"])  # a multipart object
    assert_one_feature_a_line(stored["Body"].read(), features)


def test_backfill_format_choices_are_the_sinks() -> None:
    backfill_parser = build_parser()._subparsers._group_actions[0].choices["backfill"]  # type: ignore[union-attr]
    (action,) = [action for action in backfill_parser._actions if action.dest == "format"]
    assert tuple(action.choices) == OUTPUT_FORMATS
    with pytest.raises(SystemExit):
        main(["backfill", ".", "--bucket", "b", "--prefix", "p", "--format", "csv"])


@pytest.mark.anyio
@pytest.mark.parametrize("settings", [SEQ, MULTIPART_SEQ], ids=["single", "multipart"])
async def test_the_open_writer_writes_a_sequence_of_its_batches(
    bucket: str, s3: Any, read_object: Callable[[str], bytes], settings: SinkSettings
) -> None:
    async with AsyncS3Sink(bucket, "out", settings=settings) as sink, sink.open("scene") as writer:
        for start in range(0, len(FEATURES), 70):
            await writer.add(FEATURES[start : start + 70])
    assert writer.result is not None and writer.result.key == "out/scene.geojsonl"
    assert_one_feature_a_line(read_object("out/scene.geojsonl"), FEATURES)
    assert s3.head_object(Bucket=bucket, Key="out/scene.geojsonl")["ContentType"] == "application/geo+json-seq"


def test_the_sync_open_writer_writes_a_sequence(bucket: str, read_object: Callable[[str], bytes]) -> None:
    with S3Sink(bucket, "out", settings=SEQ).open("scene") as writer:
        writer.add(FEATURES[:100])
        writer.add(iter(FEATURES[100:]))
    assert_one_feature_a_line(read_object("out/scene.geojsonl"), FEATURES)
