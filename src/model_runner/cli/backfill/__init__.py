"""
Backfill: write GeoJSON files from disk to S3, one object per file, resumably, from this process or on Dask.

Every ``*.geojson``/``*.json`` FeatureCollection file and every ``*.ndjson``/``*.geojsonl`` file (one feature a line,
blank lines ignored) under the sources becomes the object ``<prefix>/<file stem>.geojson`` (with ``--format
geojsonseq``, ``<prefix>/<file stem>.geojsonl``, one feature a line), written through
:class:`~model_runner.sink.AsyncS3Sink`. Files are parsed incrementally (ijson, or line by line), so memory does not
grow with a file's size. The object is the features re-serialised compactly by orjson: equal in content to the
source, floats included (they are written in their shortest round-trip form), but not a byte copy of it.

Each object carries the SHA-256 of its source file as the user metadata ``source-sha256``; a resumed job skips the
files whose object already carries their digest, and rewrites those whose digest differs.

A file goes through the modules in this order:

- :mod:`~model_runner.cli.backfill.sources`: finding the files under files and folders;
- :mod:`~model_runner.cli.backfill.reading`: checking, hashing and reading a file's features;
- :mod:`~model_runner.cli.backfill.writes`: writing files through the sink, resuming by digest;
- :mod:`~model_runner.cli.backfill.batches` and :mod:`~model_runner.cli.backfill.dask`: the files in batches on
  Dask workers, and the driver that collects them;
- :mod:`~model_runner.cli.backfill.cleanup`: aborting the multipart uploads a killed writer left;
- :mod:`~model_runner.cli.backfill.report` and :mod:`~model_runner.cli.backfill.job`: the progress, the summary
  line, Ctrl-C, and :func:`~model_runner.cli.backfill.job.backfill`, the whole job.

This module holds only the job's defaults, so that the command's parser shows them without importing the job and
its dependencies.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CONCURRENCY", "STOP_TIMEOUT_SECONDS"]

# Files written at once; with Dask, per batch.
DEFAULT_CONCURRENCY = 8
# After a Ctrl-C, how long the Dask driver waits for all the batches together to stop.
STOP_TIMEOUT_SECONDS = 60.0
