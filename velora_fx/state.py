"""Where velora_fx keeps the projection state of each weight, for both routes.

NOTE [the state model]
Every compressed weight has a *projection*: the basis its input is projected
on (VeLoRA's unit vector ``v``; the ``(d, r)`` basis of the other
estimators) and, for estimators refreshed on a schedule, a step counter.

* ``velora_fx.prepare(model)`` attaches one ``ProjectionState`` to the model
  as the attribute ``model.velora_fx``, not as a child module: the model's
  shape is unchanged (``len(seq)``, ``seq[-1]``, ``children()``,
  ``named_modules()`` and the wrapping policies that walk them see what they
  saw before). A state_dict post-hook and a load_state_dict pre-hook on the
  model carry it in and out of ``state_dict()``. (A ``GraphModule`` that
  ``velora_fx.transform`` rewrote is the exception: its graph reads the state
  with ``get_attr``, which needs a submodule to survive FX's pickling; a
  graph is not a container anyone iterates.) The state holds the
  projections of every weight of that model, keyed by the weight's ``named_parameters()`` name in the
  *prepared* model, so the name does not depend on how the model is later
  wrapped (DDP, FSDP2, per-block ``torch.compile``) or called. In
  ``model.state_dict()`` they appear as ``velora_fx.<weight name>.<field>``
  (``velora_fx.layers.0.mlp.down_proj.weight.v``), for both routes.
* Projections are created when a graph that compresses the weight is first
  compiled (their size depends on the contraction size ``D`` that only the
  graph knows). A fresh prepared model loads a checkpoint with the ordinary
  ``model.load_state_dict``: the container creates the projections it reads.
* The state is not a set of buffers: the container owns its tensors and
  keeps them float32 under every cast of the model (``.half()``,
  ``.to(torch.bfloat16)``, ``.double()``). It is not moved by ``.to()``
  either: a graph takes it to its own device the first time it runs there
  (``Projection.graph_input``), so ``model.to("meta")`` / ``to_empty`` leave
  it as it was. The compiled graphs are built for float32 state and are fed
  float32 state, so a cast model can never make a graph read state of the
  wrong dtype.
* Nothing here references the model strongly except the container's own
  back-reference to its root (a cycle that dies with the model). The global
  tables (``_CONTAINERS``, ``_DETACHED``, ``_OWNERS``: parameter -> its model's state and name, filled by
  ``prepare``) are weak.
* A model that was not prepared still trains: its projections live in a
  weak side table keyed by the parameter object (``_DETACHED``), outside any
  ``state_dict``, and die with the parameter. A checkpoint of such a model
  does not carry them; a resumed run recalibrates. A one-time warning says so.
"""

from __future__ import annotations

import json
import logging
import pathlib
import weakref
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from . import _torch_internals as ti
from .checkpoint import load_entries, save_entries, translate_legacy_keys
from .config import VeloraConfig
from .projection import CONTAINER, STATE_DTYPE, Projection

__all__ = [
    "CONTAINER",
    "Projection",
    "ProjectionState",
    "attached",
    "container_of",
    "find_owner",
    "load_state",
    "prepare",
    "projection_for",
    "projections",
]  # fmt: skip

log = logging.getLogger(__name__)


