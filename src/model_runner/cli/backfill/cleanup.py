"""
The cleanup of the multipart uploads that a backfill writer killed mid-write (a Dask worker that died) could not
abort itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import anyio
from botocore.exceptions import BotoCoreError, ClientError

from model_runner.cli.backfill.writes import Target
from model_runner.sink import SinkSettings
from model_runner.sink.clients import ClientOptions, shared_client
from model_runner.sink.responses import error_code

__all__ = ["abort_uploads"]

# Listings at once when aborting what a killed writer left: S3 answers each in tens of milliseconds.
ABORT_CONCURRENCY = 16


async def _abort_key(client: Any, bucket: str, key: str, bucket_arguments: dict[str, str], problems: list[str]) -> None:
    """
    Abort every multipart upload in progress for exactly one key.

    :param client: An S3 client.
    :param bucket: The bucket.
    :param key: The key; a listing by prefix also gives longer keys, which are left alone.
    :param bucket_arguments: Extra arguments of every request (the expected bucket owner).
    :param problems: Where what could not be listed or aborted is told.
    """
    try:
        async for page in client.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=key, **bucket_arguments
        ):
            for upload in page.get("Uploads", []):
                if upload.get("Key") != key:
                    continue
                try:
                    await client.abort_multipart_upload(
                        Bucket=bucket, Key=key, UploadId=upload["UploadId"], **bucket_arguments
                    )
                except ClientError as error:
                    if error_code(error) != "NoSuchUpload":  # aborted or completed meanwhile
                        problems.append(f"multipart upload {upload['UploadId']} of {key} left in progress: {error}")
    except (ClientError, BotoCoreError) as error:
        problems.append(f"cannot list the multipart uploads of {key}: {error}")


async def abort_uploads(target: Target, keys: Iterable[str]) -> list[str]:
    """
    Abort the multipart uploads in progress under some keys: those a writer killed mid-write left behind.

    Only call it when nothing of this job writes these keys any more: an upload in flight would be aborted too.

    :param target: The bucket, and the role to assume.
    :param keys: The exact keys; each is listed with ``ListMultipartUploads`` (the key as prefix).
    :return: What could not be listed or aborted, one line each; empty when every upload found was aborted.
    :raises InvalidAssumedRoleException: If the role cannot be assumed.
    """
    settings = SinkSettings()
    problems: list[str] = []
    limiter = anyio.CapacityLimiter(ABORT_CONCURRENCY)

    async def abort(client: Any, key: str) -> None:
        async with limiter:
            await _abort_key(client, target.bucket, key, settings.bucket_arguments(), problems)

    options = ClientOptions(assumed_role=target.role)
    async with shared_client(options) as shared, anyio.create_task_group() as group:
        for key in dict.fromkeys(keys):
            group.start_soon(abort, shared.client, key)
    return problems
