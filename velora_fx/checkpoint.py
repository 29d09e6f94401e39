"""The state's checkpoint format: ``velora_fx.<weight>.<field>`` entries in and out of ``state_dict()``, the
estimator that made a basis, and the keys of velora_fx 0.1.

Fields: ``v`` (VeLoRA's direction), ``basis`` (a ``(d, r)`` basis; ``estimator`` then records which estimator made
it, as ASCII bytes: safetensors and DCP store tensors only), ``key`` (the quantized estimator's key of the step) and
``step`` (the step counter of a run with a schedule).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from .projection import CONTAINER, STATE_DTYPE, Projection

__all__ = ["check_estimator", "decode_name", "encode_name", "load_entries", "save_entries", "translate_legacy_keys"]


def save_entries(entries: dict[str, Projection], destination: dict, prefix: str, keep_vars: bool) -> None:
    """The entries of a prepared model's state as ``<prefix><weight>.<field>`` items of ``destination``."""
    # A weight sharing its leader's state is saved as a copy of it: safetensors (save_pretrained's default)
    # refuses entries that share storage.
    for name, e in entries.items():
        shared = e.leader is not None
        for field, value in ((e.field, e.basis), ("step", e.step)):
            if value is not None:
                value = value if keep_vars else value.detach()
                destination[f"{prefix}{name}.{field}"] = value.clone() if shared else value
        if e.field == "basis" and e.root.estimator is not None:  # the field alone does not say which made it
            destination[f"{prefix}{name}.estimator"] = encode_name(e.root.estimator)


def load_entries(container, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Load the ``<prefix>…`` items of ``state_dict`` into ``container`` (a ``ProjectionState``), creating the
    projections it does not have yet; every problem is a load error naming the key and the fix."""
    loaded: dict[str, dict[str, torch.Tensor]] = {}
    shared: list[tuple[Projection, torch.Tensor]] = []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        weight, _, field = key[len(prefix):].rpartition(".")
        if field not in ("v", "basis", "key", "step", "estimator") or not weight:
            unexpected_keys.append(key)
            continue
        loaded.setdefault(weight, {})[field] = value
    for weight, fields in loaded.items():
        field = next((f for f in ("v", "key", "basis") if f in fields), "basis")
        if field not in fields:
            unexpected_keys.extend(f"{prefix}{weight}.{f}" for f in fields)
            continue
        value, step = fields[field], fields.get("step")
        made_by = decode_name(fields["estimator"]) if "estimator" in fields else None
        mine = None if container.config is None else container.config.estimator_name  # the FX route knows its estimator now
        if made_by is not None and mine is not None and made_by != mine:
            error_msgs.append(
                f"velora_fx: {prefix}{weight}.{field} was made by the estimator {made_by!r} (the checkpoint's "
                f"{prefix}{weight}.estimator), but this GraphModule was transformed with {mine!r}; transform with "
                f"estimator={made_by!r} to resume, or drop the velora_fx.* entries to start {mine!r} afresh."
            )
            continue
        entry = container._entries.get(weight)
        if entry is not None and (entry.field != field or entry._basis.shape != value.shape):
            error_msgs.append(
                f"size mismatch for {prefix}{weight}.{field}: copying a param with shape {tuple(value.shape)} "
                f"from checkpoint, the shape in current model is {tuple(entry._basis.shape)}."
            )
            continue
        basis = value.detach().to(STATE_DTYPE).clone()
        if basis.device.type != "meta" and not bool(torch.isfinite(basis).all()):
            error_msgs.append(
                f"velora_fx: {prefix}{weight}.{field} holds NaN or inf; a weight gradient formed from it would be "
                "non-finite. Load a checkpoint written by a healthy run, or drop the velora_fx entries from it "
                "(they are recalibrated on the first batch)."
            )
            continue
        if field == "key" and basis.device.type != "meta" and not bool(basis.ne(0).all()):
            error_msgs.append(
                f"velora_fx: {prefix}{weight}.key is 0; the quantized estimator's keys are never 0 (a zero key "
                "would draw every step's rounding from one degenerate stream). Load a checkpoint written by "
                "velora_fx, or drop the velora_fx entries from it (the keys restart from the seed)."
            )
            continue
        step = None if step is None else step.detach().to(torch.int64).clone()
        if entry is None:
            container.create(weight, field, basis, step, made_by)
        elif entry.leader is not None:  # shares its leader's state: the checkpoint must agree with it
            shared.append((entry, basis))
        else:
            entry._basis = basis.to(entry._basis.device)
            entry._steps, entry._scheduled = (0, False) if step is None else (int(step), True)
            entry._calibrated = bool(basis.ne(0).any())
            entry.estimator = made_by
            entry._mark = None  # per-call counting folds from the loaded count
    for entry, basis in shared:
        entry._basis = basis
        entry._calibrated = bool(basis.ne(0).any())
        leader, entry.leader = entry.leader, None
        entry.share(leader)  # warns if the checkpoint's values differ from the leader's
    if strict:
        missing_keys.extend(
            f"{prefix}{name}.{e.field}" for name, e in container._entries.items() if name not in loaded
        )


def encode_name(name: str) -> torch.Tensor:
    """An estimator's name as a state_dict entry: its ASCII bytes (safetensors and DCP store tensors only)."""
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def decode_name(value: torch.Tensor) -> str:
    return bytes(value.to(torch.uint8).tolist()).decode("ascii", errors="replace")


def check_estimator(proj: Projection, estimator: str, key: str) -> None:
    """Refuse to train a basis that another estimator made (both keep a ``(d, r)`` basis: same field, same shape)."""
    made_by = proj.root.estimator
    if made_by is not None and made_by != estimator:
        raise ValueError(
            f"velora_fx: {key} was made by the estimator {made_by!r} (the checkpoint says so), but this config's "
            f"estimator is {estimator!r}; its basis would be trained as if {estimator!r} had made it. Compile with "
            f"estimator={made_by!r} to resume, or drop the velora_fx.* entries of that checkpoint to start {estimator!r} "
            "afresh (it calibrates on the first batch)."
        )
    proj.root.estimator = estimator


# -- checkpoints written before the state model ------------------------------------------------------

_LEGACY_SUFFIX = "_velora_v"


def translate_legacy_keys(weights: Iterable[str], state_dict: dict, prefix: str) -> None:
    """Read checkpoints of velora_fx 0.1 (in place): ``<weight>_velora_v`` buffers (backend) and
    ``velora_fx.<w_e_i_g_h_t>.v`` (FX route, dots spelled as underscores) become ``velora_fx.<weight>.v``;
    ``weights`` are the model's parameter names."""
    escaped = {_escape(name): name for name in weights}
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        new = None
        if rest.endswith(_LEGACY_SUFFIX) and not rest.startswith(f"{CONTAINER}."):
            new = f"{prefix}{CONTAINER}.{rest[: -len(_LEGACY_SUFFIX)]}.v"
        elif rest.startswith(f"{CONTAINER}.") and rest.endswith(".v"):
            middle = rest[len(CONTAINER) + 1 : -2]
            if "." not in middle and middle in escaped and middle != escaped[middle]:
                new = f"{prefix}{CONTAINER}.{escaped[middle]}.v"
        if new is not None and new not in state_dict:
            state_dict[new] = state_dict.pop(key)


def _escape(name: str) -> str:
    return re.sub(r"\W", "_", name)
