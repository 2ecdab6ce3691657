"""
Creating clients without stalling the caller's event loop, against a real TLS endpoint.

What runs on the loop thread is observed in a fresh process with profiling hooks (``sys.setprofile`` and
``threading.setprofile`` record which thread calls what): nothing in the library is patched. The TLS tests talk to a
moto server behind TLS whose certificate a CA of the test issued.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from aiobotocore.config import AioConfig
from botocore.config import Config
from botocore.endpoint_provider import EndpointProvider
from botocore.exceptions import SSLError
from botocore.loaders import Loader
from support.tls import ConnectProxy, TlsMotoServer

from model_runner.cli.moto_server import MotoServer
from model_runner.sink import AsyncS3Sink, ClientSettings, clients
from model_runner.sink.clients import ClientOptions, shared_client
from model_runner.sink.connections import SharedTlsSession
from model_runner.sink.endpoints import unread_parameters

FEATURES = [{"type": "Feature", "geometry": None, "properties": {"n": n}} for n in range(3)]
TLS_BUCKET = "mrs-tls-bucket"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer) -> Iterator[TlsMotoServer]:
    """A moto S3 server behind TLS, with one bucket; the session's environment gives the credentials."""
    with TlsMotoServer(tmp_path_factory.mktemp("tls")) as server:
        s3 = boto3.client(
            "s3",
            endpoint_url=server.endpoint_url,
            verify=str(server.ca_bundle),
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket=TLS_BUCKET)
        yield server


def _write(endpoint_url: str, client_config: Config | None = None) -> bool:
    # One attempt: a refused certificate fails at once instead of after botocore's retries.
    client = ClientSettings(endpoint_url=endpoint_url, max_attempts=1, client_config=client_config)
    sink = AsyncS3Sink(TLS_BUCKET, "tls", client=client)
    # A loop of its own, so each write makes its client, as a process writing now and then does.
    return asyncio.run(sink.write("image", FEATURES))


def test_aws_ca_bundle_is_trusted(tls_server: TlsMotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tls_server.ca_bundle))
    assert _write(tls_server.endpoint_url)


