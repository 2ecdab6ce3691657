"""The fault proxy does what each of its actions says, seen through plain boto3 clients against a real moto server."""

from __future__ import annotations

import asyncio
import random
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest
from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from support.proxy import Exchange, FaultProxy, Rule, classify

from model_runner.cli.moto_server import MotoServer

MiB = 1 << 20
ROLE_ARN = "arn:aws:iam::123456789012:role/model-runner"


def client(endpoint_url: str, service: str = "s3", *, attempts: int = 1, **config: Any) -> Any:
    """
    A boto3 client with test credentials.

    :param endpoint_url: Where to send requests.
    :param service: ``"s3"`` or ``"sts"``.
    :param attempts: Total attempts per call, the first included (botocore's ``total_max_attempts``).
    :param config: More :class:`botocore.config.Config` arguments.
    :return: The client.
    """
    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(
            **{
                "retries": {"total_max_attempts": attempts, "mode": "standard"},
                "s3": {"addressing_style": "path"},
                "connect_timeout": 5,
                "read_timeout": 30,
                **config,
            }
        ),
    )


def payload(size: int, seed: int = 0) -> bytes:
    """
    :param size: How many bytes.
    :param seed: Seed of the generator, so each call with the same arguments gives the same bytes.
    :return: Random bytes, which no transfer encoding could compress.
    """
    return random.Random(seed).randbytes(size)


