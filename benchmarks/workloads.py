"""The workloads, and the features they write: a data set made once per run, loaded by every measurement."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from model_runner.cli.synthetic import synthetic_detections

__all__ = [
    "POOL_FEATURES",
    "Workload",
    "dataset_size",
    "feature_stream",
    "load_features",
    "make_dataset",
    "workloads",
]

# A streamed workload cycles through this many distinct features, yielding a fresh dict with its own id for
# each: the generator then costs ~1 µs a feature instead of synthetic_detections' ~20 µs, so the figures are
# the sink's and not the generator's, and what the stream holds at once is what the sink holds.
POOL_FEATURES = 10_000


@dataclass(frozen=True)
class Workload:
    """
    One benchmarked scenario.

    :param key: Its name on the command line and in the results.
    :param writes: Collections written, concurrently when more than one.
    :param features: Features in each collection.
    :param streamed: Whether features come from a generator (else from lists in memory).
    """

    key: str
    writes: int
    features: int
    streamed: bool

    @property
    def total_features(self) -> int:
        """Features over all the writes."""
        return self.writes * self.features

    def title(self) -> str:
        """
        A one-line description.

        :return: What is written and from what.
        """
        if self.writes > 1:
            return f"{self.writes} concurrent writes of {self.features:,} features (lists in memory)"
        source = "a generator" if self.streamed else "a list in memory"
        return f"one write of {self.features:,} features from {source}"


def workloads(quick: bool) -> dict[str, Workload]:
    """
    The workloads of a run.

    :param quick: Smaller sizes, for a smoke run.
    :return: The workloads by key, in the order they run.
    """
    sizes = {
        "single": (1, 20_000 if quick else 100_000, False),
        "concurrent": (50 if quick else 200, 500, False),
        "stream-1m": (1, 100_000 if quick else 1_000_000, True),
        "stream-300k": (1, 50_000 if quick else 300_000, True),
    }
    return {key: Workload(key, *size) for key, size in sizes.items()}


def dataset_size(selected: list[Workload]) -> int:
    """
    Distinct features the selected workloads need.

    :param selected: The workloads that run.
    :return: The size of the data set to make.
    """
    needed = [w.total_features for w in selected if not w.streamed]
    needed += [min(POOL_FEATURES, w.total_features) for w in selected if w.streamed]
    return max(needed, default=0)


def make_dataset(path: Path, count: int) -> None:
    """
    Write ``count`` synthetic detections to ``path`` as one JSON array, once per run.

    Loading it back with orjson takes a fraction of a second, where generating the features again in every
    measurement would take seconds (100k features: ~2 s).

    :param path: Where to write.
    :param count: How many features.
    """
    path.write_bytes(orjson.dumps(list(synthetic_detections(count, seed=7))))


def load_features(path: Path, count: int) -> list[dict[str, Any]]:
    """
    The first ``count`` features of the data set, as fresh dicts.

    :param path: The data set.
    :param count: How many features.
    :return: The features.
    """
    features: list[dict[str, Any]] = orjson.loads(path.read_bytes())
    if len(features) < count:
        raise ValueError(f"data set has {len(features)} features, {count} needed")
    del features[count:]
    return features


def feature_stream(pool: list[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    """
    ``count`` features from a generator: the pool's features in turn, each a fresh dict with a distinct id.

    :param pool: Distinct features to cycle through.
    :param count: How many features to yield.
    :return: A generator of features.
    """
    size = len(pool)
    for index in range(count):
        feature = pool[index % size]
        # Same length as the uuid it replaces, so the encoded size is that of ``count`` distinct features.
        yield {**feature, "id": f"{feature['id'][:24]}{index:012d}"}
