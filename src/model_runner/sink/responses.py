"""What botocore's answers and errors say, read in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from botocore.exceptions import ClientError

__all__ = ["error_code", "retry_attempts"]


def error_code(error: BaseException) -> str | None:
    """
    The error code AWS answered with.

    :param error: Any failure.
    :return: E.g. ``"NoSuchUpload"`` for a ``ClientError``; `None` for any other failure, or an answer with no code.
    """
    if not isinstance(error, ClientError):
        return None
    code = error.response.get("Error", {}).get("Code")
    return str(code) if code else None


def retry_attempts(response: Mapping[str, Any]) -> int:
    """
    How many times botocore retried a request before this answer.

    :param response: A parsed answer, or a ``ClientError``'s ``response``.
    :return: The retries, 0 when none are reported.
    """
    return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0))