def stored(fault_moto: MotoServer, bucket: str, key: str) -> bytes | None:
    """
    Read an object around the proxy, as the server holds it.

    :param fault_moto: The server.
    :param bucket: The bucket.
    :param key: The key.
    :return: The object's bytes; ``None`` if there is no such object.
    """
    try:
        return bytes(client(fault_moto.endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as error:
        if error.response["Error"]["Code"] == "NoSuchKey":
            return None
        raise


@pytest.fixture
def fault_bucket(fault_moto: MotoServer) -> str:
    """A new bucket, created around the proxy so proxy logs start empty."""
    name = f"faults-{uuid.uuid4().hex[:12]}"
    client(fault_moto.endpoint_url).create_bucket(Bucket=name)
    return name


@pytest.fixture
def proxied_s3(proxy: FaultProxy) -> Any:
    """An S3 client through the proxy that makes a single attempt per call, so each fault surfaces."""
    return client(proxy.url)


def test_passes_requests_and_bodies_through_unchanged(
    proxy: FaultProxy, proxied_s3: Any, fault_moto: MotoServer
) -> None:
    bucket, data = f"faults-{uuid.uuid4().hex[:12]}", payload(3 * MiB + 17)
    proxied_s3.create_bucket(Bucket=bucket)
    proxied_s3.put_object(Bucket=bucket, Key="dir/a b+c.bin", Body=data, ContentType="application/geo+json")

    got = proxied_s3.get_object(Bucket=bucket, Key="dir/a b+c.bin")
    assert got["Body"].read() == data
    assert got["ContentType"] == "application/geo+json"
    assert proxied_s3.head_object(Bucket=bucket, Key="dir/a b+c.bin")["ContentLength"] == len(data)
    assert stored(fault_moto, bucket, "dir/a b+c.bin") == data
    assert proxy.log == [
        ("CreateBucket", "PUT", f"/{bucket}", 200),
        ("PutObject", "PUT", f"/{bucket}/dir/a b+c.bin", 200),
        ("GetObject", "GET", f"/{bucket}/dir/a b+c.bin", 200),
        ("HeadObject", "HEAD", f"/{bucket}/dir/a b+c.bin", 200),
    ]
    assert isinstance(proxy.log[0], Exchange)


def test_classifies_each_operation_from_real_clients(proxy: FaultProxy, proxied_s3: Any, fault_bucket: str) -> None:
    proxied_s3.head_bucket(Bucket=fault_bucket)
    upload = proxied_s3.create_multipart_upload(Bucket=fault_bucket, Key="big")["UploadId"]
    first = proxied_s3.upload_part(Bucket=fault_bucket, Key="big", UploadId=upload, PartNumber=1, Body=payload(5 * MiB))
    last = proxied_s3.upload_part(Bucket=fault_bucket, Key="big", UploadId=upload, PartNumber=2, Body=b"tail")
    proxied_s3.list_multipart_uploads(Bucket=fault_bucket)
    parts = [{"PartNumber": 1, "ETag": first["ETag"]}, {"PartNumber": 2, "ETag": last["ETag"]}]
    proxied_s3.complete_multipart_upload(
        Bucket=fault_bucket, Key="big", UploadId=upload, MultipartUpload={"Parts": parts}
    )
    abandoned = proxied_s3.create_multipart_upload(Bucket=fault_bucket, Key="abandoned")["UploadId"]
    proxied_s3.abort_multipart_upload(Bucket=fault_bucket, Key="abandoned", UploadId=abandoned)
    proxied_s3.put_object(Bucket=fault_bucket, Key="small", Body=b"{}")
    proxied_s3.head_object(Bucket=fault_bucket, Key="big")
    proxied_s3.get_object(Bucket=fault_bucket, Key="small")["Body"].read()
    proxied_s3.list_objects(Bucket=fault_bucket)
    proxied_s3.list_objects_v2(Bucket=fault_bucket)
    proxied_s3.delete_object(Bucket=fault_bucket, Key="small")
    client(proxy.url, "sts").assume_role(RoleArn=ROLE_ARN, RoleSessionName="faults")

    assert [(operation, status) for operation, _, _, status in proxy.log] == [
        ("HeadBucket", 200),
        ("CreateMultipartUpload", 200),
        ("UploadPart", 200),
        ("UploadPart", 200),
        ("ListMultipartUploads", 200),
        ("CompleteMultipartUpload", 200),
        ("CreateMultipartUpload", 200),
        ("AbortMultipartUpload", 204),
        ("PutObject", 200),
        ("HeadObject", 200),
        ("GetObject", 200),
        ("ListObjects", 200),
        ("ListObjectsV2", 200),
        ("DeleteObject", 204),
        ("AssumeRole", 200),
    ]
    assert proxy.count("UploadPart") == 2
    assert proxy.log[-1] == ("AssumeRole", "POST", "/", 200)
    proxy.reset_log()
    assert proxy.log == []
    assert proxy.count("UploadPart") == 0


@pytest.mark.parametrize(
    ("method", "path", "query", "headers", "body", "expected"),
    [
        ("PUT", "/b/k", {"partNumber": "3", "uploadId": "u"}, {}, b"", "UploadPart"),
        ("PUT", "/b/k", {"partNumber": "3", "uploadId": "u"}, {"x-amz-copy-source": "b/o"}, b"", "UploadPartCopy"),
        ("PUT", "/b/a/deep/k", {}, {}, b"", "PutObject"),
        ("PUT", "/b/k", {}, {"X-Amz-Copy-Source": "b/o"}, b"", "CopyObject"),
        ("PUT", "/b", {}, {}, b"", "CreateBucket"),
        ("PUT", "/b/", {}, {}, b"", "CreateBucket"),
        ("PUT", "/b", {"versioning": ""}, {}, b"", "PutBucketVersioning"),
        ("POST", "/b/k", {"uploads": ""}, {}, b"", "CreateMultipartUpload"),
        ("POST", "/b/k", {"uploadId": "u"}, {}, b"", "CompleteMultipartUpload"),
        ("POST", "/b", {"delete": ""}, {}, b"", "DeleteObjects"),
        ("DELETE", "/b/k", {"uploadId": "u"}, {}, b"", "AbortMultipartUpload"),
        ("DELETE", "/b/k", {}, {}, b"", "DeleteObject"),
        ("DELETE", "/b", {}, {}, b"", "DeleteBucket"),
        ("HEAD", "/b", {}, {}, b"", "HeadBucket"),
        ("HEAD", "/b/k", {}, {}, b"", "HeadObject"),
        ("GET", "/b/k", {}, {}, b"", "GetObject"),
        ("GET", "/b/k", {"uploadId": "u"}, {}, b"", "ListParts"),
        ("GET", "/b", {"uploads": ""}, {}, b"", "ListMultipartUploads"),
        ("GET", "/b", {}, {}, b"", "ListObjects"),
        ("GET", "/b", {"list-type": "2", "prefix": "p/"}, {}, b"", "ListObjectsV2"),
        ("GET", "/b", {"location": ""}, {}, b"", "GetBucketLocation"),
        ("GET", "/", {}, {}, b"", "ListBuckets"),
        ("POST", "/", {}, {}, b"Action=AssumeRole&Version=2011-06-15&RoleArn=x", "AssumeRole"),
        ("POST", "/", {}, {}, b"Action=GetCallerIdentity&Version=2011-06-15", "GetCallerIdentity"),
        ("GET", "/", {"Action": "GetSessionToken"}, {}, b"", "GetSessionToken"),
        ("GET", "/moto-api/", {}, {}, b"", "MotoApi"),
        ("PATCH", "/b/k", {}, {}, b"", "Unknown"),
    ],
)
def test_classify(
    method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes, expected: str
) -> None:
    assert classify(method, path, query, headers, body) == expected


def test_slowdown_answers_503_without_forwarding(
    proxy: FaultProxy, proxied_s3: Any, fault_bucket: str, fault_moto: MotoServer
) -> None:
    rule = proxy.add_rule(Rule({"PutObject"}, "slowdown"))

    with pytest.raises(ClientError) as raised:
        proxied_s3.put_object(Bucket=fault_bucket, Key="k", Body=b"{}")

    assert raised.value.response["Error"]["Code"] == "SlowDown"
    assert raised.value.response["Error"]["Message"] == "Please reduce your request rate."
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert stored(fault_moto, fault_bucket, "k") is None
    assert proxy.log == [("PutObject", "PUT", f"/{fault_bucket}/k", 503)]
    assert rule.applied == 1
    # Other operations are untouched.
    proxied_s3.head_bucket(Bucket=fault_bucket)


def test_error500_after_applies_the_request_then_fails_it(
    proxy: FaultProxy, proxied_s3: Any, fault_bucket: str, fault_moto: MotoServer
) -> None:
    proxy.add_rule(Rule({"PutObject"}, "error500_after"))
    data = payload(MiB)

    with pytest.raises(ClientError) as raised:
        proxied_s3.put_object(Bucket=fault_bucket, Key="k", Body=data)

    assert raised.value.response["Error"]["Code"] == "InternalError"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    assert stored(fault_moto, fault_bucket, "k") == data
    assert proxy.log == [("PutObject", "PUT", f"/{fault_bucket}/k", 500)]


def test_reset_drops_the_connection_without_a_response(
    proxy: FaultProxy, proxied_s3: Any, fault_bucket: str, fault_moto: MotoServer
) -> None:
    proxy.add_rule(Rule({"PutObject"}, "reset"))

    with pytest.raises(ConnectionClosedError):
        proxied_s3.put_object(Bucket=fault_bucket, Key="k", Body=b"{}")

    assert stored(fault_moto, fault_bucket, "k") is None
    assert proxy.log == [("PutObject", "PUT", f"/{fault_bucket}/k", None)]
    # The client opens a new connection and carries on.
    proxied_s3.head_bucket(Bucket=fault_bucket)


def test_down_resets_every_request_until_cleared(proxy: FaultProxy, proxied_s3: Any, fault_bucket: str) -> None:
    proxy.add_rule(Rule(action="down"))
    sts = client(proxy.url, "sts")

    with pytest.raises(ConnectionClosedError):
        proxied_s3.head_bucket(Bucket=fault_bucket)
    with pytest.raises(ConnectionClosedError):
        proxied_s3.put_object(Bucket=fault_bucket, Key="k", Body=payload(MiB))
    with pytest.raises(ConnectionClosedError):
        sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName="faults")
    assert [status for *_, status in proxy.log] == [None, None, None]

    proxy.clear_rules()
    proxied_s3.head_bucket(Bucket=fault_bucket)
    sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName="faults")


