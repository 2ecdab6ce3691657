"""S3 clients shared by the sinks of an event loop that are configured alike, so a sink per request is cheap."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import gzip
import logging
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Hashable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
from botocore.credentials import RefreshableCredentials
from botocore.exceptions import ProfileNotFound

from model_runner.sink.budget import ByteBudget
from model_runner.sink.connections import SharedTlsSession
from model_runner.sink.credentials import AssumedRole, assumed_role_credentials, forget_loop_credentials, refresh
from model_runner.sink.endpoints import resolve_once_per_bucket
from model_runner.sink.settings import ClientSettings
from model_runner.sink.upload.settle import ABORT_TIMEOUT_SECONDS

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = [
    "CLOSE_WAIT_SECONDS",
    "IDLE_SECONDS",
    "ClientOptions",
    "InFlight",
    "SharedClient",
    "SharedClients",
    "close_shared_clients",
    "shared_client",
]

logger = logging.getLogger(__name__)

# A client outlives its last sink this long, so that a service writing every few minutes (a model-runner worker,
# one image at a time) does not pay for a new one each time: its first write costs ~17 ms of CPU, ~5 ms of loop
# stall and a bucket check. Kept, it holds ~0.4 MB and no socket (aiohttp closes idle connections after its
# keep-alive timeout); the timer remains so that a process cycling through many configurations frees them.
IDLE_SECONDS = 3600.0
# Closing a loop's clients waits this long at most for the writes still holding one: longer than a write's own
# bounded clean-up (an answer in flight, then its abort), so that clean-up finishes on an open client, yet a hung
# S3 cannot hold up a loop's end forever.
CLOSE_WAIT_SECONDS = 2 * ABORT_TIMEOUT_SECONDS

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
# The sessions made from callers' ``aioboto3.Session`` objects, per event loop, caller's session and environment.
_user_sessions: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.WeakKeyDictionary[Any, dict[tuple[str | None, ...], AioSession]]
] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ClientOptions:
    """
    Everything of a sink that decides its S3 client: sinks with equal options share one. What only shapes objects
    (:class:`~model_runner.sink.settings.SinkSettings`) is not part of it.

    :param client: The client settings.
    :param assumed_role: The role to assume, if any.
    :param session: The caller's ``aioboto3.Session``, compared by identity; `None` for the standard configuration.
    """

    client: ClientSettings = field(default_factory=ClientSettings)
    assumed_role: str | None = None
    session: Any = None


# One loop iteration runs every callback that is ready: 50 PutObjects started together each spend ~0.5-1 ms of
# pure Python (hooks, endpoint, signing, request building, connect) before their first wait on the network, and
# the caller's timers wait for all of them. A few at a time keep an iteration short; on one client a few requests
# at once already fill what a loop thread can prepare while others are on the network.
PUT_SLOTS = 4


@dataclass
class SharedClient:
    """A client and what the writes through it share."""

    client: S3Client
    # Bytes of request bodies that the writes through this client may hold at once.
    budget: ByteBudget
    # Worker threads that the writes through this client may use at once.
    limiter: anyio.CapacityLimiter
    # PutObject requests in flight through this client at once (PUT_SLOTS).
    put_slots: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(PUT_SLOTS))
    # Buckets a request has already reached through this client: checked once, not per write as the seed did.
    checked_buckets: set[Hashable] = field(default_factory=set)
    # Calls holding the client now: it is closed only when none does.
    users: int = 0
    key: Hashable = field(default=None, repr=False)
    context: AbstractAsyncContextManager[Any] | None = field(default=None, repr=False)
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)
    closed: bool = field(default=False, repr=False)


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
    # First, so that the loop's sessions and credentials below are let go of with its clients when it ends.
    SharedClients.of_running_loop()
    environment = tuple(os.environ.get(name) for name in _ENVIRONMENT)
    source = await _source_session(options.session, environment)
    region = _region(options.client, source)
    credentials = None
    if options.assumed_role is not None:
        role = AssumedRole(
            role_arn=options.assumed_role,
            session_name=options.client.role_session_name,
            duration_seconds=options.client.role_duration_seconds,
            refresh_seconds=options.client.credential_refresh_seconds,
            region_name=region,
            sts_endpoint_url=options.client.sts_endpoint_url,
        )
        credentials = assumed_role_credentials(role, source, clock=options.client.clock)
        await refresh(credentials, options.assumed_role)
    key = (options, region, credentials, environment)

    def make() -> AbstractAsyncContextManager[Any]:
        session = source
        if credentials is not None:
            session = _new_session()
            # botocore has no public setter for refreshable credentials; its own assume-role provider does this.
            session._credentials = credentials  # type: ignore[attr-defined]
        return session.create_client(
            "s3", region_name=region, endpoint_url=options.client.endpoint_url, config=_client_config(options, source)
        )

    def create() -> AbstractAsyncContextManager[Any]:
        return _MadeInThread(make)

    # Again, with no await before taking: the registry may have closed while the credentials were refreshed.
    registry = SharedClients.of_running_loop()
    shared = await registry.acquire(key, create, options.client)
    try:
        yield shared
    finally:
        registry.release(shared)


async def close_shared_clients() -> None:
    """
    Close the S3 clients that sinks share on the running event loop, once the writes holding them are done.

    ``asyncio.run`` and ``anyio.run`` do this by themselves as they end a loop. A loop ended otherwise, e.g.
    ``loop.run_until_complete(...)`` then ``loop.close()``, needs ``loop.run_until_complete(close_shared_clients())``
    before it is closed: else its clients are never closed, and the loop is only let go of when another loop
    takes a client. Writes still holding a client are waited for, aborts included, at most ``CLOSE_WAIT_SECONDS``.
    A later write on the loop creates a new client.
    """
    registry = _registries.get(asyncio.get_running_loop())
    if registry is not None:
        await registry.close()


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

    A client is created on first use. When its last user gives it back, a timer closes it after ``IDLE_SECONDS``
    unless someone takes it first. A task of the loop waits for the loop's end (``asyncio.run`` cancels it with
    every other task): then it waits for the calls still holding a client (a cancelled write still has to abort
    its upload), closes every client and forgets the loop, so that neither client nor loop outlives it.

    :param idle_seconds: How long an unused client is kept; ``IDLE_SECONDS`` by default.
    """

    def __init__(self, *, idle_seconds: float | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle_seconds = IDLE_SECONDS if idle_seconds is None else idle_seconds
        self._entries: dict[Hashable, SharedClient] = {}
        self._lock = asyncio.Lock()
        # Calls creating a client: they hold it as soon as it exists, so closing waits for them too.
        self._creating = 0
        # Clients closed apart from close(), which waits for them.
        self._closing_tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closed = False
        # Set once no call holds a client, while closing.
        self._released: asyncio.Future[None] | None = None
        # Named, as it shows among the loop's tasks for as long as the loop runs.
        self._guard = self._loop.create_task(self._close_when_loop_ends(), name="close shared S3 clients at loop end")

    @staticmethod
    def of_running_loop() -> SharedClients:
        """
        The shared clients of the running event loop.

        :return: This loop's registry.
        """
        loop = asyncio.get_running_loop()
        registry = _registries.get(loop)
        if registry is None:
            _forget_closed_loops()
            registry = _registries[loop] = SharedClients()
        return registry

    async def acquire(
        self, key: Hashable, create: Callable[[], AbstractAsyncContextManager[Any]], settings: ClientSettings
    ) -> SharedClient:
        """
        Take the client for a configuration, creating it if needed; concurrent first takers share one creation.

        :param key: What makes two configurations the same.
        :param create: Makes the client's async context manager, e.g. ``session.create_client(...)``.
        :param settings: Size the byte budget and the thread limiter of a new client.
        :return: The client and what is shared through it; give it back with :meth:`release`.
        :raises RuntimeError: If these clients are closed.
        """
        if self._closed:
            raise RuntimeError("these shared clients are closed: take the loop's new ones with of_running_loop()")
        entry = self._entries.get(key)
        if entry is None:
            self._creating += 1
            try:
                # Creation is rare: serialising it is simpler than a creation in flight per key.
                async with self._lock:
                    entry = self._entries.get(key)
                    if entry is None:
                        entry = await self._create(key, create, settings)
            finally:
                self._creating -= 1
                self._check_released()
        # No await since the lookup: an idle timer cannot close the entry in between.
        entry.users += 1
        if entry.expiry is not None:
            entry.expiry.cancel()
            entry.expiry = None
        return entry

    def release(self, entry: SharedClient) -> None:
        """
        Give a client back.

        :param entry: What :meth:`acquire` returned.
        """
        entry.users -= 1
        if entry.users:
            return
        if self._entries.get(entry.key) is not entry:
            # Created as its registry closed, after the wait for holders gave up: nobody else closes it.
            if not entry.closed:
                self._close_later(entry)
        elif self._closing:
            self._check_released()
        else:
            entry.expiry = self._loop.call_later(self._idle_seconds, self._expire, entry)

    async def close(self) -> None:
        """
        Wait for the calls holding a client, at most ``CLOSE_WAIT_SECONDS``, then close every client and let go
        of the loop.
        """
        if self._closing:
            return
        self._closing = True
        if self._guard is not asyncio.current_task():
            self._guard.cancel()
        try:
            await self._wait_for_holders()
        finally:
            # From here on, a call gets a new registry: these clients are closed below, whatever it does.
            self._closed = True
            if _registries.get(self._loop) is self:
                del _registries[self._loop]
            entries, self._entries = list(self._entries.values()), {}
            for entry in entries:
                if entry.expiry is not None:
                    entry.expiry.cancel()
                await _close_client(entry)
            if self._closing_tasks:
                await asyncio.wait(self._closing_tasks, timeout=CLOSE_WAIT_SECONDS)
            if self._loop not in _registries:
                # Else a call made meanwhile uses the loop's sessions and credentials: its registry forgets them.
                _forget_loop(self._loop)

    async def _create(
        self, key: Hashable, create: Callable[[], AbstractAsyncContextManager[Any]], settings: ClientSettings
    ) -> SharedClient:
        await anyio.to_thread.run_sync(_load_models)
        context = create()
        entry = SharedClient(
            await context.__aenter__(),
            budget=ByteBudget(settings.max_bytes_in_flight),
            limiter=anyio.CapacityLimiter(settings.max_worker_threads),
            key=key,
            context=context,
        )
        if not self._closed:
            self._entries[key] = entry
        return entry

    def _expire(self, entry: SharedClient) -> None:
        # One synchronous decision: no call can take the client between this check and its removal.
        entry.expiry = None
        if entry.users or self._entries.get(entry.key) is not entry:
            return
        del self._entries[entry.key]
        self._close_later(entry)

    def _close_later(self, entry: SharedClient) -> None:
        closing = self._loop.create_task(_close_client(entry))
        self._closing_tasks.add(closing)
        closing.add_done_callback(self._closing_tasks.discard)

    async def _close_when_loop_ends(self) -> None:
        try:
            await self._loop.create_future()
        except asyncio.CancelledError:
            await self.close()
            raise

    async def _wait_for_holders(self) -> None:
        self._released = self._loop.create_future()
        self._check_released()
        _, pending = await asyncio.wait({self._released}, timeout=CLOSE_WAIT_SECONDS)
        if pending:
            logger.warning(
                "closing shared S3 clients held by %d call(s) still running after %.0f s",
                self._creating + sum(entry.users for entry in self._entries.values()),
                CLOSE_WAIT_SECONDS,
            )

    def _check_released(self) -> None:
        released = self._released
        if released is None or released.done() or self._creating:
            return
        if not any(entry.users for entry in self._entries.values()):
            released.set_result(None)


class InFlight:
    """The calls of one owner in flight, so that it can wait for those of its event loop to end."""

    def __init__(self) -> None:
        self._calls: set[asyncio.Future[None]] = set()

    @asynccontextmanager
    async def track(self) -> AsyncIterator[None]:
        """
        Count a call as in flight for as long as it runs.

        :return: Nothing; the call runs in the ``async with`` block.
        """
        done = asyncio.get_running_loop().create_future()
        self._calls.add(done)
        try:
            yield
        finally:
            self._calls.discard(done)
            done.set_result(None)

    async def wait(self, seconds: float) -> int:
        """
        Wait for the calls of the running event loop to end.

        :param seconds: How long to wait at most.
        :return: How many of them still run.
        """
        loop = asyncio.get_running_loop()
        # A copy made in one step: calls of other loops may come and go from their own threads.
        calls = [call for call in list(self._calls) if call.get_loop() is loop]
        if not calls:
            return 0
        _, pending = await asyncio.wait(calls, timeout=seconds)
        return len(pending)


async def _close_client(entry: SharedClient) -> None:
    assert entry.context is not None
    entry.closed = True
    try:
        await entry.context.__aexit__(None, None, None)
    except Exception:
        logger.warning("closing a shared S3 client failed", exc_info=True)


def _forget_loop(loop: asyncio.AbstractEventLoop) -> None:
    # What a loop's registries hold refers to the loop itself (its clients, locks bound to it), so weak keys
    # alone would keep it forever: an ended loop is removed from each explicitly.
    _registries.pop(loop, None)
    _default_sessions.pop(loop, None)
    _user_sessions.pop(loop, None)
    forget_loop_credentials(loop)


def _forget_closed_loops() -> None:
    # A loop closed without asyncio's shutdown nor close_shared_clients: its clients cannot be closed any more,
    # but it is let go of, so that such loops do not pile up.
    for reference in _registries.keyrefs():
        loop = reference()
        if loop is not None and loop.is_closed():
            _forget_loop(loop)


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


def _session_like(user: Any) -> AioSession:
    """
    A session of this library's making with what the caller's ``aioboto3.Session`` was given: its configuration
    variables (profile, region...), its explicit credentials and its credential chain.

    The caller's session may serve other event loops, and credentials that refresh hold a lock bound to one loop:
    hence a session per loop, which is also made with the built-in handlers copied rather than registered again.
    """
    base: AioSession = user._session
    _load_models()
    session = AioSession(event_hooks=copy.copy(base.get_component("event_emitter")), include_builtin_handlers=False)
    session.register_component("data_loader", _shared_loader())
    for name, value in base.instance_variables().items():
        session.set_config_variable(name, value)
    with contextlib.suppress(ProfileNotFound):
        session.get_scoped_config()
        # Each load through the caller's chain makes new credentials, so sharing the chain shares no lock.
        session.register_component("credential_provider", base.get_component("credential_provider"))
    explicit = getattr(base, "_credentials", None)
    if explicit is not None and not isinstance(explicit, RefreshableCredentials):
        session._credentials = explicit  # type: ignore[attr-defined]
    return session


async def _source_session(user: Any, environment: tuple[str | None, ...]) -> AioSession:
    # A session caches credentials whose refresh lock belongs to one event loop: one session per loop.
    loop = asyncio.get_running_loop()
    if user is None:
        sessions = _default_sessions.setdefault(loop, {})
        make: Callable[[], AioSession] = _new_default_session
    else:
        # Weakly: a caller's session dropped with its last client is let go of.
        sessions = _user_sessions.setdefault(loop, weakref.WeakKeyDictionary()).setdefault(user, {})
        make = functools.partial(_session_like, user)
    session = sessions.get(environment)
    if session is None:
        # Made in a worker thread, a new session stalls the loop at most a GIL switch interval, not its making.
        made = await anyio.to_thread.run_sync(make)
        session = sessions.setdefault(environment, made)
    return session


def _region(settings: ClientSettings, source: AioSession) -> str:
    # A region given to the caller's session comes before the environment's, as with any client it makes.
    explicit = settings.region_name or source.instance_variables().get("region")
    return explicit or os.environ.get("AWS_REGION") or source.get_config_variable("region") or "us-east-1"


def _configured(session: AioSession, variable: str, environment: str) -> bool:
    if environment in os.environ:
        return True
    try:
        return variable in session.get_scoped_config()
    except ProfileNotFound:
        return False


def _client_config(options: ClientOptions, session: AioSession) -> AioConfig:
    settings = options.client
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
    if settings.client_config is None:
        return config
    # AioConfig.merge takes any Config, and keeps botocore's options only: the aiohttp options are set after.
    # (The stubs know neither.)
    merged = config.merge(settings.client_config)  # type: ignore[arg-type]
    merged.http_session_cls = SharedTlsSession  # type: ignore[attr-defined]
    user = settings.client_config
    if isinstance(user, AioConfig):
        merged.connector_args = user.connector_args  # type: ignore[attr-defined]
        if user.http_session_cls is not DEFAULT_HTTP_SESSION_CLS:  # type: ignore[attr-defined]
            merged.http_session_cls = user.http_session_cls  # type: ignore[attr-defined]
    return merged
