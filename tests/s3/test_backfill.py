"""The backfill command writes files from disk to S3 once, resumes, reports failures and stops cleanly."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from model_runner.cli import main
from model_runner.cli.backfill.batches import balanced_batches
from model_runner.cli.backfill.job import backfill
from model_runner.cli.backfill.reading import read_features
from model_runner.cli.backfill.sources import Source, find_sources
from model_runner.cli.backfill.writes import DIGEST_METADATA, Target
from model_runner.cli.synthetic import synthetic_detections

pytestmark = pytest.mark.timeout(120)

PREFIX = "backfill"
LINE_SUFFIXES = (".ndjson", ".geojsonl")
SUMMARY = re.compile(r"written (\d+), skipped (\d+), failed (\d+)")


def write_source(path: Path, features: list[dict[str, Any]]) -> None:
    """Write features as a FeatureCollection (indented, so not the bytes stored) or one feature a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in LINE_SUFFIXES:
        # A blank line now and then: they are ignored.
        path.write_bytes(
            b"".join(orjson.dumps(feature) + b"\n" * (1 + index % 3) for index, feature in enumerate(features))
        )
    else:
        path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": features}, option=orjson.OPT_INDENT_2))


def collection(features: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"type": "FeatureCollection", "features": features})


def make_mixed_folder(root: Path) -> tuple[dict[str, list[dict[str, Any]]], Path]:
    """
    40 files of the four kinds in nested folders, one of them corrupt mid-way.

    :return: The features of each good file by stem, and the corrupt file.
    """
    suffixes = (".geojson", ".json", ".ndjson", ".geojsonl")
    folders = ("", "a", "a/b", "c/d/e")
    expected = {}
    for index in range(40):
        stem = f"scene-{index:02d}"
        features = list(synthetic_detections(3 + index, seed=index))
        write_source(root / folders[index % 4] / f"{stem}{suffixes[index // 10]}", features)
        expected[stem] = features
    corrupt = root / "a" / "scene-13.json"
    corrupt.write_bytes(corrupt.read_bytes()[:2000] + b"}}garbage")
    del expected["scene-13"]
    return expected, corrupt


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    """Run the command in this process: its status, lines of standard output, and standard error."""
    status = main(["backfill", *args])
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def versions(s3: Any, bucket: str) -> int:
    return len(s3.list_object_versions(Bucket=bucket).get("Versions", []))


