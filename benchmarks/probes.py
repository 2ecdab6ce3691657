"""What a measurement observes besides wall time: loop stalls, peak RSS growth, CPU time, GC, stall causes."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import sys
import threading
import time
import traceback
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchmarks.results import Cpu, Diagnosis, GcFigures, Rss, Stall

__all__ = ["CpuClock", "GcWatch", "LoopStallTicker", "PeakRss", "StallDiagnoser"]

MB = 1_000_000
# Frames of the standard library, as _short() prints them: "3.11/asyncio/...".
_STDLIB_FRAME = re.compile(r"^\d+\.\d+/")


class LoopStallTicker:
    """
    A coroutine in the measured loop that sleeps ``interval`` again and again and records how late it wakes.

    Lateness is time in which the loop could not run a ready callback: a sync call made on the loop, a long
    callback, or the loop thread waiting for the GIL or for a core.

    :param interval: The sleep between ticks, in seconds.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.lateness = array("d")
        self.last_tick = time.perf_counter()
        self._recording = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None

    async def start(self) -> None:
        """Start ticking; return after a few ticks, before any lateness is recorded."""
        self._stopped = asyncio.Event()
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0.01)
        self.lateness = array("d")
        self._recording = True

    async def stop(self) -> None:
        """Stop after one more tick, so that a stall that ends the measured region is recorded too."""
        assert self._task is not None and self._stopped is not None
        self._stopping = True
        await self._stopped.wait()
        await self._task

    async def _run(self) -> None:
        assert self._stopped is not None
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.last_tick = now
            if self._recording:
                self.lateness.append(now - started - self.interval)
            if self._stopping:
                self._recording = False
                self._stopped.set()
                return

    def summary(self) -> Stall:
        """
        The lateness figures of the recorded ticks.

        :return: The worst, the 99th percentile, the ticks and those later than 10 ms.
        """
        values = sorted(self.lateness)
        if not values:
            return Stall()
        return Stall(
            worst_ms=values[-1] * 1e3,
            p99_ms=values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3,
            ticks=len(values),
            over_10ms=sum(1 for value in values if value > 0.010),
        )


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise LookupError(field_name)


