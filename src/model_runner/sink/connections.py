"""
The HTTP session of the sinks' S3 clients: aiobotocore's, with its TLS context built off the event loop.

aiohttp's TLS context is where a new client spends most of its first request: aiobotocore 2.x builds it on the
event loop thread and loads the CA bundle into it (~25 ms, far more on a busy machine). Here it is built in a
worker thread (``load_verify_locations`` releases the GIL), once per process for each CA bundle and client
certificate, and every client of every event loop reuses it: OpenSSL contexts are safe to share between threads,
and aiohttp itself shares its default ones.

aiobotocore has no public hook for this: :class:`SharedTlsSession` overrides two private methods of
``AIOHTTPSession``, whose behaviour it otherwise keeps (``pyproject.toml`` pins the aiobotocore range it was
tested with). Whatever it does not handle it leaves to aiobotocore unchanged: ``verify=False``, proxies, and
``connector_args`` that bring their own TLS settings.
"""

from __future__ import annotations

# A TLS connection encodes the server's name with this codec, whose import on first use (~1 ms, with stringprep)
# would run on the event loop thread.
import encodings.idna  # noqa: F401
import os
import ssl
import threading
from typing import Any

import aiohttp
import anyio.to_thread
from aiobotocore.httpsession import AIOHTTPSession
from botocore.httpsession import create_urllib3_context, get_cert_path

__all__ = ["SharedTlsSession", "tls_context"]

# What makes two contexts the same: the CA bundle, the client certificate and its key.
_Files = tuple[str | None, str | None, str | None]

_lock = threading.Lock()
# Per set of files, the context and the files' identity when it was built: a file replaced on disk (a rotated
# CA bundle) gets a new context, as a new client did when each built its own.
_contexts: dict[_Files, tuple[tuple[tuple[int, int, int] | None, ...], ssl.SSLContext]] = {}
# connector_args that bring their own TLS settings, which aiobotocore passes to aiohttp beside its own.
_TLS_CONNECTOR_ARGS = frozenset({"ssl", "ssl_context", "verify_ssl", "fingerprint"})


def _identity(path: str | None) -> tuple[int, int, int] | None:
    if path is None:
        return None
    status = os.stat(path)
    return status.st_ino, status.st_size, status.st_mtime_ns


def tls_context(ca_bundle: str | None, cert_file: str | None = None, key_file: str | None = None) -> ssl.SSLContext:
    """
    The TLS context for these files, as aiobotocore builds it, made once per process and reused.

    Blocking (it reads the files): call it from a worker thread.

    :param ca_bundle: The CA bundle to verify servers with, or `None` for the system's default.
    :param cert_file: A client certificate to present, if any.
    :param key_file: The client certificate's private key, if not in ``cert_file``.
    :return: The shared context; do not change it.
    :raises OSError: If a file cannot be read.
    :raises ssl.SSLError: If a file holds no valid certificate or key.
    """
    files = (ca_bundle, cert_file, key_file)
    with _lock:
        identity = tuple(_identity(path) for path in files)
        cached = _contexts.get(files)
        if cached is not None and cached[0] == identity:
            return cached[1]
        # As AIOHTTPSession._create_connector builds it, without a proxy.
        context: ssl.SSLContext = create_urllib3_context()
        if cert_file:
            context.load_cert_chain(cert_file, key_file)
        if ca_bundle:
            context.load_verify_locations(ca_bundle, None, None)
        _contexts[files] = (identity, context)
        return context


class SharedTlsSession(AIOHTTPSession):
    """
    aiobotocore's aiohttp session, whose connections without a proxy use the shared context of :func:`tls_context`,
    built in a worker thread when the session first sends.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls_context: ssl.SSLContext | None = None

    def _shares_context(self, proxy_url: str | None) -> bool:
        verify: object = self._verify  # type: ignore[attr-defined]
        connector_args: dict[str, Any] = self._connector_args  # type: ignore[attr-defined]
        return not proxy_url and bool(verify) and not _TLS_CONNECTOR_ARGS.intersection(connector_args)

    async def _get_session(self, proxy_url: str | None) -> aiohttp.ClientSession:
        sessions: dict[str | None, aiohttp.ClientSession] = self._sessions  # type: ignore[attr-defined]
        if proxy_url not in sessions and self._tls_context is None and self._shares_context(proxy_url):
            verify, cert_file, key_file = self._verify, self._cert_file, self._key_file  # type: ignore[attr-defined]
            # certifi's where() may read its package's files on a first call: in the thread too.
            self._tls_context = await anyio.to_thread.run_sync(
                lambda: tls_context(get_cert_path(verify), cert_file, key_file)
            )
        session: aiohttp.ClientSession = await super()._get_session(proxy_url)  # type: ignore[misc]
        return session

    def _create_connector(self, proxy_url: str | None) -> aiohttp.TCPConnector:
        if self._tls_context is None or not self._shares_context(proxy_url):
            connector: aiohttp.TCPConnector = super()._create_connector(proxy_url)  # type: ignore[misc]
            return connector
        # As AIOHTTPSession._create_connector makes it, with the shared context.
        return aiohttp.TCPConnector(
            limit=self._max_pool_connections,  # type: ignore[attr-defined]
            ssl=self._tls_context,
            **self._connector_args,  # type: ignore[attr-defined]
        )
