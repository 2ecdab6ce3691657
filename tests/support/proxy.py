"""
A fault-injecting HTTP reverse proxy to put between an AWS client and a moto server.

The proxy forwards every request to the upstream server unchanged and relays its answer, except where a :class:`Rule`
says otherwise: it can throttle, fail after the fact, reset the connection, refuse, delay or truncate, per AWS
operation, with a seeded random generator so flaky scenarios are reproducible. Faults are injected on the wire so the
client under test runs its real retry, timeout and streaming code, none of it patched.

The proxy runs its own event loop in a daemon thread, so synchronous tests, asynchronous tests on their own loop, and
libraries that keep a private loop thread can all share it.
"""

from __future__ import annotations

import asyncio
import http.client
import random
import re
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Literal, NamedTuple, get_args
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from aiohttp import web
from multidict import CIMultiDict

__all__ = ["Action", "Exchange", "FaultProxy", "Rule", "classify"]

Action = Literal["slowdown", "error500_after", "reset", "refuse", "delay", "truncate", "down"]
_ACTIONS = frozenset(get_args(Action))

# RFC 9110 section 7.6.1: meaningful for one connection only, so never relayed. Content-Length is recomputed from the
# body actually sent, and Expect is dropped because the proxy has already read the whole body when it forwards.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED = _HOP_BY_HOP | {"content-length", "expect"}
# moto's server sends two Server headers (Werkzeug's and its own); aiohttp clients in asyncio debug mode reject any
# repeat of these, so only the last of each is relayed.
_SINGLETONS = frozenset({"content-type", "date", "etag", "last-modified", "location", "server"})

_S3_BUCKET_SUBRESOURCES = {
    "acl": "Acl",
    "cors": "Cors",
    "encryption": "Encryption",
    "lifecycle": "LifecycleConfiguration",
    "location": "Location",
    "logging": "Logging",
    "notification": "NotificationConfiguration",
    "ownershipControls": "OwnershipControls",
    "policy": "Policy",
    "publicAccessBlock": "PublicAccessBlock",
    "replication": "Replication",
    "tagging": "Tagging",
    "versioning": "Versioning",
    "website": "Website",
}


# The operations whose bodies are object data, as opposed to small XML or form documents.
_OBJECT_DATA = frozenset({"PutObject", "UploadPart"})


class Exchange(NamedTuple):
    """One request seen by the proxy; compares equal to a plain ``(operation, method, path, status)`` tuple."""

    operation: str
    method: str
    path: str
    #: The status the client was sent, or ``None`` when the connection was cut before any status line.
    status: int | None


@dataclass
class Rule:
    """
    A fault to inject into the requests for some operations.

    :param operations: Operation names to match, such as ``{"UploadPart"}``; ``None`` matches every request.
    :param action: What to do with a matching request:

        - ``"slowdown"``: answer 503 ``SlowDown`` without forwarding;
        - ``"error500_after"``: forward, so the server applies the request, then answer 500 ``InternalError``;
        - ``"reset"``: read the request, then reset the connection without any response;
        - ``"refuse"``: answer ``status`` and ``code`` without forwarding;
        - ``"delay"``: wait ``delay`` seconds, then forward;
        - ``"truncate"``: forward, then send the real status and headers but only half the body, and close;
        - ``"down"``: reset every request, like an endpoint that accepts connections but is dead (``operations``
          must be ``None``); to close the port instead, use :meth:`FaultProxy.stop`.
    :param probability: Chance that a matching request gets the fault, drawn from the proxy's seeded generator.
    :param times: How many times at most the fault is applied; ``None`` for no limit.
    :param delay: Seconds to wait before carrying out any action.
    :param status: HTTP status for ``"refuse"``.
    :param code: Error code for ``"refuse"``.
    :param message: Error message for ``"refuse"``.
    """

    operations: set[str] | frozenset[str] | None = None
    action: Action = "reset"
    probability: float = 1.0
    times: int | None = None
    delay: float = 0.0
    status: int = 403
    code: str = "AccessDenied"
    message: str = "Access Denied"
    #: How many times the proxy has applied this rule.
    applied: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"unknown action {self.action!r}; expected one of {sorted(_ACTIONS)}")
        if self.action == "down" and self.operations is not None:
            raise ValueError('a "down" rule applies to every request: leave operations as None')
        if self.action == "delay" and self.delay <= 0:
            raise ValueError('a "delay" rule needs a positive delay')
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability}")
        if isinstance(self.operations, str):
            # {"UploadPart"} and "UploadPart" are easy to confuse; a bare string would match single letters.
            self.operations = frozenset({self.operations})