def test_rules_reject_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="every request"):
        Rule({"PutObject"}, "down")
    with pytest.raises(ValueError, match="unknown action"):
        Rule(None, "explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive delay"):
        Rule(None, "delay")
    with pytest.raises(ValueError, match="probability"):
        Rule(None, "slowdown", probability=1.5)
    # A bare operation name is one operation, not a set of letters.
    assert Rule("UploadPart", "reset").operations == {"UploadPart"}  # type: ignore[arg-type]


def test_refuse_answers_an_s3_error_without_forwarding(
    proxy: FaultProxy, proxied_s3: Any, fault_bucket: str, fault_moto: MotoServer
) -> None:
    proxy.add_rule(Rule({"UploadPart"}, "refuse", status=403, code="AccessDenied"))
    upload = proxied_s3.create_multipart_upload(Bucket=fault_bucket, Key="k")["UploadId"]

    with pytest.raises(ClientError) as raised:
        proxied_s3.upload_part(Bucket=fault_bucket, Key="k", UploadId=upload, PartNumber=1, Body=b"part")

    assert raised.value.response["Error"]["Code"] == "AccessDenied"
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert (
        client(fault_moto.endpoint_url).list_parts(Bucket=fault_bucket, Key="k", UploadId=upload).get("Parts", []) == []
    )
    assert [operation for operation, *_ in proxy.log] == ["CreateMultipartUpload", "UploadPart"]


