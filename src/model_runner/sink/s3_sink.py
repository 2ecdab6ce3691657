"""S3Sink: the seed's documented synchronous sink, a thin shell over
:class:`~model_runner.sink.async_s3_sink.AsyncS3Sink`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal
from botocore.config import Config

from model_runner.api import SinkMode
from model_runner.sink.async_s3_sink import AsyncS3Sink, ProgressCallback
from model_runner.sink.metrics import SinkMetrics
from model_runner.sink.results import WriteResult
from model_runner.sink.settings import SinkSettings
from model_runner.sink.sink import Sink

__all__ = ["S3Sink", "logger"]

logger = logging.getLogger(__name__)
"""Where both sinks log, as the seed did: each failed write at error level, each stored object at debug level."""

T = TypeVar("T")

# Closing connections at exit must not hold the interpreter up if S3 is unreachable.
_EXIT_CLOSE_SECONDS = 5.0


class _LoopThread:
    """One private event loop for every facade in the process, in a daemon thread.

    Daemon, because interpreter shutdown joins non-daemon threads before it runs ``atexit``: a loop thread that
    only ``atexit`` could stop would make every script that used a sink hang at exit.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._thread = threading.Thread(target=self._run, name="model-runner-sink-loop", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        anyio.run(self._serve)

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            self._ready.set()
            await portal.sleep_until_stopped()

    def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        if threading.current_thread() is self._thread:
            raise RuntimeError("S3Sink cannot be called from its own event loop; use AsyncS3Sink there")
        assert self._portal is not None
        return self._portal.call(function, *args)

    def close(self) -> None:
        # Stopping the portal ends the loop, which cancels the tasks keeping shared clients: they close them.
        assert self._portal is not None
        with contextlib.suppress(RuntimeError):  # the loop has already stopped
            self._portal.call(self._portal.stop)
        self._thread.join(_EXIT_CLOSE_SECONDS)


_loop_thread: _LoopThread | None = None
_loop_thread_lock = threading.Lock()


def _shared_loop() -> _LoopThread:
    global _loop_thread
    with _loop_thread_lock:
        if _loop_thread is None:
            _loop_thread = _LoopThread()
            atexit.register(_close_shared_loop)
        return _loop_thread


def _close_shared_loop() -> None:
    global _loop_thread
    with _loop_thread_lock:
        loop_thread, _loop_thread = _loop_thread, None
    if loop_thread is not None:
        loop_thread.close()


def _forget_loop_after_fork() -> None:
    # A forked child has no copy of the loop thread: it starts its own on first use.
    global _loop_thread, _loop_thread_lock
    _loop_thread = None
    _loop_thread_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_loop_after_fork)


class S3Sink(Sink):
    """
    A sink for writing aggregated GeoJSON feature collections to an S3 bucket.

    This class handles uploading GeoJSON data to a specified S3 bucket, optionally using an
    assumed IAM role for accessing the bucket. Writes run on one private event loop shared by every
    ``S3Sink`` in the process, so a sink can be used from plain scripts, from many threads at once and from
    code running inside another event loop; a process that used it exits by itself.

    :param bucket: The name of the S3 bucket.
    :param prefix: The prefix within the bucket where the files will be stored.
    :param assumed_role: Optional IAM role ARN to assume for accessing the bucket.
    :param settings: Tuning and object options.
    :param endpoint_url: S3 endpoint; by default the standard configuration (``AWS_ENDPOINT_URL_S3``...).
    :param sts_endpoint_url: STS endpoint for ``assumed_role``; by default the standard configuration.
    :param region_name: Region; by default ``AWS_REGION``, then the standard configuration, then us-east-1.
    :param client_config: A botocore config merged over the sink's own.
    :param clock: What time it is, for credential expiry; for tests and simulations.
    :param metrics: Hooks told of every write, part and retry; called on the sink's private loop thread.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        assumed_role: str | None = None,
        *,
        settings: SinkSettings | None = None,
        endpoint_url: str | None = None,
        sts_endpoint_url: str | None = None,
        region_name: str | None = None,
        client_config: Config | None = None,
        clock: Callable[[], datetime] | None = None,
        metrics: SinkMetrics | None = None,
    ) -> None:
        self._sink = AsyncS3Sink(
            bucket,
            prefix,
            assumed_role,
            settings=settings,
            endpoint_url=endpoint_url,
            sts_endpoint_url=sts_endpoint_url,
            region_name=region_name,
            client_config=client_config,
            clock=clock,
            metrics=metrics,
        )

    def __repr__(self) -> str:
        return f"S3Sink(bucket={self.bucket!r}, prefix={self.prefix!r}, assumed_role={self.assumed_role!r})"

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
    def settings(self) -> SinkSettings:
        """The sink's tuning and object options."""
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

    def write(
        self,
        image_id: str,
        features: Iterable[Any],
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> bool:
        """
        Write aggregated GeoJSON feature collection to the S3 bucket.

        The features are streamed to the object derived from ``image_id``; the object appears whole or not at all.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param features: A list (or any iterable) of GeoJSON features to be aggregated and written to S3.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param on_progress: Called with ``(bytes_done, features_done)`` as parts are stored, on the sink's loop
            thread.
        :return: `True` if the upload was successful, `False` otherwise.

        :raises ClientError: If there are errors while uploading the file to S3.
        """
        return self._call(partial(self._sink.write, image_id, features, metadata=metadata, on_progress=on_progress))

    def write_with_result(
        self,
        image_id: str,
        features: Iterable[Any],
        *,
        metadata: Mapping[str, str] | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> WriteResult:
        """
        Write aggregated GeoJSON feature collection to the S3 bucket, and tell what the write did.

        :param image_id: The identifier for the image, used to generate the S3 object key.
        :param features: A list (or any iterable) of GeoJSON features.
        :param metadata: User metadata to store with the object (``x-amz-meta-*``).
        :param on_progress: Called with ``(bytes_done, features_done)`` as parts are stored, on the sink's loop
            thread; the last call gives the result's ``bytes`` and ``features``.
        :return: The stored object's key, size, checksum and costs.
        :raises ClientError: If S3 refuses the upload, after retries, a missing bucket included.
        """
        return self._call(
            partial(self._sink.write_with_result, image_id, features, metadata=metadata, on_progress=on_progress)
        )

    def validate_s3_bucket(self) -> bool:
        """
        Check if the output S3 bucket exists and can be read/written to.

        :return: `True` if the bucket exists and can be accessed, `False` otherwise.

        :raises ClientError: If there are issues accessing the S3 bucket.
        """
        return self._call(self._sink.validate_s3_bucket)

    def _call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        return _shared_loop().call(function, *args)
