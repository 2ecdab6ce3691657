"""S3 clients shared by the sinks of an event loop that are configured alike, so a sink per request is cheap."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gzip
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

# anyio imports its asyncio backend on first use, which took ~15 ms of the first write's event loop; imported
# with the sink instead.
import anyio._backends._asyncio
import anyio.to_thread
import orjson
from aiobotocore.config import AioConfig
from aiobotocore.endpoint import DEFAULT_HTTP_SESSION_CLS
from aiobotocore.hooks import AioHierarchicalEmitter
from aiobotocore.session import AioSession
from botocore import loaders
from botocore.config import Config
from botocore.exceptions import ProfileNotFound

from model_runner.sink.connections import SharedTlsSession
from model_runner.sink.credentials import AssumedRole, Clock, assumed_role_credentials, refresh
from model_runner.sink.endpoints import resolve_once_per_bucket
from model_runner.sink.settings import SinkSettings
from model_runner.sink.upload import ByteBudget

__all__ = ["IDLE_SECONDS", "ClientOptions", "SharedClient", "SharedClients", "shared_client"]

# A client outlives its last sink this long, so that a service writing now and then does not pay for a new one:
# its first write costs ~17 ms of CPU (the making is off the loop: the loop stalls ~5 ms) and a bucket check.
# Kept, it holds ~0.4 MB and no socket: aiohttp closes idle connections after its keep-alive timeout.
IDLE_SECONDS = 300.0

# The standard variables that decide where a session's clients go and who they are: sessions and clients are
# reused only while these are unchanged, so a process that repoints them gets new ones.
_ENVIRONMENT = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL_STS",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)

_loader_lock = threading.Lock()
_loader: loaders.Loader | None = None
_handlers: AioHierarchicalEmitter | None = None
_default_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str | None, ...], AioSession]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class ClientOptions:
    """
    Everything of a sink that decides its S3 client: sinks with equal options share one.

    :param settings: The sink's settings.
    :param endpoint_url: S3 endpoint, or `None` for the standard configuration.
    :param sts_endpoint_url: STS endpoint for ``assumed_role``, or `None` for the standard configuration.
    :param region_name: Region, or `None` for ``AWS_REGION``, then the standard configuration, then us-east-1.
    :param client_config: A botocore config merged over the sink's own.
    :param assumed_role: The role to assume, if any.
    :param clock: What time it is, for credential expiry.
    """

    settings: SinkSettings
    endpoint_url: str | None = None
    sts_endpoint_url: str | None = None
    region_name: str | None = None
    client_config: Config | None = field(default=None, compare=False)
    assumed_role: str | None = None
    clock: Clock | None = None
    # botocore's Config is not hashable: its options stand in for it.
    client_config_key: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.client_config is not None and self.client_config_key is None:
            object.__setattr__(self, "client_config_key", repr(vars(self.client_config)))


@dataclass
class SharedClient:
    """A client and what the writes through it share."""

    client: Any
    # Bytes of request bodies that the writes through this client may hold at once.
    budget: ByteBudget
    # Worker threads that the writes through this client may use at once.
    limiter: anyio.CapacityLimiter
    # Buckets a request has already reached through this client: checked once, not per write as the seed did.
    checked_buckets: set[Hashable] = field(default_factory=set)
    users: int = 0
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def shared_client(options: ClientOptions) -> AsyncIterator[SharedClient]:
    """
    Take the client of this event loop for these options, and give it back after.

    Clients are taken per call, so a sink holds nothing between writes and can be created per request, dropped
    without closing, or used from any loop. Assumed-role credentials are refreshed here when near expiry.

    :param options: The sink's options.
    :return: The shared client.
    :raises InvalidAssumedRoleException: If the role cannot be assumed.
    """
    environment = tuple(os.environ.get(name) for name in _ENVIRONMENT)
    source = await _default_session(environment)
    region = options.region_name or os.environ.get("AWS_REGION") or source.get_config_variable("region")
    region = region or "us-east-1"
    credentials = None
    if options.assumed_role is not None:
        role = AssumedRole(
            role_arn=options.assumed_role,
            session_name=options.settings.role_session_name,
            duration_seconds=options.settings.role_duration_seconds,
            refresh_seconds=options.settings.credential_refresh_seconds,
            region_name=region,
            sts_endpoint_url=options.sts_endpoint_url,
        )
        credentials = assumed_role_credentials(role, source, clock=options.clock)
        await refresh(credentials, options.assumed_role)
    key = (options, region, credentials, environment)
    registry = SharedClients.of_running_loop()

    def make() -> AbstractAsyncContextManager[Any]:
        session = source
        if credentials is not None:
            session = _new_session()
            # botocore has no public setter for refreshable credentials; its own assume-role provider does this.
            session._credentials = credentials  # type: ignore[attr-defined]
        return session.create_client(
            "s3", region_name=region, endpoint_url=options.endpoint_url, config=_client_config(options, source)
        )

    def create() -> AbstractAsyncContextManager[Any]:
        return _MadeInThread(make)

    shared = await registry.acquire(key, create, options.settings)
    try:
        yield shared
    finally:
        registry.release(key)


class _MadeInThread:
    """
    A client's context manager, entered in a worker thread on an event loop of its own, exited on the caller's.

    Creating a client is ~10 ms of pure Python (its class, endpoint rules, handlers) in one step of the event loop;
    in a worker thread it stalls the loop at most a GIL switch interval. An aiobotocore client is bound to no event
    loop until its first request opens its aiohttp session, and its locks bind to a loop when first waited on. Its
    endpoint resolution is narrowed there too (:func:`~model_runner.sink.endpoints.resolve_once_per_bucket`).
    """

    def __init__(self, make: Callable[[], AbstractAsyncContextManager[Any]]) -> None:
        self._make = make
        self._context: AbstractAsyncContextManager[Any] | None = None

    async def _enter(self) -> tuple[AbstractAsyncContextManager[Any], Any]:
        context = self._make()
        client = await context.__aenter__()
        resolve_once_per_bucket(client, _shared_loader().load_service_model("s3", "endpoint-rule-set-1"))
        return context, client

    async def __aenter__(self) -> Any:
        self._context, client = await anyio.to_thread.run_sync(lambda: asyncio.run(self._enter()))
        return client

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._context is not None
        return await self._context.__aexit__(*exc_info)


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

    async def acquire(
        self, key: Hashable, create: Callable[[], AbstractAsyncContextManager[Any]], settings: SinkSettings
    ) -> SharedClient:
        """
        Take the client for a configuration, creating it if needed; concurrent first takers share one creation.

        :param key: What makes two configurations the same.
        :param create: Makes the client's async context manager, e.g. ``session.create_client(...)``.
        :param settings: Size the byte budget and the thread limiter of a new client.
        :return: The client and what is shared through it; give it back with :meth:`release`.
        """
        entry = self._entries.get(key)
        if entry is None:
            # Creation is rare: serialising it is simpler than a creation in flight per key.
            async with self._lock:
                entry = self._entries.get(key)
                if entry is None:
                    entry = await self._create(key, create, settings)
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

    async def _create(
        self, key: Hashable, create: Callable[[], AbstractAsyncContextManager[Any]], settings: SinkSettings
    ) -> SharedClient:
        await anyio.to_thread.run_sync(_load_models)
        context = create()
        entry = SharedClient(
            await context.__aenter__(),
            budget=ByteBudget(settings.max_bytes_in_flight),
            limiter=anyio.CapacityLimiter(settings.max_worker_threads),
        )
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


def _load_models() -> None:
    # Parsing these JSON files takes ~60 ms, which would stall the event loop on the first client creation.
    loader = _shared_loader()
    for service in ("s3", "sts"):
        loader.load_service_model(service, "service-2")
        loader.load_service_model(service, "endpoint-rule-set-1")
    for name in ("endpoints", "sdk-default-configuration", "_retry", "partitions"):
        loader.load_data(name)


class _OrjsonFileLoader(loaders.JSONFileLoader):
    """
    botocore's model files, parsed with orjson.

    A JSON parser holds the GIL for a whole file, worker thread or not: the event loop waits as long. The json
    module takes ~20 ms for S3's model and ~25 ms with its rule set, orjson ~5x less (the order of keys is kept).
    """

    def load_file(self, file_path: str) -> Any:
        for extension, opener in ((".json", open), (".json.gz", gzip.open)):
            path = file_path + extension
            if os.path.isfile(path):
                with opener(path, "rb") as file:
                    return orjson.loads(file.read())
        return None


def _shared_loader() -> loaders.Loader:
    # One loader for every session: the S3 model costs tens of milliseconds to load, once per process.
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = loaders.Loader(file_loader=_OrjsonFileLoader())
        return _loader


def _builtin_handlers() -> AioHierarchicalEmitter:
    # A session registers botocore's ~300 built-in handlers, inspecting each one's signature (~10 ms, far more on
    # a busy machine); they are the same for every session, so they are registered once and copied (~0.2 ms).
    global _handlers
    with _loader_lock:
        if _handlers is None:
            handlers = AioHierarchicalEmitter()
            AioSession(event_hooks=handlers)
            _handlers = handlers
        return _handlers


def _new_session() -> AioSession:
    session = AioSession(event_hooks=copy.copy(_builtin_handlers()), include_builtin_handlers=False)
    session.register_component("data_loader", _shared_loader())
    return session


def _new_default_session() -> AioSession:
    _load_models()
    session = _new_session()
    # Reads the configuration files, which the session then keeps: here in a worker thread, not on the loop. A
    # missing profile is raised on the loop when the region is read, as before.
    with contextlib.suppress(ProfileNotFound):
        session.get_scoped_config()
    return session


async def _default_session(environment: tuple[str | None, ...]) -> AioSession:
    # A session caches credentials whose refresh lock belongs to one event loop: one session per loop.
    sessions = _default_sessions.setdefault(asyncio.get_running_loop(), {})
    session = sessions.get(environment)
    if session is None:
        # Made in a worker thread, a new session stalls the loop at most a GIL switch interval, not its making.
        made = await anyio.to_thread.run_sync(_new_default_session)
        session = sessions.setdefault(environment, made)
    return session


def _configured(session: AioSession, variable: str, environment: str) -> bool:
    if environment in os.environ:
        return True
    try:
        return variable in session.get_scoped_config()
    except ProfileNotFound:
        return False


def _client_config(options: ClientOptions, session: AioSession) -> AioConfig:
    settings = options.settings
    retries: dict[str, Any] = {}
    if settings.retry_mode is not None:
        retries["mode"] = settings.retry_mode
    elif not _configured(session, "retry_mode", "AWS_RETRY_MODE"):
        retries["mode"] = "standard"
    if settings.max_attempts is not None:
        retries["total_max_attempts"] = settings.max_attempts
    config = AioConfig(
        http_session_cls=SharedTlsSession,
        retries=retries or None,
        max_pool_connections=settings.max_pool_connections,
        # Checksums are computed in worker threads and sent with each request; botocore would hash the body
        # again on the event loop, and sign it with SHA-256 over plain HTTP.
        s3={"payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    if options.client_config is None:
        return config
    # AioConfig.merge takes any Config, and keeps botocore's options only: the aiohttp options are set after.
    # (The stubs know neither.)
    merged = config.merge(options.client_config)  # type: ignore[arg-type]
    merged.http_session_cls = SharedTlsSession  # type: ignore[attr-defined]
    user = options.client_config
    if isinstance(user, AioConfig):
        merged.connector_args = user.connector_args  # type: ignore[attr-defined]
        if user.http_session_cls is not DEFAULT_HTTP_SESSION_CLS:  # type: ignore[attr-defined]
            merged.http_session_cls = user.http_session_cls  # type: ignore[attr-defined]
    return merged
