"""
Chunks of bytes -> one S3 object: a single PutObject, or a multipart upload that never leaves parts behind.

One module per job: :mod:`~model_runner.sink.upload.stream` takes the chunks and chooses between
:mod:`~model_runner.sink.upload.put` and :mod:`~model_runner.sink.upload.multipart`;
:mod:`~model_runner.sink.upload.parts` cuts and seals the bodies; :mod:`~model_runner.sink.upload.settle` runs the
requests that must finish whatever cancels the write; :mod:`~model_runner.sink.upload.outcome` is what an upload
tells. They all log on ``model_runner.sink.upload``.
"""

from __future__ import annotations

from model_runner.sink.upload.multipart import MultipartUpload
from model_runner.sink.upload.outcome import UploadEvents, UploadOutcome
from model_runner.sink.upload.parts import PartPlan, part_size_for
from model_runner.sink.upload.settle import ABORT_TIMEOUT_SECONDS, ANSWER_TIMEOUT_SECONDS
from model_runner.sink.upload.stream import upload_object

__all__ = [
    "ABORT_TIMEOUT_SECONDS",
    "ANSWER_TIMEOUT_SECONDS",
    "MultipartUpload",
    "PartPlan",
    "UploadEvents",
    "UploadOutcome",
    "part_size_for",
    "upload_object",
]
