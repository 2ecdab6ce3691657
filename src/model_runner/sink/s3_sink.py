"""S3Sink: the seed's documented synchronous sink, a thin shell over
:class:`~model_runner.sink.async_s3_sink.AsyncS3Sink`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from model_runner.api import SinkMode
from model_runner.sink import logs
from model_runner.sink.async_s3_sink import AsyncS3Sink, ProgressCallback
from model_runner.sink.encoding import Collection, Feature
from model_runner.sink.loop_thread import call_fed, checked_timeout, pulled_by_caller, shared_loop
from model_runner.sink.metrics import SinkMetrics
from model_runner.sink.results import WriteResult
from model_runner.sink.settings import ClientSettings, SinkSettings, resolve_client_settings
from model_runner.sink.sink import Sink
from model_runner.sink.upload.conditional import check_overwrite
from model_runner.sink.writer import SinkWriter

if TYPE_CHECKING:
    import aioboto3

__all__ = ["S3Sink", "logger"]

logger = logs.logger
"""Where both sinks log, as the seed did: each failed write at error level, each stored object at debug level."""

T = TypeVar("T")

# The private loop thread already runs the request path beside the caller's threads: with one worker thread
# encoding and sealing, the caller's loop thread queues behind one busy thread fewer for the GIL and the cores
# (to_thread(write, 100k features) on 2 cores, worst stall over 44 writes of each: median 10.9 ms against 12.9 ms
# with two, lower in 58% of pairs).
FACADE_WORKER_THREADS = 1
# The private loop and the worker thread hand the GIL to each other at every trip of the encoder, and the caller's
# loop, waiting for the GIL in a third thread, waits through those hand-overs: four batches a trip, the GIL released
# between them (the same measure: 12.0 ms against 13.9 ms with one batch a trip, lower in 55% of pairs; 16.2
# against 26.2 ms in 10 paired writes in one process).
FACADE_BATCHES_PER_TRIP = 4


class _PrivateLoopSink(AsyncS3Sink):
    """The sink behind :class:`S3Sink`: its writes run on the private loop, beside the caller's threads."""

    _batches_per_trip = FACADE_BATCHES_PER_TRIP


