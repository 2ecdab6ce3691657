"""Sphinx configuration: hand-written guides, and an API reference that sphinx-autoapi reads from ../src."""

from __future__ import annotations

import importlib.metadata

project = "model-runner-sink"
author = "model-runner-sink contributors"
project_copyright = "model-runner-sink contributors"
# The docs are built where the package is installed (make docs): one version, pyproject's.
release = importlib.metadata.version("model-runner-sink")

# AutoAPI reads the source without importing it, so the build needs no AWS configuration and no optional extra.
extensions = ["autoapi.extension"]

autoapi_type = "python"
autoapi_dirs = ["../src"]
autoapi_root = "autoapi"
# The index page places the reference in its own toctree.
autoapi_add_toctree_entry = False
autoapi_options = [
    "members",
    # Dataclass fields are documented by their class's ``:param:`` fields, and module attributes such as the
    # seed's ``model_runner.sink.s3_sink.logger`` have no docstring of their own: without this they disappear.
    # Each module's ``__all__`` still decides what is listed.
    "undoc-members",
    "show-inheritance",
    "show-module-summary",
    # No "imported-members": model_runner.sink re-exports the public classes, and documenting them there too
    # gives each two targets, which makes every short reference such as ``:raises FeatureEncodingError:``
    # ambiguous (a warning).
]
autoapi_member_order = "bysource"
# The exceptions document their arguments in ``__init__``.
autoapi_python_class_content = "both"

exclude_patterns = ["_build"]
html_theme = "alabaster"