def test_refuse_answers_sts_in_the_query_error_shape(proxy: FaultProxy) -> None:
    message = "User is not authorized to perform: sts:AssumeRole"
    proxy.add_rule(Rule({"AssumeRole"}, "refuse", status=403, code="AccessDenied", message=message))
    sts = client(proxy.url, "sts")

    with pytest.raises(ClientError) as raised:
        sts.assume_role(RoleArn=ROLE_ARN, RoleSessionName="faults")

    assert raised.value.response["Error"] == {"Type": "Sender", "Code": "AccessDenied", "Message": message}
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert proxy.log == [("AssumeRole", "POST", "/", 403)]


def test_delay_then_forwards(proxy: FaultProxy, proxied_s3: Any, fault_bucket: str, fault_moto: MotoServer) -> None:
    rule = proxy.add_rule(Rule({"PutObject"}, "delay", delay=0.2))

    proxied_s3.put_object(Bucket=fault_bucket, Key="k", Body=b"{}")

    assert rule.applied == 1
    assert stored(fault_moto, fault_bucket, "k") == b"{}"
    assert proxy.log == [("PutObject", "PUT", f"/{fault_bucket}/k", 200)]


def test_delay_longer_than_the_read_timeout_times_the_client_out(proxy: FaultProxy, fault_bucket: str) -> None:
    proxy.add_rule(Rule({"HeadBucket"}, "delay", delay=2.0))
    impatient = client(proxy.url, read_timeout=0.3)

    with pytest.raises(ReadTimeoutError):
        impatient.head_bucket(Bucket=fault_bucket)


def test_truncate_cuts_the_body_after_the_real_headers(
    proxy: FaultProxy, proxied_s3: Any, fault_bucket: str, fault_moto: MotoServer
) -> None:
    data = payload(2 * MiB)
    client(fault_moto.endpoint_url).put_object(Bucket=fault_bucket, Key="k", Body=data)
    proxy.add_rule(Rule({"GetObject"}, "truncate", times=1))

    response = proxied_s3.get_object(Bucket=fault_bucket, Key="k")

    assert response["ContentLength"] == len(data)
    with pytest.raises((IncompleteReadError, ResponseStreamingError)):
        response["Body"].read()
    assert proxy.log == [("GetObject", "GET", f"/{fault_bucket}/k", 200)]
    # Only the one response was cut.
    assert proxied_s3.get_object(Bucket=fault_bucket, Key="k")["Body"].read() == data


