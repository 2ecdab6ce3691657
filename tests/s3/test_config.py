"""Configuration: construction does no network I/O; the standard variables apply; keywords override them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError

from model_runner.cli.moto_server import MotoServer
from model_runner.sink import AsyncS3Sink, ClientSettings, S3Sink

pytestmark = pytest.mark.timeout(60)

ROLE_ARN = "arn:aws:iam::123456789012:role/model-runner-writer"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback socket that listens but never answers: connections to it can be seen, not served."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        server.setblocking(False)
        yield server


def url_of(server: socket.socket) -> str:
    return f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def closed_port_url() -> str:
    """An endpoint on a loopback port nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_construction_does_no_network_io(
    moto_server: MotoServer, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url_of(listener))
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", url_of(listener))
    sinks: list[Any] = [
        S3Sink("results-bucket", "out"),
        S3Sink("results-bucket", "out", ROLE_ARN),
        AsyncS3Sink("results-bucket", "out"),
        AsyncS3Sink("results-bucket", "out", ROLE_ARN),
        AsyncS3Sink("results-bucket", "out", client=ClientSettings(endpoint_url=url_of(listener))),
    ]
    assert [str(sink) for sink in sinks] == ["S3 AGGREGATE"] * len(sinks)
    with pytest.raises(BlockingIOError):
        listener.accept()


def test_async_write_uses_the_endpoint_from_the_environment(
    moto_server: MotoServer, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url_of(listener))
    sink = AsyncS3Sink("results-bucket", "out", client=ClientSettings(max_attempts=1))
    with pytest.raises(BlockingIOError):
        listener.accept()
    outcome: list[BaseException | bool] = []

    def write_in_a_fresh_loop() -> None:
        try:
            outcome.append(asyncio.run(sink.write("scene", [])))
        except BaseException as error:
            outcome.append(error)

    writer = threading.Thread(target=write_in_a_fresh_loop)
    writer.start()
    # Serve every connection the write makes by closing it: the HTTP layer may try more than once.
    listener.settimeout(0.1)
    requests = []
    for _ in range(300):
        if not writer.is_alive():
            break
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        with connection:
            connection.settimeout(5)
            requests.append(connection.recv(4096))
    writer.join(10)
    assert not writer.is_alive()
    assert requests, "the write never reached the endpoint in AWS_ENDPOINT_URL_S3"
    assert all(b"/results-bucket" in request.split(b"\r\n")[0] for request in requests)
    assert len(outcome) == 1
    assert isinstance(outcome[0], BotoCoreError), outcome


def test_sync_sink_construction_and_failing_write(subprocess_environment: dict[str, str]) -> None:
    # A fresh process: the sync sinks share one event loop per process, with its clients.
    script = textwrap.dedent(
        """
        import os, socket, sys
        from botocore.exceptions import BotoCoreError
        from model_runner.sink import ClientSettings, S3Sink

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        listener.setblocking(False)
        os.environ["AWS_ENDPOINT_URL_S3"] = "http://127.0.0.1:%d" % listener.getsockname()[1]
        sink = S3Sink("results-bucket", "out", client=ClientSettings(max_attempts=1))
        try:
            listener.accept()
        except BlockingIOError:
            print("no connection at construction")
        listener.close()
        try:
            sink.write("scene", [])
        except BotoCoreError as error:
            print("write failed:", type(error).__name__)
        else:
            print("write did not fail")
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        env=subprocess_environment,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0] == "no connection at construction"
    assert lines[1].startswith("write failed: ")


def test_endpoint_url_keyword_beats_environment(
    bucket: str, moto_server: MotoServer, closed_port_url: str, monkeypatch: pytest.MonkeyPatch, s3: Any
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed_port_url)
    sink = S3Sink(bucket, "kw", client=ClientSettings(endpoint_url=moto_server.endpoint_url))
    assert sink.validate_s3_bucket() is True
    assert sink.write("scene", []) is True
    assert s3.head_object(Bucket=bucket, Key="kw/scene.geojson")["ContentLength"] > 0


@pytest.mark.anyio
async def test_async_endpoint_url_keyword_beats_environment(
    bucket: str,
    moto_server: MotoServer,
    closed_port_url: str,
    monkeypatch: pytest.MonkeyPatch,
    read_object: Callable[[str], bytes],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", closed_port_url)
    # The deprecated keyword, as the README documented it, still works.
    with pytest.warns(DeprecationWarning, match=r"client=ClientSettings\(endpoint_url=\.\.\.\)"):
        sink = AsyncS3Sink(bucket, "kw", endpoint_url=moto_server.endpoint_url)
    async with sink:
        assert await sink.validate_s3_bucket() is True
        assert await sink.write("scene", []) is True
    assert read_object("kw/scene.geojson") == b'{"type":"FeatureCollection","features":[]}'


def test_endpoint_url_keyword_reaches_the_given_endpoint(bucket: str, closed_port_url: str) -> None:
    sink = S3Sink(bucket, "kw", client=ClientSettings(endpoint_url=closed_port_url, max_attempts=1))
    with pytest.raises(BotoCoreError):
        sink.write("scene", [])


@pytest.mark.anyio
async def test_async_endpoint_url_keyword_reaches_the_given_endpoint(
    bucket: str,
    closed_port_url: str,
) -> None:
    # The deprecated keyword is folded into the client settings given beside it.
    with pytest.warns(DeprecationWarning):
        sink = AsyncS3Sink(bucket, "kw", endpoint_url=closed_port_url, client=ClientSettings(max_attempts=1))
    assert sink.client == ClientSettings(endpoint_url=closed_port_url, max_attempts=1)
    async with sink:
        with pytest.raises(BotoCoreError):
            await sink.validate_s3_bucket()
