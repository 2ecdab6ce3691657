"""The loggers of the library: the one both sinks log on, and the upload layer's."""

from __future__ import annotations

import logging

__all__ = ["logger", "upload_logger"]

# The seed documents ``model_runner.sink.s3_sink.logger``: its name stays, so configuring it covers both sinks.
logger = logging.getLogger("model_runner.sink.s3_sink")
"""Where both sinks log, as the seed did: each failed write at error level, each stored object at debug level."""

# The guide documents this name for the upload layer's own lines (aborts, settled cancellations, conflicts).
upload_logger = logging.getLogger("model_runner.sink.upload")
"""Where the upload layer logs: aborts, cancelled requests and what S3 stored meanwhile, retried conflicts."""
