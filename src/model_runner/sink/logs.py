"""The one logger both sinks log on."""

from __future__ import annotations

import logging

__all__ = ["logger"]

# The seed documents ``model_runner.sink.s3_sink.logger``: its name stays, so configuring it covers both sinks.
logger = logging.getLogger("model_runner.sink.s3_sink")
"""Where both sinks log, as the seed did: each failed write at error level, each stored object at debug level."""
