"""Assumed-role credentials: fetched once per role and event loop, shared by sinks, refreshed before expiry."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from aiobotocore.credentials import AioAssumeRoleCredentialFetcher, AioDeferredRefreshableCredentials
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import BotoCoreError, ClientError
from botocore.retries import standard

from model_runner.sink.exceptions import InvalidAssumedRoleException
from model_runner.sink.responses import error_code
from model_runner.sink.settings import Clock

__all__ = ["AssumedRole", "assumed_role_credentials", "is_role_arn", "is_transient", "refresh", "refresh_windows"]

logger = logging.getLogger(__name__)

_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")

# While the current credentials are valid, STS is asked again at most this often after a failed refresh: otherwise
# every request of the refresh window would wait for its own round of AssumeRole retries during an outage.
RETRY_PAUSE_SECONDS = 30

# What botocore's standard retry mode retries: throttling, 5xx answers, connection errors and timeouts.
_TRANSIENT = standard.OrRetryChecker([standard.TransientRetryableChecker(), standard.ThrottledRetryableChecker()])


def is_role_arn(value: str) -> bool:
    """
    Tell whether a string has the form of an IAM role ARN.

    :param value: The string.
    :return: `True` for ``arn:<partition>:iam::<account>:role/<name>``.
    """
    return _ROLE_ARN.match(value) is not None


def _local_now() -> datetime:
    return datetime.now(timezone.utc)


def refresh_windows(duration_seconds: int, refresh_seconds: int | None = None) -> tuple[int, int]:
    """
    When credentials are refreshed: botocore's mandatory and advisory windows, in seconds before expiry.

    In the advisory window the first request to come refreshes them while the others carry on; in the mandatory
    one every request waits for the refresh. Both stay well inside the credentials' life, so that a set is used
    for at least a quarter of it: the mandatory window is ``refresh_seconds``, by default the lesser of 600 s and
    a quarter of the duration; the advisory one adds the lesser of 300 s and a quarter of the duration.

    :param duration_seconds: Lifetime of the credentials.
    :param refresh_seconds: The mandatory window, at most half the lifetime; `None` to derive it.
    :return: ``(mandatory, advisory)`` in seconds.
    :raises ValueError: If ``refresh_seconds`` is negative or over half the lifetime.
    """
    if refresh_seconds is not None and not 0 <= 2 * refresh_seconds <= duration_seconds:
        raise ValueError(
            f"credential_refresh_seconds must be between 0 and half of role_duration_seconds "
            f"({duration_seconds // 2}), not {refresh_seconds}"
        )
    quarter = duration_seconds // 4
    mandatory = min(600, quarter) if refresh_seconds is None else refresh_seconds
    return mandatory, mandatory + min(300, quarter)


def is_transient(error: Exception) -> bool:
    """
    Tell whether an error is one botocore's standard retry mode retries: throttling, 5xx, connections, timeouts.

    :param error: An error raised by a botocore call.
    :return: `True` if the same call may well succeed later; `False` for a denial, a malformed request...
    """
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        context = standard.RetryContext(
            attempt_number=1, parsed_response=error.response, http_response=SimpleNamespace(status_code=status)
        )
    else:
        context = standard.RetryContext(attempt_number=1, caught_exception=error)
    return _TRANSIENT.is_retryable(context)


@dataclass(frozen=True)
class AssumedRole:
    """
    A role to assume, and where: everything that makes two sinks' credentials the same.

    :param role_arn: The role's ARN.
    :param session_name: The role session name.
    :param duration_seconds: Lifetime of the credentials.
    :param refresh_seconds: Refresh when fewer than this many seconds of their life remain (at most half of it), or
        `None` to derive it from the lifetime; see :func:`refresh_windows`.
    :param region_name: Region of the STS endpoint.
    :param sts_endpoint_url: STS endpoint, or `None` for the standard configuration.
    """

    role_arn: str
    session_name: str
    duration_seconds: int
    refresh_seconds: int | None
    region_name: str
    sts_endpoint_url: str | None = None


class _NoCache(dict[str, Any]):
    # The refreshable credentials keep the current set; a fetcher cache would answer a refresh with it again.
    def __contains__(self, key: object) -> bool:
        return False


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[AssumedRole, AioSession, Clock], Any]] = (
    weakref.WeakKeyDictionary()
)
_shared_lock = threading.Lock()


def forget_loop_credentials(loop: asyncio.AbstractEventLoop) -> None:
    """
    Let go of the credentials of an event loop that has ended.

    Their refresh lock binds to the loop, so a weak key alone would keep the loop alive.

    :param loop: The loop.
    """
    with _shared_lock:
        _shared.pop(loop, None)


def assumed_role_credentials(
    role: AssumedRole, source_session: AioSession, *, clock: Clock | None = None
) -> AioDeferredRefreshableCredentials:
    """
    The credentials of an assumed role, shared by every caller on this event loop.

    Nothing is fetched here. The first use calls AssumeRole; concurrent first uses wait for that one call. They
    are refreshed in the windows of :func:`refresh_windows`; while they are valid, a refresh that fails for a
    transient reason keeps them in use. The refresh lock belongs to an event loop, hence one set per loop.

    :param role: The role and STS endpoint.
    :param source_session: The session whose credentials call AssumeRole.
    :param clock: What time it is, for tests and simulations; the local clock by default.
    :return: Refreshable credentials, for ``AioSession._credentials`` or to get frozen credentials from.
    :raises InvalidAssumedRoleException: If ``role.role_arn`` is not an IAM role ARN.
    """
    if not is_role_arn(role.role_arn):
        raise InvalidAssumedRoleException(role.role_arn, "not an IAM role ARN")
    clock = clock or _local_now
    loop = asyncio.get_running_loop()
    with _shared_lock:
        per_loop = _shared.setdefault(loop, {})
        key = (role, source_session, clock)
        credentials = per_loop.get(key)
        if credentials is None:
            credentials = per_loop[key] = _create(role, source_session, clock)
    return credentials


async def refresh(credentials: AioDeferredRefreshableCredentials, role_arn: str) -> None:
    """
    Make sure credentials can sign a new write, fetching them if they are near expiry.

    Called before a write, so that a denied role fails it before any request. Requests under way sign with the
    current credentials while they are valid, whatever STS answers.

    :param credentials: Credentials from :func:`assumed_role_credentials`.
    :param role_arn: The role they are for, to name in an error.
    :raises InvalidAssumedRoleException: If STS refuses the role (not retried), or the credentials have expired
        and STS cannot renew them, or the local clock is too far ahead of STS's.
    """
    try:
        await credentials.get_frozen_credentials()
    except (ClientError, BotoCoreError) as error:
        raise InvalidAssumedRoleException(role_arn, _reason(error)) from error
    if isinstance(credentials, _RoleCredentials) and credentials.denial is not None:
        raise InvalidAssumedRoleException(role_arn, _reason(credentials.denial)) from credentials.denial


def _reason(error: BaseException) -> str:
    return error_code(error) or type(error).__name__


def _utc(moment: datetime | None) -> str:
    return "never" if moment is None else moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _RoleCredentials(AioDeferredRefreshableCredentials):
    """
    aiobotocore's refreshable credentials, kept in use while they are valid when a refresh fails.

    botocore forgives a failed refresh only in the advisory window: in the mandatory one it raises, though the
    credentials it holds still work for minutes, and every request signed then fails, an upload's abort too.
    Here a transient failure keeps the current credentials until they expire, and a denial keeps them for the
    requests under way while :func:`refresh` fails new writes.
    """

    _time_fetcher: Clock
    _expiry_time: datetime | None
    _frozen_credentials: ReadOnlyCredentials | None
    _refresh_using: Callable[[], Awaitable[dict[str, Any]]]
    _mandatory_refresh_timeout: int
    _advisory_refresh_timeout: int

    if TYPE_CHECKING:

        def _set_from_data(self, data: dict[str, Any]) -> None: ...

        def _seconds_remaining(self) -> float: ...

    def __init__(self, role: AssumedRole, fetch: Callable[[], Awaitable[dict[str, Any]]], clock: Clock) -> None:
        super().__init__(refresh_using=fetch, method="assume-role", time_fetcher=clock)
        self.role = role
        # botocore sets these windows per class; its constructor arguments for them are not on the deferred variant.
        self._mandatory_refresh_timeout, self._advisory_refresh_timeout = refresh_windows(
            role.duration_seconds, role.refresh_seconds
        )
        #: The failure of the last refresh, while the current credentials are kept; `None` after a success.
        self.failure: ClientError | BotoCoreError | None = None
        self._paused_until: datetime | None = None

    @property
    def denial(self) -> ClientError | BotoCoreError | None:
        """
        :return: The failure of the last refresh if it was not transient (a denial...), else `None`.
        """
        return None if self.failure is None or is_transient(self.failure) else self.failure

    def refresh_needed(self, refresh_in: int | None = None) -> bool:
        if self._paused_until is not None and self._time_fetcher() < self._paused_until and not self._is_expired():
            return False
        return super().refresh_needed(refresh_in)

    def _is_expired(self) -> bool:
        # botocore's asks refresh_needed(0), which a pause would answer.
        return super().refresh_needed(0)

    async def _protected_refresh(self, is_mandatory: bool) -> None:
        try:
            metadata = await self._refresh_using()
        except (ClientError, BotoCoreError) as error:
            self._keep_current(error)
            return
        self._set_from_data(metadata)
        self._frozen_credentials = ReadOnlyCredentials(
            self._access_key,  # type: ignore[attr-defined]
            self._secret_key,  # type: ignore[attr-defined]
            self._token,  # type: ignore[attr-defined]
            self._account_id,  # type: ignore[attr-defined]
        )
        if self.failure is not None:
            logger.info("credentials of role %s refreshed again", self.role.role_arn)
        self.failure = self._paused_until = None
        self._check_clock()

    def _keep_current(self, error: ClientError | BotoCoreError) -> None:
        """
        Keep the current credentials after a failed refresh while they are valid, or raise.

        :param error: Why the refresh failed.
        :raises InvalidAssumedRoleException: If there are no valid credentials to keep.
        """
        arn = self.role.role_arn
        if self._frozen_credentials is None:
            raise InvalidAssumedRoleException(arn, _reason(error)) from error
        if self._is_expired():
            reason = f"{_reason(error)}, and the credentials expired at {_utc(self._expiry_time)}"
            raise InvalidAssumedRoleException(arn, reason) from error
        remaining = self._seconds_remaining()
        if self.failure is None:
            # Once per run of failures: a refresh is tried again every RETRY_PAUSE_SECONDS until one succeeds.
            consequence = "writes carry on" if is_transient(error) else "new writes fail; requests under way carry on"
            logger.warning(
                "could not refresh the credentials of role %s (%s): %s with the current ones, valid %.0f s more",
                arn,
                _reason(error),
                consequence,
                remaining,
            )
        else:
            logger.debug("could not refresh the credentials of role %s again (%s)", arn, _reason(error))
        self.failure = error
        self._paused_until = self._time_fetcher() + timedelta(seconds=RETRY_PAUSE_SECONDS)

    def _check_clock(self) -> None:
        """
        :raises InvalidAssumedRoleException: If fresh credentials already need a refresh by the local clock.
        """
        remaining = self._seconds_remaining()
        if remaining >= self._advisory_refresh_timeout:
            return
        ahead = self.role.duration_seconds - remaining
        when = f"{remaining:.0f} s from now" if remaining > 0 else f"{-remaining:.0f} s ago"
        reason = (
            f"STS issued credentials for {self.role.duration_seconds} s that expire at {_utc(self._expiry_time)}, "
            f"{when} by the local clock: the local clock is about {ahead:.0f} s ahead of STS's (clock skew), so "
            "they would be refreshed on every request; set the clock right (NTP)"
        )
        raise InvalidAssumedRoleException(self.role.role_arn, reason)


def _create(role: AssumedRole, source_session: AioSession, clock: Clock) -> AioDeferredRefreshableCredentials:
    fetcher: AioAssumeRoleCredentialFetcher | None = None

    async def fetch() -> dict[str, Any]:
        nonlocal fetcher
        if fetcher is None:
            source = await source_session.get_credentials()
            fetcher = AioAssumeRoleCredentialFetcher(
                client_creator=functools.partial(  # type: ignore[arg-type]
                    source_session.create_client,
                    region_name=role.region_name,
                    endpoint_url=role.sts_endpoint_url,
                    # Denials and malformed ARNs are not retried by this mode, so they fail fast.
                    config=Config(retries={"mode": "standard"}),
                ),
                source_credentials=source,
                role_arn=role.role_arn,
                extra_args={"RoleSessionName": role.session_name, "DurationSeconds": role.duration_seconds},
                cache=_NoCache(),
            )
        return await fetcher.fetch_credentials()  # type: ignore[no-any-return]

    return _RoleCredentials(role, fetch, clock)
