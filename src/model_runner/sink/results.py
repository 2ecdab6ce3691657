"""What a write did, for services that account for it and harnesses that compare it."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["WriteResult"]


@dataclass(frozen=True)
class WriteResult:
    """
    One stored feature collection.

    :param bucket: The bucket written to.
    :param key: The object's key.
    :param bytes: Size of the object.
    :param features: Features in the collection.
    :param parts: Parts of its multipart upload, 0 for a single ``PutObject``.
    :param retries: Request attempts botocore retried while writing it.
    :param seconds: Duration of the whole write.
    :param encode_seconds: Time spent serialising features, in worker threads.
    :param upload_seconds: From the first S3 request for the object to S3's last answer; the upload overlaps
        the encoding, so this and ``encode_seconds`` may add up to more than ``seconds``.
    :param checksum: CRC32 of the object's bytes, base64, as S3 reports it (``FULL_OBJECT``, multipart or not): a
        download checks against ``zlib.crc32`` of its bytes.
    :param etag: The object's ETag.
    :param version_id: The object's version, when the bucket is versioned.
    """

    bucket: str
    key: str
    bytes: int
    features: int
    parts: int
    retries: int
    seconds: float
    encode_seconds: float
    upload_seconds: float
    checksum: str
    etag: str
    version_id: str | None = None

    @property
    def megabytes_per_second(self) -> float:
        """
        Throughput of the whole write.

        :return: Megabytes (10^6 bytes) stored per second of the write.
        """
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else 0.0
