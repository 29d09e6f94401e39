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
  tables (``_CONTAINERS``, ``_DETACHED``) are weak.
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
from typing import Iterator, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary

from .config import VeloraConfig  # noqa: F401 (the FX route's config type)

__all__ = ["Projection", "ProjectionState", "prepare", "attached", "container_of", "load_state", "find_owner",
           "projection_for", "projections", "watch_steps", "check_estimator", "CONTAINER"]  # fmt: skip

log = logging.getLogger(__name__)

#: The child module ``prepare`` attaches, and the prefix of every state key.
CONTAINER = "velora_fx"

_STATE_DTYPE = torch.float32


class Projection:
    """The projection state of one weight: its basis, whether it is calibrated, and its refresh step.

    ``basis`` is float32: VeLoRA's unit vector ``v`` of shape ``(d,)``, or a
    ``(d, r)`` basis. All zeros means "not calibrated yet". Weights that read
    one input share the projection of the first of them (NOTE [one basis per
    input] in ``velora_fx/runtime.py``): ``leader`` is then that weight's
    projection, and ``basis`` / ``step`` are the leader's.
    """

    def __init__(self, weight: str, field: str, basis: torch.Tensor, step: Optional[torch.Tensor] = None):
        self.weight = weight
        self.field = field  # "v" (VeLoRA) or "basis"
        self._basis = basis
        self._step = step  # training steps seen, for a refresh schedule (None: no schedule)
        self._steps = 0 if step is None else int(step)  # the same, as a Python int (no device sync per step)
        self._last_refresh: Optional[int] = None  # the step of the last refresh this process made
        self.leader: Optional[Projection] = None
        self._calibrated = bool(basis.ne(0).any())
        #: the estimator that made the basis, where the field does not say (``"basis"``: random, principal and
        #: principal_random); ``None`` for a basis loaded from a checkpoint that did not record it
        self.estimator: Optional[str] = None
        # NOTE [one step is one optimizer step]: set by the optimizer hook (``_on_optimizer_step``)
        self._optimized = False  # an optimizer steps this weight: count its steps, not the calls of its graphs
        self._stepped = False  # it stepped since the last count
        self._mark: Optional[int] = None  # per-call counting: the count before the first call since creation/load

    def __repr__(self) -> str:
        shared = f", shares {self.leader.weight}" if self.leader is not None else ""
        return f"Projection({self.weight}, {self.field}={tuple(self.basis.shape)}, calibrated={self.calibrated}{shared})"

    @property
    def root(self) -> "Projection":
        return self if self.leader is None else self.leader.root

    @property
    def basis(self) -> torch.Tensor:
        return self.root._basis

    @property
    def calibrated(self) -> bool:
        """Whether the basis (the leader's, for a weight sharing it) has been set from data, a seed or a checkpoint."""
        return self.root._calibrated

    @calibrated.setter
    def calibrated(self, value: bool) -> None:
        self._calibrated = value

    @property
    def step(self) -> Optional[torch.Tensor]:
        return self.root._step

    @property
    def steps(self) -> int:
        """Training steps counted for the refresh schedule (the leader's, for a weight sharing its basis)."""
        return self.root._steps

    @property
    def last_refresh(self) -> Optional[int]:
        """The step at which this process last refreshed the basis (``None``: never)."""
        return self.root._last_refresh

    @property
    def v(self) -> torch.Tensor:
        """VeLoRA's direction (the basis of shape ``(d,)``)."""
        return self.basis

    def set_basis(self, value: torch.Tensor) -> None:
        """Take a new basis (calibration, refresh) as a new tensor: a backward still pending from an earlier step
        keeps the basis its forward projected with."""
        root = self.root
        new = value.detach().to(root._basis.device, _STATE_DTYPE).contiguous()  # the layout graphs were built for
        root._basis = new.clone() if new is value else new
        root._calibrated = True

    def tick(self, every: int) -> Optional[int]:
        """One training call of a graph that reads this projection: a step (``advance``) if it is the first call
        since the optimizer stepped the weight, else nothing. See NOTE [one step is one optimizer step]."""
        root = self.root
        if root._optimized:
            if not root._stepped:
                return None  # the same step: another micro-batch, another graph, an eval forward with grad
            root._stepped = False
        elif root._mark is None:
            root._mark = root._steps
        return self.advance(every)

    def optimizer_stepped(self) -> None:
        root = self.root
        if not root._optimized and root._mark is not None:  # the calls of the first step count as one
            root._steps = root._mark + 1
            if root._step is not None:
                root._step.fill_(root._steps)
        root._optimized, root._stepped, root._mark = True, True, None

    def advance(self, every: int) -> Optional[int]:
        """Count one training step; the refresh index (1, 2, ...) when this step starts with a refresh, else None."""
        root = self.root
        due = every > 0 and root._steps > 0 and root._steps % every == 0
        root._steps += 1
        if root._step is None and every > 0:  # loaded from a run without a schedule: count from here on, and save it
            root._step = torch.zeros((), dtype=torch.int64, device=root._basis.device)
        if root._step is not None:
            root._step.fill_(root._steps)
        if due:
            root._last_refresh = root._steps - 1
            return (root._steps - 1) // every
        return None

    def graph_input(self, device: torch.device) -> torch.Tensor:
        """The basis as a compiled graph expects it: float32 on ``device`` (moved there for good if it is not)."""
        root = self.root
        if root._basis.device.type == "meta":  # made on the meta device (a model built there): start afresh
            root._basis = torch.zeros(root._basis.shape, dtype=_STATE_DTYPE, device=device)
            root._step = None if root._step is None else torch.zeros((), dtype=torch.int64, device=device)
            root._steps, root._calibrated = 0, False
        elif root._basis.device != device:
            root._basis = root._basis.to(device)
            if root._step is not None:
                root._step = root._step.to(device)
        return root._basis

    def share(self, leader: "Projection") -> None:
        """Use ``leader``'s state from now on (warn if this weight's own, loaded state differed)."""
        if leader.root is self.root:
            return
        mine, theirs = self._basis, leader.basis
        if self._calibrated and (mine.shape != theirs.shape or not torch.equal(mine.to(theirs.device), theirs)):
            log.warning(
                "velora_fx: the projection of %s differs from that of %s, whose input it shares; both weights use "
                "the latter (one basis per input)",
                self.weight,
                leader.weight,
            )
        self.leader = leader.root

    def _apply_device(self, device: torch.device) -> None:
        self._basis = self._basis.to(device)
        if self._step is not None:
            self._step = self._step.to(device)


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
        self._index: dict[int, tuple[weakref.ref, str]] = {}
        self.fx_inputs: dict[str, tuple] = {}  # FX route: per site, the input seen first (for the report)
        self.instance_records: list = []  # compile backend: what each compiled graph did to this model (the report)
        _CONTAINERS.add(self)

    def extra_repr(self) -> str:
        return f"{len(self._entries)} projections"

    def __deepcopy__(self, memo: dict) -> "ProjectionState":
        root = memo.get(id(self._root))
        if root is None:  # the container copied alone: it keeps describing the original model
            root = self._root
        copy = ProjectionState.__new__(ProjectionState)
        memo[id(self)] = copy
        nn.Module.__init__(copy)
        copy.config = self.config
        object.__setattr__(copy, "_root", root)
        copy._index = {}
        copy.fx_inputs = dict(self.fx_inputs)
        copy.instance_records = []  # what graphs did to the original, not to the copy
        entries = {name: Projection(name, e.field, e._basis.clone(), None if e._step is None else e._step.clone())
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
        state["_index"], state["instance_records"] = {}, []  # weak references: not picklable, rebuilt on use
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
        hit = self._index.get(id(param))
        if hit is not None and hit[0]() is param:
            return hit[1]
        self._index = {}
        for name, p in named_parameters(self._root):  # a tied parameter: its first name, as named_parameters() says
            self._index.setdefault(id(p), (weakref.ref(p), name))
        hit = self._index.get(id(param))
        return hit[1] if hit is not None and hit[0]() is param else None

    # -- projections ----------------------------------------------------------------------------------

    def __contains__(self, weight: str) -> bool:
        return weight in self._entries

    def __iter__(self) -> Iterator[Projection]:
        return iter(self._entries.values())

    def get(self, weight: str) -> Optional[Projection]:
        return self._entries.get(weight)

    def create(self, weight: str, field: str, basis: torch.Tensor, step: Optional[torch.Tensor],
               estimator: Optional[str] = None) -> Projection:  # fmt: skip
        entry = Projection(weight, field, basis.to(_STATE_DTYPE).contiguous(), step)
        entry.estimator = estimator
        self._entries[weight] = entry
        return entry

    # -- state_dict, load_state_dict, .to() -------------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # A weight sharing its leader's state is saved as a copy of it: safetensors (save_pretrained's default)
        # refuses entries that share storage.
        for name, e in self._entries.items():
            shared = e.leader is not None
            for field, value in ((e.field, e.basis), ("step", e.step)):
                if value is not None:
                    value = value if keep_vars else value.detach()
                    destination[f"{prefix}{name}.{field}"] = value.clone() if shared else value
            if e.field == "basis" and e.root.estimator is not None:  # the field alone does not say which made it
                destination[f"{prefix}{name}.estimator"] = _encode_name(e.root.estimator)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # fmt: skip
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
            made_by = _decode_name(fields["estimator"]) if "estimator" in fields else None
            mine = None if self.config is None else self.config.estimator_name  # the FX route knows its estimator now
            if made_by is not None and mine is not None and made_by != mine:
                error_msgs.append(
                    f"velora_fx: {prefix}{weight}.{field} was made by the estimator {made_by!r} (the checkpoint's "
                    f"{prefix}{weight}.estimator), but this GraphModule was transformed with {mine!r}; transform with "
                    f"estimator={made_by!r} to resume, or drop the velora_fx.* entries to start {mine!r} afresh."
                )
                continue
            entry = self._entries.get(weight)
            if entry is not None and (entry.field != field or entry._basis.shape != value.shape):
                error_msgs.append(
                    f"size mismatch for {prefix}{weight}.{field}: copying a param with shape {tuple(value.shape)} "
                    f"from checkpoint, the shape in current model is {tuple(entry._basis.shape)}."
                )
                continue
            basis = value.detach().to(_STATE_DTYPE).clone()
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
                self.create(weight, field, basis, step, made_by)
            elif entry.leader is not None:  # shares its leader's state: the checkpoint must agree with it
                shared.append((entry, basis))
            else:
                entry._basis = basis.to(entry._basis.device)
                entry._step = None if step is None else step.to(entry._basis.device)
                entry._steps = 0 if step is None else int(step)
                entry.calibrated = bool(basis.ne(0).any())
                entry.estimator = made_by
                entry._mark = None  # per-call counting folds from the loaded count
        for entry, basis in shared:
            entry._basis = basis
            entry.calibrated = bool(basis.ne(0).any())
            leader, entry.leader = entry.leader, None
            entry.share(leader)  # warns if the checkpoint's values differ from the leader's
        if strict:
            missing_keys.extend(
                f"{prefix}{name}.{e.field}" for name, e in self._entries.items() if name not in loaded
            )

    def _apply(self, fn, recurse=True):
        # See NOTE [the state model]: the state follows the model's device, never its dtype. Out of the meta
        # device (``to_empty``, the meta-device init of FSDP2 recipes) it starts afresh: uncalibrated, step 0 (a
        # checkpoint loaded next restores it).
        device = fn(torch.zeros((), dtype=_STATE_DTYPE)).device
        for e in self._entries.values():
            if e._basis.device.type == "meta" and device.type != "meta":
                e._basis = torch.zeros(e._basis.shape, dtype=_STATE_DTYPE, device=device)
                e._step = None if e._step is None else torch.zeros((), dtype=torch.int64, device=device)
                e._steps, e._calibrated = 0, False
            elif e._basis.device != device:
                e._apply_device(device)
        return self


def _encode_name(name: str) -> torch.Tensor:
    """An estimator's name as a state_dict entry: its ASCII bytes (safetensors and DCP store tensors only)."""
    return torch.tensor(list(name.encode("ascii")), dtype=torch.uint8)


def _decode_name(value: torch.Tensor) -> str:
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


# NOTE [one step is one optimizer step]
# A refresh schedule (``refresh_every``) and the quantized estimator's per-step draws count training steps. A step
# is an optimizer step of the weight: a global optimizer step post-hook marks the projections of the parameters the
# optimizer stepped, and the first graph call after the mark counts one step; further calls before the next mark
# (micro-batches of gradient accumulation, the other graph of a weight used on both sides of a graph break, an eval
# forward with grad) count nothing. Until an optimizer has stepped the weight (training without ``torch.optim``,
# or parameters the optimizer holds as other objects, e.g. FSDP2's shards), each call counts; at the first optimizer
# step the calls since creation or load are folded into one.

_PROJECTION_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> its projection, for the optimizer hook
_HOOK = None


def watch_steps(param: torch.Tensor, proj: "Projection") -> None:
    """Count ``proj``'s steps by the optimizer steps of ``param`` (NOTE [one step is one optimizer step])."""
    global _HOOK
    _PROJECTION_OF[param] = proj
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_on_optimizer_step)


