"""Shared timing for the benchmarks: interleaved repeats, medians, ratios measured in one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(
    candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time in seconds of each candidate, running them in turn ``repeats`` times.

    Interleaving spreads slow drifts of the machine (other load, thermal state) over all candidates
    instead of charging them to whichever ran last.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
