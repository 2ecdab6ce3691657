"""Realistic synthetic detections, shaped like model-runner output, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

__all__ = ["synthetic_detections"]

_CLASSES = (
    "ground_motor_passenger_vehicle",
    "ground_motor_truck",
    "building",
    "aircraft",
    "maritime_vessel",
)


def synthetic_detections(count: int, *, seed: int = 0, image_id: str | None = None) -> Iterator[dict[str, Any]]:
    """
    Generate detections shaped like model-runner output: a polygon or point per object, with image coordinates,
    classes and scores.

    :param count: How many features.
    :param seed: Seed of the random generator, for reproducible collections.
    :param image_id: The image the detections belong to; a random one by default.
    :return: An iterator of GeoJSON feature dicts.
    """
    rng = random.Random(seed)
    image_id = image_id or f"{uuid.UUID(int=rng.getrandbits(128))}:s3://imagery/scene-{seed}.tif"
    origin_lon, origin_lat = -43.68 + rng.uniform(-1, 1), -22.94 + rng.uniform(-1, 1)
    for _ in range(count):
        column, row = rng.randrange(0, 20000), rng.randrange(0, 20000)
        width, height = rng.randrange(6, 60), rng.randrange(6, 60)
        image_ring = [
            [column, row],
            [column, row + height],
            [column + width, row + height],
            [column + width, row],
            [column, row],
        ]
        world_ring = [[round(origin_lon + x * 1e-6, 7), round(origin_lat - y * 1e-6, 7)] for x, y in image_ring]
        if rng.random() < 0.5:
            geometry: dict[str, Any] = {"type": "Polygon", "coordinates": [world_ring]}
        else:
            geometry = {"type": "Point", "coordinates": world_ring[0]}
        score = rng.random()
        feature_class = rng.choice(_CLASSES)
        yield {
            "type": "Feature",
            "id": str(uuid.UUID(int=rng.getrandbits(128))),
            "geometry": geometry,
            "properties": {
                "bounds_imcoords": [column, row, column + width, row + height],
                "geom_imcoords": image_ring,
                "featureClasses": [{"iri": feature_class, "score": score}],
                "detection_score": score,
                "image_id": image_id,
            },
        }
