"""Timing helpers shared by the benchmarks (not a benchmark itself)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def best_of(fn: Callable[[], T], rounds: int = 3) -> tuple[float, T]:
    """The fastest of ``rounds`` calls of ``fn`` (seconds) and the last call's result."""
    best = float("inf")
    out: T
    for _ in range(rounds):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out