def assert_stored(s3: Any, bucket: str, expected: dict[str, list[dict[str, Any]]]) -> None:
    for stem, features in expected.items():
        stored = s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{stem}.geojson")
        assert stored["Body"].read() == collection(features), stem
        assert len(stored["Metadata"][DIGEST_METADATA]) == 64
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_writes_skips_unchanged_and_rewrites_changed(
    tmp_path: Path, bucket: str, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    expected, corrupt = make_mixed_folder(tmp_path)
    arguments = (str(tmp_path), "--bucket", bucket, "--prefix", PREFIX)

    status, out, err = run(capsys, *arguments)
    assert (status, out[-1]) == (1, "written 39, skipped 0, failed 1")
    assert f"failed {corrupt}: not valid JSON after feature" in err
    assert_stored(s3, bucket, expected)
    assert versions(s3, bucket) == 39

    # Nothing is written again: no new version of any object.
    status, out, _ = run(capsys, *arguments)
    assert (status, out[-1]) == (1, "written 0, skipped 39, failed 1")
    assert versions(s3, bucket) == 39

    changed = list(synthetic_detections(7, seed=100))
    write_source(tmp_path / "c/d/e/scene-23.ndjson", changed)
    status, out, _ = run(capsys, *arguments)
    assert (status, out[-1]) == (1, "written 1, skipped 38, failed 1")
    assert_stored(s3, bucket, {**expected, "scene-23": changed})

    status, out, _ = run(capsys, *arguments, "--no-resume", "--concurrency", "3")
    assert (status, out[-1]) == (1, "written 39, skipped 0, failed 1")
    assert versions(s3, bucket) == 39 + 1 + 39


def test_bad_files_fail_with_their_reason(
    tmp_path: Path, bucket: str, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    features = list(synthetic_detections(4, seed=1))
    write_source(tmp_path / "good.ndjson", features)
    lines = [orjson.dumps(feature) for feature in features]
    (tmp_path / "bad-line.ndjson").write_bytes(b"\n".join([lines[0], b"", b"{oops", lines[1]]))
    (tmp_path / "not-object.geojsonl").write_bytes(b"\n".join([lines[0], b"[1, 2]"]))
    (tmp_path / "feature.geojson").write_bytes(orjson.dumps(features[0]))
    (tmp_path / "not-json.json").write_bytes(b"<html>")
    (tmp_path / "empty.geojson").write_bytes(b"")
    (tmp_path / "latin-1.geojson").write_bytes(b'{"type": "FeatureCollection", "features": [{"a": "\xe9t\xe9"}]}')
    (tmp_path / "notes.txt").write_text("not a source: ignored")
    write_source(tmp_path / "other" / "good.geojson", features)  # same key as good.ndjson

    status, out, err = run(
        capsys, str(tmp_path), str(tmp_path / "missing.geojson"), "--bucket", bucket, "--prefix", PREFIX
    )
    assert (status, out[-1]) == (1, "written 1, skipped 0, failed 8")
    for name, reason in [
        ("bad-line.ndjson", "line 3 is not valid JSON"),
        ("not-object.geojsonl", "line 2 is not a JSON object"),
        ("feature.geojson", "not a GeoJSON FeatureCollection: type 'Feature'"),
        ("not-json.json", "not valid JSON"),
        ("empty.geojson", "not valid JSON: parse error: premature EOF\n"),
        ("latin-1.geojson", "not valid JSON after feature 0: lexical error: invalid bytes in UTF8 string.\n"),
        ("missing.geojson", "no such file or directory"),
        ("other/good.geojson", f"same object key as {tmp_path / 'good.ndjson'}"),
    ]:
        assert f"failed {tmp_path / name}: {reason}" in err, name
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 1
    assert_stored(s3, bucket, {"good": features})


def test_a_link_to_a_file_is_written_to_its_own_key_and_a_broken_one_fails(
    tmp_path: Path, bucket: str, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    features = list(synthetic_detections(4, seed=2))
    write_source(tmp_path / "a.geojson", features)
    (tmp_path / "b.geojson").symlink_to(tmp_path / "a.geojson")  # another name: another key
    (tmp_path / "copies").mkdir()
    (tmp_path / "copies" / "a.geojson").symlink_to(tmp_path / "a.geojson")  # the same file under the same key
    (tmp_path / "gone.ndjson").symlink_to(tmp_path / "missing.ndjson")
    (tmp_path / "loop.geojson").symlink_to(tmp_path / "loop.geojson")
    (tmp_path / "notes.txt").symlink_to(tmp_path / "missing.txt")  # not a source: ignored

    status, out, err = run(capsys, str(tmp_path), str(tmp_path / "a.geojson"), "--bucket", bucket, "--prefix", PREFIX)
    assert (status, out[-1]) == (1, "written 2, skipped 0, failed 2")
    assert f"failed {tmp_path / 'gone.ndjson'}: broken symbolic link: No such file or directory" in err
    assert f"failed {tmp_path / 'loop.geojson'}: broken symbolic link: Too many levels of symbolic links" in err
    assert_stored(s3, bucket, {"a": features, "b": features})
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 2


def test_linked_folders_are_followed_each_once_and_a_cycle_ends(
    tmp_path: Path, bucket: str, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    inside, outside = list(synthetic_detections(3, seed=3)), list(synthetic_detections(5, seed=4))
    root = tmp_path / "root"
    write_source(root / "real" / "inside.geojson", inside)
    write_source(tmp_path / "elsewhere" / "deep" / "outside.ndjson", outside)
    (root / "a-link").symlink_to(root / "real")  # sorts first: the folder is still found by its own path
    (root / "real" / "up").symlink_to(root)  # a cycle
    (root / "real" / "loop-1").symlink_to(root / "real" / "loop-2")  # links to links, a cycle of their own
    (root / "real" / "loop-2").symlink_to(root / "real" / "loop-1")
    (root / "away").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "deep" / "back").symlink_to(tmp_path / "elsewhere")

    sources, failures = find_sources([root], PREFIX)
    assert [source.path for source in sources] == [
        root / "away" / "deep" / "outside.ndjson",
        root / "real" / "inside.geojson",
    ]
    assert failures == []
    status, out, _ = run(capsys, str(root), "--bucket", bucket, "--prefix", PREFIX)
    assert (status, out[-1]) == (0, "written 2, skipped 0, failed 0")
    assert_stored(s3, bucket, {"inside": inside, "outside": outside})


def test_failures_are_told_once_and_the_sink_debug_lines_still_flow(
    tmp_path: Path, bucket: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    write_source(tmp_path / "good.ndjson", list(synthetic_detections(3)))
    (tmp_path / "bad.ndjson").write_bytes(b'{"type": "Feature", "properties": {"n": 1}}\n{not json\n')
    with caplog.at_level(logging.DEBUG, logger="model_runner.sink.s3_sink"):
        status, out, err = run(capsys, str(tmp_path), "--bucket", bucket, "--prefix", PREFIX)
    assert (status, out[-1]) == (1, "written 1, skipped 0, failed 1")
    assert err.count("bad.ndjson") == 1
    sink_records = [record for record in caplog.records if record.name == "model_runner.sink.s3_sink"]
    assert [record.levelno for record in sink_records] == [logging.DEBUG]
    assert sink_records[0].key == f"{PREFIX}/good.geojson"


def test_dry_run_lists_and_writes_nothing(
    tmp_path: Path, bucket: str, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    for index in range(3):
        write_source(tmp_path / f"scene-{index}.geojson", list(synthetic_detections(2, seed=index)))
    arguments = (str(tmp_path), "--bucket", bucket, "--prefix", PREFIX)
    status, out, _ = run(capsys, *arguments, "--dry-run")
    assert status == 0
    assert out[-2:] == ["dry run: would write 3, nothing written", "written 0, skipped 0, failed 0"]
    assert f"would write {tmp_path / 'scene-1.geojson'} -> {PREFIX}/scene-1.geojson" in out
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0

    run(capsys, str(tmp_path / "scene-0.geojson"), "--bucket", bucket, "--prefix", PREFIX)
    status, out, _ = run(capsys, *arguments, "--dry-run")
    assert out[-2:] == ["dry run: would write 2, nothing written", "written 0, skipped 1, failed 0"]


def test_missing_bucket_stops_the_job(tmp_path: Path, missing_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    write_source(tmp_path / "scene.geojson", list(synthetic_detections(2)))
    status, out, err = run(capsys, str(tmp_path), "--bucket", missing_bucket, "--prefix", PREFIX)
    assert status == 1
    assert out == []
    assert f"backfill failed: bucket {missing_bucket} does not exist or cannot be accessed" in err


@pytest.fixture(scope="module")
def big_features() -> list[dict[str, Any]]:
    """60,000 features, about 30 MB encoded: several multipart parts."""
    return list(synthetic_detections(60_000, seed=60))


def test_large_collection_round_trips_through_multipart(
    tmp_path: Path, bucket: str, s3: Any, big_features: list[dict[str, Any]]
) -> None:
    write_source(tmp_path / "huge.geojson", big_features)
    out, err = io.StringIO(), io.StringIO()
    assert backfill([tmp_path], Target(bucket, PREFIX), out=out, err=err, progress_seconds=0.05) == 0
    assert out.getvalue().splitlines()[-1] == "written 1, skipped 0, failed 0"
    assert re.search(r"backfill: [01]/1 files, \d+\.\d/\d+\.\d MB, 0 failed", err.getvalue())
    stored = s3.get_object(Bucket=bucket, Key=f"{PREFIX}/huge.geojson")
    assert re.search(r"-\d+\"$", stored["ETag"])  # a multipart object
    assert stored["Body"].read() == collection(big_features)


def test_collection_breaking_after_parts_were_uploaded_leaves_nothing(
    tmp_path: Path, bucket: str, s3: Any, big_features: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "broken.json"
    write_source(source, big_features)
    source.write_bytes(source.read_bytes()[:-1_000_000] + b"]]]")
    status, out, err = run(capsys, str(source), "--bucket", bucket, "--prefix", PREFIX)
    assert (status, out[-1]) == (1, "written 0, skipped 0, failed 1")
    assert re.search(rf"failed {re.escape(str(source))}: not valid JSON after feature \d{{5}}: ", err)
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)


def test_collection_is_read_incrementally(tmp_path: Path, big_features: list[dict[str, Any]]) -> None:
    source = tmp_path / "huge.geojson"
    write_source(source, big_features)
    features = read_features(source)
    tracemalloc.start()
    try:
        first = [next(features) for _ in range(100)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        features.close()
    assert first == big_features[:100]
    assert peak < source.stat().st_size / 20


def test_batches_balance_bytes() -> None:
    sources = [Source(Path(f"{size}.geojson"), size) for size in (90, 10, 50, 40, 30, 30, 20, 20, 5, 5)]
    batches = balanced_batches(sources, 3)
    assert sorted(sum(source.size for source in batch) for batch in batches) == [100, 100, 100]
    assert sorted(source.path for batch in batches for source in batch) == sorted(source.path for source in sources)
    assert balanced_batches(sources[:2], 8) == [[sources[0]], [sources[1]]]


def test_dask_local_cluster(tmp_path: Path, bucket: str, s3: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # The workers are processes: they find the test server through the environment they inherit.
    expected, corrupt = make_mixed_folder(tmp_path)
    status, out, err = run(capsys, str(tmp_path), "--bucket", bucket, "--prefix", PREFIX, "--dask", "local")
    assert (status, out[-1]) == (1, "written 39, skipped 0, failed 1"), err
    assert f"failed {corrupt}: not valid JSON after feature" in err
    assert_stored(s3, bucket, expected)


def test_dask_missing_extra_is_named(
    tmp_path: Path, bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)
    write_source(tmp_path / "scene.geojson", list(synthetic_detections(2)))
    status, _, err = run(capsys, str(tmp_path), "--bucket", bucket, "--prefix", PREFIX, "--dask", "local")
    assert status == 1
    assert "pip install 'model-runner-sink[dask]'" in err


def stored_parts(s3: Any, bucket: str) -> int:
    """Parts stored by the multipart uploads in progress."""
    parts = 0
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        with contextlib.suppress(s3.exceptions.NoSuchUpload):  # completed meanwhile
            parts += len(s3.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]).get("Parts", []))
    return parts


@pytest.mark.parametrize("mode", [[], ["--dask", "local"]], ids=["local", "dask"])
def test_ctrl_c_stops_cleanly_and_a_rerun_resumes(
    mode: list[str],
    tmp_path: Path,
    bucket: str,
    s3: Any,
    subprocess_environment: dict[str, str],
    big_features: list[dict[str, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Small files, then a big one (paths are taken in order, by size with dask): the signal comes once the big
    # one has a part stored, so that the sink must abort its upload. (The sink cannot abort an upload while its
    # CreateMultipartUpload is in flight, not having its id yet: one multipart upload keeps that out of the test.)
    for index in range(30):
        write_source(tmp_path / f"a-small-{index:03d}.ndjson", big_features[index : index + 50])
    write_source(tmp_path / "b-big.ndjson", big_features[:40_000])
    arguments = (str(tmp_path), "--bucket", bucket, "--prefix", PREFIX, "--concurrency", "1")
    process = subprocess.Popen(
        [sys.executable, "-m", "model_runner", "backfill", *arguments, *mode],
        env=subprocess_environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (s3.list_objects_v2(Bucket=bucket)["KeyCount"] and stored_parts(s3, bucket)):
            assert time.monotonic() < deadline and process.poll() is None, "no multipart upload was seen in flight"
            time.sleep(0.01)
        # To the process group, as a terminal's Ctrl-C: dask's worker processes get it too.
        os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    summary = SUMMARY.fullmatch(out.splitlines()[-1])
    assert summary is not None, out
    written = int(summary[1])
    assert 1 <= written < 31
    assert "files not done" in err
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)

    status, lines, _ = run(capsys, *arguments)
    assert status == 0
    summary = SUMMARY.fullmatch(lines[-1])
    assert summary is not None
    assert int(summary[1]) + int(summary[2]) == 31
    assert int(summary[2]) >= written
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 31
