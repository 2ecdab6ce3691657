"""Assumed-role credentials: fetched once per role and event loop, shared by sinks, refreshed before expiry."""

from __future__ import annotations

import asyncio
import functools
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiobotocore.credentials import AioAssumeRoleCredentialFetcher, AioDeferredRefreshableCredentials
from aiobotocore.session import AioSession
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from model_runner.sink.exceptions import InvalidAssumedRoleException

__all__ = ["AssumedRole", "assumed_role_credentials", "is_role_arn", "refresh"]

_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")

Clock = Callable[[], datetime]


def is_role_arn(value: str) -> bool:
    """
    Tell whether a string has the form of an IAM role ARN.

    :param value: The string.
    :return: `True` for ``arn:<partition>:iam::<account>:role/<name>``.
    """
    return _ROLE_ARN.match(value) is not None


def _local_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class AssumedRole:
    """
    A role to assume, and where: everything that makes two sinks' credentials the same.

    :param role_arn: The role's ARN.
    :param session_name: The role session name.
    :param duration_seconds: Lifetime of the credentials.
    :param refresh_seconds: Refresh when fewer than this many seconds of their life remain.
    :param region_name: Region of the STS endpoint.
    :param sts_endpoint_url: STS endpoint, or `None` for the standard configuration.
    """

    role_arn: str
    session_name: str
    duration_seconds: int
    refresh_seconds: int
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
    are refreshed when fewer than ``role.refresh_seconds`` remain, and, in the five minutes before that, by the
    first caller to come (the others carry on with the current set). The refresh lock belongs to an event loop,
    hence one set per loop.

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
    Make sure credentials are fresh, fetching them if they are near expiry.

    Called before a write, so that request signing never meets an expired or denied role mid-upload.

    :param credentials: Credentials from :func:`assumed_role_credentials`.
    :param role_arn: The role they are for, to name in an error.
    :raises InvalidAssumedRoleException: If the role cannot be assumed; denials are not retried.
    """
    try:
        await credentials.get_frozen_credentials()
    except (ClientError, BotoCoreError) as error:
        code = error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None
        raise InvalidAssumedRoleException(role_arn, code or type(error).__name__) from error


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

    credentials = AioDeferredRefreshableCredentials(refresh_using=fetch, method="assume-role", time_fetcher=clock)
    # botocore sets these windows per class; its constructor arguments for them are not on the deferred variant.
    credentials._mandatory_refresh_timeout = role.refresh_seconds  # type: ignore[attr-defined]
    credentials._advisory_refresh_timeout = role.refresh_seconds + 300  # type: ignore[attr-defined]
    return credentials
