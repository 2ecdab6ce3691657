"""S3 clients shared by the sinks of an event loop that are configured alike, so a sink per request is cheap."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.to_thread
from botocore import loaders

from model_runner.sink.upload import ByteBudget

__all__ = ["IDLE_SECONDS", "SharedClient", "SharedClients", "shared_loader"]

# A client outlives its last sink this long, so sinks created one after another reuse its connections.
IDLE_SECONDS = 30.0

_loader_lock = threading.Lock()
_loader: loaders.Loader | None = None


def _load_models() -> None:
    # Parsing these JSON files takes ~60 ms, which would stall the event loop on the first client creation.
    loader = shared_loader()
    for service in ("s3", "sts"):
        loader.load_service_model(service, "service-2")
        loader.load_service_model(service, "endpoint-rule-set-1")
    for name in ("endpoints", "sdk-default-configuration", "_retry", "partitions"):
        loader.load_data(name)


def shared_loader() -> loaders.Loader:
    """
    One botocore loader for every session: the S3 model costs tens of milliseconds to load, once per process.

    :return: The process's loader.
    """
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = loaders.create_loader()
        return _loader


@dataclass
class SharedClient:
    """A client and what is known of it."""

    client: Any
    users: int = 0
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # Buckets a request has already reached through this client: checked once, not per write as the seed did.
    checked_buckets: set[Hashable] = field(default_factory=set)
    # Bytes of request bodies that the writes through this client may hold at once.
    budget: ByteBudget | None = None
    # Worker threads that the writes through this client may use at once.
    limiter: anyio.CapacityLimiter | None = None


class SharedClients:
    """
    The clients of one event loop, by configuration.

    A client is created on first use and kept by a task of the loop. When its last user releases it, that task
    closes it after ``IDLE_SECONDS`` unless someone takes it again; when the loop shuts down (``asyncio.run``
    cancels its remaining tasks) the task closes it too, so no client is left to the garbage collector.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, SharedClient] = {}
        self._lock = asyncio.Lock()
        self._keepers: set[asyncio.Task[None]] = set()

    @staticmethod
    def of_running_loop() -> SharedClients:
        """
        The shared clients of the running event loop.

        :return: This loop's registry.
        """
        loop = asyncio.get_running_loop()
        registry = _registries.get(loop)
        if registry is None:
            registry = _registries[loop] = SharedClients()
        return registry

    async def acquire(self, key: Hashable, create: Callable[[], AbstractAsyncContextManager[Any]]) -> SharedClient:
        """
        Take the client for a configuration, creating it if needed; concurrent first takers share one creation.

        :param key: What makes two configurations the same.
        :param create: Makes the client's async context manager, e.g. ``session.create_client(...)``.
        :return: The client (``.client``) and what is known of it; give it back with :meth:`release`.
        """
        entry = self._entries.get(key)
        if entry is None:
            # Creation is rare: serialising it is simpler than a creation in flight per key.
            async with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = await self._create(key, create)
        entry.users += 1
        entry.idle.clear()
        entry.taken.set()
        return entry

    def release(self, key: Hashable) -> None:
        """
        Give a client back.

        :param key: The key it was taken with.
        """
        entry = self._entries.get(key)
        if entry is not None:
            entry.users -= 1
            if entry.users == 0:
                entry.taken.clear()
                entry.idle.set()

    async def _create(self, key: Hashable, create: Callable[[], AbstractAsyncContextManager[Any]]) -> SharedClient:
        await anyio.to_thread.run_sync(_load_models)
        context = create()
        entry = SharedClient(await context.__aenter__())
        self._entries[key] = entry
        keeper = asyncio.get_running_loop().create_task(self._keep(key, entry, context))
        self._keepers.add(keeper)
        keeper.add_done_callback(self._keepers.discard)
        return entry

    async def _keep(self, key: Hashable, entry: SharedClient, context: AbstractAsyncContextManager[Any]) -> None:
        try:
            while True:
                await entry.idle.wait()
                try:
                    await asyncio.wait_for(entry.taken.wait(), IDLE_SECONDS)
                except asyncio.TimeoutError:
                    return
        finally:
            # Forgotten before closing, so a sink arriving meanwhile creates a new client instead.
            del self._entries[key]
            await context.__aexit__(None, None, None)


_registries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SharedClients] = weakref.WeakKeyDictionary()
