"""
The library stands alone and the command line is an application on top of it: importing ``model_runner.sink``
loads nothing of the command, the command runs as ``python -m model_runner`` and as its console script, its
dependencies are an extra that it names when missing, and importing it logs nothing.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import orjson
import pytest
from packaging.requirements import Requirement

from model_runner.cli.synthetic import synthetic_detections

# A guard against a hang, not a speed check.
CHILD_SECONDS = 120
SCRIPT = Path(sysconfig.get_path("scripts")) / "model-runner-sink"
# What only the command line, the demo, Dask or the tests use.
APPLICATION_MODULES = ("model_runner.cli", "ijson", "tqdm", "distributed", "dask", "moto")

# Imports every module of model_runner.sink in a fresh interpreter, then names the application's modules loaded.
IMPORT_THE_LIBRARY = """
import importlib, pkgutil, sys
import model_runner.sink
for module in pkgutil.walk_packages(model_runner.sink.__path__, "model_runner.sink."):
    importlib.import_module(module.name)
prefixes = sys.argv[1:]
print(sorted(name for name in sys.modules if any(name == p or name.startswith(p + ".") for p in prefixes)))
"""

# Runs the installed console script as pip wrote it, in an interpreter where one module cannot be found: a meta
# path finder placed first raises what the import system raises for a module that is not installed.
WITHOUT_A_MODULE = """
import runpy, sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.name or fullname.startswith(self.name + "."):
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None

script, missing, *arguments = sys.argv[1:]
sys.meta_path.insert(0, NotInstalled(missing))
sys.argv = [script, *arguments]
runpy.run_path(script, run_name="__main__")
"""

# Imports the whole command with logging on, then reads a collection twice: the line between tells when a warning came.
IMPORT_THEN_READ = """
import logging, sys
from pathlib import Path
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
import model_runner.cli.backfill.job
from model_runner.cli.backfill.reading import inspect_source, read_features
print("imported", flush=True)
for _ in range(2):
    inspect_source(Path(sys.argv[1]))
    list(read_features(Path(sys.argv[1])))
"""


def run_python(*arguments: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, timeout=CHILD_SECONDS, env=environment
    )


def test_the_library_loads_nothing_of_the_application() -> None:
    child = run_python("-c", IMPORT_THE_LIBRARY, *APPLICATION_MODULES)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[]"


def test_the_package_requires_only_the_foundation_and_the_command_line_brings_its_own() -> None:
    requirements = [Requirement(text) for text in importlib.metadata.requires("model-runner-sink") or []]
    core = {requirement.name for requirement in requirements if requirement.marker is None}
    # aiobotocore is aioboto3's own client, pinned to the range whose private session hooks the sink overrides.
    assert core == {"aioboto3", "aiobotocore", "anyio", "geojson", "orjson"}

    def extra(name: str) -> set[str]:
        return {
            f"{requirement.name}[{','.join(sorted(requirement.extras))}]" if requirement.extras else requirement.name
            for requirement in requirements
            if requirement.marker is not None and requirement.marker.evaluate({"extra": name})
        }

    assert {"ijson", "tqdm"} <= extra("cli")
    # The demo and the Dask workers run the command's code, so their extras bring the command's.
    assert {"model-runner-sink[cli]", "moto[s3,server,sts]"} <= extra("demo")
    assert {"model-runner-sink[cli]", "distributed"} <= extra("dask")


@pytest.mark.parametrize("module", ["model_runner", "model_runner.cli"])
def test_python_m_runs_the_command(module: str) -> None:
    child = run_python("-m", module, "--help")
    assert child.returncode == 0, child.stderr
    assert child.stdout.startswith("usage: model-runner-sink")
    assert "backfill" in child.stdout and "demo" in child.stdout


def test_the_console_script_runs_a_backfill(
    tmp_path: Path, bucket: str, s3: Any, subprocess_environment: dict[str, str]
) -> None:
    features = list(synthetic_detections(20, seed=13))
    (tmp_path / "scene-1.geojson").write_bytes(orjson.dumps({"type": "FeatureCollection", "features": features}))
    (tmp_path / "scene-2.ndjson").write_bytes(b"".join(orjson.dumps(feature) + b"\n" for feature in features))
    child = subprocess.run(
        [str(SCRIPT), "backfill", str(tmp_path), "--bucket", bucket, "--prefix", "out"],
        capture_output=True,
        text=True,
        timeout=CHILD_SECONDS,
        env=subprocess_environment,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[-1] == "written 2, skipped 0, failed 0"
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == ["out/scene-1.geojson", "out/scene-2.geojson"]


@pytest.mark.parametrize(
    ("missing", "arguments", "extra"),
    [
        ("ijson", ["backfill", "folder", "--bucket", "b", "--prefix", "p"], "cli"),
        ("tqdm", ["backfill", "folder", "--bucket", "b", "--prefix", "p", "--dry-run"], "cli"),
        ("ijson", ["demo"], "cli"),
        ("moto", ["demo", "--features", "10"], "demo"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(missing: str, arguments: list[str], extra: str) -> None:
    child = run_python("-c", WITHOUT_A_MODULE, str(SCRIPT), missing, *arguments)
    assert child.returncode == 2, child.stderr
    assert child.stdout == ""
    assert child.stderr.count("\n") == 1 and "Traceback" not in child.stderr, child.stderr
    assert f"{missing} is not installed" in child.stderr
    assert f"pip install 'model-runner-sink[{extra}]'" in child.stderr


def test_the_help_needs_no_extra() -> None:
    child = run_python("-c", WITHOUT_A_MODULE, str(SCRIPT), "ijson", "backfill", "--help")
    assert child.returncode == 0, child.stderr
    assert "--bucket" in child.stdout


def test_a_slow_json_parser_is_told_when_the_first_collection_is_read_not_on_import(
    tmp_path: Path, subprocess_environment: dict[str, str]
) -> None:
    source = tmp_path / "scene.geojson"
    source.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": list(synthetic_detections(3))}))
    child = run_python(
        "-c", IMPORT_THEN_READ, str(source), environment={**subprocess_environment, "IJSON_BACKEND": "python"}
    )
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines == [
        "imported",
        "WARNING model_runner.cli.backfill.reading: ijson uses its python backend: reading collections is several "
        "times slower",
    ]
