"""Fixtures for fault-injection tests: a :class:`FaultProxy` in front of the session's moto server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from model_runner.cli.moto_server import MotoServer

from .proxy import FaultProxy


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
