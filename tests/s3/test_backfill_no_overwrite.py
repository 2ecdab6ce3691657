"""backfill --no-overwrite never replaces an object: a file whose key has one, changed or not, is skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from model_runner.cli import main
from model_runner.cli.synthetic import synthetic_detections

pytestmark = pytest.mark.timeout(120)


def write_source(path: Path, features: list[dict[str, Any]]) -> None:
    path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": features}))


def test_no_overwrite_skips_files_whose_key_has_an_object(
    tmp_path: Path, bucket: str, s3: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    s3.put_object(Bucket=bucket, Key="backfill/taken.geojson", Body=b"someone else's")
    for stem in ("taken", "free"):
        write_source(tmp_path / f"{stem}.geojson", list(synthetic_detections(5, seed=len(stem))))
    arguments = ["backfill", str(tmp_path), "--bucket", bucket, "--prefix", "backfill", "--no-overwrite"]

    assert main(arguments) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "written 1, skipped 1, failed 0"
    assert s3.get_object(Bucket=bucket, Key="backfill/taken.geojson")["Body"].read() == b"someone else's"

    # A changed file is not written over its object either, resuming or not.
    write_source(tmp_path / "free.geojson", list(synthetic_detections(6, seed=9)))
    before = s3.get_object(Bucket=bucket, Key="backfill/free.geojson")["Body"].read()
    for extra in ([], ["--no-resume"]):
        assert main([*arguments, *extra]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "written 0, skipped 2, failed 0"
    assert s3.get_object(Bucket=bucket, Key="backfill/free.geojson")["Body"].read() == before
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=bucket)
