"""Inputs shared by the tests of bad input: values that are not a collection of features."""

from __future__ import annotations

import pytest

NOT_COLLECTIONS = [
    pytest.param(None, id="None"),
    pytest.param(5, id="int"),
    pytest.param(2.5, id="float"),
    pytest.param("features", id="str"),
    pytest.param(b"features", id="bytes"),
    pytest.param({"type": "Feature", "geometry": None, "properties": {}}, id="dict"),
    pytest.param({"type": "FeatureCollection", "features": 5}, id="collection-of-int"),
    pytest.param(object(), id="object"),
]