def _on_optimizer_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _PROJECTION_OF:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            proj = _PROJECTION_OF.get(param)
            if proj is not None:
                proj.optimizer_stepped()


# -- the registry of prepared models and of the projections of unprepared ones ------------------------

_CONTAINERS: "weakref.WeakSet[ProjectionState]" = weakref.WeakSet()
_DETACHED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> Projection (models not prepared)
_warned_unprepared = False


def named_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``module.named_parameters()`` with the names of the model as written: ``torch.compile``'s ``_orig_mod.``
    segments (per-block compile) dropped, every alias of a tied parameter listed (its first name first)."""
    for name, p in module.named_parameters(remove_duplicate=False):
        yield strip_compiled(name), p


def strip_compiled(name: str) -> str:
    """A module path without ``torch.compile``'s ``_orig_mod`` segments (``layers.0._orig_mod.mlp`` -> ``layers.0.mlp``)."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


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
    if attached(getattr(model, "_orig_mod", model)) is None:
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
    result = getattr(model, "_orig_mod", model).load_state_dict(mine, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"velora_fx.load_state: unexpected keys {result.unexpected_keys[:5]}")
    return len(mine)


def container_of(model: nn.Module) -> Optional[ProjectionState]:
    """The ``ProjectionState`` of a prepared ``model`` (or of what ``torch.compile`` returned for it)."""
    return attached(getattr(model, "_orig_mod", model))


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
    for container in list(_CONTAINERS):
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
    entry = Projection(name, field, basis.to(_STATE_DTYPE).contiguous(), step)
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
    model = getattr(model, "_orig_mod", model)
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


# -- checkpoints written before the state model ------------------------------------------------------

_LEGACY_SUFFIX = "_velora_v"


def _translate_legacy_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs):  # fmt: skip
    """Read checkpoints of velora_fx 0.1: ``<weight>_velora_v`` buffers (backend) and ``velora_fx.<w_e_i_g_h_t>.v``
    (FX route, dots spelled as underscores) become ``velora_fx.<weight>.v``."""
    if attached(module) is None:
        return
    escaped = {_escape(name): name for name, _ in named_parameters(module)}
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
    import re

    return re.sub(r"\W", "_", name)