class PeakRss:
    """
    Peak RSS growth of this process over a region.

    Linux keeps the peak itself (``VmHWM``), and writing ``5`` to ``/proc/self/clear_refs`` resets it to the
    current RSS: the peak is then exact, however short, and no sampling thread competes with the measured loop
    for the GIL. Where that is not allowed, a thread samples RSS every 2 ms with psutil instead (and may miss
    short peaks).
    """

    def __init__(self) -> None:
        self.method = ""
        self.baseline = 0
        self._sampled_peak = 0
        self._sampling = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Take the baseline and reset the peak to it."""
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
                clear_refs.write("5")
            self.baseline = _status_kib("VmRSS") * 1024
            self.method = "VmHWM reset via /proc/self/clear_refs"
            return
        except (OSError, LookupError):
            pass
        self.method = "psutil sampling every 2 ms"
        process = psutil.Process()
        self.baseline = self._sampled_peak = process.memory_info().rss
        self._sampling = True

        def sample() -> None:
            while self._sampling:
                self._sampled_peak = max(self._sampled_peak, process.memory_info().rss)
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> Rss:
        """
        End the region.

        :return: The baseline, the peak growth and the method used.
        """
        if self._thread is not None:
            self._sampling = False
            self._thread.join()
            peak = self._sampled_peak
        else:
            peak = _status_kib("VmHWM") * 1024
        return Rss(self.baseline / MB, max(0, peak - self.baseline) / MB, self.method)


@dataclass
class CpuClock:
    """
    CPU time of this process (all its threads) over a region, and of another process, the S3 server, if given.

    :param other_pid: A process whose CPU time is measured too.
    """

    other_pid: int | None = None
    _start: os.times_result | None = None
    _process_start: float = 0.0
    _other: psutil.Process | None = None
    _other_start: float = 0.0

    def start(self) -> None:
        """Start the region."""
        if self.other_pid is not None:
            try:
                self._other = psutil.Process(self.other_pid)
                times = self._other.cpu_times()
                self._other_start = times.user + times.system
            except psutil.Error:
                self._other = None
        self._process_start = time.process_time()
        self._start = os.times()

    def stop(self) -> Cpu:
        """
        End the region.

        :return: This process's CPU time, and the server's (`None` without a server).
        """
        # process_time has nanosecond resolution; os.times, in 10 ms clock ticks, only splits user and system.
        total = time.process_time() - self._process_start
        end = os.times()
        assert self._start is not None
        user, system = end.user - self._start.user, end.system - self._start.system
        server: float | None = None
        if self._other is not None:
            try:
                times = self._other.cpu_times()
                server = times.user + times.system - self._other_start
            except psutil.Error:
                server = None
        return Cpu(total, user, system, server)


class GcWatch:
    """Collections by the garbage collector over a region, per generation, and the longest of each."""

    def __init__(self) -> None:
        self._before: list[int] = []
        self._started: float | None = None
        self.longest = [0.0, 0.0, 0.0]

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            generation = int(info["generation"])
            self.longest[generation] = max(self.longest[generation], time.perf_counter() - self._started)
            self._started = None

    def start(self) -> None:
        """Start the region."""
        self._before = [stats["collections"] for stats in gc.get_stats()]
        gc.callbacks.append(self._callback)

    def stop(self) -> GcFigures:
        """
        End the region.

        :return: Collections per generation and the longest of each.
        """
        gc.callbacks.remove(self._callback)
        after = [stats["collections"] for stats in gc.get_stats()]
        counts = [b - a for a, b in zip(self._before, after, strict=True)]
        longest = [seconds * 1e3 for seconds in self.longest]
        return GcFigures((counts[0], counts[1], counts[2]), (longest[0], longest[1], longest[2]))


# Innermost functions of a thread that is parked, not competing for the GIL.
_IDLE_FUNCTIONS = frozenset(
    {"wait", "select", "poll", "get", "sleep", "_wait_for_tstate_lock", "acquire", "accept"},
)


def _schedstat(native_id: int) -> tuple[float, float] | None:
    # Seconds a thread has run on a CPU, and waited runnable for one, as the scheduler counts them.
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", encoding="ascii") as stat:
            running, waiting, _ = stat.read().split()
    except (OSError, ValueError):
        return None
    return int(running) / 1e9, int(waiting) / 1e9


@dataclass
class _Episode:
    started: float
    lateness: float = 0.0
    samples: list[dict[str, list[str]]] = field(default_factory=list)
    sched_start: tuple[float, float, float] | None = None
    sched_end: tuple[float, float, float] | None = None


class StallDiagnoser:
    """
    Finds what the event loop was doing, or waiting for, when it stalled.

    Four views:

    1. A watchdog thread that, whenever the ticker is ``threshold`` seconds late, records the stacks of the
       loop thread and of every busy thread (``sys._current_frames``).
    2. The loop's callbacks that ran longer than ``threshold`` (``asyncio.Handle._run`` is timed).
    3. Garbage collections and their durations.
    4. The scheduler's account of the loop thread over each stall (``/proc/self/task/<tid>/schedstat``):
       time on a CPU (running callbacks), time runnable but waiting for a core, and the rest, blocked: asleep
       on the GIL while another thread holds it (the loop's timer was due: it was not waiting in epoll).

    The watchdog needs the GIL too: while a C call holds it, the watchdog samples only afterwards, when the
    loop thread has already moved on; the busy threads' stacks are then the better clue.

    :param ticker: The ticker of the measured loop.
    :param threshold: Lateness, in seconds, from which a stall is examined.
    """

    def __init__(self, ticker: LoopStallTicker, threshold: float = 0.004) -> None:
        self.ticker = ticker
        self.threshold = threshold
        self.episodes: list[_Episode] = []
        self.slow_callbacks: list[tuple[float, str]] = []
        self.collections: list[tuple[int, float]] = []
        self._running = False
        self._thread: threading.Thread | None = None
        self._loop_thread_id = threading.get_ident()
        self._loop_native_id = threading.get_native_id()
        self._original_run: Any = None
        self._gc_started: float | None = None

    def start(self) -> None:
        """Start watching; call from the loop thread."""
        self._loop_thread_id = threading.get_ident()
        self._loop_native_id = threading.get_native_id()
        self._running = True
        self._patch_handles()
        gc.callbacks.append(self._on_gc)
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._running = False
        if self._thread is not None:
            self._thread.join()
        gc.callbacks.remove(self._on_gc)
        if self._original_run is not None:
            asyncio.events.Handle._run = self._original_run  # type: ignore[method-assign]

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.collections.append((int(info["generation"]), time.perf_counter() - self._gc_started))
            self._gc_started = None

    def _patch_handles(self) -> None:
        original = self._original_run = asyncio.events.Handle._run
        slow = self.slow_callbacks
        threshold = self.threshold

        def timed_run(handle: asyncio.events.Handle) -> None:
            started = time.perf_counter()
            original(handle)
            seconds = time.perf_counter() - started
            if seconds > threshold:
                slow.append((seconds, _describe_handle(handle)))

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign, assignment]

    def _sched_sample(self) -> tuple[float, float, float] | None:
        stat = _schedstat(self._loop_native_id)
        return None if stat is None else (time.perf_counter(), *stat)

    def _watch(self) -> None:
        episode: _Episode | None = None
        expected = self.ticker.interval
        # The loop thread's scheduler figures of the last ~50 ms: a stall is seen only once it has lasted
        # ``threshold``, and its account must start where the stall began.
        recent: deque[tuple[float, float, float]] = deque(maxlen=100)
        while self._running:
            time.sleep(0.0005)
            sample = self._sched_sample()
            if sample is not None:
                recent.append(sample)
            last = self.ticker.last_tick
            late = time.perf_counter() - last - expected
            if episode is not None and (late < self.threshold or episode.started != last):
                episode.sched_end = sample
                episode = None
            if late < self.threshold:
                continue
            if episode is None:
                episode = _Episode(started=last)
                due = last + expected
                before = [item for item in recent if item[0] <= due]
                episode.sched_start = before[-1] if before else (recent[0] if recent else None)
                self.episodes.append(episode)
            episode.lateness = late
            if len(episode.samples) < 20:
                episode.samples.append(self._stacks())

    def _stacks(self) -> dict[str, list[str]]:
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        stacks: dict[str, list[str]] = {}
        for ident, frame in sys._current_frames().items():
            if ident == threading.get_ident():
                continue
            summary = traceback.extract_stack(frame, limit=12)
            if ident != self._loop_thread_id and (not summary or summary[-1].name in _IDLE_FUNCTIONS):
                continue
            label = "LOOP" if ident == self._loop_thread_id else names.get(ident, str(ident))
            stacks[label] = [f"{_short(entry.filename)}:{entry.lineno} {entry.name}" for entry in summary]
        return stacks

    def _scheduler_account(self) -> tuple[float, float, float]:
        window = running = waiting = 0.0
        for episode in self.episodes:
            if episode.sched_start is None or episode.sched_end is None:
                continue
            window += episode.sched_end[0] - episode.sched_start[0]
            running += episode.sched_end[1] - episode.sched_start[1]
            waiting += episode.sched_end[2] - episode.sched_start[2]
        return window * 1e3, running * 1e3, waiting * 1e3

    def report(self, top: int = 5) -> Diagnosis:
        """
        What was found.

        :param top: How many of the longest stalls, slow callbacks and frames to keep.
        :return: The findings.
        """
        busy: Counter[str] = Counter()
        loop_frames: Counter[str] = Counter()
        for episode in self.episodes:
            for sample in episode.samples:
                for label, stack in sample.items():
                    if not stack:
                        continue
                    if label == "LOOP":
                        loop_frames[_loop_frame(stack)] += 1
                    else:
                        busy[f"{label.split(' ')[0]}: {_first_own_frame(stack)}"] += 1
        longest = sorted(self.episodes, key=lambda episode: episode.lateness, reverse=True)[:top]
        durations: dict[int, list[float]] = {0: [], 1: [], 2: []}
        for generation, seconds in self.collections:
            durations[generation].append(seconds)
        window, running, waiting = self._scheduler_account()
        return Diagnosis(
            threshold_ms=self.threshold * 1e3,
            stalls=len(self.episodes),
            window_ms=window,
            on_cpu_ms=running,
            waiting_for_core_ms=waiting,
            blocked_ms=max(0.0, window - running - waiting),
            longest=[(e.lateness * 1e3, e.samples[0] if e.samples else {}) for e in longest],
            slow_callbacks=[(seconds * 1e3, name) for seconds, name in sorted(self.slow_callbacks, reverse=True)[:top]],
            slow_callback_count=len(self.slow_callbacks),
            collections={f"gen{g}": (len(d), max(d, default=0.0) * 1e3) for g, d in durations.items()},
            loop_frames=loop_frames.most_common(top),
            busy_frames=busy.most_common(top),
        )


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/src/", "/lib/python"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _loop_frame(stack: list[str]) -> str:
    if stack[-1].endswith(" select"):
        # No callback running: epoll has returned (the timer is due); the thread waits for the GIL or a core.
        return "select(): no callback running, waiting for the GIL or a core"
    return _first_own_frame(stack)


def _first_own_frame(stack: list[str]) -> str:
    # The innermost frame is often a stdlib helper: the innermost frame of the sink (or of the floor's code)
    # says more, else the innermost of a library (aiohttp, botocore...); the harness's own frames say nothing.
    for entry in reversed(stack):
        if "model_runner/" in entry or "benchmarks/contenders" in entry:
            return entry
    for entry in reversed(stack):
        if not _STDLIB_FRAME.match(entry) and "benchmarks/" not in entry:
            return entry
    return stack[-1]


def _describe_handle(handle: asyncio.events.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coroutine = owner.get_coro()
        name = getattr(coroutine, "__qualname__", repr(coroutine))
        frames = owner.get_stack(limit=1)
        where = f", now at {_short(frames[-1].f_code.co_filename)}:{frames[-1].f_lineno}" if frames else ""
        return f"task step {name}{where}"
    return repr(callback)[:160]