def classify(method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str], body: bytes) -> str:
    """
    Name the AWS operation of a path-style S3 request or of an AWS Query (STS) request.

    :param method: The HTTP method.
    :param path: The decoded URL path.
    :param query: The query parameters.
    :param headers: The request headers.
    :param body: The request body, where Query requests carry their ``Action``.
    :return: The operation name, such as ``"UploadPart"`` or ``"AssumeRole"``; ``"Unknown"`` if unrecognised.
    """
    if path.startswith("/moto-api"):
        return "MotoApi"
    action = query.get("Action")
    if action is None and method == "POST" and path == "/":
        action = next(iter(parse_qs(body.decode("utf-8", "replace")).get("Action", [])), None)
    if action:
        return action
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket:
        return "ListBuckets" if method == "GET" else "Unknown"
    if key:
        return _classify_object(method, query, headers)
    return _classify_bucket(method, query)


def _classify_object(method: str, query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    copy = "x-amz-copy-source" in {name.lower() for name in headers}
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "UploadPartCopy" if copy else "UploadPart"
        if "tagging" in query:
            return "PutObjectTagging"
        if "acl" in query:
            return "PutObjectAcl"
        return "CopyObject" if copy else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        if "restore" in query:
            return "RestoreObject"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteObjectTagging" if "tagging" in query else "DeleteObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "GET":
        if "uploadId" in query:
            return "ListParts"
        for name in ("tagging", "acl", "attributes"):
            if name in query:
                return f"GetObject{name.capitalize()}"
        return "GetObject"
    return "Unknown"


def _classify_bucket(method: str, query: Mapping[str, str]) -> str:
    subresource = next((_S3_BUCKET_SUBRESOURCES[name] for name in query if name in _S3_BUCKET_SUBRESOURCES), None)
    if method == "HEAD":
        return "HeadBucket"
    if method == "PUT":
        return f"PutBucket{subresource}" if subresource else "CreateBucket"
    if method == "DELETE":
        return f"DeleteBucket{subresource}" if subresource else "DeleteBucket"
    if method == "POST":
        return "DeleteObjects" if "delete" in query else "Unknown"
    if method == "GET":
        if "uploads" in query:
            return "ListMultipartUploads"
        if "versions" in query:
            return "ListObjectVersions"
        if subresource == "Location":
            return "GetBucketLocation"
        if subresource:
            return f"GetBucket{subresource}"
        return "ListObjectsV2" if query.get("list-type") == "2" else "ListObjects"
    return "Unknown"


class _Upstream(NamedTuple):
    status: int
    reason: str | None
    headers: CIMultiDict[str]
    body: bytes


class FaultProxy:
    """
    A reverse proxy on a free loopback port that forwards to ``upstream`` and injects the faults of its rules.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. Rules are tried in order for each request and
    the first that matches and fires is applied; rules and the log may be changed from any thread while it runs.

    :param upstream: Base URL of the real server, such as ``MotoServer.endpoint_url``.
    :param seed: Seed of the generator that draws rule probabilities.
    :param host: Address to listen on.
    :param sts_clock: When set, AssumeRole answers expire ``DurationSeconds`` after this clock's time rather than
        the server's: STS with a shifted clock, so tests can move time for both sides.
    """

    def __init__(
        self,
        upstream: str,
        *,
        seed: int | None = 0,
        host: str = "127.0.0.1",
        sts_clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.sts_clock = sts_clock
        self.upstream = upstream.rstrip("/")
        self.host = host
        #: The listening port; kept across :meth:`stop` and :meth:`start` so a restarted proxy is the same endpoint.
        self.port = 0
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rules: list[Rule] = []
        self._log: list[Exchange] = []
        self._query_bodies: list[tuple[str, bytes]] = []
        self._headers: list[tuple[str, CIMultiDict[str]]] = []
        self._in_flight: dict[str, int] = {}
        self._bytes_in_flight = 0
        #: The most requests of each operation that were in the proxy at once.
        self.peak_in_flight: dict[str, int] = {}
        #: The most object bytes (PutObject and UploadPart bodies together) that were in the proxy at once.
        self.peak_bytes_in_flight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._upstream_pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """
        :return: The proxy's base URL, to give clients as their endpoint.
        """
        if not self.port:
            raise RuntimeError("the proxy has never been started")
        return f"http://{self.host}:{self.port}"

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """
        Start listening, on the same port as before if the proxy was started and stopped already.

        :return: The proxy itself.
        :raises RuntimeError: If it is running already.
        """
        if self._thread is not None:
            raise RuntimeError("the proxy is running already")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,), name=f"FaultProxy->{self.upstream}", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self._open(), loop).result(timeout=30)
        except BaseException:
            self._halt_loop()
            raise
        return self

    def stop(self) -> None:
        """Close the port and every open connection; clients then get connection refused. Idempotent."""
        if self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=30)
        finally:
            self._halt_loop()

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # Handlers still held by a "delay" rule outlive aiohttp's shutdown timeout; end them as asyncio.run would.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _halt_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop = self._thread = None

    async def _open(self) -> None:
        # S3 parts can be 8 MiB and more; 0 lifts aiohttp's default 1 MiB body limit.
        app = web.Application(client_max_size=0)
        # The catch-all route, rather than a bare low-level server, is what answers "Expect: 100-continue", which
        # botocore sends with every PutObject and UploadPart and would otherwise wait a second for.
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown timeout: stop() must not wait for a request a "delay" rule is holding.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        # Enough threads that a client uploading many parts at once is not throttled by the proxy itself.
        self._upstream_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="FaultProxy-upstream")

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._upstream_pool is not None:
            # Not waiting: a request stuck upstream must not hold up stop().
            self._upstream_pool.shutdown(wait=False, cancel_futures=True)
            self._upstream_pool = None

    # -- rules and log --------------------------------------------------------------------------------------------

    def add_rule(self, rule: Rule) -> Rule:
        """
        Append a rule, tried after those already there.

        :param rule: The rule.
        :return: The same rule, whose :attr:`Rule.applied` counts its applications.
        """
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_rules(self) -> None:
        """Remove every rule, so requests pass through untouched."""
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        """
        :return: A copy of the rules, in order.
        """
        with self._lock:
            return list(self._rules)

    @property
    def log(self) -> list[Exchange]:
        """
        :return: A copy of the requests seen so far, in the order their answers were decided.
        """
        with self._lock:
            return list(self._log)

    def count(self, operation: str) -> int:
        """
        :param operation: An operation name, such as ``"UploadPart"``.
        :return: How many requests for it the proxy has seen, faulted or not.
        """
        with self._lock:
            return sum(1 for exchange in self._log if exchange.operation == operation)

    def accepted(self, operation: str) -> int:
        """
        :param operation: An operation name, such as ``"AbortMultipartUpload"``.
        :return: How many requests for it were answered with a 2xx status: a request retried after a fault counts
            once per attempt in :meth:`count`, once here if it succeeded.
        """
        with self._lock:
            return sum(
                1
                for exchange in self._log
                if exchange.operation == operation and exchange.status is not None and 200 <= exchange.status < 300
            )

    def header_values(self, name: str) -> list[tuple[str, str | None]]:
        """
        What each request so far carried in a header.

        :param name: The header, such as ``"x-amz-expected-bucket-owner"``.
        :return: ``(operation, value or None)`` for each request, oldest first.
        """
        with self._lock:
            return [(operation, headers.get(name)) for operation, headers in self._headers]

    def query_bodies(self, operation: str) -> list[bytes]:
        """
        The bodies relayed from upstream for a Query-protocol operation (STS...), to know what a client was told.

        :param operation: Operation name, such as ``"AssumeRole"``.
        :return: Response bodies, oldest first.
        """
        with self._lock:
            return [body for name, body in self._query_bodies if name == operation]

    def reset_log(self) -> None:
        """Forget the requests seen so far."""
        with self._lock:
            self._log.clear()
            self._headers.clear()

    def _choose(self, operation: str) -> Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.operations is not None and operation not in rule.operations:
                    continue
                if rule.times is not None and rule.applied >= rule.times:
                    continue
                # Draw only for partial probabilities, so adding a certain rule does not shift other draws.
                if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                    continue
                rule.applied += 1
                return rule
            return None

    # -- request handling -----------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        operation = classify(request.method, request.path, request.query, request.headers, body)
        with self._lock:
            self._in_flight[operation] = self._in_flight.get(operation, 0) + 1
            self.peak_in_flight[operation] = max(self.peak_in_flight.get(operation, 0), self._in_flight[operation])
            self._bytes_in_flight += len(body) if operation in _OBJECT_DATA else 0
            self.peak_bytes_in_flight = max(self.peak_bytes_in_flight, self._bytes_in_flight)
        try:
            return await self._answer(request, body, operation)
        finally:
            with self._lock:
                self._in_flight[operation] -= 1
                self._bytes_in_flight -= len(body) if operation in _OBJECT_DATA else 0

    async def _answer(self, request: web.Request, body: bytes, operation: str) -> web.StreamResponse:
        rule = self._choose(operation)
        action = rule.action if rule is not None else None
        if rule is not None and rule.delay > 0:
            await asyncio.sleep(rule.delay)
        # Each exchange is recorded before the client gets any answer, so a client that looks at the log as soon as
        # its call returns finds its request there.
        if action in ("reset", "down"):
            self._record(operation, request, None)
            return _cut(request, reset=True)
        # STS and the other Query services shape their errors differently from S3.
        query_protocol = _is_query_request(request, body)
        relayed = b""
        response: web.StreamResponse
        if action == "slowdown":
            response = _error(query_protocol, 503, "SlowDown", "Please reduce your request rate.")
        elif action == "refuse":
            assert rule is not None
            response = _error(query_protocol, rule.status, rule.code, rule.message)
        else:
            upstream = await self._forward(request, body)
            if action == "error500_after":
                message = "We encountered an internal error. Please try again."
                response = _error(query_protocol, 500, "InternalError", message)
            else:
                response, relayed = _relay_head(upstream), upstream.body
                if operation == "AssumeRole" and self.sts_clock is not None and upstream.status == 200:
                    relayed = _shift_expiration(relayed, body, self.sts_clock())
                    response.headers["Content-Length"] = str(len(relayed))
                if query_protocol:
                    with self._lock:
                        self._query_bodies.append((operation, relayed))
        self._record(operation, request, response.status)
        if action == "truncate":
            await response.prepare(request)
            await response.write(relayed[: len(relayed) // 2])
            return _cut(request, reset=False)
        if relayed:
            await response.prepare(request)
            await response.write(relayed)
        return response

    def _record(self, operation: str, request: web.Request, status: int | None) -> None:
        with self._lock:
            self._log.append(Exchange(operation, request.method, request.path, status))
            self._headers.append((operation, CIMultiDict(request.headers)))

    async def _forward(self, request: web.Request, body: bytes) -> _Upstream:
        assert self._upstream_pool is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
        has_body = bool(body) or "Content-Length" in request.headers or "Transfer-Encoding" in request.headers
        if has_body:
            headers.append(("Content-Length", str(len(body))))
        # The upstream leg uses http.client in threads, not aiohttp's client: in asyncio debug mode (PYTHONASYNCIODEBUG
        # or -X dev) aiohttp parses responses strictly and rejects moto's, which carry two Server headers.
        loop = asyncio.get_running_loop()
        call = (request.method, request.raw_path, headers, body if has_body else None)
        return await loop.run_in_executor(self._upstream_pool, self._exchange, *call)

    def _exchange(self, method: str, raw_path: str, headers: list[tuple[str, str]], body: bytes | None) -> _Upstream:
        target = urlsplit(self.upstream)
        factory = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
        connection = factory(target.netloc, timeout=120)
        try:
            # raw_path keeps the client's own percent-encoding, which its signature covers; Host is the client's too.
            connection.putrequest(method, target.path + raw_path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                connection.putheader(name, value)
            connection.endheaders(body)
            answer = connection.getresponse()
            return _Upstream(answer.status, answer.reason, CIMultiDict(answer.getheaders()), answer.read())
        except (OSError, http.client.HTTPException) as exc:
            text = f"FaultProxy could not reach {self.upstream}: {exc!r}"
            return _Upstream(502, "Bad Gateway", CIMultiDict({"Content-Type": "text/plain"}), text.encode())
        finally:
            connection.close()


def _shift_expiration(answer: bytes, request_body: bytes, now: datetime) -> bytes:
    duration = int(next(iter(parse_qs(request_body.decode()).get("DurationSeconds", [])), 3600))
    expiration = (now + timedelta(seconds=duration)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return re.sub(rb"<Expiration>[^<]*</Expiration>", f"<Expiration>{expiration}</Expiration>".encode(), answer)


def _is_query_request(request: web.Request, body: bytes) -> bool:
    return "Action" in request.query or (request.method == "POST" and request.path == "/" and b"Action=" in body)


def _relay_head(upstream: _Upstream) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in upstream.headers.items():
        if name.lower() in _SINGLETONS:
            response.headers[name] = value
        elif name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
            response.headers.add(name, value)
    # A HEAD answer declares the length of the body it does not send; keep the server's figure.
    declared = upstream.headers.get("Content-Length")
    response.content_length = int(declared) if declared is not None else len(upstream.body)
    return response


def _cut(request: web.Request, *, reset: bool) -> web.StreamResponse:
    """
    Drop the client's connection: with a TCP reset, or with an orderly close after what was written is flushed.

    :param request: The request whose connection to drop.
    :param reset: Whether to reset rather than close.
    :return: A response for aiohttp to fail to send, which it takes as a premature disconnection and stays quiet.
    """
    transport = request.transport
    if transport is not None:
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # Linger on, with a zero timeout, makes close() send RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
    return web.Response()


def _error(query_protocol: bool, status: int, code: str, message: str) -> web.Response:
    request_id = uuid.uuid4().hex.upper()
    if query_protocol:
        kind = "Sender" if status < 500 else "Receiver"
        xml = (
            '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            f"<Error><Type>{kind}</Type><Code>{escape(code)}</Code><Message>{escape(message)}</Message></Error>"
            f"<RequestId>{request_id}</RequestId></ErrorResponse>"
        )
        headers = {"x-amzn-RequestId": request_id}
    else:
        xml = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        )
        headers = {"x-amz-request-id": request_id}
    return web.Response(status=status, headers=headers, body=xml.encode(), content_type="application/xml")
