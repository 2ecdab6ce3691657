"""Shared clients belong to their event loop: closed only when no call holds them, never outliving the loop,
which is let go of when it ends."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

import model_runner.sink as sink_package
from model_runner.cli.synthetic import synthetic_detections
from model_runner.sink import AsyncS3Sink, ClientSettings, clients

pytestmark = pytest.mark.timeout(120)

ROLE_ARN = "arn:aws:iam::123456789012:role/model-runner-writer"
FEATURES = list(synthetic_detections(20, seed=3))
SETTINGS = ClientSettings()


class FakeClient:
    """Stands for ``session.create_client(...)``: a client that tells whether it was closed, and when."""

    def __init__(self) -> None:
        self.closed = False
        self.closed_event = asyncio.Event()

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.closed = True
        self.closed_event.set()

    async def request(self) -> bool:
        """A request that takes a few turns of the loop, as a real one does.

        :return: Whether the client was open all along.
        """
        for _ in range(5):
            if self.closed:
                return False
            await asyncio.sleep(0)
        return not self.closed


@contextmanager
def leftovers(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """
    Collect what asyncio and aiohttp report about resources left open, once the garbage is collected.

    :return: The reports, filled when the block ends.
    """
    caplog.set_level(logging.ERROR, logger="asyncio")
    reports: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield reports
        # The tracebacks of records logged so far may hold a client: dropped, it is reported when collected.
        logged = [record.getMessage() for record in caplog.records]
        caplog.clear()
        gc.collect()
    reports.extend(str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning))
    logged += [record.getMessage() for record in caplog.records]
    reports.extend(
        message for message in logged if "Unclosed" in message or "was destroyed but it is pending" in message
    )


def alive(loops: list[weakref.ref[asyncio.AbstractEventLoop]]) -> int:
    gc.collect()
    return sum(reference() is not None for reference in loops)


# Server-free: the registry driven with a fake client.


def test_a_client_taken_as_its_idle_time_ends_is_not_closed_under_the_taker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clients, "IDLE_SECONDS", 0.05)
    made: list[FakeClient] = []

    def create() -> FakeClient:
        made.append(FakeClient())
        return made[-1]

    async def main() -> list[bool]:
        registry = clients.SharedClients()
        registry.release(await registry.acquire("key", create, SETTINGS))

        async def take_later() -> list[bool]:
            await asyncio.sleep(0.06)
            entry = await registry.acquire("key", create, SETTINGS)
            try:
                return [await entry.client.request() for _ in range(3)]
            finally:
                registry.release(entry)

        taker = asyncio.create_task(take_later())
        await asyncio.sleep(0.01)
        # The loop is held past both deadlines, so the idle timeout and the take fall due in the same turn.
        time.sleep(0.3)  # noqa: ASYNC251
        return await taker

    assert asyncio.run(main()) == [True, True, True]
    assert all(client.closed for client in made)


def test_an_unused_client_is_closed_after_its_idle_time_and_a_held_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(clients, "IDLE_SECONDS", 0.05)

    async def main() -> None:
        registry = clients.SharedClients()
        held = await registry.acquire("held", FakeClient, SETTINGS)
        unused = await registry.acquire("unused", FakeClient, SETTINGS)
        registry.release(unused)
        await asyncio.wait_for(unused.client.closed_event.wait(), 30)
        assert not held.client.closed
        again = await registry.acquire("unused", FakeClient, SETTINGS)
        assert again is not unused and not again.client.closed
        registry.release(again)
        registry.release(held)

    asyncio.run(main())


def test_the_end_of_the_loop_waits_for_a_cancelled_call_to_finish_with_its_client() -> None:
    seen: list[bool] = []
    client = FakeClient()
    writes: list[asyncio.Task[None]] = []

    async def write(registry: clients.SharedClients, started: asyncio.Event) -> None:
        entry = await registry.acquire("key", lambda: client, SETTINGS)
        try:
            started.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            # What a cancelled multipart write does: abort its upload through the client it holds.
            seen.append(await entry.client.request())
            raise
        finally:
            registry.release(entry)

    async def main() -> None:
        registry = clients.SharedClients()
        started = asyncio.Event()
        # A write left running as asyncio.run ends: its shutdown cancels the write and the registry together.
        writes.append(asyncio.create_task(write(registry, started)))
        await started.wait()

    asyncio.run(main())
    assert writes[0].cancelled()
    assert seen == [True]
    assert client.closed


def test_the_end_of_the_loop_waits_for_a_call_holding_a_client_only_so_long(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(clients, "CLOSE_WAIT_SECONDS", 0.1)
    client = FakeClient()

    async def main() -> None:
        registry = clients.SharedClients()
        # Taken and never given back, like a call stuck in a shielded request.
        await registry.acquire("key", lambda: client, SETTINGS)

    with caplog.at_level(logging.WARNING, logger="model_runner.sink.clients"):
        asyncio.run(main())
    assert client.closed
    assert any("held by 1 call(s)" in record.getMessage() for record in caplog.records)


def test_close_shared_clients_closes_them_and_lets_the_loop_go() -> None:
    client = FakeClient()

    async def use() -> None:
        registry = clients.SharedClients.of_running_loop()
        registry.release(await registry.acquire("key", lambda: client, SETTINGS))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(use())
        loop.run_until_complete(sink_package.close_shared_clients())
        assert client.closed
        assert loop not in clients._registries
    finally:
        loop.close()
    reference = weakref.ref(loop)
    del loop
    assert alive([reference]) == 0


def test_close_shared_clients_waits_for_the_calls_holding_a_client_even_those_starting_meanwhile() -> None:
    async def main() -> None:
        registry = clients.SharedClients.of_running_loop()
        first = await registry.acquire("first", FakeClient, SETTINGS)
        closing = asyncio.create_task(sink_package.close_shared_clients())
        await asyncio.sleep(0)
        # A call starting while the clients close still gets one, and the closing waits for it too.
        second = await registry.acquire("second", FakeClient, SETTINGS)
        registry.release(first)
        await asyncio.sleep(0.01)
        assert not closing.done()
        assert not first.client.closed and not second.client.closed
        registry.release(second)
        await asyncio.wait_for(closing, 30)
        assert first.client.closed and second.client.closed
        # Once closed, the loop's calls get new clients.
        again = clients.SharedClients.of_running_loop()
        assert again is not registry
        entry = await again.acquire("first", FakeClient, SETTINGS)
        assert not entry.client.closed
        again.release(entry)

    asyncio.run(main())


# With real clients, against the moto server.


def test_a_write_taking_the_client_as_its_idle_time_ends_leaves_no_session_open(
    bucket: str,
    stored_keys: Callable[[], list[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(clients, "IDLE_SECONDS", 0.05)

    async def main() -> None:
        sink = AsyncS3Sink(bucket, "race")
        assert await sink.write("first", FEATURES)

        async def write_later() -> bool:
            await asyncio.sleep(0.06)
            return await sink.write("second", FEATURES)

        writer = asyncio.create_task(write_later())
        await asyncio.sleep(0.01)
        # The loop is held past both deadlines, so the idle timeout and the second write fall due in one turn.
        time.sleep(0.3)  # noqa: ASYNC251
        assert await writer

    with leftovers(caplog) as reports:
        asyncio.run(main())
    assert reports == []
    assert stored_keys() == ["race/first.geojson", "race/second.geojson"]


@pytest.mark.parametrize("assumed_role", [None, ROLE_ARN], ids=["own-credentials", "assumed-role"])
def test_event_loops_that_ended_are_let_go_of(
    bucket: str, assumed_role: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def concurrent_writes(run: int) -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        sink = AsyncS3Sink(bucket, "loops", assumed_role)
        # Concurrent first writes wait for one another: the waits bind locks to the loop.
        stored = await asyncio.gather(*(sink.write(f"{run}-{index}", FEATURES) for index in range(4)))
        assert stored == [True] * 4

    with leftovers(caplog) as reports:
        for run in range(40):
            asyncio.run(concurrent_writes(run))
    assert reports == []
    assert alive(loops) == 0


def test_a_loop_closed_by_hand_after_close_shared_clients_leaves_nothing_open(
    bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def concurrent_writes() -> None:
        sink = AsyncS3Sink(bucket, "by-hand")
        assert await asyncio.gather(*(sink.write(f"scene-{index}", FEATURES) for index in range(4))) == [True] * 4

    with leftovers(caplog) as reports:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(concurrent_writes())
            loop.run_until_complete(sink_package.close_shared_clients())
        finally:
            loop.close()
        reference = weakref.ref(loop)
        del loop
    assert reports == []
    assert alive([reference]) == 0


def test_a_loop_closed_by_hand_without_the_call_is_let_go_of_when_another_loop_takes_a_client(
    bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def write(image_id: str) -> None:
        assert await AsyncS3Sink(bucket, "forgotten").write(image_id, FEATURES)

    with leftovers(caplog) as reports:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(write("first"))
        finally:
            loop.close()
        reference = weakref.ref(loop)
        del loop
        asyncio.run(write("second"))
    assert alive([reference]) == 0
    # Its client could not be closed any more: aiohttp says so, pointing at the missing call.
    assert any("Unclosed client session" in report for report in reports)
