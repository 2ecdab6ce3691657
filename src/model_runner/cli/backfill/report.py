"""The backfill's report: each file's outcome as it comes, the progress, and the summary line."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, TextIO

from tqdm import tqdm

from model_runner.cli.backfill.sources import Outcome

__all__ = ["Report"]


class Report:
    """
    Counts the outcomes, tells failures and dry-run plans as they come, and shows progress: a bar on a terminal, a
    line every ``seconds`` otherwise.

    :param files: The files of the job, failures found on the way included.
    :param total_bytes: Their bytes.
    :param out: Where dry-run plans go.
    :param err: Where failures and progress go.
    :param seconds: How often progress is told when ``err`` is not a terminal.
    """

    def __init__(self, files: int, total_bytes: int, out: TextIO, err: TextIO, seconds: float) -> None:
        self.counts: Counter[str] = Counter()
        self.files = files
        self._total_bytes = total_bytes
        self._bytes = 0
        self._out, self._err = out, err
        self._stopped = threading.Event()
        self._bar: tqdm[Any] | None = None
        if err.isatty():
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="backfill", file=err)
        else:
            threading.Thread(target=self._tick, args=(seconds,), name="backfill-progress", daemon=True).start()

    def __call__(self, outcome: Outcome) -> None:
        self.counts[outcome.status] += 1
        self._bytes += outcome.bytes
        if outcome.status == "failed":
            tqdm.write(f"failed {outcome.path}: {outcome.reason}", file=self._err)
        elif outcome.status == "planned":
            tqdm.write(f"would write {outcome.path} -> {outcome.key}", file=self._out)
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.done}/{self.files} files, {self.counts['failed']} failed", refresh=False)
            self._bar.update(outcome.bytes)

    @property
    def done(self) -> int:
        """
        Files done.

        :return: How many outcomes were reported.
        """
        return self.counts.total()

    def _tick(self, seconds: float) -> None:
        while not self._stopped.wait(seconds):
            print(
                f"backfill: {self.done}/{self.files} files, {self._bytes / 1e6:.1f}/{self._total_bytes / 1e6:.1f} MB, "
                f"{self.counts['failed']} failed",
                file=self._err,
                flush=True,
            )

    def close(self) -> None:
        """Stop showing progress."""
        self._stopped.set()
        if self._bar is not None:
            self._bar.close()

    def tell(self, message: str) -> None:
        """
        Tell something that is no file's outcome, such as an upload that could not be aborted.

        :param message: One line.
        """
        tqdm.write(message, file=self._err)

    def summary(self) -> str:
        """
        The summary line.

        :return: ``written W, skipped S, failed F``.
        """
        return self.summary_of(self.counts)

    @staticmethod
    def summary_of(counts: Counter[str]) -> str:
        """
        The summary line of some counts.

        :param counts: Files by status.
        :return: ``written W, skipped S, failed F``.
        """
        return f"written {counts['written']}, skipped {counts['skipped']}, failed {counts['failed']}"