def test_times_limits_how_often_a_rule_applies(proxy: FaultProxy, proxied_s3: Any, fault_bucket: str) -> None:
    rule = proxy.add_rule(Rule({"PutObject"}, "slowdown", times=2))

    outcomes = []
    for attempt in range(4):
        try:
            proxied_s3.put_object(Bucket=fault_bucket, Key=f"k{attempt}", Body=b"{}")
            outcomes.append("ok")
        except ClientError as error:
            outcomes.append(error.response["Error"]["Code"])

    assert outcomes == ["SlowDown", "SlowDown", "ok", "ok"]
    assert rule.applied == 2


def test_rules_are_tried_in_order(proxy: FaultProxy, proxied_s3: Any, fault_bucket: str) -> None:
    first = proxy.add_rule(Rule({"HeadBucket"}, "refuse", status=404, code="NoSuchBucket", times=1))
    second = proxy.add_rule(Rule(None, "slowdown", times=1))
    statuses = []
    for _ in range(3):
        try:
            proxied_s3.head_bucket(Bucket=fault_bucket)
            statuses.append(200)
        except ClientError as error:
            statuses.append(error.response["ResponseMetadata"]["HTTPStatusCode"])

    assert statuses == [404, 503, 200]
    assert (first.applied, second.applied) == (1, 1)
    assert proxy.rules == [first, second]


def _slowdown_pattern(proxy: FaultProxy, bucket: str, requests: int) -> list[bool]:
    s3 = client(proxy.url)
    pattern = []
    for _ in range(requests):
        try:
            s3.head_bucket(Bucket=bucket)
            pattern.append(False)
        except ClientError as error:
            assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            pattern.append(True)
    return pattern


def test_probability_is_seeded_and_reproducible(proxy: FaultProxy, fault_bucket: str, fault_moto: MotoServer) -> None:
    rule = proxy.add_rule(Rule({"HeadBucket"}, "slowdown", probability=0.5))

    pattern = _slowdown_pattern(proxy, fault_bucket, 40)

    assert 5 < sum(pattern) < 35
    assert rule.applied == sum(pattern)
    with FaultProxy(fault_moto.endpoint_url, seed=0) as twin:
        twin.add_rule(Rule({"HeadBucket"}, "slowdown", probability=0.5))
        assert _slowdown_pattern(twin, fault_bucket, 40) == pattern


def test_standard_retries_recover_from_two_slowdowns(
    proxy: FaultProxy, fault_bucket: str, fault_moto: MotoServer
) -> None:
    proxy.add_rule(Rule({"PutObject"}, "slowdown", times=2))

    client(proxy.url, attempts=3).put_object(Bucket=fault_bucket, Key="k", Body=b"{}")

    assert [status for *_, status in proxy.log] == [503, 503, 200]
    assert stored(fault_moto, fault_bucket, "k") == b"{}"


def test_standard_retries_give_up_when_attempts_run_out(proxy: FaultProxy, fault_bucket: str) -> None:
    proxy.add_rule(Rule({"PutObject"}, "slowdown", times=2))

    with pytest.raises(ClientError, match="SlowDown"):
        client(proxy.url, attempts=2).put_object(Bucket=fault_bucket, Key="k", Body=b"{}")

    assert proxy.count("PutObject") == 2


def test_botocore_max_attempts_counts_retries_not_attempts(proxy: FaultProxy, fault_bucket: str) -> None:
    # A trap worth pinning: Config(retries={"max_attempts": 1}) means one *retry*, so two requests.
    proxy.add_rule(Rule({"PutObject"}, "slowdown"))
    legacy = boto3.client(
        "s3",
        endpoint_url=proxy.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, s3={"addressing_style": "path"}),
    )

    with pytest.raises(ClientError, match="SlowDown"):
        legacy.put_object(Bucket=fault_bucket, Key="k", Body=b"{}")

    assert proxy.count("PutObject") == 2


