"""The tuning and object options of a sink, in one typed record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MiB", "SinkSettings"]

MiB = 1024 * 1024
# S3's multipart limits: every part but the last is at least 5 MiB, no part exceeds 5 GiB.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * 1024 * MiB

ServerSideEncryption = Literal["AES256", "aws:kms", "aws:kms:dsse"]


@dataclass(frozen=True)
class SinkSettings:
    """
    How a sink encodes and uploads, and the options of the objects it writes.

    The defaults suit both a service writing many small collections and a backfill writing huge ones.

    :param part_size: Size of a multipart part in bytes (at least 5 MiB); grown automatically for objects so
        large that they would otherwise need more than 10,000 parts.
    :param multipart_threshold: A collection whose encoding reaches this many bytes is uploaded in parts.
    :param max_parts_in_flight: Parts of one write uploading at once.
    :param max_bytes_in_flight: Bytes of request bodies held at once by all the writes of sinks that share a client
        (sinks configured alike, on one event loop): with the part size, what bounds memory under load.
    :param max_pool_connections: HTTP connections the sink's S3 client keeps open.
    :param max_worker_threads: Worker threads encoding and sealing bodies at once for the sinks that share a client.
        orjson holds the GIL, so more threads only make the event loop wait longer for it.
    :param encode_batch_features: Features in the first batch given to orjson; later batches adapt.
    :param encode_call_seconds: Target duration of one orjson call. orjson holds the GIL for a whole call, so
        this bounds how long the event loop can wait on the encoder.
    :param acl: Canned ACL of written objects, or `None` for the bucket's default.
    :param content_type: Content type of written objects.
    :param storage_class: S3 storage class, or `None` for the bucket's default.
    :param server_side_encryption: `"AES256"` (SSE-S3), `"aws:kms"` or `"aws:kms:dsse"`, or `None`.
    :param sse_kms_key_id: KMS key for `"aws:kms"` encryption.
    :param expected_bucket_owner: Account id every request requires the bucket to belong to.
    :param max_attempts: Attempts per request, or `None` for ``AWS_MAX_ATTEMPTS`` or botocore's default.
    :param retry_mode: botocore retry mode, or `None` for ``AWS_RETRY_MODE``, else `"standard"`.
    :param role_session_name: Session name of assumed roles.
    :param role_duration_seconds: Lifetime of assumed-role credentials, 900 to 43,200 seconds.
    :param credential_refresh_seconds: Assumed-role credentials are refreshed when fewer than this many seconds
        of their life remain, at most half of it; `None` (the default) for the lesser of 600 s and a quarter of
        ``role_duration_seconds``. The first write to come refreshes them up to 300 s (at most a quarter of their
        life) earlier, while the others carry on.
    """

    part_size: int = 8 * MiB
    multipart_threshold: int = 8 * MiB
    max_parts_in_flight: int = 6
    max_bytes_in_flight: int = 256 * MiB
    max_pool_connections: int = 32
    max_worker_threads: int = 2
    encode_batch_features: int = 1000
    encode_call_seconds: float = 0.001
    acl: str | None = "bucket-owner-full-control"
    content_type: str = "application/geo+json"
    storage_class: str | None = None
    server_side_encryption: ServerSideEncryption | None = None
    sse_kms_key_id: str | None = None
    expected_bucket_owner: str | None = None
    max_attempts: int | None = None
    retry_mode: Literal["standard", "adaptive", "legacy"] | None = None
    role_session_name: str = "model-runner-sink"
    role_duration_seconds: int = 3600
    credential_refresh_seconds: int | None = None

    def __post_init__(self) -> None:
        if not MIN_PART_SIZE <= self.part_size <= MAX_PART_SIZE:
            raise ValueError(f"part_size must be between 5 MiB and 5 GiB, not {self.part_size}")
        if self.multipart_threshold < 1:
            raise ValueError("multipart_threshold must be positive")
        for name in (
            "max_parts_in_flight",
            "max_bytes_in_flight",
            "max_pool_connections",
            "max_worker_threads",
            "encode_batch_features",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.encode_call_seconds <= 0:
            raise ValueError("encode_call_seconds must be positive")
        if self.sse_kms_key_id is not None and self.server_side_encryption not in ("aws:kms", "aws:kms:dsse"):
            raise ValueError("sse_kms_key_id needs server_side_encryption='aws:kms' or 'aws:kms:dsse'")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 900 <= self.role_duration_seconds <= 43200:
            raise ValueError("role_duration_seconds must be between 900 and 43200")
        refresh = self.credential_refresh_seconds
        # Beyond half their life, the earlier advisory window would cover most or all of it: AssumeRole on every write.
        if refresh is not None and not 0 <= 2 * refresh <= self.role_duration_seconds:
            raise ValueError(
                f"credential_refresh_seconds must be between 0 and half of role_duration_seconds "
                f"({self.role_duration_seconds // 2}), not {refresh}"
            )

    def object_arguments(self) -> dict[str, str]:
        """
        The arguments that ``PutObject`` and ``CreateMultipartUpload`` share.

        :return: Request arguments for the options that are set.
        """
        arguments = {"ContentType": self.content_type}
        optional = {
            "ACL": self.acl,
            "StorageClass": self.storage_class,
            "ServerSideEncryption": self.server_side_encryption,
            "SSEKMSKeyId": self.sse_kms_key_id,
        }
        arguments.update({name: value for name, value in optional.items() if value is not None})
        arguments.update(self.bucket_arguments())
        return arguments

    def bucket_arguments(self) -> dict[str, Any]:
        """
        The arguments every request on the bucket carries.

        :return: ``ExpectedBucketOwner`` when set, else nothing.
        """
        if self.expected_bucket_owner is None:
            return {}
        return {"ExpectedBucketOwner": self.expected_bucket_owner}
