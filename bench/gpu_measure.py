"""How bench/gpu.py's sections measure: device sync, interleaved timed rounds, ratios, peak device memory, release."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _best_rounds(paths: dict[str, Callable[[], Any]], device: str, repeats: int) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` rounds of each path, the paths interleaved within each round."""
    best = {name: math.inf for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            _sync(device)
            start = time.perf_counter()
            run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _ratio(project_rate: float, bare_rate: float) -> float:
    return project_rate / bare_rate if bare_rate > 0 else math.nan


def _release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _peak_memory_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
