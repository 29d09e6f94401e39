"""The plans of compiled graphs, kept next to Inductor's caches so that a cache hit still has its report.

On an FX-graph or AOTAutograd cache hit the joint-graph pass does not run,
so the backend would not know what the cached graph compresses. The pass's
plan (name-free: see ``passes/contract.py``) is written to a small JSON file
under Inductor's cache directory, keyed by the pass ``uuid`` and the graph,
and read back on a hit. Nothing is kept in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Optional, Sequence

import torch
import torch.fx

from velora_fx import _torch_internals as ti
from velora_fx.passes.contract import PlannedSite
from velora_fx.records import GraphSummary

__all__ = ["graph_key", "store", "load"]

log = logging.getLogger(__name__)


def graph_key(gm: torch.fx.GraphModule, examples: Sequence[Any], uuid: str) -> str:
    """What a compile's result depends on: the pass ``uuid``, the graph's code, and the inputs' shapes."""
    h = hashlib.sha256(uuid.encode())
    h.update(gm.code.encode())

    def dims(sizes) -> tuple:  # a symbol's name depends on what was compiled before: only say "symbolic"
        return tuple("sym" if ti.is_symbolic(s) else int(s) for s in sizes)

    for e in examples:
        if isinstance(e, torch.Tensor):
            h.update(f"{dims(e.shape)}|{dims(e.stride())}|{e.dtype}|{e.requires_grad}".encode())
        else:
            h.update(repr(e).encode())
    return h.hexdigest()[:40]


def _path(key: str) -> str:
    return os.path.join(ti.cache_dir(), "velora_fx", "plans", f"{key}.json")


def store(key: str, sites: Sequence[PlannedSite], summary: Optional[GraphSummary]) -> None:
    """Write the plan and the partition summary of the graph ``key`` (atomically); a failure is logged, never raised."""
    text = json.dumps({"sites": [dataclasses.asdict(s) for s in sites],
                       "summary": None if summary is None else summary.to_dict()})  # fmt: skip
    try:
        path = _path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # the report is a convenience; compiling must not fail for it
        log.debug("velora_fx: could not store the plan %s: %s", key, e)


def load(key: str) -> Optional[tuple[list[PlannedSite], Optional[GraphSummary]]]:
    """The plan and the partition summary stored for the graph ``key``, ``None`` if there are none. Only a compile
    where both passes ran stores an entry, so a ``None`` summary here means the graph has none (no descriptors)."""
    try:
        with open(_path(key)) as f:
            data = json.load(f)
        sites = [PlannedSite(**dict(s, related=tuple(s["related"]),
                                    input_shape=None if s["input_shape"] is None else tuple(s["input_shape"])))
                 for s in data["sites"]]  # fmt: skip
        return sites, None if data["summary"] is None else GraphSummary.from_dict(data["summary"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
