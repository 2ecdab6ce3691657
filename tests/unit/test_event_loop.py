"""The async tests run on the event loop that ``--event-loop`` names, so a uvloop run really tests uvloop."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


async def test_the_async_tests_run_on_the_chosen_event_loop(request: pytest.FixtureRequest) -> None:
    loop = asyncio.get_running_loop()
    if request.config.getoption("event_loop") == "uvloop":
        import uvloop

        assert isinstance(loop, uvloop.Loop)
    else:
        assert type(loop).__module__.startswith("asyncio.")
