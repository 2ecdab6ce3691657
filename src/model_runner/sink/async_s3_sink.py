"""AsyncS3Sink: write a feature collection to S3 from asyncio, without stalling the event loop."""

from __future__ import annotations

import posixpath
import re
import time
from collections.abc import Callable, Mapping
from contextlib import aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeAlias, TypedDict

import anyio
from botocore.exceptions import ClientError

from model_runner.api import SinkMode, SinkType
from model_runner.sink.clients import CLOSE_WAIT_SECONDS, ClientOptions, InFlight, SharedClient, shared_client
from model_runner.sink.encoding import (
    SUFFIXES,
    EncodedBatch,
    EncodingStats,
    Features,
    FeatureSource,
    OutputFormat,
    check_features,
    check_members,
    encode_batch,
    encode_collection,
)
from model_runner.sink.exceptions import FeatureEncodingError, ObjectExistsError, SinkError
from model_runner.sink.logs import logger
from model_runner.sink.metrics import SinkMetrics, error_type
from model_runner.sink.responses import error_code, retry_attempts
from model_runner.sink.results import WriteResult
from model_runner.sink.settings import ClientSettings, SinkSettings, resolve_client_settings
from model_runner.sink.sink import AsyncSink
from model_runner.sink.upload import upload_object
from model_runner.sink.upload.conditional import check_overwrite
from model_runner.sink.writer import AsyncSinkWriter

if TYPE_CHECKING:
    import aioboto3

__all__ = ["AsyncS3Sink", "ProgressCallback", "object_key"]

ProgressCallback: TypeAlias = Callable[[int, int], object]
"""Called with ``(bytes_done, features_done)`` as a write advances."""

# What botocore accepts as a bucket name (legacy names included); the rest is left to S3 to judge.
_BUCKET_NAME = re.compile(r"^[a-zA-Z0-9.\-_]{3,255}$")
_MAX_KEY_BYTES = 1024
# The shortest name an image can add to the prefix: one character and the longest suffix, ".geojsonl".
_SHORTEST_NAME_BYTES = len("x" + max(SUFFIXES.values(), key=len))
# Answers that mean the bucket cannot be written at all: the seed reports them as False, not as an exception.
_UNUSABLE_BUCKET_CODES = frozenset({"NoSuchBucket", "404", "NotFound", "AccessDenied", "403", "Forbidden"})


def object_key(prefix: str, image_id: str, output_format: OutputFormat = "geojson") -> str:
    """
    The key of an image's collection, as the seed derives it: the image id's last path segment, under the prefix.

    :param prefix: The prefix within the bucket.
    :param image_id: The image's identifier; only its last ``/``-separated segment is used.
    :param output_format: The object's format, which names its suffix.
    :return: ``prefix/<last segment>.geojson``, or ``.geojsonl`` for ``"geojsonseq"``.
    :raises ValueError: If the image id has no last segment, e.g. ``""`` or ``"a/b/"``.
    """
    if not isinstance(image_id, str):
        raise TypeError(f"image_id must be a str, not {type(image_id).__name__}")
    name = image_id.split("/")[-1]
    if not name:
        raise ValueError(f"image_id {image_id!r} has no file name to derive an object key from")
    key = posixpath.join(prefix, name + SUFFIXES[output_format])
    if _utf8_length(key, "image_id") > _MAX_KEY_BYTES:
        raise ValueError(f"object key for image_id {image_id!r} is longer than S3's 1,024 bytes")
    return key


def _utf8_length(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} {text!r} cannot be an S3 key: it is not valid Unicode ({error.reason})") from None


class _EncoderOptions(TypedDict):
    """How a sink's writes and writers encode: the same for both."""

    batch_features: int
    call_seconds: float
    limiter: anyio.CapacityLimiter
    output_format: OutputFormat
    batches_per_trip: int


def _split_collection(source: FeatureSource) -> tuple[Features, dict[str, Any]]:
    """A collection's features and its other members; features alone have none."""
    if not isinstance(source, Mapping):
        check_features(source)
        return source, {}
    kind = source.get("type")
    if not (isinstance(kind, str) and kind == "FeatureCollection"):
        check_features(source)  # refuses any other mapping, with its hint
    if "features" not in source:
        raise TypeError('a FeatureCollection holds its features in "features", and this one has none')
    features = source["features"]
    check_features(features)
    return features, {name: value for name, value in source.items() if name not in ("type", "features")}


