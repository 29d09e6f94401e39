"""Measurement helpers shared by the benchmarks: bytes kept for backward, interleaved step-time medians."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn


def import_compiler() -> None:
    """Import Inductor's ``compile_fx`` now, so that no compile time below includes importing it.

    ``torch.compile(model)`` (the default backend) imports it when called: outside the
    timed first step. A callable backend such as ``velora_fx.backend`` imports it in
    its first compile: inside it. Importing it up front, once per process, puts the
    two on the same footing (~2–4 s on this machine).
    """
    import torch._inductor.compile_fx  # noqa: F401


def saved_bytes(step_forward: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct non-parameter storages autograd keeps for backward while ``step_forward()`` runs.

    ``saved_tensors_hooks`` see compiled graphs too (AOTAutograd saves through
    autograd), so the eager, transformed and compiled routes are measured alike.
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step_forward()
    return sum(storages.values()), out


def interleaved_medians(steps: dict[str, Callable[[], None]], repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each step, the calls interleaved so drift hits all alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}