class S3Sink(Sink):
    """
    A sink for writing aggregated GeoJSON feature collections to an S3 bucket.

    This class handles uploading GeoJSON data to a specified S3 bucket, optionally using an
    assumed IAM role for accessing the bucket. Writes run on one private event loop shared by every
    ``S3Sink`` in the process, so a sink can be used from plain scripts, from many threads at once and from
    code running inside another event loop; a process that used it exits by itself. A call blocks its thread until
    its write has ended: Ctrl-C, a ``timeout=`` running out or the interpreter exiting cancel the write, which
    aborts its upload before the call raises.

    :param bucket: The name of the S3 bucket.
    :param prefix: The prefix within the bucket where the files will be stored.
    :param assumed_role: Optional IAM role ARN to assume for accessing the bucket.
    :param settings: How each write encodes and uploads, and the options of the objects it writes.
    :param client: What decides the S3 client (endpoints, region, retries, connections, byte budget, worker
        threads, role session); see :class:`~model_runner.sink.settings.ClientSettings`. By default one worker
        thread rather than two: the private loop thread is busy beside them.
    :param session: An ``aioboto3.Session`` whose credentials, profile and region the sink uses; by default the
        standard configuration.
    :param metrics: Hooks told of every write, part and retry; called on the sink's private loop thread.
    :param deprecated: ``endpoint_url``, ``sts_endpoint_url``, ``region_name``, ``client_config`` and ``clock``,
        deprecated: they are fields of ``client``.
    :raises TypeError: If a deprecated keyword is also given in ``client``, or a keyword is unknown.
    """

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
        # Resolved here rather than by AsyncS3Sink, so that a deprecation warning names this constructor's caller.
        given = client
        client = resolve_client_settings(client, settings or SinkSettings(), deprecated, stacklevel=2)
        if given is None and (settings is None or settings.max_worker_threads is None):
            client = replace(client, max_worker_threads=FACADE_WORKER_THREADS)
        self._sink = _PrivateLoopSink(
            bucket,
            prefix,
            assumed_role,
            settings=settings,
            client=client,
            session=session,
            metrics=metrics,
        )

    def __repr__(self) -> str:
        return f"S3Sink(bucket={self.bucket!r}, prefix={self.prefix!r}, assumed_role={self.assumed_role!r})"

    def __enter__(self) -> S3Sink:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    @property
    def bucket(self) -> str:
        """The name of the S3 bucket."""
        return self._sink.bucket

    @property
    def prefix(self) -> str:
        """The prefix within the bucket where the files will be stored."""
        return self._sink.prefix

    @property
    def assumed_role(self) -> str | None:
        """The IAM role ARN assumed for accessing the bucket, if any."""
        return self._sink.assumed_role

    @property
    def client(self) -> ClientSettings:
        """What decides the sink's S3 client."""
        return self._sink.client

    @property
    def session(self) -> aioboto3.Session | None:
        """The ``aioboto3.Session`` the sink was given, if any."""
        return self._sink.session

    @property
    def settings(self) -> SinkSettings:
        """How each write encodes and uploads, and the options of the objects it writes."""
        return self._sink.settings

    @staticmethod
    def name() -> str:
        """
        Retrieve the name of the sink type.

        :return: The string representation of the sink type.
        """
        return AsyncS3Sink.name()

    @property
    def mode(self) -> SinkMode:
        """
        The mode of the sink, which is aggregate.

        :return: The `SinkMode` enumeration value representing the aggregate mode.
        """
        return self._sink.mode

    def object_key(self, image_id: str) -> str:
        """
        The key an image's collection is written to.

        :param image_id: The identifier of the image.
        :return: ``prefix/<last segment of image_id>.geojson``, or ``.geojsonl`` for ``"geojsonseq"``.
        :raises ValueError: If the image id has no last segment.
        """
        return self._sink.object_key(image_id)

    def write(
        self,
        image_id: str,
        features: Iterable[Feature] | Collection,
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        overwrite: bool = True,
    ) -> bool:
        """
        Write aggregated GeoJSON feature collection to the S3 bucket.

        The features are streamed to the object derived from ``image_id``; the object appears whole or not at all.
        A plain iterable (a generator, a database cursor) is pulled and encoded on the calling thread, a few batches
        at a time as the upload takes them, so a source tied to its thread works; lists and tuples are taken as
        they are.

        The write is cancelled if it runs out of ``timeout``, or if the wait is interrupted (Ctrl-C): the call then
        waits, up to 60 s, for the write to abort its upload (a second Ctrl-C stops waiting), and raises. A write
        cancelled while S3 is already storing the object (its ``PutObject`` or ``CompleteMultipartUpload`` sent) may
        still be stored whole; the sink's log says which. A thread cannot be cancelled from outside:
        ``asyncio.to_thread(sink.write, ...)`` under an ``asyncio.timeout`` stops waiting but not the write, so pass
        ``timeout=`` or use :class:`~model_runner.sink.async_s3_sink.AsyncS3Sink` in asyncio code.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param features: A list (or any iterable) of GeoJSON features to be aggregated and written to S3, or a whole
            collection (a ``geojson.FeatureCollection`` or a dict whose ``type`` is ``"FeatureCollection"``), whose
            other members (``bbox``...) are written too.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param on_progress: Called with ``(bytes_done, features_done)`` as parts are stored, on the sink's loop
            thread.
        :param timeout: Seconds the write may take, features pulled included; `None` for no limit.
        :param overwrite: Whether an existing object with the key may be replaced; with `False`, the object is
            stored only if no object has its key (see :meth:`AsyncS3Sink.write_with_result
            <model_runner.sink.async_s3_sink.AsyncS3Sink.write_with_result>`).
        :return: `True` if the upload was successful, `False` otherwise.

        :raises ClientError: If there are errors while uploading the file to S3.
        :raises ObjectExistsError: If ``overwrite`` is false and an object has the key; nothing is stored.
        :raises TimeoutError: If the write did not finish within ``timeout``; it was cancelled.
        """
        check_overwrite(overwrite)
        write = partial(self._sink.write, overwrite=overwrite)
        return self._write(write, image_id, features, metadata, on_progress, timeout)

    def write_with_result(
        self,
        image_id: str,
        features: Iterable[Feature] | Collection,
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        overwrite: bool = True,
    ) -> WriteResult:
        """
        Write aggregated GeoJSON feature collection to the S3 bucket, and tell what the write did.

        Features are pulled, and the write cancelled, as by :meth:`write`.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param features: A list (or any iterable) of GeoJSON features, or a whole collection, as for :meth:`write`.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param on_progress: Called with ``(bytes_done, features_done)`` as parts are stored, on the sink's loop
            thread; the last call gives the result's ``bytes`` and ``features``.
        :param timeout: Seconds the write may take, features pulled included; `None` for no limit.
        :param overwrite: Whether an existing object with the key may be replaced, as for :meth:`write`.
        :return: The stored object's key, size, checksum and costs.
        :raises ClientError: If S3 refuses the upload, after retries, a missing bucket included.
        :raises ObjectExistsError: If ``overwrite`` is false and an object has the key; nothing is stored.
        :raises TimeoutError: If the write did not finish within ``timeout``; it was cancelled.
        """
        check_overwrite(overwrite)
        write = partial(self._sink.write_with_result, overwrite=overwrite)
        return self._write(write, image_id, features, metadata, on_progress, timeout)

    def open(self, image_id: str, *, metadata: Mapping[str, str] | None = None, overwrite: bool = True) -> SinkWriter:
        """
        A writer for one image's object, to add features to a batch at a time from any number of threads:
        ``with sink.open(image_id) as writer: writer.add(features)``. The object appears whole when the block ends
        normally, or not at all (an exception or Ctrl-C inside the block), as with :meth:`AsyncS3Sink.open
        <model_runner.sink.async_s3_sink.AsyncS3Sink.open>`.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param overwrite: Whether an existing object with the key may be replaced, as for :meth:`write`.
        :return: The writer, to use as a context manager; see :class:`~model_runner.sink.writer.SinkWriter`.
        :raises ValueError: If the image id has no file name.
        :raises TypeError: If ``overwrite`` is not a bool.
        """
        writer = self._sink.open(image_id, metadata=metadata, overwrite=overwrite)
        return SinkWriter(writer, f"writer of s3://{self.bucket}/{writer.key}")

    def validate_s3_bucket(self, *, timeout: float | None = None) -> bool:
        """
        Check if the output S3 bucket exists and can be read/written to.

        :param timeout: Seconds the check may take; `None` for no limit.
        :return: `True` if the bucket exists and can be accessed, `False` otherwise.

        :raises ClientError: If there are issues accessing the S3 bucket.
        :raises TimeoutError: If S3 did not answer within ``timeout``.
        """
        what = f"check of bucket {self.bucket}"
        return shared_loop().call(what, checked_timeout(timeout), self._sink.validate_s3_bucket)

    def object_metadata(self, image_id: str, *, timeout: float | None = None) -> dict[str, str] | None:
        """
        The user metadata of an image's stored object, from one ``HeadObject``: what a resumed job compares.

        :param image_id: The identifier of the image.
        :param timeout: Seconds the request may take; `None` for no limit.
        :return: The object's metadata (keys lower-cased by S3), or `None` if there is no such object.
        :raises ClientError: If S3 refuses the request for another reason than a missing object.
        :raises TimeoutError: If S3 did not answer within ``timeout``.
        """
        what = f"metadata of s3://{self.bucket}/{self.object_key(image_id)}"
        return shared_loop().call(what, checked_timeout(timeout), self._sink.object_metadata, image_id)

    def close(self) -> None:
        """
        Wait for this sink's writes still running (started from other threads) to end, their aborts included, for
        at most ``CLOSE_WAIT_SECONDS``; ``with`` calls it. No close is needed otherwise: the private loop closes
        its clients as the process exits.
        """
        shared_loop().call(f"close of {self!r}", None, self._sink.aclose)

    def _write(
        self,
        method: Callable[..., Awaitable[T]],
        image_id: str,
        features: Iterable[Feature] | Collection,
        metadata: Mapping[str, str] | None,
        on_progress: ProgressCallback | None,
        timeout: float | None,
    ) -> T:
        # A bad image id fails here, as it would on the loop, but before any feature is pulled.
        what = f"write of s3://{self.bucket}/{self._sink.object_key(image_id)}"
        write = partial(method, image_id, metadata=metadata, on_progress=on_progress)
        loop_thread = shared_loop()
        if pulled_by_caller(features):
            return call_fed(loop_thread, what, checked_timeout(timeout), write, features)
        return loop_thread.call(what, checked_timeout(timeout), write, features)
