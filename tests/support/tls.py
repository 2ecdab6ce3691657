"""A moto S3 server behind TLS with a certificate of a test CA, and an HTTP CONNECT proxy: for the TLS tests."""

from __future__ import annotations

import select
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import TracebackType

import trustme

__all__ = ["ConnectProxy", "TlsMotoServer"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TlsMotoServer:
    """
    moto's S3 server on ``https://127.0.0.1:<port>``, its certificate issued by a CA of its own.

    :param folder: Where the CA bundle (``ca.pem``) and the server's key and certificate are written.
    """

    def __init__(self, folder: Path) -> None:
        self.ca = trustme.CA()
        self.ca_bundle = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_bundle))
        issued = self.ca.issue_cert("127.0.0.1", "localhost")
        self._key, self._cert = folder / "server.key", folder / "server.pem"
        issued.private_key_pem.write_to_path(str(self._key))
        issued.cert_chain_pems[0].write_to_path(str(self._cert))
        for extra in issued.cert_chain_pems[1:]:
            extra.write_to_path(str(self._cert), append=True)
        self.port = _free_port()
        self.endpoint_url = f"https://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> TlsMotoServer:
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._process = subprocess.Popen(
            [*command, "--ssl-cert", str(self._cert), "--ssl-key", str(self._key)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        context = ssl.create_default_context(cafile=str(self.ca_bundle))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with status {self._process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=1, context=context):
                    return self
            except OSError:
                time.sleep(0.05)
        self.__exit__(None, None, None)
        raise RuntimeError(f"moto server did not answer on {self.endpoint_url}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(10)
            self._process = None


class _Tunnel(socketserver.BaseRequestHandler):
    server: _ProxyServer

    def handle(self) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.request.recv(4096)
            if not data:
                return
            head += data
        method, target, _ = head.split(b"\r\n", 1)[0].decode("ascii").split(" ", 2)
        if method != "CONNECT":
            self.request.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        host, port = target.rsplit(":", 1)
        self.server.targets.append(target)
        with socket.create_connection((host, int(port))) as upstream:
            self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            ends = [self.request, upstream]
            while True:
                readable, _, _ = select.select(ends, [], [], 30)
                if not readable:
                    return
                for end in readable:
                    data = end.recv(65536)
                    if not data:
                        return
                    (upstream if end is self.request else self.request).sendall(data)


class _ProxyServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Tunnel)
        self.targets: list[str] = []


class ConnectProxy:
    """An HTTP proxy that tunnels ``CONNECT host:port`` requests, and remembers their targets."""

    def __init__(self) -> None:
        self._server = _ProxyServer()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="connect-proxy", daemon=True)

    @property
    def targets(self) -> list[str]:
        """The ``host:port`` of every tunnel asked for."""
        return list(self._server.targets)

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
