"""The exceptions a sink raises besides botocore's ``ClientError``."""

from __future__ import annotations

__all__ = [
    "ChecksumMismatchError",
    "FeatureEncodingError",
    "InvalidAssumedRoleException",
    "ObjectExistsError",
    "SinkError",
]


class SinkError(Exception):
    """Base class of the errors specific to this library."""


class InvalidAssumedRoleException(SinkError):
    """The role given as ``assumed_role`` cannot be assumed."""

    def __init__(self, role_arn: str, reason: str) -> None:
        """
        :param role_arn: The ARN of the role that could not be assumed.
        :param reason: Why, without any credential.
        """
        super().__init__(f"cannot assume role {role_arn}: {reason}")
        self.role_arn = role_arn


class ChecksumMismatchError(SinkError):
    """S3 reported a checksum for the stored object other than the one computed from its bytes."""


class FeatureEncodingError(TypeError):
    """
    A feature cannot be written as valid GeoJSON: not a Feature, a value JSON cannot represent, a non-finite
    coordinate, colliding keys; nothing of its collection is stored.
    """

    def __init__(self, index: int, reason: str) -> None:
        """
        :param index: The position of the feature in the collection, from 0.
        :param reason: What about it cannot be written, and what to do.
        """
        super().__init__(f"feature {index} cannot be encoded as GeoJSON: {reason}")
        self.index = index


class ObjectExistsError(SinkError):
    """
    A write with ``overwrite=False`` found an object with its key: the existing object is untouched, and nothing of
    the write is stored (no multipart upload is left either).
    """

    def __init__(self, bucket: str, key: str) -> None:
        """
        :param bucket: The bucket.
        :param key: The key that already has an object.
        """
        super().__init__(f"s3://{bucket}/{key} already exists, and the write was made with overwrite=False")
        self.bucket = bucket
        self.key = key
