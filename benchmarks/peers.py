"""The peers: what a user would pick instead of this project's sinks (benchmarks/README.md says how each writes)."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Iterable
from typing import Any

import aioboto3
import boto3
import obstore
import orjson
import s3fs
import smart_open
from aiobotocore.config import AioConfig
from botocore.config import Config
from obstore.store import S3Store

from benchmarks.contenders import Contender, Job
from model_runner.sink.async_s3_sink import object_key
from model_runner.sink.encoding import COLLECTION_HEAD, COLLECTION_TAIL

__all__ = ["CONTENDERS"]


def _config(kind: type[Config] = Config) -> Any:
    # As the seed, the floor and the sinks: no SHA-256 of request bodies over the moto endpoint's plain HTTP.
    return kind(s3={"payload_signing_enabled": False})


def _collection(features: list[Any]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}


class _AsyncPeer(Contender):
    """A peer awaited from the loop: its writes run concurrently through ``write``."""

    @classmethod
    def prepare(cls, features: Iterable[Any]) -> Any:
        """
        The collection as a list, made before the clock starts: these peers serialise it whole.

        :param features: A list, or a generator for streamed workloads.
        :return: A list of the features.
        """
        return features if isinstance(features, list) else list(features)

    async def run(self, jobs: list[Job]) -> int:
        """
        Write the collections concurrently.

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        sizes = await asyncio.gather(*(self.write(object_key(self.prefix, image_id), f) for image_id, f in jobs))
        return sum(sizes)

    async def write(self, key: str, features: list[Any]) -> int:
        """
        Serialise and store one collection.

        :param key: The object's key.
        :param features: The features.
        :return: Bytes stored.
        """
        raise NotImplementedError


class Aioboto3Peer(_AsyncPeer):
    """aioboto3: ``json.dumps`` into a ``BytesIO``, ``upload_fileobj``."""

    key = "aioboto3"

    async def __aenter__(self) -> Aioboto3Peer:
        client = aioboto3.Session().client("s3", config=_config(AioConfig))
        self._client = await self._stack.enter_async_context(client)
        return self

    async def write(self, key: str, features: list[Any]) -> int:
        body = io.BytesIO(json.dumps(_collection(features)).encode())
        await self._client.upload_fileobj(body, self.bucket, key)
        return len(body.getbuffer())


class ObstorePeer(_AsyncPeer):
    """obstore: ``orjson.dumps``, ``put_async`` to an ``S3Store`` at the moto endpoint."""

    key = "obstore"

    async def __aenter__(self) -> ObstorePeer:
        self._store = S3Store(
            self.bucket,
            endpoint=os.environ["AWS_ENDPOINT_URL_S3"],
            region=os.environ["AWS_REGION"],
            access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            session_token=os.environ["AWS_SESSION_TOKEN"],
            client_options={"allow_http": True},
        )
        return self

    async def write(self, key: str, features: list[Any]) -> int:
        body = orjson.dumps(_collection(features))
        await obstore.put_async(self._store, key, body)
        return len(body)


class S3fsPeer(_AsyncPeer):
    """s3fs, asynchronous: ``orjson.dumps``, ``_pipe_file``."""

    key = "s3fs"

    async def __aenter__(self) -> S3fsPeer:
        self._fs = s3fs.S3FileSystem(
            asynchronous=True,
            skip_instance_cache=True,
            client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"]},
            config_kwargs={"s3": {"payload_signing_enabled": False}},
        )
        client = await self._fs.set_session()
        self._stack.push_async_callback(client.close)
        return self

    async def write(self, key: str, features: list[Any]) -> int:
        body = orjson.dumps(_collection(features))
        await self._fs._pipe_file(f"{self.bucket}/{key}", body)
        return len(body)


class SmartOpenPeer(Contender):
    """smart_open: a stream written a feature at a time, from a worker thread."""

    key = "smart_open"

    call_mode = "to_thread"

    async def __aenter__(self) -> SmartOpenPeer:
        # In a worker thread, as the writes: boto3 would otherwise make its client on the loop.
        self._client = await asyncio.to_thread(boto3.client, "s3", config=_config())
        return self

    async def run(self, jobs: list[Job]) -> int:
        """
        Write the collections, each through ``asyncio.to_thread`` (default executor).

        :param jobs: ``(image id, features)`` pairs.
        :return: Bytes stored.
        """
        sizes = await asyncio.gather(*(asyncio.to_thread(self._write, *job) for job in jobs))
        return sum(sizes)

    def _write(self, image_id: str, features: Iterable[Any]) -> int:
        url = f"s3://{self.bucket}/{object_key(self.prefix, image_id)}"
        with smart_open.open(url, "wb", transport_params={"client": self._client}) as stream:
            size = stream.write(COLLECTION_HEAD)
            for index, feature in enumerate(features):
                size += stream.write(b"," + orjson.dumps(feature) if index else orjson.dumps(feature))
            size += stream.write(COLLECTION_TAIL)
        return size


CONTENDERS: dict[str, type[Contender]] = {
    kind.key: kind for kind in (Aioboto3Peer, ObstorePeer, SmartOpenPeer, S3fsPeer)
}
