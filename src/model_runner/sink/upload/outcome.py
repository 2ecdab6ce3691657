"""What an upload tells as it goes, and what S3 answered for the stored object."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from model_runner.sink.exceptions import ChecksumMismatchError
from model_runner.sink.responses import retry_attempts

__all__ = ["UploadEvents", "UploadOutcome", "tell_retries", "verify_checksum"]


@dataclass
class UploadOutcome:
    """What S3 answered for a stored object, and how long from its first request to the last answer."""

    bytes: int = 0
    parts: int = 0
    retries: int = 0
    checksum: str = ""
    etag: str = ""
    version_id: str | None = None
    seconds: float = 0.0


class UploadEvents(Protocol):
    """What an upload tells as it goes. Called on the event loop thread; an exception raised fails the upload."""

    def part_stored(self, number: int, size: int) -> None:
        """
        A part was stored.

        :param number: The part number.
        :param size: Its size in bytes.
        """

    def retried(self, operation: str, retries: int) -> None:
        """
        A request succeeded after botocore retried it.

        :param operation: The S3 operation, e.g. ``"UploadPart"``.
        :param retries: How many times it was retried.
        """


def tell_retries(events: UploadEvents | None, operation: str, response: Mapping[str, Any]) -> None:
    """
    Tell ``events`` that a request was retried, if it was.

    :param events: Who listens, if anyone.
    :param operation: The S3 operation.
    :param response: Its answer.
    """
    retries = retry_attempts(response)
    if retries and events is not None:
        events.retried(operation, retries)


def verify_checksum(response: Mapping[str, Any], expected: str, key: str) -> None:
    """
    Check the CRC32 S3 reports for a stored object, when it reports one.

    :param response: S3's answer to the request that stored it.
    :param expected: The CRC32 of the bytes sent, base64.
    :param key: The object key, for the message.
    :raises ChecksumMismatchError: If S3 reports another CRC32.
    """
    stored = response.get("ChecksumCRC32")
    if stored is not None and stored != expected:
        raise ChecksumMismatchError(f"s3 stored {key} with CRC32 {stored}, expected {expected}")
