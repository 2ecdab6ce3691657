"""A caller's own aioboto3.Session: its credentials, profile and region sign the sink's requests."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aioboto3
import pytest
from support.proxy import FaultProxy

from model_runner.cli.moto_server import MotoServer
from model_runner.sink import AsyncS3Sink, ClientSettings, S3Sink, clients

pytestmark = pytest.mark.timeout(60)

FEATURES = [{"type": "Feature", "geometry": None, "properties": {"n": n}} for n in range(3)]
BODY = (
    b'{"type":"FeatureCollection","features":['
    + b",".join(b'{"type":"Feature","geometry":null,"properties":{"n":%d}}' % n for n in range(3))
    + b"]}"
)
ROLE = "arn:aws:iam::123456789012:role/session-writer"
SESSION_KEY = "AKIASESSIONKEY000001"
_SCOPE = re.compile(r"Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request")


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A proxy with no rules in front of the moto server: it records every request's headers."""
    with FaultProxy(moto_server.endpoint_url, seed=0) as recorder:
        yield recorder


@pytest.fixture
def no_environment_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """No credentials in the environment, nor anywhere the default chain looks."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def signers(proxy: FaultProxy, operation: str | None = None) -> set[tuple[str, str, str]]:
    """
    :return: The ``(access key, region, service)`` of each request's signature, for one operation or all.
    """
    scopes = set()
    for name, value in proxy.header_values("Authorization"):
        if operation is None or name == operation:
            match = _SCOPE.search(value or "")
            assert match is not None, value
            scopes.add(match.groups())
    return scopes


def user_session(region_name: str | None = "us-east-1", **options: Any) -> aioboto3.Session:
    return aioboto3.Session(
        aws_access_key_id=SESSION_KEY, aws_secret_access_key="session-secret", region_name=region_name, **options
    )


@pytest.mark.anyio
@pytest.mark.usefixtures("no_environment_credentials")
async def test_a_session_with_its_own_credentials_signs_the_writes(
    proxy: FaultProxy, bucket: str, read_object: Any
) -> None:
    sink = AsyncS3Sink(bucket, "session", session=user_session(), client=ClientSettings(endpoint_url=proxy.url))
    assert await sink.validate_s3_bucket()
    assert await sink.write("image", FEATURES)
    assert read_object("session/image.geojson") == BODY
    assert signers(proxy) == {(SESSION_KEY, "us-east-1", "s3")}


@pytest.mark.usefixtures("no_environment_credentials")
def test_the_sync_sink_uses_the_session_and_its_region(proxy: FaultProxy, bucket: str, read_object: Any) -> None:
    # The session's region comes before AWS_REGION (us-east-1 here), as for any client the session makes.
    sink = S3Sink(bucket, "sync", session=user_session("eu-west-2"), client=ClientSettings(endpoint_url=proxy.url))
    assert sink.session is not None
    assert sink.write("image", FEATURES)
    assert read_object("sync/image.geojson") == BODY
    assert signers(proxy) == {(SESSION_KEY, "eu-west-2", "s3")}


@pytest.mark.anyio
@pytest.mark.usefixtures("no_environment_credentials")
async def test_the_client_settings_region_comes_before_the_session_s(proxy: FaultProxy, bucket: str) -> None:
    client = ClientSettings(endpoint_url=proxy.url, region_name="ap-southeast-2")
    assert await AsyncS3Sink(bucket, "region", session=user_session("eu-west-2"), client=client).write("image", [])
    assert signers(proxy) == {(SESSION_KEY, "ap-southeast-2", "s3")}


@pytest.mark.anyio
@pytest.mark.usefixtures("no_environment_credentials")
async def test_the_role_is_assumed_with_the_session_s_credentials(
    proxy: FaultProxy, bucket: str, read_object: Any
) -> None:
    client = ClientSettings(endpoint_url=proxy.url, sts_endpoint_url=proxy.url)
    sink = AsyncS3Sink(bucket, "role", ROLE, session=user_session(), client=client)
    assert await sink.write("image", FEATURES)
    assert read_object("role/image.geojson") == BODY
    assert {key for key, _, _ in signers(proxy, "AssumeRole")} == {SESSION_KEY}
    # The writes themselves are signed with the role's credentials.
    role_keys = {key for key, _, service in signers(proxy) if service == "s3"}
    assert role_keys and SESSION_KEY not in role_keys


@pytest.mark.usefixtures("no_environment_credentials")
def test_the_session_s_profile_gives_the_credentials(
    proxy: FaultProxy, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text("[writer]\naws_access_key_id = AKIAPROFILEKEY000001\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    session = aioboto3.Session(profile_name="writer")
    assert asyncio.run(
        AsyncS3Sink(bucket, "profile", session=session, client=ClientSettings(endpoint_url=proxy.url)).write(
            "image", []
        )
    )
    assert signers(proxy) == {("AKIAPROFILEKEY000001", "us-east-1", "s3")}


def test_sinks_share_a_client_per_session(bucket: str) -> None:
    first, second = user_session(), user_session()
    sinks = [
        AsyncS3Sink(bucket, "a", session=first),
        AsyncS3Sink(bucket, "b", session=first),
        AsyncS3Sink(bucket, "c", session=second),
        AsyncS3Sink(bucket, "d"),
    ]

    async def main() -> int:
        for sink in sinks:
            assert await sink.write("image", FEATURES)
        return len(clients.SharedClients.of_running_loop()._entries)

    assert asyncio.run(main()) == 3


def test_a_session_must_be_an_aioboto3_session() -> None:
    import boto3

    with pytest.raises(TypeError, match=r"session must be an aioboto3\.Session, not Session"):
        AsyncS3Sink("bucket", "p", session=boto3.Session())