def _check_session(session: object) -> None:
    if session is None:
        return
    # Imported when used: boto3 and aioboto3 cost an import the sinks do not need otherwise.
    import aioboto3

    if not isinstance(session, aioboto3.Session):
        raise TypeError(f"session must be an aioboto3.Session, not {type(session).__name__}")


def _is_unusable_bucket_error(error: ClientError) -> bool:
    """
    Tell whether S3 refused a request because the bucket is missing or forbidden.

    :param error: The error.
    :return: `True` for a missing or forbidden bucket.
    """
    return error_code(error) in _UNUSABLE_BUCKET_CODES


class AsyncS3Sink(AsyncSink):
    """
    Writes each image's features to S3 as one GeoJSON FeatureCollection, from asyncio.

    A write is atomic: the object appears whole or not at all, and a failed or cancelled write leaves no
    multipart upload behind. Features are serialised in worker threads in small batches and large collections
    are streamed in parts, so the event loop keeps running and memory stays bounded however large the collection.
    Constructing a sink does no network I/O; its S3 client is created on first use and reused.

    :param bucket: The name of the S3 bucket.
    :param prefix: The prefix within the bucket where the files will be stored.
    :param assumed_role: Optional IAM role ARN to assume for accessing the bucket.
    :param settings: How each write encodes and uploads, and the options of the objects it writes.
    :param client: What decides the S3 client: endpoints, region, retries, connections, the byte budget, the worker
        threads and the role session. Sinks with equal client settings (and role and session) share one
        client whatever their ``settings``.
    :param session: An ``aioboto3.Session`` whose credentials, profile and region the sink uses (the region of
        ``client`` comes first); ``assumed_role`` is then assumed with its credentials. By default the standard
        configuration.
    :param metrics: Hooks told of every write, part and retry, e.g.
        :class:`~model_runner.sink.metrics.OpenTelemetryMetrics`; none by default.
    :param deprecated: ``endpoint_url``, ``sts_endpoint_url``, ``region_name``, ``client_config`` and ``clock``,
        deprecated: they are fields of ``client``.
    :raises TypeError: If a deprecated keyword is also given in ``client``, or a keyword is unknown.
    """

    # Feature batches encoded per trip to a worker thread. The caller's loop runs the write and takes the GIL back at
    # the end of each trip; longer trips kept it waiting longer (100k features, median worst stall of 10 writes:
    # 8.4 ms with one batch a trip, 11.5 ms with trips of ~1 MB, 19.2 ms with trips of ~4 MB).
    _batches_per_trip = 1

    def __init__(
        self,
        bucket: str,
        prefix: str,
        assumed_role: str | None = None,
        *,
        settings: SinkSettings | None = None,
        client: ClientSettings | None = None,
        session: aioboto3.Session | None = None,
        metrics: SinkMetrics | None = None,
        **deprecated: Any,
    ) -> None:
        if not isinstance(bucket, str) or not _BUCKET_NAME.match(bucket):
            raise ValueError(f"{bucket!r} is not a valid S3 bucket name")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        if _utf8_length(prefix, "prefix") + 1 + _SHORTEST_NAME_BYTES > _MAX_KEY_BYTES:
            raise ValueError("prefix leaves no room for a file name within S3's 1,024-byte keys")
        _check_session(session)
        self.bucket = bucket
        self.prefix = prefix
        self.assumed_role = assumed_role
        self.settings = settings or SinkSettings()
        self.client = resolve_client_settings(client, self.settings, deprecated, stacklevel=2)
        self.session = session
        self._client_options = ClientOptions(client=self.client, assumed_role=assumed_role, session=session)
        self._bucket_identity = (bucket, self.settings.expected_bucket_owner)
        self._metrics = metrics
        self._writes = InFlight()

    def __repr__(self) -> str:
        return f"AsyncS3Sink(bucket={self.bucket!r}, prefix={self.prefix!r}, assumed_role={self.assumed_role!r})"

    @staticmethod
    def name() -> str:
        """
        Retrieve the name of the sink type.

        :return: The string representation of the sink type.
        """
        return str(SinkType.S3.value)

    @property
    def mode(self) -> SinkMode:
        """
        The mode of the sink, which is aggregate.

        :return: The `SinkMode` enumeration value representing the aggregate mode.
        """
        return SinkMode.AGGREGATE

    def object_key(self, image_id: str) -> str:
        """
        The key an image's collection is written to.

        :param image_id: The identifier of the image.
        :return: ``prefix/<last segment of image_id>.geojson``, or ``.geojsonl`` for ``"geojsonseq"``.
        :raises ValueError: If the image id has no last segment.
        """
        return object_key(self.prefix, image_id, self.settings.output_format)

    async def __aenter__(self) -> AsyncS3Sink:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """
        Wait for this sink's writes still running on this event loop to end, their aborts included, for at most
        ``CLOSE_WAIT_SECONDS``; a write that outlasts it goes on, and is logged.

        The sink holds no connection between writes: the S3 client it shares with sinks configured alike closes
        once unused for an hour, or when the event loop ends (see
        :func:`~model_runner.sink.clients.close_shared_clients` for a loop that is closed without
        ``asyncio.run``).
        """
        running = await self._writes.wait(CLOSE_WAIT_SECONDS)
        if running:
            logger.warning("%r closed with %d write(s) still running after %.0f s", self, running, CLOSE_WAIT_SECONDS)

    async def write(
        self,
        image_id: str,
        features: FeatureSource,
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        overwrite: bool = True,
    ) -> bool:
        """
        Write the features of one image to S3 as a GeoJSON FeatureCollection.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param features: GeoJSON features (``geojson.Feature`` objects or dicts): a list, any iterable, or an
            async iterable; or a whole collection (a ``geojson.FeatureCollection`` or a dict whose ``type`` is
            ``"FeatureCollection"``), whose other members (``bbox``...) are written too.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param on_progress: Called with ``(bytes_done, features_done)`` as parts are stored; see
            :meth:`write_with_result`.
        :param overwrite: Whether an existing object with the key may be replaced; see :meth:`write_with_result`.
        :return: `True` if the object was stored, `False` if the bucket does not exist or is forbidden.
        :raises ClientError: If S3 refuses the upload for another reason, after retries.
        :raises ObjectExistsError: If ``overwrite`` is false and an object has the key; nothing is stored.
        :raises FeatureEncodingError: If a feature cannot be serialised; nothing is stored.
        :raises InvalidAssumedRoleException: If ``assumed_role`` cannot be assumed.
        :raises ValueError: If the image id has no file name, or the output format is a text sequence and a
            collection has members other than its features.
        :raises TypeError: If ``features`` is neither features nor a FeatureCollection.
        """
        try:
            await self.write_with_result(
                image_id, features, metadata=metadata, on_progress=on_progress, overwrite=overwrite
            )
        except ClientError as error:
            if not _is_unusable_bucket_error(error):
                raise
            return False  # already logged at error level by write_with_result
        return True

    async def write_with_result(
        self,
        image_id: str,
        features: FeatureSource,
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        overwrite: bool = True,
    ) -> WriteResult:
        """
        Write the features of one image, and tell what the write did.

        ``on_progress`` serves progress bars: it is called on the event loop thread after each part S3 stores
        and once more when the object is stored, with the bytes stored so far and the features those bytes hold;
        both only grow, and the last call gives the result's ``bytes`` and ``features``. An exception it raises
        fails the write, which then stores nothing; one raised by the last call, once the object is stored, is
        logged and ignored.

        With ``overwrite=False`` the object is stored only if no object has its key: the request that stores it
        (``PutObject``, or ``CompleteMultipartUpload``) is conditional (``If-None-Match: *``), so of writers racing
        for a key exactly one wins. The others get :class:`ObjectExistsError`; the existing object is untouched and
        their multipart upload aborted. A request S3 applied whose answer was lost, retried, is recognised as this
        write's own by the size and checksum of the object, and succeeds.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param features: GeoJSON features: a list, any iterable, or an async iterable; or a whole collection, as
            for :meth:`write`.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param on_progress: Called with ``(bytes_done, features_done)`` as the write advances.
        :param overwrite: Whether an existing object with the key may be replaced (the default, as the seed does).
        :return: The stored object's key, size, checksum and costs.
        :raises ClientError: If S3 refuses the upload, after retries, a missing bucket included.
        :raises ObjectExistsError: If ``overwrite`` is false and an object has the key; nothing is stored.
        :raises TypeError: If ``overwrite`` is not a bool.
        :raises FeatureEncodingError: If a feature cannot be serialised; nothing is stored.
        :raises InvalidAssumedRoleException: If ``assumed_role`` cannot be assumed.
        :raises ValueError: If the output format is a text sequence and a collection has members other than its
            features; nothing is stored.
        """
        key = self.object_key(image_id)
        features, members = _split_collection(features)
        check_members(members, self.settings.output_format)
        check_overwrite(overwrite)
        watch = _WriteWatch(self.bucket, key, on_progress, self._metrics)
        watch.started()
        try:
            async with self._writes.track():
                result = await self._write(key, features, members, metadata, watch, overwrite)
        except BaseException as error:
            watch.failed(error)
            raise
        watch.finished(result)
        return result

    async def _write(
        self,
        key: str,
        features: Features,
        members: Mapping[str, Any],
        metadata: Mapping[str, str] | None,
        watch: _WriteWatch,
        overwrite: bool,
    ) -> WriteResult:
        async with shared_client(self._client_options) as shared:
            await self._check_bucket_once(shared)
            chunks = encode_collection(features, stats=watch.stats, members=members, **self._encoder_options(shared))
            async with aclosing(chunks):
                outcome = await upload_object(
                    shared,
                    self.bucket,
                    key,
                    chunks,
                    self.settings,
                    metadata=dict(metadata) if metadata else None,
                    events=watch,
                    overwrite=overwrite,
                )
        return WriteResult(
            bucket=self.bucket,
            key=key,
            bytes=outcome.bytes,
            features=watch.stats.features,
            parts=outcome.parts,
            retries=outcome.retries,
            seconds=watch.elapsed(),
            encode_seconds=watch.stats.seconds,
            upload_seconds=outcome.seconds,
            checksum=outcome.checksum,
            etag=outcome.etag,
            version_id=outcome.version_id,
        )

    def open(
        self, image_id: str, *, metadata: Mapping[str, str] | None = None, overwrite: bool = True
    ) -> AsyncSinkWriter:
        """
        A writer for one image's object, to add features to a batch at a time while they are produced, from any
        number of tasks: ``async with sink.open(image_id) as writer: await writer.add(features)``.

        The features stream in as they are added, parts uploaded as they fill, but the object still appears whole
        when the block ends normally, or not at all: an exception or a cancellation inside the block, or a batch
        that fails to encode or upload, stores nothing. The sink's ``mode`` stays aggregate.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param overwrite: Whether an existing object with the key may be replaced; see :meth:`write_with_result`.
        :return: The writer, to use as an async context manager; see
            :class:`~model_runner.sink.writer.AsyncSinkWriter`.
        :raises ValueError: If the image id has no file name.
        :raises TypeError: If ``overwrite`` is not a bool.
        """
        return AsyncSinkWriter(self, image_id, metadata, overwrite)

    async def _encode_batch(self, features: Features, first_index: int) -> list[EncodedBatch]:
        # For this sink's writers: a batch encoded as its writes encode, within its client's worker threads.
        async with shared_client(self._client_options) as shared:
            return await encode_batch(features, first_index, **self._encoder_options(shared))

    def _encoder_options(self, shared: SharedClient) -> _EncoderOptions:
        settings = self.settings
        return _EncoderOptions(
            batch_features=settings.encode_batch_features,
            call_seconds=settings.encode_call_seconds,
            limiter=shared.limiter,
            output_format=settings.output_format,
            batches_per_trip=self._batches_per_trip,
        )

    async def object_metadata(self, image_id: str) -> dict[str, str] | None:
        """
        The user metadata of an image's stored object, from one ``HeadObject``: what a resumed job compares.

        :param image_id: The identifier of the image.
        :return: The object's metadata (keys lower-cased by S3), or `None` if there is no such object.
        :raises ClientError: If S3 refuses the request for another reason than a missing object.
        :raises InvalidAssumedRoleException: If ``assumed_role`` cannot be assumed.
        """
        key = self.object_key(image_id)
        async with shared_client(self._client_options) as shared:
            try:
                head = await shared.client.head_object(Bucket=self.bucket, Key=key, **self.settings.bucket_arguments())
            except ClientError as error:
                if error_code(error) in {"404", "NoSuchKey", "NotFound"}:
                    return None
                raise
        return dict(head.get("Metadata", {}))

    async def validate_s3_bucket(self) -> bool:
        """
        Check if the output S3 bucket exists and can be read/written to.

        :return: `True` if the bucket exists and can be accessed, `False` otherwise.
        :raises ClientError: If there are issues accessing the S3 bucket other than its absence or a denial.
        :raises InvalidAssumedRoleException: If ``assumed_role`` cannot be assumed.
        """
        async with shared_client(self._client_options) as shared:
            try:
                await shared.client.head_bucket(Bucket=self.bucket, **self.settings.bucket_arguments())
            except ClientError as error:
                if not _is_unusable_bucket_error(error):
                    raise
                logger.error("bucket %s does not exist or cannot be accessed: %s", self.bucket, error)
                return False
            shared.checked_buckets.add(self._bucket_identity)
        return True

    async def _check_bucket_once(self, shared: SharedClient) -> None:
        if self._bucket_identity not in shared.checked_buckets:
            # Once per client, not per write as the seed did: later failures surface from the upload itself.
            await shared.client.head_bucket(Bucket=self.bucket, **self.settings.bucket_arguments())
            shared.checked_buckets.add(self._bucket_identity)


