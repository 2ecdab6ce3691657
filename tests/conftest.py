"""
Shared fixtures: one moto S3/STS server per session, reached only through the standard AWS variables, and fault
proxies in front of it.

The tests come in tiers: ``unit/`` needs no server; ``s3/`` writes to the moto server; ``faults/`` goes through a
:class:`~support.proxy.FaultProxy` that injects faults; ``proxy/`` tests the proxy itself. ``support/`` holds what
they share.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from support.proxy import FaultProxy

from model_runner.cli.moto_server import MotoServer

# Variables that would point clients elsewhere than the test server, or at a user's own configuration.
_FOREIGN_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)


_EVENT_LOOPS = ("asyncio", "uvloop")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--event-loop",
        choices=_EVENT_LOOPS,
        default="asyncio",
        help="the event loop of the async tests: asyncio's own (default) or uvloop, as under uvicorn",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"event loop of the async tests: {config.getoption('event_loop')}"


@pytest.fixture(scope="session")
def anyio_backend(request: pytest.FixtureRequest) -> str | tuple[str, dict[str, Any]]:
    """Async tests run on asyncio, the loop the library targets; ``--event-loop=uvloop`` puts uvloop under it."""
    if request.config.getoption("event_loop") == "uvloop":
        # anyio imports uvloop itself: a missing uvloop is an ImportError, never a silent fallback to asyncio's loop.
        return ("asyncio", {"use_uvloop": True})
    return "asyncio"


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """
    A moto S3 and STS server for the session, with ``os.environ`` pointing every AWS client at it.

    Sinks find the server only through the standard variables (``AWS_ENDPOINT_URL_S3`` ...), as in production.
    The user's own AWS configuration files and profiles are hidden for the session.
    """
    missing = tmp_path_factory.mktemp("aws") / "absent"
    with MotoServer() as server, pytest.MonkeyPatch.context() as patch:
        for name in _FOREIGN_VARIABLES:
            patch.delenv(name, raising=False)
        patch.setenv("AWS_CONFIG_FILE", str(missing))
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
        for name, value in server.environment().items():
            patch.setenv(name, value)
        yield server


@pytest.fixture(scope="session")
def s3(moto_server: MotoServer) -> Any:
    """A plain boto3 S3 client, configured from the environment, to create buckets and check results."""
    return boto3.client("s3")


def _unique_bucket_name() -> str:
    return f"mrs-test-{uuid.uuid4().hex[:20]}"


@pytest.fixture
def bucket(s3: Any) -> str:
    """A fresh, empty bucket of its own for each test."""
    name = _unique_bucket_name()
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def missing_bucket(moto_server: MotoServer) -> str:
    """The name of a bucket that does not exist."""
    return _unique_bucket_name()


@pytest.fixture
def read_object(s3: Any, bucket: str) -> Callable[[str], bytes]:
    """Read an object of the test's bucket: ``read_object(key) -> bytes``."""

    def read(key: str) -> bytes:
        body: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    return read


@pytest.fixture
def stored_keys(s3: Any, bucket: str) -> Callable[[], list[str]]:
    """List the keys in the test's bucket: ``stored_keys() -> sorted keys``."""

    def keys() -> list[str]:
        found = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            found.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(found)

    return keys


@pytest.fixture
def subprocess_environment(moto_server: MotoServer) -> dict[str, str]:
    """The environment of a child Python process: the session's AWS variables, no warnings filter."""
    environment = dict(os.environ)
    environment.pop("PYTHONWARNINGS", None)
    return environment


@pytest.fixture(scope="session")
def fault_moto(moto_server: MotoServer) -> MotoServer:
    """
    The session's moto server, as the upstream of fault proxies.

    :return: The running server.
    """
    return moto_server


@pytest.fixture
def proxy(fault_moto: MotoServer) -> Iterator[FaultProxy]:
    """
    A fresh fault proxy in front of :func:`fault_moto`, with no rules, an empty log and random seed 0.

    :return: The running proxy.
    """
    with FaultProxy(fault_moto.endpoint_url, seed=0) as fault_proxy:
        yield fault_proxy
