"""The private event loop every :class:`~model_runner.sink.s3_sink.S3Sink` of a process runs its calls on: one
daemon thread with an anyio ``BlockingPortal``, calls its callers can cancel, and features pulled and encoded on
the caller's thread.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import queue
import threading
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_for_futures
from functools import partial
from typing import Any, TypeAlias, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from model_runner.sink.encoding import FeatureSource, ThreadBoundFeatures
from model_runner.sink.exceptions import SinkError
from model_runner.sink.logs import logger

__all__ = ["Call", "LoopThread", "call_fed", "checked_timeout", "pulled_by_caller", "shared_loop"]

T = TypeVar("T")

# A blocked caller wakes this often, so that Ctrl-C reaches it on every platform (Windows does not interrupt a
# blocking wait) and its deadline is checked.
_WAIT_SLICE_SECONDS = 0.1
# How long an interrupted, timed out or exiting call waits for its write to end: as long as the uploader itself
# allows an abort to take.
_CANCEL_WAIT_SECONDS = 60.0
# Closing connections at exit must not hold the interpreter up if S3 is unreachable.
_EXIT_CLOSE_SECONDS = 5.0


class Call:
    """
    One facade call running on the private loop, which its caller can cancel at any moment of its life.

    It is cancelled through a cancel scope of its own rather than the portal's future, so that a call interrupted
    while the portal is still starting it, before its future is known, is cancelled too.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, what: str, timeout: float | None) -> None:
        self.future: Future[Any] = Future()
        self.finished = threading.Event()
        self._loop = loop
        self._what = what
        self._timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._scope: anyio.CancelScope | None = None
        self._cancel_requested = False

    async def run(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            with anyio.CancelScope() as scope:
                # Set the scope, then read the request; cancel() does the reverse: one of them sees the other.
                self._scope = scope
                if self._cancel_requested:
                    scope.cancel()
                return await function(*args)
            raise anyio.get_cancelled_exc_class()()  # cancelled by its caller, who no longer waits for a result
        finally:
            self.finished.set()

    def cancel(self) -> None:
        """Cancel the call and wait (bounded) until it has ended: a cancelled write first aborts its upload."""
        self._cancel_requested = True
        scope = self._scope
        if scope is None:
            return  # not started: it will see the request and end before any request to S3
        with contextlib.suppress(RuntimeError):  # the loop has closed, and the call with it
            self._loop.call_soon_threadsafe(scope.cancel)
        deadline = time.monotonic() + _CANCEL_WAIT_SECONDS
        while not self.finished.wait(min(_WAIT_SLICE_SECONDS, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                logger.warning("%s was cancelled but had not ended after %.0f s", self._what, _CANCEL_WAIT_SECONDS)
                return

    def expired(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline

    def wait_slice(self) -> float:
        """
        :return: How long a blocked caller may wait before it looks again at Ctrl-C and the deadline.
        :raises TimeoutError: If the deadline has passed.
        """
        if self._deadline is None:
            return _WAIT_SLICE_SECONDS
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self.timed_out()
        return min(_WAIT_SLICE_SECONDS, remaining)

    def wait(self, *futures: Future[Any]) -> None:
        """
        Wait until one of the futures is done.

        :raises TimeoutError: If the call's deadline passes first.
        """
        while not any(future.done() for future in futures):
            wait_for_futures(futures, self.wait_slice(), return_when=FIRST_COMPLETED)

    def join(self, first: Callable[[], object] | None = None) -> Any:
        """
        Do ``first`` (e.g. feed the call its features), then wait for the call's result. Anything that ends the
        wait early (Ctrl-C, the deadline) cancels the call, waits for it to end, then propagates.

        :return: What the call returned.
        :raises TimeoutError: If the call's deadline passes first.
        """
        try:
            if first is not None:
                first()
            self.wait(self.future)
        except BaseException:
            self.cancel()
            raise
        return self.result()

    def timed_out(self) -> TimeoutError:
        return TimeoutError(f"{self._what} did not finish within {self._timeout:g} s and was cancelled")

    def result(self) -> Any:
        if self.future.cancelled():
            raise SinkError(f"{self._what} was cancelled: the interpreter is exiting")
        return self.future.result()


class LoopThread:
    """One private event loop for every facade in the process, in a daemon thread.

    Daemon, because interpreter shutdown joins non-daemon threads before it runs ``atexit``: a loop thread that
    only ``atexit`` could stop would make every script that used a sink hang at exit.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="model-runner-sink-loop", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        anyio.run(self._serve)

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            self._loop = asyncio.get_running_loop()
            self._ready.set()
            await portal.sleep_until_stopped()

    def start(self, what: str, timeout: float | None, function: Callable[..., Awaitable[Any]], *args: Any) -> Call:
        """
        Start a call on the loop.

        :param what: What the call does, for errors and logs.
        :param timeout: Seconds before the call is cancelled; `None` for no limit.
        :param function: The coroutine function to run, with its positional arguments.
        :return: The call, to wait for or cancel.
        """
        self.check_caller()
        assert self._portal is not None and self._loop is not None
        call = Call(self._loop, what, timeout)
        try:
            call.future = self._portal.start_task_soon(call.run, function, *args)
        except BaseException:
            call.cancel()
            raise
        return call

    def check_caller(self) -> None:
        if threading.current_thread() is self._thread:
            raise RuntimeError("S3Sink cannot be called from its own event loop; use AsyncS3Sink there")

    def spawn(self, function: Callable[..., Awaitable[T]], *args: Any) -> Future[T]:
        assert self._portal is not None
        return self._portal.start_task_soon(function, *args)

    def call(self, what: str, timeout: float | None, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """
        Run a call on the loop and wait for it. Anything that ends the wait early (Ctrl-C, the deadline) cancels
        the call, waits for it to end, then propagates.

        :return: What the call returned.
        :raises TimeoutError: If it did not finish within ``timeout`` seconds.
        """
        result: T = self.start(what, timeout, function, *args).join()
        return result

    def close(self) -> None:
        # Cancelling what is still running lets each write abort its upload; the loop ends once they have, which
        # cancels the tasks keeping shared clients: they close them.
        assert self._portal is not None
        with contextlib.suppress(RuntimeError):  # the loop has already stopped
            self._portal.call(self._portal.stop, True)
        self._thread.join(_CANCEL_WAIT_SECONDS + _EXIT_CLOSE_SECONDS)


def pulled_by_caller(features: object) -> bool:
    """
    Tell whether a call's features are pulled on the caller's thread, a batch at a time, rather than on the loop.

    :param features: What the caller gave.
    :return: `True` for a plain iterable (a generator, a cursor...).
    """
    # Lists and tuples are not tied to a thread; async iterables belong to the loop; anything that is not a
    # collection of features is refused by the write itself.
    return isinstance(features, Iterable) and not isinstance(
        features, (list, tuple, str, bytes, bytearray, Mapping, AsyncIterable)
    )


# A function the write asks the caller's thread to run, its arguments, and the future of its result.
_Trip: TypeAlias = "tuple[Callable[..., Any], tuple[Any, ...], Future[Any]]"


def call_fed(
    loop_thread: LoopThread,
    what: str,
    timeout: float | None,
    write: Callable[[FeatureSource], Awaitable[T]],
    features: Iterable[Any],
) -> T:
    """
    Run a write on the loop with its features pulled and encoded on this thread, which would only wait otherwise:
    the write sends each of its encoder's trips here, so memory stays bounded, a source tied to this thread (an
    sqlite3 cursor, a thread-local session) works, and features are freed where they were made.

    :return: What the write returned.
    :raises TimeoutError: If it did not finish within ``timeout`` seconds.
    """
    loop_thread.check_caller()
    trips: queue.SimpleQueue[_Trip | None] = queue.SimpleQueue()
    if timeout is not None:
        # Checked between features: a slow source must not hold the caller past its deadline. Pulled only by
        # _serve below, once `call` is set.
        features = _until_expired(features, lambda: call.expired())
    call = loop_thread.start(what, timeout, write, ThreadBoundFeatures(features, partial(_run_on_caller, trips)))
    # Wakes this thread once the write has ended, whatever its outcome.
    call.future.add_done_callback(lambda _: trips.put(None))
    result: T = call.join(partial(_serve, call, trips))
    return result


async def _run_on_caller(trips: queue.SimpleQueue[_Trip | None], function: Callable[..., T], *args: Any) -> T:
    # Awaited as a worker thread's result would be; a cancelled write stops waiting for it.
    future: Future[T] = Future()
    trips.put((function, args, future))
    return await asyncio.wrap_future(future)


def _serve(call: Call, trips: queue.SimpleQueue[_Trip | None]) -> None:
    """
    Run the write's trips on this thread until it has ended.

    :raises TimeoutError: If the call's deadline passes first.
    """
    while True:
        try:
            trip = trips.get(timeout=call.wait_slice())
        except queue.Empty:
            continue
        if trip is None:
            return
        function, args, future = trip
        if not future.set_running_or_notify_cancel():
            continue  # the write stopped waiting for it
        try:
            future.set_result(function(*args))
        except Exception as error:
            future.set_exception(error)
        if call.expired():
            raise call.timed_out()


def _until_expired(features: Iterable[Any], expired: Callable[[], bool]) -> Iterator[Any]:
    for feature in features:
        yield feature
        if expired():
            # Raised into the write's encoder, which then stores nothing, however far the source had got.
            raise TimeoutError("the write's deadline passed while its features were pulled")


def checked_timeout(timeout: float | None) -> float | None:
    """
    :param timeout: A call's ``timeout=``.
    :return: The same.
    :raises ValueError: If it is not a positive number of seconds or `None`.
    """
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, not {timeout!r}")
    return timeout


_loop_thread: LoopThread | None = None
_loop_thread_lock = threading.Lock()


def shared_loop() -> LoopThread:
    """
    The process's private loop thread, started on first use and closed at exit.

    :return: The loop thread.
    """
    global _loop_thread
    with _loop_thread_lock:
        if _loop_thread is None:
            _loop_thread = LoopThread()
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
