"""The typed records a measurement produces and the reports read: what a child process hands back, pickled."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Cpu", "Diagnosis", "GcFigures", "Measurement", "Rss", "Stall", "WriteFigures"]


@dataclass(frozen=True)
class Stall:
    """How late the 1 ms ticker woke: the worst and 99th percentile lateness, ticks, ticks later than 10 ms."""

    worst_ms: float = 0.0
    p99_ms: float = 0.0
    ticks: int = 0
    over_10ms: int = 0


@dataclass(frozen=True)
class Rss:
    """Peak RSS growth over the measured region, the RSS it started from, and how the peak was found."""

    baseline_mb: float
    peak_growth_mb: float
    method: str


@dataclass(frozen=True)
class Cpu:
    """CPU seconds of the measuring process (user + system, and each) and of the S3 server (`None` if unknown)."""

    cpu_s: float
    user_s: float
    system_s: float
    server_cpu_s: float | None


@dataclass(frozen=True)
class GcFigures:
    """Garbage collections per generation over the region, and the longest of each in ms."""

    collections: tuple[int, int, int]
    longest_ms: tuple[float, float, float]


@dataclass(frozen=True)
class Diagnosis:
    """
    What the stall diagnoser saw while the loop was late (see :class:`benchmarks.probes.StallDiagnoser`).

    :param threshold_ms: Lateness from which a stall is examined.
    :param stalls: Stalls over the threshold.
    :param window_ms: Time the loop thread spent in them, split into ``on_cpu_ms`` (running callbacks),
        ``waiting_for_core_ms`` (runnable) and ``blocked_ms`` (asleep on the GIL).
    :param longest: The longest stalls: lateness in ms and, per thread, the first stack sampled.
    :param slow_callbacks: The slowest loop callbacks over the threshold: ms and description.
    :param slow_callback_count: All loop callbacks over the threshold.
    :param collections: Per generation, collections and the longest in ms.
    :param loop_frames: The loop thread's innermost frames over all samples, with counts.
    :param busy_frames: The busy threads' frames over all samples, with counts.
    """

    threshold_ms: float
    stalls: int
    window_ms: float
    on_cpu_ms: float
    waiting_for_core_ms: float
    blocked_ms: float
    longest: list[tuple[float, dict[str, list[str]]]]
    slow_callbacks: list[tuple[float, str]]
    slow_callback_count: int
    collections: dict[str, tuple[int, float]]
    loop_frames: list[tuple[str, int]]
    busy_frames: list[tuple[str, int]]


@dataclass(frozen=True)
class WriteFigures:
    """
    A run's figures from this project's own ``WriteResult`` objects, without the harness's clock.

    :param writes: Writes.
    :param seconds: The longest write's (for writes started together, the run's span).
    :param upload_seconds: The longest write's upload.
    :param encode_seconds: Summed over the writes; so are the rest.
    """

    writes: int
    seconds: float
    upload_seconds: float
    encode_seconds: float
    bytes: int
    features: int
    parts: int
    retries: int


@dataclass
class Measurement:
    """
    One measurement of one contender on one workload, in a process of its own.

    :param kind: ``warm`` (after warm-up writes), ``process`` (first write of a fresh process) or ``loop``
        (first write on a new event loop of a process that wrote on another).
    :param call_mode: How the measured loop calls the contender: ``await``, ``to_thread`` or ``direct``.
    :param seconds: The harness's clock around the writes (the peers report may take a WriteResult's instead:
        ``seconds_from`` says which, ``clock_seconds`` keeps the clock's).
    :param setup_seconds: Building the inputs, before the clock.
    :param verified: Whether S3 holds the objects and bytes reported (checked by the harness).
    """

    kind: str
    workload: str
    contender: str
    call_mode: str
    seconds: float
    bytes: int
    writes: int
    features: int
    setup_seconds: float
    stall: Stall
    rss: Rss
    cpu: Cpu
    gc: GcFigures
    diagnosis: Diagnosis | None = None
    write_figures: WriteFigures | None = None
    process_seconds: float = 0.0
    verified: bool = False
    repeat: int = 0
    seconds_from: str = "clock"
    clock_seconds: float = 0.0

    @property
    def cpu_ms_per_write(self) -> float:
        """The measuring process's CPU time per write, in ms."""
        return self.cpu.cpu_s / self.writes * 1e3
