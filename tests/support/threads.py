"""Running the same work on several threads at once, as callers of a sync sink do."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_on_threads(work: Callable[[int], object], count: int) -> None:
    """
    Run ``work(0)`` ... ``work(count - 1)`` each on a thread of its own, all at once, and wait for them.

    :param work: What each thread does, given its number.
    :param count: How many threads.
    """
    threads = [threading.Thread(target=work, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