class ProjectionState(nn.Module):
    """The projections of every weight of one prepared model (``model.velora_fx``).

    Created by ``velora_fx.prepare`` (and by ``velora_fx.transform`` on the
    GraphModule it rewrites); see NOTE [the state model].
    """

    def __init__(self, root: nn.Module):
        super().__init__()
        self.config: Optional[VeloraConfig] = None  # the FX route's (set by velora_fx.transform); see prepare
        self._entries: dict[str, Projection] = {}
        object.__setattr__(self, "_root", root)  # not a submodule: a back-reference
        self.fx_inputs: dict[str, tuple] = {}  # FX route: per site, the input seen first (for the report)
        self.instance_records: list = []  # compile backend: what each compiled graph did to this model (the report)
        _CONTAINERS.add(self)

    def extra_repr(self) -> str:
        return f"{len(self._entries)} projections"

    def __deepcopy__(self, memo: dict) -> ProjectionState:
        root = memo.get(id(self._root))
        if root is None:  # the container copied alone: it keeps describing the original model
            root = self._root
        copy = ProjectionState.__new__(ProjectionState)
        memo[id(self)] = copy
        nn.Module.__init__(copy)
        copy.config = self.config
        object.__setattr__(copy, "_root", root)
        copy.fx_inputs = dict(self.fx_inputs)
        copy.instance_records = []  # what graphs did to the original, not to the copy
        entries = {name: Projection(name, e.field, e._basis.clone(), e._steps if e._scheduled else None)
                   for name, e in self._entries.items()}  # fmt: skip
        for name, e in self._entries.items():
            entries[name]._calibrated, entries[name]._last_refresh = e._calibrated, e._last_refresh
            if e.leader is not None:
                entries[name].leader = entries[e.leader.weight]
        copy._entries = entries
        copy.training = self.training
        _CONTAINERS.add(copy)
        return copy

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["instance_records"] = []  # weak references: not picklable, rebuilt on use
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        _CONTAINERS.add(self)

    # -- names ----------------------------------------------------------------------------------------

    @property
    def root(self) -> nn.Module:
        return self._root

    def name_of(self, param: torch.Tensor) -> Optional[str]:
        """The ``named_parameters()`` name of ``param`` in the prepared model, ``None`` if it is not one of its."""
        hit = _OWNERS.get(param)
        if hit is None or hit[0]() is not self:  # a parameter made since (to_empty, FSDP2, an adapter): look again
            self.index_names()
            hit = _OWNERS.get(param)
        return hit[1] if hit is not None and hit[0]() is self else None

    def index_names(self) -> None:
        """Enter every parameter of the prepared model in the weak map parameter -> (state, name) (``_OWNERS``)."""
        me, seen = weakref.ref(self), set()
        for name, p in named_parameters(self._root):  # a tied parameter: its first name, as named_parameters() says
            if id(p) not in seen:
                seen.add(id(p))
                _OWNERS[p] = (me, name)

    # -- projections ----------------------------------------------------------------------------------

    def __contains__(self, weight: str) -> bool:
        return weight in self._entries

    def __iter__(self) -> Iterator[Projection]:
        return iter(self._entries.values())

    def get(self, weight: str) -> Optional[Projection]:
        return self._entries.get(weight)

    def create(self, weight: str, field: str, basis: torch.Tensor, step: Optional[torch.Tensor],
               estimator: Optional[str] = None) -> Projection:  # fmt: skip
        entry = Projection(weight, field, basis.to(STATE_DTYPE).contiguous(), step)
        entry.estimator = estimator
        self._entries[weight] = entry
        return entry

    # -- state_dict, load_state_dict, .to() (the format: checkpoint.py) ---------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        save_entries(self._entries, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
        load_entries(self, state_dict, prefix, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # See NOTE [the state model]: the state follows the model's device, never its dtype. Out of the meta
        # device (``to_empty``, the meta-device init of FSDP2 recipes) it starts afresh: uncalibrated, step 0 (a
        # checkpoint loaded next restores it).
        device = fn(torch.zeros((), dtype=STATE_DTYPE)).device
        for e in self._entries.values():
            if e._basis.device.type == "meta" and device.type != "meta":
                e._basis = torch.zeros(e._basis.shape, dtype=STATE_DTYPE, device=device)
                e._steps, e._calibrated = 0, False
            elif e._basis.device != device:
                e._apply_device(device)
        return self


# -- the registry of prepared models and of the projections of unprepared ones ------------------------

_CONTAINERS: weakref.WeakSet[ProjectionState] = weakref.WeakSet()
_DETACHED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> Projection (models not prepared)
#: parameter -> (its prepared model's state, weakly; its name there): filled by ``prepare``, refreshed by ``name_of``
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
_warned_unprepared = False


def named_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``module.named_parameters()`` with the names of the model as written: ``torch.compile``'s ``_orig_mod.``
    segments (per-block compile) dropped, every alias of a tied parameter listed (its first name first)."""
    for name, p in module.named_parameters(remove_duplicate=False):
        yield strip_compiled(name), p


def strip_compiled(name: str) -> str:
    """A module path without ``torch.compile``'s ``_orig_mod`` segments (``layers.0._orig_mod.mlp`` -> ``layers.0.mlp``)."""
    return ".".join(part for part in name.split(".") if part != ti.COMPILED_SEGMENT)


def prepare(model: nn.Module) -> nn.Module:
    """Give ``model`` the state velora_fx keeps for it, so ``model.state_dict()`` carries it.

    Attaches a ``ProjectionState`` as ``model.velora_fx`` (NOTE [the state
    model]): the projection of each compressed weight is kept there under the
    weight's ``named_parameters()`` name, for the compile backend and for
    ``velora_fx.transform`` alike, and survives ``state_dict()`` /
    ``load_state_dict()``, ``copy.deepcopy``, ``torch.save(model)``, DDP,
    FSDP2 and per-block ``torch.compile``. Call it once, before wrapping the
    model (DDP, ``fully_shard``) and before loading a checkpoint into a fresh
    model. Preparing twice returns the model unchanged.

    What to compress and how is the backend's ``VeloraConfig``
    (``make_backend(config)``), not the model's: Dynamo keys a compiled graph
    on the backend it was compiled with, never on attributes of the model, so
    a config kept on the model could be silently ignored when Dynamo reuses a
    graph for another instance of the model's class.

    Args:
        model: the model to train, unchanged otherwise.

    Returns:
        ``model`` itself.

    Example::

        >>> model = velora_fx.prepare(MyModel())                                           # doctest: +SKIP
        >>> model.load_state_dict(torch.load("ckpt.pt"))   # a resumed run: the projections come back too  # doctest: +SKIP
        >>> compiled = torch.compile(model, backend=velora_fx.backend)                     # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"velora_fx.prepare takes an nn.Module, got {type(model).__name__}")
    if attached(model) is not None:
        return model
    if hasattr(model, CONTAINER):
        raise ValueError(
            f"velora_fx.prepare: {type(model).__name__} already has an attribute {CONTAINER!r}; velora_fx keeps "
            "its state under that name"
        )
    for name, p in named_parameters(model):
        owner = find_owner(p)
        if owner is not None and owner.root is not model:
            raise ValueError(
                f"velora_fx.prepare: parameter {name} already belongs to a prepared {type(owner.root).__name__} "
                f"(as {owner.name_of(p)}); prepare the outermost model you train, once"
            )
    model.register_load_state_dict_pre_hook(_translate_legacy_keys)  # before _load_state reads the keys
    state = ProjectionState(model)
    if isinstance(model, torch.fx.GraphModule):  # NOTE [the state model]: get_attr needs a submodule
        model.add_module(CONTAINER, state)
    else:
        object.__setattr__(model, CONTAINER, state)  # not nn.Module.__setattr__: no child module
        model.register_state_dict_post_hook(_save_state)
        model.register_load_state_dict_pre_hook(_load_state)
    state.index_names()
    return model


def attached(module: nn.Module) -> Optional[ProjectionState]:
    """The ``ProjectionState`` that ``prepare`` attached to ``module`` itself, ``None`` if none."""
    if not isinstance(module, nn.Module):
        return None
    found = module.__dict__.get(CONTAINER, module._modules.get(CONTAINER))
    return found if isinstance(found, ProjectionState) else None


def load_state(model: nn.Module, checkpoint) -> int:
    """Load the ``velora_fx.*`` entries of ``checkpoint`` into the prepared ``model``; the number loaded.

    For loaders that keep only the keys a fresh model lists (HF ``from_pretrained``: a prepared model lists its
    projections only once a graph has made them, so it reports them as unexpected and drops them).
    ``checkpoint``: a state dict, a ``.safetensors`` / ``torch.save`` file, or a ``save_pretrained`` directory
    (``model.safetensors``, its sharded index, or ``pytorch_model.bin``).

    Example::

        >>> model = velora_fx.prepare(MyLlama.from_pretrained(path))   # doctest: +SKIP
        >>> velora_fx.load_state(model, path)                           # doctest: +SKIP
    """
    if attached(ti.unwrap_optimized_module(model)) is None:
        raise ValueError(f"velora_fx.load_state: {type(model).__name__} is not prepared; velora_fx.prepare(model) first")
    if isinstance(checkpoint, dict):
        state = checkpoint
    else:
        path = pathlib.Path(checkpoint)
        if path.is_dir():
            index = path / "model.safetensors.index.json"
            files = (sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.exists()
                     else [f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.exists()][:1])  # fmt: skip
            if not files:
                raise FileNotFoundError(f"velora_fx.load_state: no model.safetensors or pytorch_model.bin in {path}")
        else:
            files = [path]
        state = {}
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f)))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
    mine = {k: v for k, v in state.items() if k.startswith(f"{CONTAINER}.")}
    result = ti.unwrap_optimized_module(model).load_state_dict(mine, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"velora_fx.load_state: unexpected keys {result.unexpected_keys[:5]}")
    return len(mine)


def container_of(model: nn.Module) -> Optional[ProjectionState]:
    """The ``ProjectionState`` of a prepared ``model`` (or of what ``torch.compile`` returned for it)."""
    return attached(ti.unwrap_optimized_module(model))


def _save_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``state_dict`` post-hook of a prepared model: its state under ``<prefix>velora_fx.``."""
    container = attached(module)
    if container is not None:
        container._save_to_state_dict(state_dict, f"{prefix}{CONTAINER}.", False)


def _load_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                error_msgs):  # fmt: skip
    """``load_state_dict`` pre-hook of a prepared model: takes the ``<prefix>velora_fx.`` entries out (the model
    has no child of that name to give them to) and loads them into its state."""
    container = attached(module)
    if container is None:
        return
    mine = f"{prefix}{CONTAINER}."
    taken = {key: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(mine)]}
    container._load_from_state_dict(taken, mine, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def find_owner(param: torch.Tensor) -> Optional[ProjectionState]:
    """The prepared model's state that ``param`` belongs to, ``None`` if no prepared model holds it."""
    hit = _OWNERS.get(param)
    owner = hit[0]() if hit is not None else None
    if owner is not None and owner.name_of(param) is not None:
        return owner
    for container in list(_CONTAINERS):  # a parameter made after prepare: the prepared models look again
        if container.name_of(param) is not None:
            return container
    return None


def projection_for(param: torch.Tensor, name: str, owner: Optional[ProjectionState]) -> Optional[Projection]:
    """The existing projection of ``param`` (named ``name`` in ``owner``, or unprepared), ``None`` if none yet."""
    if owner is not None:
        return owner.get(name)
    return _DETACHED.get(param)


def new_projection(param: torch.Tensor, name: str, owner: Optional[ProjectionState], field: str,
                   basis: torch.Tensor, step: Optional[torch.Tensor], estimator: Optional[str] = None) -> Projection:  # fmt: skip
    """Create the projection of ``param``: in its prepared model, or in the side table (and warn once)."""
    if owner is not None:
        return owner.create(name, field, basis, step, estimator)
    global _warned_unprepared
    if not _warned_unprepared:
        _warned_unprepared = True
        log.warning(
            "velora_fx: training weights of a model that velora_fx.prepare() was not called on (first: %s). "
            "Training is unaffected, but their projections are not part of model.state_dict(): a checkpoint does "
            "not carry them and a resumed run recalibrates. Call velora_fx.prepare(model) before training to keep "
            "them.",
            name,
        )
    entry = Projection(name, field, basis.to(STATE_DTYPE).contiguous(), step)
    entry.estimator = estimator
    _DETACHED[param] = entry
    return entry


def projections(model: nn.Module) -> dict[str, Projection]:
    """The projection of every weight of ``model`` that has one, by ``named_parameters()`` name.

    Works for prepared models (both routes) and for models compiled without
    ``prepare`` (their projections are found by parameter identity).

    Example::

        >>> {name: p.v for name, p in velora_fx.projections(model).items()}   # VeLoRA's directions  # doctest: +SKIP
    """
    model = ti.unwrap_optimized_module(model)
    out: dict[str, Projection] = {}
    for path, module in model.named_modules():
        container = attached(module)
        if container is not None:
            prefix = f"{strip_compiled(path)}." if strip_compiled(path) else ""
            for e in container:
                out[prefix + e.weight] = e
    for name, p in named_parameters(model):
        entry = _DETACHED.get(p)
        if entry is not None:
            out.setdefault(name, entry)
    return out


def _translate_legacy_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs):  # fmt: skip
    """``load_state_dict`` pre-hook of a prepared model: the keys of velora_fx 0.1 (``checkpoint.py``)."""
    if attached(module) is not None:
        translate_legacy_keys((name for name, _ in named_parameters(module)), state_dict, prefix)