class _WriteWatch:
    """One write seen from outside: its clock, its progress callback, its metrics hooks and its log lines."""

    def __init__(
        self, bucket: str, key: str, on_progress: ProgressCallback | None, metrics: SinkMetrics | None
    ) -> None:
        self.bucket = bucket
        self.key = key
        self.stats = EncodingStats(marks=[] if on_progress is not None else None)
        self._on_progress = on_progress
        # The base class's hooks do nothing: no metrics is one more listener, not a special case.
        self._metrics = metrics or SinkMetrics()
        self._started = time.perf_counter()
        self._bytes_done = 0
        self._features_done = 0
        self._next_mark = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def started(self) -> None:
        self._tell(self._metrics.write_started, self.bucket, self.key)

    def part_stored(self, number: int, size: int) -> None:
        self._tell(self._metrics.part_uploaded, self.bucket, self.key, number, size)
        marks = self.stats.marks
        if self._on_progress is None or marks is None:
            return
        self._bytes_done += size
        # Parts are stored out of order, so this counts the features within as many bytes as are stored.
        while self._next_mark < len(marks) and marks[self._next_mark][0] <= self._bytes_done:
            self._features_done = marks[self._next_mark][1]
            self._next_mark += 1
        self._on_progress(self._bytes_done, self._features_done)

    def retried(self, operation: str, retries: int) -> None:
        self._tell(self._metrics.request_retried, self.bucket, self.key, operation, retries)

    def finished(self, result: WriteResult) -> None:
        if self._on_progress is not None:
            try:
                self._on_progress(result.bytes, result.features)
            except Exception:
                # The object is stored: a progress bar failing now must not make the write look failed.
                logger.warning("on_progress failed after s3://%s/%s was stored", self.bucket, self.key, exc_info=True)
        logger.debug(
            "wrote s3://%s/%s: %d bytes, %d features in %.3f s",
            result.bucket,
            result.key,
            result.bytes,
            result.features,
            result.seconds,
            extra={
                "bucket": result.bucket,
                "key": result.key,
                "bytes": result.bytes,
                "features": result.features,
                "parts": result.parts,
                "retries": result.retries,
                "seconds": result.seconds,
            },
        )
        self._tell(self._metrics.write_finished, result)

    def failed(self, error: BaseException) -> None:
        seconds = self.elapsed()
        extra: dict[str, Any] = {
            "bucket": self.bucket,
            "key": self.key,
            "features": self.stats.features,
            "seconds": seconds,
            "error_type": error_type(error),
        }
        if isinstance(error, anyio.get_cancelled_exc_class()):
            logger.info("write of s3://%s/%s cancelled after %.3f s", self.bucket, self.key, seconds, extra=extra)
        elif isinstance(error, ObjectExistsError):
            # What the caller asked for (overwrite=False), not a failure of the sink.
            logger.info("write of s3://%s/%s refused: the object exists", self.bucket, self.key, extra=extra)
        elif isinstance(error, ClientError):
            response: Mapping[str, Any] = error.response
            extra["error_code"] = error_code(error)
            extra["request_id"] = response.get("ResponseMetadata", {}).get("RequestId")
            extra["operation"] = error.operation_name
            extra["retries"] = retry_attempts(response)
            if extra["retries"]:
                self._tell(self._metrics.request_retried, self.bucket, self.key, error.operation_name, extra["retries"])
            logger.error(
                "write of s3://%s/%s failed: %s on %s, request id %s",
                self.bucket,
                self.key,
                extra["error_code"],
                extra["operation"],
                extra["request_id"],
                extra=extra,
            )
        else:
            # Our own errors' messages name a feature index or a role, never a feature's contents or a secret;
            # of any other error, only its type is logged.
            ours = isinstance(error, (SinkError, FeatureEncodingError))
            reason = f"{error_type(error)}: {error}" if ours else error_type(error)
            logger.error("write of s3://%s/%s failed: %s", self.bucket, self.key, reason, extra=extra)
        self._tell(self._metrics.write_failed, self.bucket, self.key, error, seconds)

    @staticmethod
    def _tell(hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            # Metrics must never cost a write.
            logger.warning("metrics hook %s failed", hook.__name__, exc_info=True)