def test_ca_bundle_of_the_aws_config_is_trusted(
    tls_server: TlsMotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    config.write_text(f"[default]\nca_bundle = {tls_server.ca_bundle}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    # The variable outranks the file.
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    assert _write(tls_server.endpoint_url)


def test_unknown_certificate_is_refused(tls_server: TlsMotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SSLError):
        _write(tls_server.endpoint_url)


def test_replaced_ca_bundle_is_read_again(
    tls_server: TlsMotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(tls_server.ca_bundle.read_bytes())
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    assert _write(tls_server.endpoint_url)
    # A rotated bundle that no longer holds the server's CA: the shared context must not outlive the file.
    import trustme

    trustme.CA().cert_pem.write_to_path(str(bundle))
    with pytest.raises(SSLError):
        _write(tls_server.endpoint_url)


def test_https_through_a_proxy(tls_server: TlsMotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tls_server.ca_bundle))
    with ConnectProxy() as proxy:
        assert _write(tls_server.endpoint_url, Config(proxies={"https": proxy.url}))
    assert proxy.targets and set(proxy.targets) == {f"127.0.0.1:{tls_server.port}"}


# Run in a fresh process: two event loops each write once to the TLS server, the second with a client_config of its
# own; the profiling hooks record which threads called what, and which modules the first write imported.
_OBSERVE = """
import asyncio, json, sys, threading
from botocore.config import Config
from model_runner.cli.moto_server import MotoServer
from model_runner.sink import AsyncS3Sink, ClientSettings

WATCHED = {"load_verify_locations", "_register_builtin_handlers", "_create_client_class", "_load_file"}
calls = []

def hook(frame, event, arg):
    name = getattr(arg, "__name__", None) if event == "c_call" else frame.f_code.co_name if event == "call" else None
    if name in WATCHED:
        calls.append((name, threading.current_thread() is threading.main_thread()))

sys.setprofile(hook)
threading.setprofile(hook)

async def write(client_config):
    client = ClientSettings(endpoint_url="URL", max_attempts=1, client_config=client_config)
    sink = AsyncS3Sink("BUCKET", "p", client=client)
    assert await sink.write("image", [{"type": "Feature", "geometry": None, "properties": {}}])

before = set(sys.modules)
asyncio.run(write(None))
imported = sorted(set(sys.modules) - before)
asyncio.run(write(Config(read_timeout=30)))
sys.setprofile(None)
threading.setprofile(None)
print(json.dumps({"calls": calls, "imported": imported}))
"""


@pytest.fixture(scope="module")
def observed(tls_server: TlsMotoServer) -> dict[str, Any]:
    """What two cold writes, on two event loops of a fresh process, ran on which thread."""
    script = _OBSERVE.replace("BUCKET", TLS_BUCKET).replace("URL", tls_server.endpoint_url)
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONWARNINGS"}
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**environment, "AWS_CA_BUNDLE": str(tls_server.ca_bundle)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _threads(observed: dict[str, Any], name: str) -> list[str]:
    return ["loop" if on_main else "worker" for called, on_main in observed["calls"] if called == name]


def test_tls_context_is_built_once_per_process_off_the_loop(observed: dict[str, Any]) -> None:
    # Two clients of two loops, configured differently, share one context, loaded in a worker thread.
    assert _threads(observed, "load_verify_locations") == ["worker"]


def test_botocore_handlers_are_registered_once_per_process_off_the_loop(observed: dict[str, Any]) -> None:
    # Each loop has a session of its own, made from the first one's handlers.
    assert _threads(observed, "_register_builtin_handlers") == ["worker"]


def test_clients_are_made_off_the_loop(observed: dict[str, Any]) -> None:
    assert _threads(observed, "_create_client_class") == ["worker", "worker"]


def test_models_are_parsed_with_orjson(observed: dict[str, Any]) -> None:
    # botocore's loader parses with the json module, which holds the GIL ~5x longer.
    assert _threads(observed, "_load_file") == []


def test_orjson_parses_the_models_as_botocore_does() -> None:
    # Fresh loaders: botocore edits the models it has loaded (S3's request URIs) as clients use them.
    ours, botocores = Loader(file_loader=clients._OrjsonFileLoader()), Loader()
    for service, kind in (("s3", "service-2"), ("s3", "endpoint-rule-set-1"), ("sts", "service-2")):
        assert ours.load_service_model(service, kind) == botocores.load_service_model(service, kind)
    assert ours.load_data("endpoints") == botocores.load_data("endpoints")


def test_first_write_imports_nothing(observed: dict[str, Any]) -> None:
    # An import on first use runs on the loop thread: the sink imports what its writes need.
    assert observed["imported"] == []


@pytest.mark.anyio
async def test_endpoint_is_resolved_once_per_bucket(bucket: str) -> None:
    sink = AsyncS3Sink(bucket, "keys")
    await sink.write("first", FEATURES)
    misses = EndpointProvider.resolve_endpoint.cache_info().misses  # type: ignore[attr-defined]
    for name in ("second", "third", "fourth"):
        assert await sink.write(name, FEATURES)
    # The object key is a parameter of S3's endpoint rules that no rule reads: new keys, same resolution.
    assert EndpointProvider.resolve_endpoint.cache_info().misses == misses  # type: ignore[attr-defined]


def test_unread_parameters() -> None:
    ruleset = {
        "parameters": {"Bucket": {}, "Region": {}, "Key": {}, "Endpoint": {}},
        "rules": [
            {
                "conditions": [{"fn": "isSet", "argv": [{"ref": "Bucket"}]}],
                "endpoint": {"url": "https://{Bucket}.s3.{Region}.example", "properties": {}, "headers": {}},
                "type": "endpoint",
            },
            {"conditions": [], "error": "no {Endpoint#path}", "type": "error"},
        ],
    }
    assert unread_parameters(ruleset) == {"Key"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "client_config",
    [None, Config(connect_timeout=7), AioConfig(connector_args={"keepalive_timeout": 3.0}, connect_timeout=7)],
    ids=["none", "botocore-config", "aioconfig"],
)
async def test_client_config_keeps_the_shared_tls_session(
    moto_server: MotoServer, client_config: Config | None
) -> None:
    options = ClientOptions(client=ClientSettings(client_config=client_config))
    async with shared_client(options) as shared:
        session = shared.client._endpoint.http_session
        assert isinstance(session, SharedTlsSession)
        if isinstance(client_config, AioConfig):
            # A user's aiohttp options reach aiohttp, where a merge with botocore's Config used to drop them.
            assert session._connector_args == {"keepalive_timeout": 3.0}
        if client_config is not None:
            assert shared.client.meta.config.connect_timeout == 7