def test_standard_retries_recover_from_resets_and_500s(
    proxy: FaultProxy, fault_bucket: str, fault_moto: MotoServer
) -> None:
    proxy.add_rule(Rule({"PutObject"}, "reset", times=1))
    proxy.add_rule(Rule({"PutObject"}, "error500_after", times=1))

    client(proxy.url, attempts=3).put_object(Bucket=fault_bucket, Key="k", Body=b"{}")

    assert [status for *_, status in proxy.log] == [None, 500, 200]
    assert stored(fault_moto, fault_bucket, "k") == b"{}"


def test_stop_closes_the_port_and_start_reopens_it(proxy: FaultProxy, proxied_s3: Any, fault_bucket: str) -> None:
    proxied_s3.head_bucket(Bucket=fault_bucket)
    url = proxy.url

    proxy.stop()

    with pytest.raises(EndpointConnectionError):
        proxied_s3.head_bucket(Bucket=fault_bucket)
    with pytest.raises(ConnectionRefusedError), socket.create_connection((proxy.host, proxy.port), timeout=5):
        pass

    proxy.start()
    assert proxy.url == url
    proxied_s3.head_bucket(Bucket=fault_bucket)


def test_rules_change_safely_under_concurrent_requests(
    proxy: FaultProxy, fault_bucket: str, fault_moto: MotoServer
) -> None:
    rules = [proxy.add_rule(Rule({"PutObject"}, "slowdown", probability=0.3))]
    s3 = client(proxy.url, max_pool_connections=16)

    def put(index: int) -> bool:
        try:
            s3.put_object(Bucket=fault_bucket, Key=f"k{index}", Body=payload(64 * 1024, index))
            return True
        except ClientError:
            return False

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(put, index) for index in range(48)]
        # Rules change while requests are in flight on the proxy's thread.
        for _ in range(10):
            rules.append(proxy.add_rule(Rule({"PutObject"}, "slowdown", probability=0.05)))
        succeeded = [future.result() for future in futures]
        proxy.clear_rules()
        assert all(pool.map(put, range(48, 64)))

    assert succeeded.count(False) == sum(rule.applied for rule in rules)
    assert proxy.count("PutObject") == 64
    listing = client(fault_moto.endpoint_url).list_objects_v2(Bucket=fault_bucket)
    assert listing["KeyCount"] == succeeded.count(True) + 16


def test_serves_async_clients_on_their_own_loop(proxy: FaultProxy, fault_bucket: str, fault_moto: MotoServer) -> None:
    big, tail = payload(8 * MiB + 5), b"tail"
    proxy.add_rule(Rule({"UploadPart"}, "reset", times=1))

    async def upload() -> None:
        config = Config(retries={"total_max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"})
        async with get_session().create_client(
            "s3",
            endpoint_url=proxy.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=config,
        ) as s3:
            upload_id = (await s3.create_multipart_upload(Bucket=fault_bucket, Key="big"))["UploadId"]
            parts = []
            for number, body in enumerate((big, tail), start=1):
                part = await s3.upload_part(
                    Bucket=fault_bucket, Key="big", UploadId=upload_id, PartNumber=number, Body=body
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
            await s3.complete_multipart_upload(
                Bucket=fault_bucket, Key="big", UploadId=upload_id, MultipartUpload={"Parts": parts}
            )

    asyncio.run(upload())

    assert stored(fault_moto, fault_bucket, "big") == big + tail
    assert [(operation, status) for operation, _, _, status in proxy.log] == [
        ("CreateMultipartUpload", 200),
        ("UploadPart", None),
        ("UploadPart", 200),
        ("UploadPart", 200),
        ("CompleteMultipartUpload", 200),
    ]
